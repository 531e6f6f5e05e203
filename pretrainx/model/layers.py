"""Building blocks of the decoder: RMSNorm, rotary embeddings, the SwiGLU MLP and the embedding.

Every parameter is declared with logical axis names; pretrainx.sharding maps them to mesh axes.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from pretrainx.config import ModelConfig
from pretrainx.config.model import ntk_theta
from pretrainx.model import kernels


def dense_init(in_axes: tuple[int, ...], out_axes: tuple[int, ...],
               batch_axes: tuple[int, ...] = ()):
  """Fan-in scaled truncated normal for an einsum kernel with the given input/output axes
  (batch_axes: independent kernels stacked, such as experts)."""
  return nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=in_axes,
                                          out_axis=out_axes, batch_axis=batch_axes)


PROJECTION = "projection"  # checkpoint name of project()'s written-out-gradient output
_NN = (((1,), (0,)), ((), ()))  # [m, k] x [k, n]
_NT = (((1,), (1,)), ((), ()))  # [m, k] x [n, k]
_TN = (((0,), (0,)), ((), ()))  # [k, m] x [k, n]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul(x2: jax.Array, w2: jax.Array, transposed: bool) -> jax.Array:
  """x2 [tokens, in] x w2 [in, out] (`transposed`: w2 is [out, in]) -> [tokens, out]."""
  return jax.lax.dot_general(x2, w2, _NT if transposed else _NN)


def _matmul_fwd(x2, w2, transposed):
  return _matmul(x2, w2, transposed), (x2, w2)


def _matmul_bwd(transposed, res, g):  # g: [tokens, out]
  x2, w2 = res
  dx = jax.lax.dot_general(g, w2, _NN if transposed else _NT)  # [tokens, in]
  # The weight gradient in the weight's own layout, [out, in] or [in, out]: a plain contraction
  # over tokens, with nothing to transpose before or after it.
  dw = jax.lax.dot_general(g, x2, _TN) if transposed else jax.lax.dot_general(x2, g, _TN)
  return dx.astype(x2.dtype), dw.astype(w2.dtype)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def project(x: jax.Array, w: jax.Array, contract: int = 1, transposed: bool = False
            ) -> jax.Array:
  """x [..., *in] times a kernel w [*in, *out] -> [..., *out], as one 2-D matmul
  [tokens, in] x [in, out] (`transposed`: w is [*out, *in], as a tied embedding table).

  `contract` is how many trailing dims of x the kernel's leading (trailing) dims contract. Same
  math as the einsum; the gradient is written out so that XLA:CPU needs no transposed copies:
  autodiff of an einsum with batch and seq free forms the weight gradient as g^T x followed by
  a transpose, and XLA:CPU then copies g and the gradient in transposed layout
  (bench/profile_step.py, issue 22). dw = x^T g is one contraction over tokens. The written-out
  gradient is used in the CPU-tuned graph only (kernels.cpu_tuned_graph; elsewhere a plain
  dot_general); its output is named PROJECTION for the remat policies that save dots.
  """
  lead, ins = x.shape[:x.ndim - contract], x.shape[x.ndim - contract:]
  size_in = math.prod(ins)
  outs = w.shape[:w.ndim - contract] if transposed else w.shape[contract:]
  w2 = w.reshape(-1, size_in) if transposed else w.reshape(size_in, -1)
  x2 = x.reshape(-1, size_in)
  if kernels.cpu_tuned_graph():
    # named, so that remat policies that save dots save this one too (transformer.py)
    y = checkpoint_name(_matmul(x2, w2, transposed), PROJECTION)
  else:  # TPU/GPU compilers need no help, and remat policies that save dots must see this one
    y = jax.lax.dot_general(x2, w2, _NT if transposed else _NN)
  return y.reshape(*lead, *outs)


def param_with_axes(module: nn.Module, name: str, init, shape: tuple[int, ...],
                    axes: tuple[str | None, ...], dtype) -> jax.Array:
  """Declares a parameter whose dimensions carry logical axis names."""
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def excess_kurtosis(x: jax.Array) -> jax.Array:
  """E[(x - mean)^4] / var^2 - 3 over all elements, in fp32 (0 for a Gaussian)."""
  x = x.astype(jnp.float32)
  centred = x - jnp.mean(x)
  var = jnp.mean(jnp.square(centred))
  return jnp.mean(jnp.square(jnp.square(centred))) / jnp.maximum(jnp.square(var), 1e-30) - 3.0


class RMSNorm(nn.Module):
  """Root-mean-square norm with a per-channel gain (or one scalar gain), computed in fp32."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:  # x: [..., embed]
    if self.cfg.norm_scale == "scalar":
      scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ()), (),
                         self.cfg.storage_dtype)
    else:
      scale = param_with_axes(self, "scale", nn.initializers.ones, (x.shape[-1],), ("embed",),
                              self.cfg.storage_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.cfg.norm_eps)
    return (y * scale.astype(jnp.float32)).astype(self.cfg.compute_dtype)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
  """YaRN's attention scale 0.1 * mscale * ln(scale) + 1 (1 for scale <= 1), as HF's."""
  return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_attention_factor(cfg: ModelConfig) -> float:
  """The factor cos and sin are multiplied by: 1, or YaRN's (cfg.rope_attention_factor, else
  HF's default from the scaling factor and rope_yarn_mscale / rope_yarn_mscale_all_dim)."""
  if cfg.rope_scaling != "yarn":
    return 1.0
  if cfg.rope_attention_factor is not None:
    return float(cfg.rope_attention_factor)
  factor, mscale, all_dim = (cfg.rope_scaling_factor, cfg.rope_yarn_mscale,
                             cfg.rope_yarn_mscale_all_dim)
  if mscale and all_dim:  # both set and non-zero, as HF reads them
    return _yarn_mscale(factor, mscale) / _yarn_mscale(factor, all_dim)
  return _yarn_mscale(factor)


def _yarn_inv_freq(cfg: ModelConfig, head_dim: int, plain: np.ndarray) -> np.ndarray:
  """HF _compute_yarn_parameters' inverse frequencies (float64): interpolated below the ramp,
  kept above it, a linear ramp over dims between the two correction dims."""
  base, orig = cfg.rope_theta, cfg.rope_original_max_len
  # the dim whose wavelength fits `rotations` times into the original context
  dim_of = lambda rotations: head_dim * math.log(orig / (rotations * 2 * math.pi)) / (
      2 * math.log(base))
  low, high = dim_of(cfg.rope_yarn_beta_fast), dim_of(cfg.rope_yarn_beta_slow)
  if cfg.rope_yarn_truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, head_dim - 1)
  if low == high:
    high += 0.001  # HF's guard against a zero-width ramp
  ramp = np.clip((np.arange(head_dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
  keep = 1 - ramp  # [head_dim/2]: 1 where the frequency is kept (extrapolated)
  return plain / cfg.rope_scaling_factor * (1 - keep) + plain * keep


def rope_frequencies(cfg: ModelConfig, head_dim: int) -> tuple[np.ndarray, float]:
  """(inverse frequencies [head_dim/2] fp32, attention factor) of cfg's rope_* fields.

  The one place RoPE's frequency math lives (Hugging Face modeling_rope_utils' formulas, in
  float64 and then rounded to fp32). 'dynamic' gives the frequencies up to
  rope_original_max_len (plain RoPE); rope_tables grows its base with the sequence.
  """
  kind, d = cfg.rope_scaling, head_dim
  # 'ntk' is plain RoPE at the base ModelConfig.rope_ntk_theta gives (exports write that base)
  theta = ntk_theta(cfg.rope_theta, cfg.rope_scaling_factor, d) if kind == "ntk" else (
      cfg.rope_theta)
  plain = 1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)  # [head_dim/2]
  freqs = plain
  if kind == "linear":
    freqs = plain / cfg.rope_scaling_factor
  elif kind == "yarn":
    freqs = _yarn_inv_freq(cfg, head_dim, plain)
  elif kind == "llama3":
    factor, original = cfg.rope_scaling_factor, cfg.rope_original_max_len
    low, high = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    wavelen = 2 * math.pi / plain
    scaled = np.where(wavelen > original / low, plain / factor, plain)
    smooth = (original / wavelen - low) / (high - low)  # 0 at the low-frequency edge, 1 at high
    medium = (1 - smooth) * scaled / factor + smooth * scaled
    freqs = np.where((wavelen <= original / low) & (wavelen >= original / high), medium, scaled)
  return freqs.astype(np.float32), rope_attention_factor(cfg)


def _dynamic_inv_freq(cfg: ModelConfig, head_dim: int, positions: jax.Array) -> jax.Array:
  """'dynamic' NTK frequencies [head_dim/2] for a pass whose length is max(positions) + 1 (a
  traced value), as HF's _compute_dynamic_ntk_parameters in fp32."""
  original, factor, d = cfg.rope_original_max_len, cfg.rope_scaling_factor, head_dim
  length = jnp.maximum(jnp.max(positions) + 1, original).astype(jnp.float32)
  base = cfg.rope_theta * (factor * length / original - (factor - 1)) ** (d / (d - 2))
  return 1.0 / base ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d)


def rope_tables(cfg: ModelConfig, positions: jax.Array, head_dim: int
                ) -> tuple[jax.Array, jax.Array]:
  """(sin, cos) [batch, seq, 1, head_dim/2] (fp32) of cfg's RoPE at integer `positions`
  [batch, seq], both multiplied by the attention factor (YaRN's temperature; 1 otherwise)."""
  freqs, attention_factor = rope_frequencies(cfg, head_dim)  # [head_dim/2]
  freqs = _dynamic_inv_freq(cfg, head_dim, positions) if cfg.rope_scaling == "dynamic" else (
      jnp.asarray(freqs))
  angles = positions.astype(jnp.float32)[:, :, None, None] * freqs  # [batch, seq, 1, head_dim/2]
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  if attention_factor != 1.0:
    sin, cos = sin * attention_factor, cos * attention_factor
  return sin, cos


def _computed_once(table: jax.Array) -> jax.Array:
  """table [batch, seq, ...] read back through a gather of its own rows along seq (the identity).

  XLA:CPU fuses RoPE's sin and cos into the rotation's loop, computing each once per head, half
  and pass (forward and backward); it never fuses into a gather's operand, so the table is then
  written once. A q rotation's forward and backward at the quickstart's shapes: 3.5 -> 0.9 ms
  (bench/RESULTS.md, issue 22). Gathering along seq keeps the batch dim, the data-parallel one,
  a passthrough dim that stays on its shard.
  """
  return jnp.take(table, jnp.arange(table.shape[1]), axis=1)


def apply_rope(x: jax.Array, positions: jax.Array, cfg: ModelConfig) -> jax.Array:
  """Rotary position embedding in the rotate-half layout (as Hugging Face Llama stores q/k).

  Args:
    x: [batch, seq, heads, head_dim]
    positions: [batch, seq] integer positions.
    cfg: the model config; its rope_* fields choose the frequencies (rope_tables).
  """
  sin, cos = rope_tables(cfg, positions, x.shape[-1])  # [batch, seq, 1, head_dim/2]
  if kernels.cpu_tuned_graph():
    sin, cos = _computed_once(sin), _computed_once(cos)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


class SwiGLU(nn.Module):
  """down(silu(gate(x)) * up(x))."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:  # x: [batch, seq, embed]
    cfg = self.cfg
    shape_in, shape_out = (cfg.embed_dim, cfg.mlp_dim), (cfg.mlp_dim, cfg.embed_dim)
    init = dense_init((0,), (1,))
    w_gate = param_with_axes(self, "gate_proj", init, shape_in, ("embed", "mlp"), cfg.storage_dtype)
    w_up = param_with_axes(self, "up_proj", init, shape_in, ("embed", "mlp"), cfg.storage_dtype)
    w_down = param_with_axes(self, "down_proj", init, shape_out, ("mlp", "embed"), cfg.storage_dtype)
    dt = cfg.compute_dtype
    gate = project(x, w_gate.astype(dt))  # [batch, seq, mlp]
    up = project(x, w_up.astype(dt))
    hidden = nn.with_logical_constraint(
        jax.nn.silu(gate) * up, ("activation_batch", "activation_length", "activation_mlp"))
    return project(hidden, w_down.astype(dt))  # [batch, seq, embed]


class Embedding(nn.Module):
  """Token embedding [vocab, embed] (vocab padded); `attend` gives tied output logits."""

  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    self.table = param_with_axes(self, "embedding", nn.initializers.normal(cfg.init_std),
                                 (cfg.padded_vocab_size, cfg.embed_dim), ("vocab", "embed"),
                                 cfg.storage_dtype)

  def __call__(self, tokens: jax.Array) -> jax.Array:  # tokens: [batch, seq] -> [b, s, embed]
    return jnp.take(self.table, tokens, axis=0).astype(self.cfg.compute_dtype)

  def attend(self, x: jax.Array) -> jax.Array:  # x: [batch, seq, embed] -> [b, s, vocab]
    return project(x, self.table.astype(self.cfg.compute_dtype), transposed=True)
