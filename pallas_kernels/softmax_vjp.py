"""Materialised softmax attention with a hand-written backward: the model's 'reference' path.

The forward is reference_attention's math (causal, packed segments, prefix-LM, grouped kv heads,
scores in fp32). The backward uses flash attention's identity rowsum(P * dP) = rowsum(dO * O),
a [q, head_dim] reduction in place of a [q, k] one, and skips the mask's select: on CPU, where
short sequences make the [batch, heads, q, k] passes a fifth of a train step, fewer passes over
them pay (bench/profile_step.py). Tested against reference_attention, forward and gradients.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.reference import MASK_VALUE, attention_mask, check_attention_shapes


def _forward(q, k, v, mask, scale):
  """-> out [b, q, kvh, g, d] fp32, probs [b, kvh, g, q, k] fp32, q_grouped (scaled)."""
  num_heads, num_kv_heads = check_attention_shapes(q, k, v)
  batch, q_len, _, head_dim = q.shape
  qg = (q * jnp.asarray(scale, q.dtype)).reshape(batch, q_len, num_kv_heads,
                                                num_heads // num_kv_heads, head_dim)
  scores = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32)
  scores = jnp.where(mask[:, None, None], scores, MASK_VALUE)
  probs = jax.nn.softmax(scores, axis=-1)
  probs = probs * jnp.any(mask, axis=-1, keepdims=True)[:, None, None]  # empty rows: zeros
  out = jnp.einsum("bhgqk,bkhd->bqhgd", probs.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  return out, probs, qg


@jax.custom_vjp
def _attention(q, k, v, mask, scale):
  out, _, _ = _forward(q, k, v, mask, scale)
  return out.reshape(q.shape).astype(q.dtype)


def _attention_fwd(q, k, v, mask, scale):
  out, probs, qg = _forward(q, k, v, mask, scale)
  return out.reshape(q.shape).astype(q.dtype), (qg, k, v, mask, scale, out, probs)


def _attention_bwd(res, d_out):
  qg, k, v, mask, scale, out, probs = res  # out: [b, q, kvh, g, d] fp32
  do = d_out.reshape(out.shape)  # [b, q, kvh, g, d]
  d_probs = jnp.einsum("bqhgd,bkhd->bhgqk", do, v, preferred_element_type=jnp.float32)
  delta = jnp.einsum("bqhgd,bqhgd->bhgq", do.astype(jnp.float32), out)[..., None]
  d_scores = probs * (d_probs - delta)  # 0 where masked: probs is 0 there
  dq = jnp.einsum("bhgqk,bkhd->bqhgd", d_scores.astype(k.dtype), k,
                  preferred_element_type=jnp.float32) * scale
  dk = jnp.einsum("bhgqk,bqhgd->bkhd", d_scores.astype(qg.dtype), qg,
                  preferred_element_type=jnp.float32)
  dv = jnp.einsum("bhgqk,bqhgd->bkhd", probs.astype(do.dtype), do,
                  preferred_element_type=jnp.float32)
  batch, q_len, kvh, groups, head_dim = qg.shape
  dq = dq.reshape(batch, q_len, kvh * groups, head_dim).astype(qg.dtype)
  return dq, dk.astype(k.dtype), dv.astype(v.dtype), None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                      segment_ids: jax.Array | None = None,
                      prefix_mask: jax.Array | None = None,
                      scale: float | None = None) -> jax.Array:
  """Causal softmax attention within segments, materialising the scores.

  Args:
    q: [batch, seq, heads, head_dim]; k, v: [batch, seq, kv_heads, head_dim].
    segment_ids: [batch, seq] packed-document ids, or None.
    prefix_mask: [batch, seq] bool, True on a bidirectional prefix (prefix-LM), or None.
    scale: score scale; default head_dim ** -0.5.
  Returns:
    [batch, seq, heads, head_dim] in q's dtype; equal to reference_attention(causal=True).
  """
  seq = q.shape[1]
  mask = attention_mask(seq, k.shape[1], causal=True, q_segment_ids=segment_ids,
                        kv_segment_ids=segment_ids, prefix_mask=prefix_mask)  # [b or 1, q, k]
  scale = q.shape[-1]**-0.5 if scale is None else scale
  return _attention(q, k, v, mask, jnp.asarray(scale, jnp.float32))
