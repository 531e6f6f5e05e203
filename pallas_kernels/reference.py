"""Pure-JAX reference attention: the ground truth every attention kernel is tested against.

Softmax attention with causality, packed-document `segment_ids`, a bidirectional prefix
(`prefix_mask`, prefix-LM / UL2), grouped-query heads (K/V are shared by groups of query heads
without being repeated in memory), an optional sliding window and an optional logit soft-cap.
Scores are computed in fp32 whatever the input dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Finite stand-in for -inf so that fully masked rows give zeros instead of NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def check_attention_shapes(q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[int, int]:
  """Validates [batch, seq, heads, head_dim] q/k/v; returns (num_heads, num_kv_heads)."""
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(
        f"attention expects q, k, v of rank 4 [batch, seq, heads, head_dim]; got shapes "
        f"{q.shape}, {k.shape}, {v.shape}.")
  if not (q.shape[-1] == k.shape[-1] == v.shape[-1]):
    raise ValueError(
        f"head dims do not match: q {q.shape[-1]}, k {k.shape[-1]}, v {v.shape[-1]}; "
        "q, k and v must share one head_dim.")
  if k.shape != v.shape:
    raise ValueError(f"k and v must have the same shape; got {k.shape} and {v.shape}.")
  num_heads, num_kv_heads = q.shape[2], k.shape[2]
  if num_heads % num_kv_heads:
    raise ValueError(
        f"num_kv_heads={num_kv_heads} does not divide num_heads={num_heads}; grouped-query "
        "attention needs each kv head shared by a whole number of query heads.")
  return num_heads, num_kv_heads


def attention_mask(
    q_len: int,
    kv_len: int,
    *,
    causal: bool,
    q_segment_ids: jax.Array | None,
    kv_segment_ids: jax.Array | None,
    sliding_window: int | None = None,
    prefix_mask: jax.Array | None = None,
    q_positions: jax.Array | None = None,
    kv_positions: jax.Array | None = None,
) -> jax.Array:
  """Boolean mask [batch or 1, q_len, kv_len]: True where query i may attend to key j.

  mask(i, j) = same_segment(i, j) & (causal_ok(i, j) | prefix[j]) & window_ok(i, j): a key in the
  bidirectional prefix (`prefix_mask` [batch, kv_len], True on prefix tokens) is visible to every
  query of its segment, earlier or later. Without positions, queries are aligned to the end of the
  keys (query i sits at key position kv_len - q_len + i), which is the usual convention for
  decoding with a cache. With `q_positions` [batch, q_len] and `kv_positions` [batch, kv_len]
  (each token's index in the full sequence, e.g. a context-parallel shard in zigzag order),
  causal_ok is kv_pos <= q_pos and window_ok is q_pos - kv_pos < sliding_window.
  """
  if (q_positions is None) != (kv_positions is None):
    raise ValueError("pass both q_positions and kv_positions, or neither.")
  if q_positions is None:
    q_idx = (jnp.arange(q_len)[:, None] + (kv_len - q_len))[None]  # [1, q_len, 1]
    kv_idx = jnp.arange(kv_len)[None, None, :]  # [1, 1, kv_len]
  else:
    for name, pos, length in (("q_positions", q_positions, q_len),
                              ("kv_positions", kv_positions, kv_len)):
      if pos.ndim != 2 or pos.shape[1] != length:
        raise ValueError(f"{name} must be [batch, {length}]; got shape {pos.shape}.")
    q_idx, kv_idx = q_positions[:, :, None], kv_positions[:, None, :]
  batch = max(q_idx.shape[0], kv_idx.shape[0])
  mask = jnp.ones((batch, q_len, kv_len), dtype=bool)
  if causal:
    mask = jnp.broadcast_to(kv_idx <= q_idx, mask.shape)
  if prefix_mask is not None:
    if prefix_mask.ndim != 2 or prefix_mask.shape[1] != kv_len:
      raise ValueError(f"prefix_mask must be [batch, kv_len={kv_len}]; got shape "
                       f"{prefix_mask.shape}.")
    mask = mask | prefix_mask.astype(bool)[:, None, :]
  if sliding_window is not None:
    mask &= q_idx - kv_idx < sliding_window
  if q_segment_ids is not None or kv_segment_ids is not None:
    if q_segment_ids is None or kv_segment_ids is None:
      raise ValueError("pass both q_segment_ids and kv_segment_ids, or neither.")
    mask = mask & (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])
  return mask


def reference_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = True,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    sliding_window: int | None = None,
    logit_softcap: float | None = None,
    scale: float | None = None,
    prefix_mask: jax.Array | None = None,
    q_positions: jax.Array | None = None,
    kv_positions: jax.Array | None = None,
) -> jax.Array:
  """Softmax attention, materialising the scores.

  Args:
    q: [batch, q_len, num_heads, head_dim]
    k, v: [batch, kv_len, num_kv_heads, head_dim]; num_kv_heads divides num_heads.
    q_segment_ids, kv_segment_ids: [batch, q_len] / [batch, kv_len] int ids; tokens attend only
      within their own segment (packed documents).
    sliding_window: if set, query i sees keys j with i - j < sliding_window.
    logit_softcap: if set, scores become softcap * tanh(scores / softcap).
    scale: score scale; default head_dim ** -0.5.
    prefix_mask: [batch, kv_len] bool, True on the bidirectional prefix: those keys are visible to
      all queries of their segment (prefix-LM); see `attention_mask`.
    q_positions, kv_positions: [batch, q_len] / [batch, kv_len] int token indices in the full
      sequence (both or neither); when given, the causal mask and the window compare these
      instead of end-aligned array indices (context parallelism: a shard of queries against
      all-gathered keys, in any order).
  Returns:
    [batch, q_len, num_heads, head_dim] in q's dtype.
  """
  num_heads, num_kv_heads = check_attention_shapes(q, k, v)
  batch, q_len, _, head_dim = q.shape
  kv_len = k.shape[1]
  groups = num_heads // num_kv_heads
  scale = head_dim**-0.5 if scale is None else scale

  # q_grouped: [batch, q_len, kv_heads, groups, head_dim]; K/V are never repeated.
  q_grouped = (q * jnp.asarray(scale, q.dtype)).reshape(batch, q_len, num_kv_heads, groups, head_dim)
  scores = jnp.einsum("bqhgd,bkhd->bhgqk", q_grouped, k, preferred_element_type=jnp.float32)
  if logit_softcap is not None:
    scores = logit_softcap * jnp.tanh(scores / logit_softcap)
  mask = attention_mask(q_len, kv_len, causal=causal, q_segment_ids=q_segment_ids,
                        kv_segment_ids=kv_segment_ids, sliding_window=sliding_window,
                        prefix_mask=prefix_mask, q_positions=q_positions,
                        kv_positions=kv_positions)
  scores = jnp.where(mask[:, None, None], scores, MASK_VALUE)  # [batch, kv_heads, groups, q, k]
  probs = jax.nn.softmax(scores, axis=-1)
  # Rows with no visible key (possible only with padding) get zero output, not a uniform average.
  probs = probs * jnp.any(mask, axis=-1, keepdims=True)[:, None, None]
  out = jnp.einsum("bhgqk,bkhd->bqhgd", probs.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  return out.reshape(batch, q_len, num_heads, head_dim).astype(q.dtype)
