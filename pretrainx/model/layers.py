"""Building blocks of the decoder: RMSNorm, rotary embeddings, the SwiGLU MLP and the embedding.

Every parameter is declared with logical axis names; pretrainx.sharding maps them to mesh axes.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from pretrainx.config import ModelConfig


def dense_init(in_axes: tuple[int, ...], out_axes: tuple[int, ...],
               batch_axes: tuple[int, ...] = ()):
  """Fan-in scaled truncated normal for an einsum kernel with the given input/output axes
  (batch_axes: independent kernels stacked, such as experts)."""
  return nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=in_axes,
                                          out_axis=out_axes, batch_axis=batch_axes)


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


def rope_inv_freq(head_dim: int, theta: float,
                  llama3: tuple[float, float, float, int] | None = None) -> jax.Array:
  """RoPE inverse frequencies [head_dim/2] (fp32), optionally with Llama 3.1 scaling.

  llama3: (factor, low_freq_factor, high_freq_factor, original_max_len), as ModelConfig.rope_llama3
  gives: long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
  """
  freqs = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  if llama3 is None:
    return freqs
  factor, low, high, original = llama3
  wavelen = 2 * jnp.pi / freqs
  smooth = (original / wavelen - low) / (high - low)  # 0 at the low-frequency edge, 1 at high
  medium = (1.0 - smooth) * freqs / factor + smooth * freqs
  scaled = jnp.where(wavelen > original / low, freqs / factor, freqs)
  return jnp.where((wavelen <= original / low) & (wavelen >= original / high), medium, scaled)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float,
               llama3: tuple[float, float, float, int] | None = None) -> jax.Array:
  """Rotary position embedding in the rotate-half layout (as Hugging Face Llama stores q/k).

  Args:
    x: [batch, seq, heads, head_dim]
    positions: [batch, seq] integer positions.
    llama3: optional Llama 3.1 frequency scaling, see rope_inv_freq.
  """
  head_dim = x.shape[-1]
  freqs = rope_inv_freq(head_dim, theta, llama3)  # [head_dim/2]
  angles = positions.astype(jnp.float32)[:, :, None, None] * freqs  # [batch, seq, 1, head_dim/2]
  sin, cos = jnp.sin(angles), jnp.cos(angles)
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
    gate = jnp.einsum("bsd,dm->bsm", x, w_gate.astype(dt))
    up = jnp.einsum("bsd,dm->bsm", x, w_up.astype(dt))
    hidden = nn.with_logical_constraint(
        jax.nn.silu(gate) * up, ("activation_batch", "activation_length", "activation_mlp"))
    return jnp.einsum("bsm,md->bsd", hidden, w_down.astype(dt))


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
    return jnp.einsum("bsd,vd->bsv", x, self.table.astype(self.cfg.compute_dtype))
