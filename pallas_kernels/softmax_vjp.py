"""Materialised softmax attention with a hand-written backward: the model's 'reference' path.

The forward is reference_attention's math (causal, packed segments, prefix-LM, grouped kv heads,
scores in fp32). The backward uses flash attention's identity rowsum(P * dP) = rowsum(dO * O),
a [q, head_dim] reduction in place of a [q, k] one, and skips the mask's select: on CPU, where
short sequences make the [batch, heads, q, k] passes a fifth of a train step, fewer passes over
them pay (bench/profile_step.py). A causal mask without a prefix runs as query chunks, each
against the keys up to its own end (chunk_plan). Tested against reference_attention, forward and
gradients.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.reference import MASK_VALUE, attention_mask, check_attention_shapes


# Causal attention with q_len == kv_len runs as about CHUNKS query chunks (of at least MIN_CHUNK
# rows), each against only the keys up to its last row: the blocks above the diagonal are never
# computed (in 8 chunks, 36 of 64 blocks are), and each chunk's scores stay in cache. On this
# 2-core host a layer's attention forward and backward at 512 tokens took 82 ms in 8 chunks
# against 138 ms unchunked, and at 128 tokens 9 ms in 4 chunks against 21 ms.
CHUNKS, MIN_CHUNK = 8, 32


def chunk_plan(q_len: int, kv_len: int, causal_only: bool,
               chunk: int | None = None) -> tuple[tuple[int, int, int], ...]:
  """(q_start, q_end, kv_end) per query chunk: one chunk over all keys unless the mask is causal
  without a prefix and q_len == kv_len. chunk: rows a chunk (default: see CHUNKS, MIN_CHUNK)."""
  chunk = chunk or max(MIN_CHUNK, -(-q_len // CHUNKS))
  if not causal_only or q_len != kv_len or q_len <= chunk:
    return ((0, q_len, kv_len),)
  return tuple((i, min(i + chunk, q_len), min(i + chunk, q_len)) for i in range(0, q_len, chunk))


def _chunk_forward(qg, k, v, mask, every_row_sees_itself: bool):
  """qg [b, q, kvh, g, d] (scaled), k/v [b, kv, kvh, d], mask [b or 1, q, kv] ->
  out [b, q, kvh, g, d] fp32, probs [b, kvh, q, g, kv] fp32.

  The scores keep the order a dot general gives them (batch dims, then q's free dims, then k's),
  [b, kvh, q, g, kv], so no [q, kv]-sized array is transposed on the way to the softmax.
  """
  scores = jnp.einsum("bqhgd,bkhd->bhqgk", qg, k, preferred_element_type=jnp.float32)
  mask = mask[:, None, :, None]  # [b or 1, 1, q, 1, kv]
  probs = jax.nn.softmax(jnp.where(mask, scores, MASK_VALUE), axis=-1)
  if not every_row_sees_itself:  # rows with no visible key: zeros, not a uniform average
    probs = probs * jnp.any(mask, axis=-1, keepdims=True)
  out = jnp.einsum("bhqgk,bkhd->bqhgd", probs.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  return out, probs


def _forward(q, k, v, mask, scale, plan):
  """-> out [b, q, kvh, g, d] fp32, probs per chunk, q_grouped (scaled)."""
  num_heads, num_kv_heads = check_attention_shapes(q, k, v)
  batch, q_len, _, head_dim = q.shape
  qg = (q * jnp.asarray(scale, q.dtype)).reshape(batch, q_len, num_kv_heads,
                                                num_heads // num_kv_heads, head_dim)
  outs, probs = [], []
  for q0, q1, kv1 in plan:
    # With q_len == kv_len, query i sits at key i, in its own segment: a causal row is never empty.
    out, p = _chunk_forward(qg[:, q0:q1], k[:, :kv1], v[:, :kv1], mask[:, q0:q1, :kv1],
                            every_row_sees_itself=q_len == k.shape[1])
    outs.append(out)
    probs.append(p)
  out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)
  return out, tuple(probs), qg


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attention(q, k, v, mask, scale, plan):
  out, _, _ = _forward(q, k, v, mask, scale, plan)
  return out.reshape(q.shape).astype(q.dtype)


def _attention_fwd(q, k, v, mask, scale, plan):
  out, probs, qg = _forward(q, k, v, mask, scale, plan)
  return out.reshape(q.shape).astype(q.dtype), (qg, k, v, mask, scale, out, probs)


def _attention_bwd(plan, res, d_out):
  qg, k, v, mask, scale, out, probs = res  # out: [b, q, kvh, g, d] fp32
  do = d_out.reshape(out.shape)  # [b, q, kvh, g, d]
  kv_len = k.shape[1]
  dqs, dk, dv = [], 0.0, 0.0
  for (q0, q1, kv1), p in zip(plan, probs):  # p: [b, kvh, chunk, g, kv1]
    do_c, k_c, v_c, qg_c = do[:, q0:q1], k[:, :kv1], v[:, :kv1], qg[:, q0:q1]
    d_probs = jnp.einsum("bqhgd,bkhd->bhqgk", do_c, v_c, preferred_element_type=jnp.float32)
    delta = jnp.einsum("bqhgd,bqhgd->bhqg", do_c.astype(jnp.float32), out[:, q0:q1])[..., None]
    d_scores = p * (d_probs - delta)  # 0 where masked: p is 0 there
    dqs.append(jnp.einsum("bhqgk,bkhd->bqhgd", d_scores.astype(k.dtype), k_c,
                          preferred_element_type=jnp.float32))
    pad = ((0, 0), (0, kv_len - kv1), (0, 0), (0, 0))
    dk = dk + jnp.pad(jnp.einsum("bhqgk,bqhgd->bkhd", d_scores.astype(qg.dtype), qg_c,
                                 preferred_element_type=jnp.float32), pad)
    dv = dv + jnp.pad(jnp.einsum("bhqgk,bqhgd->bkhd", p.astype(do.dtype), do_c,
                                 preferred_element_type=jnp.float32), pad)
  dq = (dqs[0] if len(dqs) == 1 else jnp.concatenate(dqs, axis=1)) * scale
  batch, q_len, kvh, groups, head_dim = qg.shape
  dq = dq.reshape(batch, q_len, kvh * groups, head_dim).astype(qg.dtype)
  return dq, dk.astype(k.dtype), dv.astype(v.dtype), None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                      segment_ids: jax.Array | None = None,
                      prefix_mask: jax.Array | None = None,
                      scale: float | None = None, chunk: int | None = None) -> jax.Array:
  """Causal softmax attention within segments, materialising the scores.

  Args:
    q: [batch, seq, heads, head_dim]; k, v: [batch, seq, kv_heads, head_dim].
    segment_ids: [batch, seq] packed-document ids, or None.
    prefix_mask: [batch, seq] bool, True on a bidirectional prefix (prefix-LM), or None.
    scale: score scale; default head_dim ** -0.5.
    chunk: query rows a chunk where the mask allows chunking (see chunk_plan); None: automatic.
  Returns:
    [batch, seq, heads, head_dim] in q's dtype; equal to reference_attention(causal=True).
  """
  seq = q.shape[1]
  mask = attention_mask(seq, k.shape[1], causal=True, q_segment_ids=segment_ids,
                        kv_segment_ids=segment_ids, prefix_mask=prefix_mask)  # [b or 1, q, k]
  scale = q.shape[-1]**-0.5 if scale is None else scale
  plan = chunk_plan(seq, k.shape[1], causal_only=prefix_mask is None, chunk=chunk)
  return _attention(q, k, v, mask, jnp.asarray(scale, jnp.float32), plan)
