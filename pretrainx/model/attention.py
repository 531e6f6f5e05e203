"""Grouped-query self-attention layer and the one dispatch point for attention implementations.

The layer projects, applies RoPE and calls `dot_product_attention(..., cfg=cfg)`, which picks
ATTENTION_IMPLS[cfg.attention_impl]:
  'reference'  materialised softmax (pallas_kernels.reference; in the CPU-tuned graph,
               kernels.cpu_tuned_graph, the same math with the hand-written backward of
               pallas_kernels.softmax_vjp, which runs a causal mask as query chunks that skip
               the blocks above the diagonal), prefix-LM masks included;
  'flash'      the blockwise Pallas kernel (pallas_kernels.flash_attention, imported lazily);
  'linear'     causal linear attention with a learned hedgehog (or fixed) feature map and optional
               per-head decay; packed documents reset the state at segment starts;
  'hybrid'     LoLCATs: sliding-window softmax plus linear attention for older keys.
Under context parallelism (MeshConfig.context > 1) both softmax impls run under shard_map with
each device's queries against the gathered keys, masked by natural-order token indices
(model.context_parallel); 'linear' and 'hybrid' are refused there.
Both softmax impls take `ModelConfig.sliding_window` (query i sees keys i - window < j <= i, as
Mistral; the flash kernels skip the key blocks wholly outside it), the KV-cache decoder too.
A Pallas kernel runs when the backend can lower it or `ModelConfig.kernel_interpret` is set;
otherwise the pure-JAX twin of the same computation runs, announced by ONE warning per process.
'hybrid' is pure JAX on every backend (no fallback). Decoding (`Attention(decode=True)`) keeps
per-layer state in the flax 'cache' collection: 'linear' and 'hybrid' a constant-size recurrent
state, 'reference' and 'flash' a KV cache of `cache_len` slots that every new query attends to in
pure JAX (fp32 softmax, grouped kv heads), skipping the slots marked invalid (left padding).
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from pallas_kernels import flash_attention as fa
from pallas_kernels import linear_attention as la
from pallas_kernels.hybrid_attention import hybrid_attention
from pallas_kernels.reference import MASK_VALUE, reference_attention
from pallas_kernels.softmax_vjp import softmax_attention
from pretrainx.model import context_parallel, kernels
from pretrainx.config import ModelConfig
from pretrainx.model.layers import apply_rope, dense_init, param_with_axes, project

_WARNED: set[tuple[str, ...]] = set()  # fallbacks already announced in this process


class LearnedAttention(NamedTuple):
  """Learned parameters of 'linear'/'hybrid' (None where the config does not use them)."""
  # hedgehog maps (W_q [heads, head_dim, F], W_k [kv_heads, head_dim, F])
  feature_params: tuple[jax.Array, jax.Array] | None = None
  decay: jax.Array | None = None  # gamma [heads] in (0, 1)
  window_factor: jax.Array | None = None  # f [heads] in (0, 1): weight of the softmax window


def _warn_once(key: tuple[str, ...], message: str) -> None:
  if key not in _WARNED:
    _WARNED.add(key)
    logging.warning(message)


def _warn_fallback(impl: str, used: str, reason: str | None = None) -> None:
  backend = jax.default_backend()
  reason = reason or (f"the {backend!r} backend cannot lower its Pallas kernel and "
                      "ModelConfig.kernel_interpret is False")
  _warn_once((impl, backend, used, reason), f"attention_impl={impl!r}: {reason}; using {used} instead "
             "(same results, different speed). This is reported once per process.")


# ----------------------------------------------------------------------------- implementations
# Each: fn(q, k, v, segment_ids, prefix_mask, cfg, learned) -> [batch, seq, heads, head_dim].


def _reference(q, k, v, segment_ids, prefix_mask, cfg, learned):
  del learned
  window = cfg.sliding_window
  if context_parallel.context_size() > 1:  # each device's queries against the gathered keys
    def kernel(q, k, v, seg, prefix, _, __, split):
      return reference_attention(q, k, v, causal=True, q_segment_ids=seg,
                                 kv_segment_ids=split.kv_segment_ids, prefix_mask=prefix,
                                 sliding_window=window, q_positions=split.q_positions,
                                 kv_positions=split.kv_positions)

    return kernels.shard_attention(kernel, q, k, v, segment_ids, prefix_mask,
                                   layout=_layout(q, cfg))
  if kernels.cpu_tuned_graph():  # the same math with a hand-written backward (fewer [q, k]
    return softmax_attention(q, k, v, segment_ids=segment_ids, prefix_mask=prefix_mask,  # passes)
                             sliding_window=window)
  # elsewhere plain autodiff, whose dots remat policies that save dots can see
  return reference_attention(q, k, v, causal=True, q_segment_ids=segment_ids,
                             kv_segment_ids=segment_ids, prefix_mask=prefix_mask,
                             sliding_window=window)


def _layout(q, cfg) -> np.ndarray:
  """The natural-order index of each position of q's (split) sequence."""
  return context_parallel.layout(q.shape[1], context_parallel.context_size(),
                                 cfg.context_load_balance)


def _flash(q, k, v, segment_ids, prefix_mask, cfg, learned):
  blocks = dict(block_q=cfg.flash_block_q, block_k=cfg.flash_block_k,
                sliding_window=cfg.sliding_window)
  backend = kernels.platform()
  pallas = cfg.kernel_interpret or fa.can_lower(backend)
  if not pallas:
    _warn_fallback("flash", "blockwise_attention_jax (pure JAX)")
  interpret = True if cfg.kernel_interpret else None
  attend = (functools.partial(fa.flash_attention, interpret=interpret, backend=backend)
            if pallas else fa.blockwise_attention_jax)

  def kernel(q, k, v, seg, prefix, _, __, split):  # one device's shard
    if split is None:
      return attend(q, k, v, causal=True, segment_ids=seg, prefix_mask=prefix, **blocks)
    return attend(q, k, v, causal=True, segment_ids=seg, kv_segment_ids=split.kv_segment_ids,
                  prefix_mask=prefix, q_positions=split.q_positions,
                  kv_positions=split.kv_positions, **blocks)

  if not pallas and context_parallel.context_size() == 1:  # pure JAX: GSPMD partitions it
    return kernel(q, k, v, segment_ids, prefix_mask, None, None, None)
  return kernels.shard_attention(kernel, q, k, v, segment_ids, prefix_mask,
                                 layout=_layout(q, cfg))


def _linear(q, k, v, segment_ids, prefix_mask, cfg, learned):
  del prefix_mask
  kw = dict(feature=cfg.linear_feature, chunk_size=cfg.linear_chunk)
  backend = kernels.platform()
  if cfg.kernel_interpret or fa.can_lower(backend):
    interpret = True if cfg.kernel_interpret else backend == "cpu"
    fp = learned.feature_params  # hedgehog (W_q [heads, ...], W_k [kv_heads, ...]) or one W
    w_q, w_k = fp if isinstance(fp, (tuple, list)) else (None, fp)

    def kernel(q, k, v, seg, _, head_params, kv_head_params, __):  # one device's shard
      (w_q, decay), w_k = head_params, kv_head_params
      return la.linear_attention(q, k, v, segment_ids=seg, interpret=interpret, decay=decay,
                                 backend=backend,
                                 feature_params=w_k if w_q is None else (w_q, w_k), **kw)

    return kernels.shard_attention(kernel, q, k, v, segment_ids, head_params=(w_q, learned.decay),
                                   kv_head_params=w_k)
  _warn_fallback("linear", "linear_attention_jax (pure JAX)")
  return la.linear_attention_jax(q, k, v, segment_ids=segment_ids, decay=learned.decay,
                                 feature_params=learned.feature_params, **kw)


def _hybrid(q, k, v, segment_ids, prefix_mask, cfg, learned):
  del prefix_mask
  return hybrid_attention(q, k, v, window=cfg.attention_window, feature=cfg.linear_feature,
                          feature_params=learned.feature_params, segment_ids=segment_ids,
                          window_factor=learned.window_factor, chunk_size=cfg.linear_chunk)


ATTENTION_IMPLS: dict[str, Callable[..., jax.Array]] = {
    "reference": _reference, "flash": _flash, "linear": _linear, "hybrid": _hybrid}


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                          segment_ids: jax.Array | None, *, prefix_mask: jax.Array | None = None,
                          cfg: ModelConfig | None = None, impl: str | None = None,
                          learned: LearnedAttention | None = None) -> jax.Array:
  """Causal attention within segments, by the named implementation.

  Args:
    q: [batch, seq, heads, head_dim]; k, v: [batch, seq, kv_heads, head_dim].
    segment_ids: [batch, seq] packed-document ids (each id one contiguous run), or None.
    prefix_mask: [batch, seq] bool, True on a bidirectional prefix ('reference'/'flash' only).
    cfg: options (impl, feature map, window, chunk, interpret, block sizes); default ModelConfig().
    impl: overrides cfg.attention_impl.
    learned: the layer's learned 'linear'/'hybrid' parameters (hedgehog maps need them).
  """
  cfg = ModelConfig() if cfg is None else cfg
  impl = cfg.attention_impl if impl is None else impl
  if impl not in ATTENTION_IMPLS:
    raise ValueError(
        f"unknown attention_impl {impl!r}; choose one of {', '.join(ATTENTION_IMPLS)}.")
  if prefix_mask is not None and impl in ("linear", "hybrid"):
    raise ValueError(f"prefix_mask (a bidirectional prefix, prefix-LM/UL2) is not supported by "
                     f"attention_impl={impl!r}, which is causal by construction; use 'reference' "
                     "or 'flash'.")
  context_parallel.check_split(q.shape[1], context_parallel.context_size(),
                               cfg.context_load_balance, (impl,))
  with jax.named_scope("attention_core"):  # names the core's ops in profiles (bench/profile_step)
    return ATTENTION_IMPLS[impl](q, k, v, segment_ids, prefix_mask, cfg,
                                 LearnedAttention() if learned is None else learned)


# ----------------------------------------------------------------------------- the layer


def _learned(module: nn.Module, cfg: ModelConfig) -> LearnedAttention:
  """Declares the 'linear'/'hybrid' parameters: hedgehog maps, decay, window factor."""
  if cfg.attention_impl not in ("linear", "hybrid"):
    return LearnedAttention()
  h, kvh, hd, f = cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim, cfg.linear_feature_dim
  pdt, feature_params, decay, window_factor = cfg.storage_dtype, None, None, None
  if cfg.linear_feature == "hedgehog":
    # Identity-like init (as LoLCATs): phi(x) = softmax([x, -x]) on the first F channels.
    eye = lambda _, shape, dtype: jnp.broadcast_to(jnp.eye(shape[1], shape[2], dtype=dtype), shape)
    w_q = param_with_axes(module, "feature_map", eye, (h, hd, f), ("heads", "head_dim", None), pdt)
    w_k = param_with_axes(module, "feature_map_k", eye, (kvh, hd, f),
                          ("kv_heads", "head_dim", None), pdt)
    feature_params = (w_q.astype(jnp.float32), w_k.astype(jnp.float32))
  if cfg.linear_decay:  # gamma = sigmoid(p), from 1 - 2**-5 to 1 - 2**-9 across heads (RetNet)
    def decay_init(_, shape, dtype):
      gamma = 1.0 - 2.0**-jnp.linspace(5.0, 9.0, shape[0])
      return jnp.log(gamma / (1.0 - gamma)).astype(dtype)
    decay = jax.nn.sigmoid(
        param_with_axes(module, "decay", decay_init, (h,), ("heads",), pdt).astype(jnp.float32))
  if cfg.attention_impl == "hybrid":  # f = sigmoid(p), 0.5 at init (LoLCATs)
    window_factor = jax.nn.sigmoid(param_with_axes(
        module, "window_factor", nn.initializers.zeros, (h,), ("heads",), pdt).astype(jnp.float32))
  return LearnedAttention(feature_params, decay, window_factor)


def _add_qkv_bias(module: nn.Module, cfg: ModelConfig, q, k, v):
  """Adds the q/k/v projection biases (Qwen2): q [heads, head_dim], k and v [kv_heads, head_dim]."""
  h, kvh, hd, pdt = cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim, cfg.storage_dtype
  zeros = nn.initializers.zeros
  b_q = param_with_axes(module, "q_bias", zeros, (h, hd), ("heads", "head_dim"), pdt)
  b_k = param_with_axes(module, "k_bias", zeros, (kvh, hd), ("kv_heads", "head_dim"), pdt)
  b_v = param_with_axes(module, "v_bias", zeros, (kvh, hd), ("kv_heads", "head_dim"), pdt)
  return q + b_q.astype(q.dtype), k + b_k.astype(k.dtype), v + b_v.astype(v.dtype)


class Attention(nn.Module):
  """Multi-head attention with grouped key/value heads and rotary positions.

  With `decode=True` the layer consumes the next tokens of one document per row, continuing from
  its 'cache' state (apply with mutable=['cache']). 'reference'/'flash' keep a KV cache of
  `cache_len` slots (0: cfg.max_seq_len): k_cache, v_cache [batch, cache_len, kv_heads, head_dim],
  valid [batch, cache_len] and the next slot `index`; each call writes its t tokens at slots
  [index, index + t), which must fit. Their segment_ids [batch, t] mark padding with 0 (stored as
  invalid, never attended; e.g. left padding of prompts of different lengths), any other id a real
  token. 'linear'/'hybrid' keep constant-size recurrent state and take no segment_ids.
  """

  cfg: ModelConfig
  decode: bool = False
  cache_len: int = 0

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None,
               prefix_mask: jax.Array | None = None) -> jax.Array:
    """x: [batch, seq, embed]; positions, segment_ids, prefix_mask: [batch, seq] -> like x."""
    cfg = self.cfg
    d, h, kvh, hd = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
    dt, pdt = cfg.compute_dtype, cfg.storage_dtype
    w_q = param_with_axes(self, "q_proj", dense_init((0,), (1, 2)), (d, h, hd),
                          ("embed", "heads", "head_dim"), pdt)
    w_k = param_with_axes(self, "k_proj", dense_init((0,), (1, 2)), (d, kvh, hd),
                          ("embed", "kv_heads", "head_dim"), pdt)
    w_v = param_with_axes(self, "v_proj", dense_init((0,), (1, 2)), (d, kvh, hd),
                          ("embed", "kv_heads", "head_dim"), pdt)
    w_o = param_with_axes(self, "o_proj", dense_init((0, 1), (2,)), (h, hd, d),
                          ("heads", "head_dim", "embed"), pdt)
    learned = _learned(self, cfg)

    q = project(x, w_q.astype(dt))  # [batch, seq, heads, head_dim]
    k = project(x, w_k.astype(dt))  # [batch, seq, kv_heads, head_dim]
    v = project(x, w_v.astype(dt))
    if cfg.qkv_bias:
      q, k, v = _add_qkv_bias(self, cfg, q, k, v)
    q = apply_rope(q, positions, cfg)  # cfg's rope_* fields, the decode path's too
    k = apply_rope(k, positions, cfg)
    axes_q = ("activation_batch", "activation_length", "activation_heads", None)
    axes_kv = ("activation_batch", "activation_length", "activation_kv_heads", None)
    q = nn.with_logical_constraint(q, axes_q)
    k = nn.with_logical_constraint(k, axes_kv)
    v = nn.with_logical_constraint(v, axes_kv)
    if self.decode:
      recurrent = cfg.attention_impl in ("linear", "hybrid")
      if prefix_mask is not None or (recurrent and segment_ids is not None):
        raise ValueError("decoding takes one document per row: pass segment_ids=None and "
                         "prefix_mask=None with decode=True.")
      if recurrent:
        out = _decode(self, q, k, v, cfg, learned)
      else:
        out = _kv_cache_decode(self, q, k, v, segment_ids, self.cache_len or cfg.max_seq_len, cfg)
    else:
      out = dot_product_attention(q, k, v, segment_ids, prefix_mask=prefix_mask, cfg=cfg,
                                  learned=learned)
    out = nn.with_logical_constraint(out, axes_q)
    return project(out, w_o.astype(dt), contract=2)  # [batch, seq, embed]


# ----------------------------------------------------------------------------- decoding


def _kv_cache_decode(module, q, k, v, segment_ids, cache_len, cfg):
  """Softmax attention of the new tokens against the KV cache, which they join.

  q [b, t, h, d], k/v [b, t, kvh, d]; segment_ids [b, t] (0: padding) or None -> [b, t, h, d].
  New query i sits at slot index + i and sees the valid slots s <= index + i (and, with
  cfg.sliding_window, s > index + i - sliding_window).
  """
  batch, t, heads, hd = q.shape
  kv_heads, dt = k.shape[2], cfg.compute_dtype
  if t > cache_len:
    raise ValueError(f"decoding {t} tokens at once into a KV cache of cache_len={cache_len} slots; "
                     "raise Transformer.cache_len (0 means ModelConfig.max_seq_len).")
  buf = (batch, cache_len, kv_heads, hd)
  k_cache = module.variable("cache", "k_cache", jnp.zeros, buf, dt)
  v_cache = module.variable("cache", "v_cache", jnp.zeros, buf, dt)
  valid = module.variable("cache", "valid", jnp.zeros, (batch, cache_len), jnp.bool_)
  index = module.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
  idx = index.value
  new_valid = jnp.ones((batch, t), bool) if segment_ids is None else segment_ids != 0  # [b, t]
  # the cache's slots stay unsharded: one slot is written per step
  axes = ("activation_batch", None, "activation_kv_heads", None)
  keys = nn.with_logical_constraint(  # [b, cache_len, kvh, d]
      jax.lax.dynamic_update_slice(k_cache.value, k.astype(dt), (0, idx, 0, 0)), axes)
  values = nn.with_logical_constraint(
      jax.lax.dynamic_update_slice(v_cache.value, v.astype(dt), (0, idx, 0, 0)), axes)
  filled = jax.lax.dynamic_update_slice(valid.value, new_valid, (0, idx))  # [b, cache_len]
  slot, query = jnp.arange(cache_len)[None, :], idx + jnp.arange(t)[:, None]
  causal = slot <= query  # [t, cache_len]
  if cfg.sliding_window is not None:
    causal &= slot > query - cfg.sliding_window
  mask = causal[None] & filled[:, None, :]  # [b, t, cache_len]

  # q grouped: [b, t, kvh, groups, d]; kv heads are shared by their group, never repeated
  q = (q * jnp.asarray(hd**-0.5, q.dtype)).reshape(batch, t, kv_heads, heads // kv_heads, hd)
  scores = jnp.einsum("btkgd,bskd->bkgts", q, keys, preferred_element_type=jnp.float32)
  scores = jnp.where(mask[:, None, None], scores, MASK_VALUE)  # [b, kvh, groups, t, cache_len]
  probs = jax.nn.softmax(scores, axis=-1)
  probs = probs * jnp.any(mask, axis=-1, keepdims=True)[:, None, None]  # padding queries: zeros
  out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(values.dtype), values,
                   preferred_element_type=jnp.float32)
  if not module.is_initializing():
    k_cache.value, v_cache.value, valid.value, index.value = keys, values, filled, idx + t
  return out.reshape(batch, t, heads, hd).astype(dt)


def _decode(module, q, k, v, cfg, learned):
  """Recurrent attention over the new tokens q [b, t, h, d], k/v [b, t, kvh, d] -> [b, t, h, d]."""
  if cfg.attention_impl == "linear":
    step, carry = _linear_decoder(module, q, cfg, learned)
  elif cfg.attention_impl == "hybrid":
    step, carry = _hybrid_decoder(module, q, k, cfg, learned)
  else:
    raise ValueError(f"decode=True (recurrent decoding) supports attention_impl 'linear' and "
                     f"'hybrid'; got {cfg.attention_impl!r}, which decodes with a KV cache.")
  values = tuple(c.value for c in carry)
  values, out = jax.lax.scan(step, values, (jnp.swapaxes(q, 0, 1), jnp.swapaxes(k, 0, 1),
                                            jnp.swapaxes(v, 0, 1)))
  if not module.is_initializing():
    for c, value in zip(carry, values):
      c.value = value
  return jnp.swapaxes(out, 0, 1)


def _linear_decoder(module, q, cfg, learned):
  """State (S [b, h, F, d], z [b, h, F]) fp32, constant in the number of tokens."""
  batch, _, heads, hd = q.shape
  feat = la.feature_dim(cfg.linear_feature, hd, learned.feature_params)
  carry = (module.variable("cache", "kv", jnp.zeros, (batch, heads, feat, hd), jnp.float32),
           module.variable("cache", "k_sum", jnp.zeros, (batch, heads, feat), jnp.float32))
  recurrent = functools.partial(la.recurrent_step, feature=cfg.linear_feature,
                                feature_params=learned.feature_params, decay=learned.decay)

  def step(state, xs):
    out, state = recurrent(la.LinearAttentionState(*state), *xs)
    return tuple(state), out

  return step, carry


def _hybrid_decoder(module, q, k, cfg, learned):
  """A ring buffer of the last `window` keys/values, the linear state of older keys, the index."""
  batch, _, heads, hd = q.shape
  kv_heads, window = k.shape[2], cfg.attention_window
  w_q, w_k = learned.feature_params or (None, None)
  feat = la.feature_dim(cfg.linear_feature, hd, learned.feature_params)
  buf = (batch, window, kv_heads, hd)
  carry = (module.variable("cache", "k_window", jnp.zeros, buf, q.dtype),
           module.variable("cache", "v_window", jnp.zeros, buf, q.dtype),
           module.variable("cache", "kv", jnp.zeros, (batch, heads, feat, hd), jnp.float32),
           module.variable("cache", "k_sum", jnp.zeros, (batch, heads, feat), jnp.float32),
           module.variable("cache", "index", lambda: jnp.zeros((), jnp.int32)))
  phi = lambda x, w: la.feature_map(x, cfg.linear_feature, w)
  # kv heads -> query heads (one token or one window: cheap); axis of the heads
  repeat = lambda x, axis: jnp.repeat(x.astype(jnp.float32), heads // kv_heads, axis=axis)
  f = jnp.ones((heads,)) if learned.window_factor is None else learned.window_factor

  def step(state, xs):
    k_buf, v_buf, s, z, idx = state  # k_buf, v_buf: [b, w, kvh, d]
    q_t, k_t, v_t = xs  # [b, h, d], [b, kvh, d], [b, kvh, d]
    slot = idx % window
    evict = (idx >= window).astype(jnp.float32)  # the slot holds key idx - window: now linear
    phi_old = repeat(phi(k_buf[:, slot], w_k), 1) * evict  # [b, h, F]
    s = s + phi_old[..., :, None] * repeat(v_buf[:, slot], 1)[..., None, :]
    z = z + phi_old
    k_buf, v_buf = k_buf.at[:, slot].set(k_t), v_buf.at[:, slot].set(v_t)
    scores = jnp.einsum("bhd,bwhd->bhw", q_t.astype(jnp.float32), repeat(k_buf, 2)) * hd**-0.5
    scores = jnp.where(jnp.arange(window) <= idx, scores, -jnp.inf)  # filled slots only
    p = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))  # [b, h, w]
    phi_q = phi(q_t, w_q)  # [b, h, F]
    num = (f[:, None] * jnp.einsum("bhw,bwhd->bhd", p, repeat(v_buf, 2))
           + jnp.einsum("bhf,bhfd->bhd", phi_q, s))
    den = f * p.sum(-1) + jnp.einsum("bhf,bhf->bh", phi_q, z)
    out = (num / jnp.maximum(den, 1e-6)[..., None]).astype(q_t.dtype)
    return (k_buf, v_buf, s, z, idx + 1), out

  return step, carry
