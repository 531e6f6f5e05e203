"""Materialised softmax attention with a hand-written backward: the model's 'reference' path.

The forward is reference_attention's math (causal, packed segments, prefix-LM, grouped kv heads,
scores in fp32). The backward uses flash attention's identity rowsum(P * dP) = rowsum(dO * O),
a [q, head_dim] reduction in place of a [q, k] one, and skips the mask's select: on CPU, where
short sequences make the [batch, heads, q, k] passes a fifth of a train step, fewer passes over
them pay (bench/profile_step.py). A causal mask without a prefix runs as query chunks, each
against the keys up to its own end (chunk_plan). Each chunk's [rows, keys] arrays are written
once each, head-major and unnormalised. Tested against reference_attention, forward and gradients.
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


def _head_major(x):
  """[b, q, kvh, g, d] -> [b, kvh, q * g, d]: a chunk's rows as a dot general's free dims."""
  b, q, kvh, g, d = x.shape
  return jnp.transpose(x, (0, 2, 1, 3, 4)).reshape(b, kvh, q * g, d)


def _token_major(x, groups: int):
  """[b, kvh, q * g, d] -> [b, q, kvh, g, d]."""
  b, kvh, rows, d = x.shape
  return jnp.transpose(x.reshape(b, kvh, rows // groups, groups, d), (0, 2, 1, 3, 4))


def _chunk_forward(q_rows, k, v, mask, groups: int, every_row_sees_itself: bool):
  """q_rows [b, kvh, rows, d] (scaled; rows = q * g), k/v [b, kv, kvh, d], mask [b or 1, q, kv]
  -> out [b, kvh, rows, d] fp32, exps [b, kvh, rows, kv] fp32, inv_sums [b, kvh, rows] fp32.

  Every [rows, kv] array is in the order a dot general gives and takes it (batch dims, then the
  free dims), so none of them is transposed or copied on the way between the dots and the
  softmax. The exponentials stay unnormalised, exps * inv_sums being the probabilities: the
  output scales the [rows, head_dim] product instead, and the backward scales its own [rows, kv]
  pass, so no normalised copy of them is written.
  """
  scores = jnp.einsum("bhrd,bkhd->bhrk", q_rows, k, preferred_element_type=jnp.float32)
  mask = jnp.repeat(mask, groups, axis=1)[:, None]  # [b or 1, 1, rows, kv]
  scores = jnp.where(mask, scores, MASK_VALUE)
  exps = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
  inv_sums = 1.0 / jnp.sum(exps, axis=-1)
  if not every_row_sees_itself:  # rows with no visible key: zeros, not a uniform average
    inv_sums = jnp.where(jnp.any(mask, axis=-1), inv_sums, 0.0)
  out = jnp.einsum("bhrk,bkhd->bhrd", exps.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return out * inv_sums[..., None], exps, inv_sums


def _forward(q, k, v, mask, scale, plan):
  """-> out [b, q, kvh, g, d] fp32, and per chunk (q_rows (scaled), exps, inv_sums), what the
  backward reads."""
  num_heads, num_kv_heads = check_attention_shapes(q, k, v)
  batch, q_len, _, head_dim = q.shape
  groups = num_heads // num_kv_heads
  qg = (q * jnp.asarray(scale, q.dtype)).reshape(batch, q_len, num_kv_heads, groups, head_dim)
  outs, chunks = [], []
  for q0, q1, kv1 in plan:
    # With q_len == kv_len, query i sits at key i, in its own segment: a causal row is never empty.
    q_rows = _head_major(qg[:, q0:q1])
    out, exps, inv_sums = _chunk_forward(q_rows, k[:, :kv1], v[:, :kv1], mask[:, q0:q1, :kv1],
                                         groups, every_row_sees_itself=q_len == k.shape[1])
    outs.append(out)
    chunks.append((q_rows, exps, inv_sums))
  out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=2)
  return _token_major(out, groups), tuple(chunks)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attention(q, k, v, mask, scale, plan):
  out, _ = _forward(q, k, v, mask, scale, plan)
  return out.reshape(q.shape).astype(q.dtype)


def _attention_fwd(q, k, v, mask, scale, plan):
  out, chunks = _forward(q, k, v, mask, scale, plan)
  return out.reshape(q.shape).astype(q.dtype), (k, v, scale, out, chunks)


def _attention_bwd(plan, res, d_out):
  k, v, scale, out, chunks = res  # out: [b, q, kvh, g, d] fp32
  batch, q_len, kvh, groups, head_dim = out.shape
  q_dtype = chunks[0][0].dtype
  kv_len = k.shape[1]
  do = d_out.reshape(out.shape)  # [b, q, kvh, g, d]
  # rowsum(P * dP) = rowsum(dO * O), a [q, head_dim] reduction: [b, kvh, q * g].
  delta = jnp.transpose(jnp.sum(do.astype(jnp.float32) * out, axis=-1),
                        (0, 2, 1, 3)).reshape(batch, kvh, q_len * groups)
  # dk_t, dv_t: [b, kvh, d, kv], so the [rows, kv] operands go into their dots untransposed. A
  # chunk adds into its own keys in place; summing zero-padded chunks made XLA fuse every pad
  # into the RoPE backward, a loop that tested each chunk's bounds per element.
  dqs = []
  dk_t = dv_t = jnp.zeros((batch, kvh, head_dim, kv_len), jnp.float32)
  for (q0, q1, kv1), (q_c, exps, inv_sums) in zip(plan, chunks):  # exps: [b, kvh, rows, kv1]
    do_c = _head_major(do[:, q0:q1])  # [b, kvh, rows, d], as q_c
    k_c, v_c = k[:, :kv1], v[:, :kv1]
    d_probs = jnp.einsum("bhrd,bkhd->bhrk", do_c, v_c, preferred_element_type=jnp.float32)
    # P * (dP - delta) with P = exps * inv_sums; 0 where masked, exps being 0 there.
    delta_c = delta[:, :, q0 * groups:q1 * groups, None]
    d_scores = exps * ((d_probs - delta_c) * inv_sums[..., None])
    dqs.append(jnp.einsum("bhrk,bkhd->bhrd", d_scores.astype(k.dtype), k_c,
                          preferred_element_type=jnp.float32))
    dk_t = dk_t.at[..., :kv1].add(jnp.einsum("bhrd,bhrk->bhdk", q_c, d_scores.astype(q_dtype),
                                             preferred_element_type=jnp.float32))
    do_scaled = (do_c * inv_sums[..., None]).astype(do.dtype)  # P^T dO = exps^T (dO / sums)
    dv_t = dv_t.at[..., :kv1].add(jnp.einsum("bhrd,bhrk->bhdk", do_scaled, exps.astype(do.dtype),
                                             preferred_element_type=jnp.float32))
  dq = _token_major(dqs[0] if len(dqs) == 1 else jnp.concatenate(dqs, axis=2), groups) * scale
  dq = dq.reshape(batch, q_len, kvh * groups, head_dim).astype(q_dtype)
  dk, dv = (jnp.transpose(x, (0, 3, 1, 2)) for x in (dk_t, dv_t))  # -> [b, kv, kvh, d]
  return dq, dk.astype(k.dtype), dv.astype(v.dtype), None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                      segment_ids: jax.Array | None = None,
                      prefix_mask: jax.Array | None = None,
                      sliding_window: int | None = None,
                      scale: float | None = None, chunk: int | None = None) -> jax.Array:
  """Causal softmax attention within segments, materialising the scores.

  Args:
    q: [batch, seq, heads, head_dim]; k, v: [batch, seq, kv_heads, head_dim].
    segment_ids: [batch, seq] packed-document ids, or None.
    prefix_mask: [batch, seq] bool, True on a bidirectional prefix (prefix-LM), or None.
    sliding_window: query i sees keys j with i - j < sliding_window; None: no window.
    scale: score scale; default head_dim ** -0.5.
    chunk: query rows a chunk where the mask allows chunking (see chunk_plan); None: automatic.
  Returns:
    [batch, seq, heads, head_dim] in q's dtype; equal to reference_attention(causal=True).
  """
  seq = q.shape[1]
  mask = attention_mask(seq, k.shape[1], causal=True, q_segment_ids=segment_ids,
                        kv_segment_ids=segment_ids, prefix_mask=prefix_mask,
                        sliding_window=sliding_window)  # [b or 1, q, k]
  scale = q.shape[-1]**-0.5 if scale is None else scale
  plan = chunk_plan(seq, k.shape[1], causal_only=prefix_mask is None, chunk=chunk)
  return _attention(q, k, v, mask, jnp.asarray(scale, jnp.float32), plan)
