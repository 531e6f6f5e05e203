"""Hybrid sliding-window softmax + linear attention (the LoLCATs layer), in pure JAX.

Query i attends with softmax to the last `window` keys (i - window < j <= i, itself included) and
with linear attention to every earlier key (j <= i - window); both share ONE normaliser. We use the
LoLCATs formulation, stabilised by the row max m_i of the windowed scores s_ij = scale * q_i.k_j:

  num_i = f * sum_{window} exp(s_ij - m_i) v_j + phi(q_i) S_{i-window}
  den_i = f * sum_{window} exp(s_ij - m_i)     + phi(q_i) . z_{i-window}
  out_i = num_i / max(den_i, eps)

where S_t = sum_{j<=t} phi(k_j)^T v_j and z_t = sum_{j<=t} phi(k_j) (no decay), and f is an optional
learned window factor (LoLCATs uses f = sigmoid(param)), a scalar or one value per query head,
default 1. As in LoLCATs the linear terms are not rescaled by exp(-m_i): the exp(-m_i) shift keeps
the softmax part in [0, 1], and the linear part is learned to be on that scale. The window always
contains the query itself, so den_i >= f: eps is only a floor for f near 0 (a floor, not an added
term, so that with window >= seq, where there are no linear terms, the result is exactly softmax
attention up to fp32 rounding).

Memory: the softmax part is computed in blocks of `window` queries against the 2 * window keys of
their own and the previous block, so at most [seq, 2 * window] scores per head are materialised
([seq, seq] when window >= seq). The linear part is a chunked lax.scan over states (never
[seq, seq]). Packed documents (`segment_ids`) are supported when each segment id is one contiguous
run (ids need not be sorted); the linear state then resets at segment boundaries.
`reference_hybrid_attention` materialises everything and is the ground truth in tests.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.linear_attention import _check_feature, _feature_qk
from pallas_kernels.reference import MASK_VALUE, check_attention_shapes


def _window_factor(window_factor, num_heads: int, kv_heads: int) -> jax.Array:
  """f per query head as [kv_heads, groups] fp32."""
  f = jnp.ones(()) if window_factor is None else jnp.asarray(window_factor, jnp.float32)
  if f.shape not in ((), (num_heads,)):
    raise ValueError(f"window_factor must be a scalar or [{num_heads}]; got shape {f.shape}.")
  return jnp.broadcast_to(f, (num_heads,)).reshape(kv_heads, num_heads // kv_heads)


def _blocks(x, n, w, lo):
  """[b, n*w + lo, ...] -> [b, n, lo + w, ...]: block i holds rows [i*w, i*w + w + lo)."""
  cur = x[:, lo:].reshape(x.shape[0], n, w, *x.shape[2:])
  if not lo:
    return cur
  prev = x[:, :n * w].reshape(x.shape[0], n, w, *x.shape[2:])
  return jnp.concatenate([prev, cur], axis=2)


def _window_softmax(q, k, v, seg, window, scale):
  """Windowed softmax terms: (num [b, t, kvh, g, D], den [b, t, kvh, g]), shifted by row max.

  q: [b, t, kvh, g, D]; k, v: [b, t, kvh, D]; seg: [b, t]; window <= t.
  """
  batch, seq = q.shape[:2]
  n = -(-seq // window)
  pad = n * window - seq
  lo = window if n > 1 else 0  # keys of the previous block, none when one block covers seq
  pad_kv = lambda x: jnp.pad(x, [(0, 0), (lo, pad)] + [(0, 0)] * (x.ndim - 2))
  qb = _blocks(jnp.pad(q, [(0, 0), (0, pad)] + [(0, 0)] * 3), n, window, 0)  # [b, n, w, ...]
  kb, vb = _blocks(pad_kv(k), n, window, lo), _blocks(pad_kv(v), n, window, lo)  # [b, n, w+lo, ..]
  seg_q = _blocks(jnp.pad(seg, ((0, 0), (0, pad))), n, window, 0)  # [b, n, w]
  seg_k = _blocks(pad_kv(seg), n, window, lo)  # [b, n, w+lo]
  q_pos = (jnp.arange(n)[:, None] * window + jnp.arange(window))[:, :, None]  # [n, w, 1]
  k_pos = (jnp.arange(n)[:, None] * window + jnp.arange(window + lo) - lo)[:, None, :]
  mask = (k_pos >= 0) & (k_pos <= q_pos) & (q_pos - k_pos < window)  # [n, w, w+lo]
  mask = mask[None] & (seg_q[..., :, None] == seg_k[..., None, :])  # [b, n, w, w+lo]
  s = jnp.einsum("bnihgd,bnjhd->bnhgij", qb, kb, preferred_element_type=jnp.float32) * scale
  mask = mask[:, :, None, None]
  s = jnp.where(mask, s, MASK_VALUE)
  p = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True)) * mask  # [b, n, kvh, g, w, w+lo]
  num = jnp.einsum("bnhgij,bnjhd->bnihgd", p, vb.astype(jnp.float32))
  den = jnp.moveaxis(p.sum(-1), 4, 2)  # [b, n, w, kvh, g]
  unblock = lambda x: x.reshape(batch, n * window, *x.shape[3:])[:, :seq]
  return unblock(num), unblock(den)


def _segment_chunk_step(carry, xs):
  """Linear terms for one chunk with the state reset at segment boundaries (one head, no decay).

  carry: (S [F, D], z [F], id of the last key before the chunk); xs: q, k [C, F], v [C, D],
  q and k segment ids [C]. Returns (carry, (num [C, D], den [C])).
  """
  s, z, prev = carry
  q, k, v, seg_q, seg_k = xs
  c = q.shape[0]
  causal = jnp.arange(c)[None, :] <= jnp.arange(c)[:, None]
  scores = (q @ k.T) * (causal & (seg_q[:, None] == seg_k[None, :]))
  q_in = q * (seg_q == prev)[:, None]  # the carried state is the run of segment `prev` only
  num = scores @ v + q_in @ s
  den = scores.sum(-1) + q_in @ z
  last = seg_k[-1]
  keep = (last == prev).astype(jnp.float32)
  k_run = k * (seg_k == last)[:, None]
  return (keep * s + k_run.T @ v, keep * z + k_run.sum(0), last), (num, den)


def _linear_terms(phi_q, phi_k, v, seg_q, seg_k, chunk):
  """Unnormalised causal linear terms for one head: phi_q, phi_k [T, F], v [T, D], segs [T]."""
  seq = phi_q.shape[0]
  n = -(-seq // chunk)
  pad = lambda x: jnp.pad(x, [(0, n * chunk - seq)] + [(0, 0)] * (x.ndim - 1), mode="edge")
  split = lambda x: pad(x).reshape(n, chunk, *x.shape[1:])
  zero = lambda x: jnp.pad(x, [(0, n * chunk - seq)] + [(0, 0)] * (x.ndim - 1))
  xs = (split(phi_q), zero(phi_k).reshape(n, chunk, -1), zero(v).reshape(n, chunk, -1),
        split(seg_q), split(seg_k))
  init = (jnp.zeros((phi_q.shape[1], v.shape[1]), jnp.float32),
          jnp.zeros((phi_q.shape[1],), jnp.float32), seg_k[0])
  num, den = jax.lax.scan(_segment_chunk_step, init, xs)[1]
  return num.reshape(n * chunk, -1)[:seq], den.reshape(-1)[:seq]


def _shift(x, window):
  """x[t - window] at row t (zeros before); x: [b, t, ...]."""
  return jnp.pad(x, [(0, 0), (window, 0)] + [(0, 0)] * (x.ndim - 2))[:, :x.shape[1]]


def _prepare(q, k, v, window, segment_ids, window_factor, scale):
  num_heads, kv_heads = check_attention_shapes(q, k, v)
  if int(window) != window or window < 1:
    raise ValueError(f"window must be a positive integer; got {window}.")
  batch, seq, _, head_dim = q.shape
  seg = jnp.zeros((batch, seq), jnp.int32) if segment_ids is None else segment_ids
  if seg.shape != (batch, seq):
    raise ValueError(f"segment_ids must be [batch, seq] = {(batch, seq)}; got {seg.shape}.")
  scale = head_dim**-0.5 if scale is None else scale
  f = _window_factor(window_factor, num_heads, kv_heads)
  q_grouped = q.reshape(batch, seq, kv_heads, num_heads // kv_heads, head_dim)
  return q_grouped, seg, scale, f


def hybrid_attention(q, k, v, *, window, feature, feature_params=None, segment_ids=None,
                     window_factor=None, scale=None, eps=1e-6, chunk_size=64):
  """Sliding-window softmax + linear attention with one shared normaliser (module docstring).

  Args:
    q: [batch, seq, heads, head_dim]; k, v: [batch, seq, kv_heads, head_dim] (GQA).
    window: softmax keys per query, itself included. feature, feature_params: as in
      `linear_attention`. segment_ids: [batch, seq] ids, each a contiguous run.
    window_factor: f, a scalar or [heads] (e.g. sigmoid of a learned parameter); default 1.
    scale: score scale, default head_dim ** -0.5. chunk_size: chunk of the linear-part scan.
  Returns:
    [batch, seq, heads, head_dim] in q's dtype.
  """
  _check_feature(feature)
  q_grouped, seg, scale, f = _prepare(q, k, v, window, segment_ids, window_factor, scale)
  seq = q.shape[1]
  w = min(int(window), seq)
  num, den = _window_softmax(q_grouped, k, v, seg, w, scale)  # [b, t, kvh, g, (D)]
  num, den = f[..., None] * num, f * den
  if window < seq:  # keys j <= i - window: linear attention against keys shifted by `window`
    phi_q, phi_k = _feature_qk(q, k, feature, feature_params)
    phi_q = phi_q.reshape(*q_grouped.shape[:4], -1)  # [b, t, kvh, g, F]
    seg_k = jnp.concatenate([jnp.broadcast_to(seg[:, :1], (seg.shape[0], w)), seg], 1)[:, :seq]
    terms = lambda pq, pk, vv, sq, sk: _linear_terms(pq, pk, vv, sq, sk, min(chunk_size, seq))
    per_group = jax.vmap(terms, (1, None, None, None, None), (1, 1))  # over g, K/V shared
    per_head = jax.vmap(per_group, (1, 1, 1, None, None), (1, 1))  # over kv heads
    lin_num, lin_den = jax.vmap(per_head)(
        phi_q, _shift(phi_k, w), _shift(v.astype(jnp.float32), w), seg, seg_k)
    num, den = num + lin_num, den + lin_den
  out = num / jnp.maximum(den, eps)[..., None]
  return out.reshape(q.shape).astype(q.dtype)


def reference_hybrid_attention(q, k, v, *, window, feature, feature_params=None,
                               segment_ids=None, window_factor=None, scale=None, eps=1e-6,
                               **unused):
  """`hybrid_attention` materialising [seq, seq] softmax and linear scores per head."""
  del unused
  _check_feature(feature)
  q_grouped, seg, scale, f = _prepare(q, k, v, window, segment_ids, window_factor, scale)
  seq = q.shape[1]
  i, j = jnp.arange(seq)[:, None], jnp.arange(seq)[None, :]
  same = seg[:, None, None, :, None] == seg[:, None, None, None, :]  # [b, 1, 1, t, t]
  in_window = same & (j <= i) & (i - j < window)
  in_linear = same & (i - j >= window)
  s = jnp.einsum("bqhgd,bkhd->bhgqk", q_grouped, k, preferred_element_type=jnp.float32) * scale
  s = jnp.where(in_window, s, MASK_VALUE)
  p = jnp.exp(s - s.max(-1, keepdims=True)) * in_window * f[None, :, :, None, None]
  phi_q, phi_k = _feature_qk(q, k, feature, feature_params)
  phi_q = phi_q.reshape(*q_grouped.shape[:4], -1)
  a = jnp.einsum("bqhgf,bkhf->bhgqk", phi_q, phi_k) * in_linear
  weights = p + a  # [b, kvh, g, t, t]
  num = jnp.einsum("bhgqk,bkhd->bqhgd", weights, v.astype(jnp.float32))
  den = jnp.moveaxis(weights.sum(-1), 3, 1)
  return (num / jnp.maximum(den, eps)[..., None]).reshape(q.shape).astype(q.dtype)
