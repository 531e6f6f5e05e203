"""Causal linear attention: a chunked Pallas kernel, two pure-JAX references and a recurrent step.

Linear attention replaces exp(q.k) by a feature-map inner product phi(q).phi(k), so that causal
attention becomes a running state. With an optional per-head decay gamma in (0, 1] (RetNet/GLA
style) the recurrence for query head h at token t is

  S_t = gamma * S_{t-1} + phi(k_t)^T v_t      # [feature_dim, head_dim]
  z_t = gamma * z_{t-1} + phi(k_t)            # [feature_dim] normaliser state
  o_t = phi(q_t) S_t / (phi(q_t) . z_t + eps)

Feature maps (`feature_map`): 'elu+1', 'relu', 'hedgehog' (learned, per head: softmax over
[x W, -x W], as in Hedgehog/LoLCATs) and 'taylor' (2nd-order Taylor expansion of exp(q.k/sqrt(d)),
as in Based). Layout follows `reference.py`: q [batch, seq, heads, head_dim], k/v
[batch, seq, kv_heads, head_dim], kv heads shared by groups of query heads (GQA).

`linear_attention` runs the chunked form in a Pallas kernel: the grid is (batch, query head), and
each program loops over chunks carrying (S, z) in fp32; within a chunk the causal part is a masked
[chunk, chunk] product. Its `jax.custom_vjp` backward is a chunked pure-JAX backward: the same chunk
recurrence written with `lax.scan` (sharing `_chunk_step` with the kernel) is differentiated by
`jax.vjp`, which recomputes the per-chunk states instead of saving them in the forward. Feature maps
are applied outside the kernel, so gradients reach hedgehog weights by ordinary autodiff, and the
decay (if passed as an array) gets its gradient through log(gamma).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.reference import check_attention_shapes

FEATURE_MAPS = ("elu+1", "relu", "hedgehog", "taylor")


# ----------------------------------------------------------------------------- feature maps


def _check_feature(name: str) -> None:
  if name not in FEATURE_MAPS:
    raise ValueError(f"unknown feature map {name!r}; choose one of {', '.join(FEATURE_MAPS)}.")


def feature_map(x: jax.Array, name: str, params: jax.Array | None = None) -> jax.Array:
  """phi(x) in fp32. x: [..., heads, head_dim] -> [..., heads, feature_dim].

  feature_dim is head_dim for 'elu+1'/'relu', 2 * F for 'hedgehog' with params W
  [heads, head_dim, F], and 1 + head_dim + head_dim**2 for 'taylor'.
  """
  _check_feature(name)
  x = x.astype(jnp.float32)
  if name == "elu+1":
    return jax.nn.elu(x) + 1.0
  if name == "relu":
    return jax.nn.relu(x)
  if name == "taylor":
    # [1, x', x' (x) x' / sqrt(2)] with x' = x / d**0.25, so phi(q).phi(k) = 1 + s + s**2 / 2
    # for s = q.k / sqrt(d): the Based approximation of exp(s).
    xs = x * x.shape[-1]**-0.25
    outer = (xs[..., :, None] * xs[..., None, :]).reshape(*x.shape[:-1], -1) * 0.5**0.5
    return jnp.concatenate([jnp.ones_like(x[..., :1]), xs, outer], axis=-1)
  if params is None or params.ndim != 3 or params.shape[:2] != x.shape[-2:]:
    got = None if params is None else params.shape
    raise ValueError(f"'hedgehog' needs params W of shape [heads, head_dim, F] = "
                     f"[{x.shape[-2]}, {x.shape[-1]}, F]; got {got}.")
  xw = jnp.einsum("...hd,hdf->...hf", x, params.astype(jnp.float32))  # [..., heads, F]
  return jax.nn.softmax(jnp.concatenate([xw, -xw], axis=-1), axis=-1)


def feature_dim(name: str, head_dim: int, params=None) -> int:
  """Size of phi(x) for a head_dim input (hedgehog: 2 * F of its W, or of the q map's W)."""
  _check_feature(name)
  if name == "taylor":
    return 1 + head_dim + head_dim**2
  if name == "hedgehog":
    w = params[0] if isinstance(params, (tuple, list)) else params
    return 2 * w.shape[-1]
  return head_dim


def _feature_qk(q, k, name, params):
  """phi(q) [b, t, heads, F] and phi(k) [b, t, kv_heads, F].

  hedgehog params: one W [kv_heads, head_dim, F] shared by q and k (query head h uses
  W[h // groups]), or a pair (W_q [heads, head_dim, F], W_k [kv_heads, head_dim, F]).
  """
  _check_feature(name)
  if name != "hedgehog":
    return feature_map(q, name), feature_map(k, name)
  if isinstance(params, (tuple, list)):
    w_q, w_k = params
  elif params is not None and params.ndim == 3 and params.shape[0] == k.shape[2]:
    w_q, w_k = jnp.repeat(params, q.shape[2] // k.shape[2], axis=0), params
  else:
    raise ValueError(f"'hedgehog' needs feature_params W [kv_heads={k.shape[2]}, head_dim, F] "
                     f"or a pair (W_q, W_k); got {getattr(params, 'shape', params)}.")
  return feature_map(q, name, w_q), feature_map(k, name, w_k)


def _log_decay(decay, num_heads: int) -> jax.Array:
  """log(gamma) per query head [num_heads] fp32 (zeros when decay is None)."""
  if decay is None:
    return jnp.zeros((num_heads,), jnp.float32)
  gamma = jnp.asarray(decay, jnp.float32)
  if gamma.shape not in ((), (num_heads,)):
    raise ValueError(f"decay must be a scalar or one value per query head [{num_heads}]; "
                     f"got shape {gamma.shape}.")
  return jnp.log(jnp.broadcast_to(gamma, (num_heads,)))


# ----------------------------------------------------------------------------- chunked core


def _chunk_step(state, q, k, v, seg, log_gamma):
  """One chunk of the recurrence, all fp32, with the state reset at segment starts.

  state: (S [F, D], z [F, 1], prev [1, 1]: the segment id of the last key before the chunk);
  q, k: [C, F]; v: [C, D]; seg: [C, 1] the chunk's segment ids (float, each id one contiguous
  run); log_gamma: [1, 1]. Everything is 2-D, as Mosaic (TPU) lowers it.
  Returns (new_state, numerator [C, D], denominator [C, 1]).
  """
  s, z, prev = state
  c = q.shape[0]
  i = jax.lax.broadcasted_iota(jnp.int32, (c, c), 0)
  j = jax.lax.broadcasted_iota(jnp.int32, (c, c), 1)
  ones = jnp.ones((c, 1), jnp.float32)
  seg_j = jax.lax.dot_general(ones, seg, (((1,), (1,)), ((), ())))  # [C, C]: seg of key j
  visible = (j <= i) & (seg == seg_j)
  # gamma**(i - j) where visible; exponents are never negative, so nothing overflows.
  gaps = jnp.where(visible, i - j, 0).astype(jnp.float32)
  intra = jnp.where(visible, jnp.exp(gaps * log_gamma), 0.0)
  scores = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * intra  # [C, C]
  pos = jax.lax.broadcasted_iota(jnp.int32, (c, 1), 0).astype(jnp.float32)
  # The state holds `prev`'s run, decayed i + 1 steps into the chunk for query i.
  q_in = q * jnp.where(seg == prev, jnp.exp((pos + 1.0) * log_gamma), 0.0)
  num = jnp.dot(scores, v, preferred_element_type=jnp.float32) + jnp.dot(q_in, s)
  den = jnp.sum(scores, axis=1, keepdims=True) + jnp.dot(q_in, z)
  # [1, 1]: the run the new state holds (a masked sum, as Triton lowers no value slices)
  last = jnp.sum(jnp.where(pos == c - 1.0, seg, 0.0), axis=0, keepdims=True)
  keep = jnp.where(last == prev, jnp.exp(c * log_gamma), 0.0)
  k_run = k * jnp.where(seg == last, jnp.exp((c - 1.0 - pos) * log_gamma), 0.0)
  s = keep * s + jnp.dot(k_run.T, v, preferred_element_type=jnp.float32)
  z = keep * z + jnp.dot(k_run.T, ones, preferred_element_type=jnp.float32)
  return (s, z, last), num, den


def _init_state(feat: int, head_dim: int, first_seg):
  return (jnp.zeros((feat, head_dim), jnp.float32), jnp.zeros((feat, 1), jnp.float32),
          first_seg)


def _to_heads_major(x, seq_pad):
  """[b, t, h, f] -> [b, h, seq_pad, f] fp32, zero-padded at the end of the sequence."""
  x = jnp.swapaxes(x.astype(jnp.float32), 1, 2)
  return jnp.pad(x, ((0, 0), (0, 0), (0, seq_pad - x.shape[2]), (0, 0)))


def _segments(segment_ids, batch: int, seq: int, seq_pad: int) -> jax.Array:
  """[b, seq_pad, 1] fp32 segment ids; padding continues the last run (its keys are zeros)."""
  seg = jnp.zeros((batch, seq), jnp.int32) if segment_ids is None else segment_ids
  seg = jnp.pad(seg.astype(jnp.int32), ((0, 0), (0, seq_pad - seq)), mode="edge")
  return seg.astype(jnp.float32)[:, :, None]


def _linear_kernel(lg_ref, seg_ref, q_ref, k_ref, v_ref, o_ref, *, chunk, num_chunks, eps):
  """One (batch, head) program. q [T, F], k [T, F], v [T, D], o [T, D], seg [T, 1] refs;
  lg [1, 128] (the head's log decay, broadcast over lanes)."""
  log_gamma = jnp.max(lg_ref[...], axis=1, keepdims=True)  # [1, 1] (all 128 lanes are equal)

  def body(c, state):
    rows = pl.ds(pl.multiple_of(c * chunk, chunk), chunk)
    state, num, den = _chunk_step(state, q_ref[rows, :], k_ref[rows, :], v_ref[rows, :],
                                  seg_ref[rows, :], log_gamma)
    o_ref[rows, :] = (num / (den + eps)).astype(o_ref.dtype)
    return state

  init = _init_state(q_ref.shape[1], v_ref.shape[1], seg_ref[0:1, :])
  jax.lax.fori_loop(0, num_chunks, body, init)


def _compiler_params(backend: str, interpret: bool):
  """Triton on GPU (jax's default there, Mosaic GPU, wants other kernels), Mosaic on TPU."""
  if interpret or backend == "cpu":
    return None
  if backend == "gpu":
    from jax.experimental.pallas import triton as pl_triton  # pylint: disable=g-import-not-at-top
    return pl_triton.CompilerParams(num_warps=4, num_stages=1)
  from jax.experimental.pallas import tpu as pl_tpu  # pylint: disable=g-import-not-at-top
  return pl_tpu.CompilerParams(dimension_semantics=("parallel", "parallel"))


def _pallas_forward(phi_q, phi_k, v, seg, log_gamma, chunk, eps, interpret, backend="cpu"):
  """phi_q [b, t, h, F], phi_k [b, t, kvh, F], v [b, t, kvh, D], seg [b, seq_pad, 1]
  -> [b, t, h, D] fp32."""
  batch, seq, heads, feat = phi_q.shape
  kv_heads, head_dim = v.shape[2], v.shape[3]
  groups = heads // kv_heads
  num_chunks = pl.cdiv(seq, chunk)
  seq_pad = num_chunks * chunk
  q_spec = pl.BlockSpec((None, None, seq_pad, feat), lambda b, h: (b, h, 0, 0))
  k_spec = pl.BlockSpec((None, None, seq_pad, feat), lambda b, h: (b, h // groups, 0, 0))
  v_spec = pl.BlockSpec((None, None, seq_pad, head_dim), lambda b, h: (b, h // groups, 0, 0))
  # Mosaic tiles the last two block dims by (8, 128) or takes them whole: the per-head decay is
  # a [1, 128] row per head, the segment ids a [seq_pad, 1] column per batch row.
  lg_spec = pl.BlockSpec((None, 1, 128), lambda b, h: (h, 0, 0))
  seg_spec = pl.BlockSpec((None, seq_pad, 1), lambda b, h: (b, 0, 0))
  out = pl.pallas_call(
      functools.partial(_linear_kernel, chunk=chunk, num_chunks=num_chunks, eps=eps),
      out_shape=jax.ShapeDtypeStruct((batch, heads, seq_pad, head_dim), jnp.float32),
      grid=(batch, heads),
      in_specs=[lg_spec, seg_spec, q_spec, k_spec, v_spec],
      out_specs=pl.BlockSpec((None, None, seq_pad, head_dim), lambda b, h: (b, h, 0, 0)),
      interpret=interpret, compiler_params=_compiler_params(backend, interpret),
  )(jnp.broadcast_to(log_gamma[:, None, None], (heads, 1, 128)), seg,
    _to_heads_major(phi_q, seq_pad), _to_heads_major(phi_k, seq_pad),
    _to_heads_major(v, seq_pad))
  return jnp.swapaxes(out[:, :, :seq], 1, 2)


def _scan_head(q, k, v, seg, log_gamma, eps):
  """Pure-JAX chunk scan for one head: q, k [N, C, F], v [N, C, D], seg [N, C, 1] -> [N, C, D]."""
  lg = jnp.reshape(log_gamma, (1, 1))

  def step(state, xs):
    state, num, den = _chunk_step(state, *xs, lg)
    return state, num / (den + eps)

  init = _init_state(q.shape[-1], v.shape[-1], seg[0, 0:1, :])
  return jax.lax.scan(step, init, (q, k, v, seg))[1]


def _chunked_jax(phi_q, phi_k, v, seg, log_gamma, chunk, eps):
  """The kernel's computation in pure JAX (lax.scan over chunks); shapes as `_pallas_forward`."""
  batch, seq, heads, feat = phi_q.shape
  kv_heads, head_dim = v.shape[2], v.shape[3]
  groups = heads // kv_heads
  num_chunks = pl.cdiv(seq, chunk)
  seq_pad = num_chunks * chunk
  # [b, kvh, (g,) N, C, f]: query heads grouped so K/V are shared, not repeated.
  q = _to_heads_major(phi_q, seq_pad).reshape(batch, kv_heads, groups, num_chunks, chunk, feat)
  k = _to_heads_major(phi_k, seq_pad).reshape(batch, kv_heads, num_chunks, chunk, feat)
  vv = _to_heads_major(v, seq_pad).reshape(batch, kv_heads, num_chunks, chunk, head_dim)
  sg = seg.reshape(batch, num_chunks, chunk, 1)
  per_group = jax.vmap(lambda q, k, v, s, lg: _scan_head(q, k, v, s, lg, eps),
                       (0, None, None, None, 0))
  per_kv_head = jax.vmap(per_group, (0, 0, 0, None, 0))
  out = jax.vmap(per_kv_head, (0, 0, 0, 0, None))(q, k, vv, sg,
                                                  log_gamma.reshape(kv_heads, groups))
  out = out.reshape(batch, heads, seq_pad, head_dim)[:, :, :seq]
  return jnp.swapaxes(out, 1, 2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _linear_core(phi_q, phi_k, v, seg, log_gamma, chunk, eps, interpret, backend):
  return _pallas_forward(phi_q, phi_k, v, seg, log_gamma, chunk, eps, interpret, backend)


def _linear_core_fwd(phi_q, phi_k, v, seg, log_gamma, chunk, eps, interpret, backend):
  out = _pallas_forward(phi_q, phi_k, v, seg, log_gamma, chunk, eps, interpret, backend)
  return out, (phi_q, phi_k, v, seg, log_gamma)


def _linear_core_bwd(chunk, eps, interpret, backend, residuals, d_out):
  del interpret, backend
  phi_q, phi_k, v, seg, log_gamma = residuals
  _, vjp = jax.vjp(lambda q, k, v, lg: _chunked_jax(q, k, v, seg, lg, chunk, eps),
                   phi_q, phi_k, v, log_gamma)
  dq, dk, dv, dlg = vjp(d_out)
  return dq, dk, dv, jnp.zeros_like(seg), dlg


_linear_core.defvjp(_linear_core_fwd, _linear_core_bwd)


def linear_attention(q, k, v, *, feature="elu+1", feature_params=None, decay=None,
                     segment_ids=None, chunk_size=64, eps=1e-6, interpret=None, backend=None):
  """Chunked causal linear attention (Pallas forward, recomputing pure-JAX chunked backward).

  Args:
    q: [batch, seq, heads, head_dim]; k, v: [batch, seq, kv_heads, head_dim] (GQA).
    feature: one of FEATURE_MAPS. feature_params: hedgehog W (see `_feature_qk`).
    decay: None, a scalar, or [heads] values gamma in (0, 1]; differentiable if an array.
    segment_ids: [batch, seq] packed-document ids, each id one contiguous run; the state resets
      at each segment start (None: one document per row).
    chunk_size: tokens per chunk (clipped to seq); seq need not be a multiple of it.
    interpret: run Pallas in interpret mode; default True on the CPU backend.
    backend: the platform compiled for (None: jax's default backend), e.g. 'tpu' when compiling
      ahead of time for TPU devices from a CPU host.
  Returns:
    [batch, seq, heads, head_dim] in q's dtype.
  """
  backend = jax.default_backend() if backend is None else backend
  interpret = backend == "cpu" if interpret is None else interpret
  chunk = min(chunk_size, q.shape[1])
  if backend == "tpu" and not interpret and chunk % 8 and chunk != q.shape[1]:
    low, high = max(chunk // 8 * 8, 8), -(-chunk // 8) * 8
    raise ValueError(f"chunk_size={chunk_size} cannot be tiled by the TPU (Mosaic slices chunks "
                     f"of rows in multiples of 8); the nearest valid sizes are "
                     f"{low if low == high else f'{low} or {high}'}.")
  return _linear(q, k, v, feature, feature_params, decay, segment_ids, chunk_size, eps,
                 "pallas", interpret, {"cuda": "gpu", "rocm": "gpu"}.get(backend, backend))


def linear_attention_jax(q, k, v, *, feature="elu+1", feature_params=None, decay=None,
                         segment_ids=None, chunk_size=64, eps=1e-6, **unused):
  """`linear_attention` in pure JAX (the same chunked recurrence as a lax.scan), for backends
  that cannot lower the kernel."""
  del unused
  return _linear(q, k, v, feature, feature_params, decay, segment_ids, chunk_size, eps, "jax",
                 False, "cpu")


def _linear(q, k, v, feature, feature_params, decay, segment_ids, chunk_size, eps, impl,
            interpret, backend):
  _check_feature(feature)
  num_heads, _ = check_attention_shapes(q, k, v)
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be positive; got {chunk_size}.")
  phi_q, phi_k = _feature_qk(q, k, feature, feature_params)
  chunk = min(chunk_size, q.shape[1])
  seg = _segments(segment_ids, q.shape[0], q.shape[1], pl.cdiv(q.shape[1], chunk) * chunk)
  args = (phi_q, phi_k, v.astype(jnp.float32), seg, _log_decay(decay, num_heads))
  if impl == "jax":
    out = _chunked_jax(*args, chunk, float(eps))
  else:
    out = _linear_core(*args, chunk, float(eps), bool(interpret), backend)
  return out.astype(q.dtype)


# ----------------------------------------------------------------------------- references


def reference_linear_attention_quadratic(q, k, v, *, feature="elu+1", feature_params=None,
                                         decay=None, segment_ids=None, eps=1e-6, **unused):
  """Materialises phi(Q) phi(K)^T [seq, seq] per head with a causal gamma**(i - j) mask (and,
  with segment_ids, only keys of the query's own segment)."""
  del unused  # accepts chunk_size / interpret for a signature shared with `linear_attention`.
  _check_feature(feature)
  num_heads, kv_heads = check_attention_shapes(q, k, v)
  batch, seq, _, _ = q.shape
  groups = num_heads // kv_heads
  phi_q, phi_k = _feature_qk(q, k, feature, feature_params)
  phi_q = phi_q.reshape(batch, seq, kv_heads, groups, -1)  # [b, t, kvh, g, F]
  log_gamma = _log_decay(decay, num_heads).reshape(kv_heads, groups, 1, 1)
  i, j = jnp.arange(seq)[:, None], jnp.arange(seq)[None, :]
  causal = j <= i
  decay_mat = jnp.where(causal, jnp.exp(jnp.where(causal, i - j, 0) * log_gamma), 0.0)
  scores = jnp.einsum("bqhgf,bkhf->bhgqk", phi_q, phi_k) * decay_mat  # [b, kvh, g, t, t]
  if segment_ids is not None:  # [b, 1, 1, t, t]: a key counts only within the query's segment
    scores = scores * (segment_ids[:, None, None, :, None] == segment_ids[:, None, None, None, :])
  num = jnp.einsum("bhgqk,bkhd->bqhgd", scores, v.astype(jnp.float32))
  den = jnp.moveaxis(scores.sum(-1), 3, 1)  # [b, t, kvh, g]
  out = num / (den[..., None] + eps)
  return out.reshape(q.shape).astype(q.dtype)


def reference_linear_attention_recurrent(q, k, v, *, feature="elu+1", feature_params=None,
                                         decay=None, eps=1e-6, **unused):
  """lax.scan of `recurrent_step` over tokens: O(1) state, one token at a time."""
  del unused
  _check_feature(feature)
  num_heads, _ = check_attention_shapes(q, k, v)
  head_dim = q.shape[-1]
  state = init_state(q.shape[0], num_heads, feature_dim(feature, head_dim, feature_params),
                     head_dim)
  step = functools.partial(recurrent_step, feature=feature, feature_params=feature_params,
                           decay=decay, eps=eps)
  _, out = jax.lax.scan(lambda s, x: step(s, *x)[::-1], state,
                        (jnp.swapaxes(q, 0, 1), jnp.swapaxes(k, 0, 1), jnp.swapaxes(v, 0, 1)))
  return jnp.swapaxes(out, 0, 1)


# ----------------------------------------------------------------------------- recurrent API


class LinearAttentionState(NamedTuple):
  """Per query head running state (per query head because decays are per query head)."""
  kv: jax.Array  # [batch, heads, feature_dim, head_dim] fp32: sum_j gamma**(t-j) phi(k_j)^T v_j
  k_sum: jax.Array  # [batch, heads, feature_dim] fp32: sum_j gamma**(t-j) phi(k_j)


def init_state(batch: int, heads: int, feature_dim: int, head_dim: int) -> LinearAttentionState:
  """Zero state for `recurrent_step`; heads is the number of query heads."""
  return LinearAttentionState(jnp.zeros((batch, heads, feature_dim, head_dim), jnp.float32),
                              jnp.zeros((batch, heads, feature_dim), jnp.float32))


def recurrent_step(state: LinearAttentionState, q_t, k_t, v_t, *, feature="elu+1",
                   feature_params=None, decay=None, eps=1e-6):
  """One generation step. q_t: [batch, heads, head_dim]; k_t, v_t: [batch, kv_heads, head_dim].

  Returns (out_t [batch, heads, head_dim] in q_t's dtype, new state).
  """
  _check_feature(feature)
  num_heads, kv_heads = check_attention_shapes(q_t[:, None], k_t[:, None], v_t[:, None])
  phi_q, phi_k = _feature_qk(q_t[:, None], k_t[:, None], feature, feature_params)
  phi_q = phi_q[:, 0]  # [b, h, F]
  if state.kv.shape != (q_t.shape[0], num_heads, phi_q.shape[-1], q_t.shape[-1]):
    raise ValueError(f"state.kv has shape {state.kv.shape}; expected "
                     f"{(q_t.shape[0], num_heads, phi_q.shape[-1], q_t.shape[-1])}.")
  groups = num_heads // kv_heads
  phi_k = jnp.repeat(phi_k[:, 0], groups, axis=1)  # [b, h, F]; one token, so repeating is cheap
  v_rep = jnp.repeat(v_t.astype(jnp.float32), groups, axis=1)  # [b, h, D]
  gamma = jnp.exp(_log_decay(decay, num_heads))[None, :, None]  # [1, h, 1]
  kv = gamma[..., None] * state.kv + phi_k[..., :, None] * v_rep[..., None, :]
  k_sum = gamma * state.k_sum + phi_k
  num = jnp.einsum("bhf,bhfd->bhd", phi_q, kv)
  den = jnp.einsum("bhf,bhf->bh", phi_q, k_sum)
  out = num / (den[..., None] + eps)
  return out.astype(q_t.dtype), LinearAttentionState(kv, k_sum)
