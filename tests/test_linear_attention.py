"""Linear attention: Pallas chunked kernel (interpret mode on CPU) vs quadratic and recurrent
references, gradients, single-step generation, the hybrid LoLCATs layer, bf16 and bad inputs.

Shapes are tiny (seq 37 with chunk 16, so the last chunk is padded): interpret mode is slow.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import linear_attention as la
from pallas_kernels.hybrid_attention import hybrid_attention, reference_hybrid_attention
from pallas_kernels.reference import reference_attention

SEQ, HEAD_DIM, KV_HEADS, HEDGEHOG_F = 37, 8, 2, 6


def make_inputs(batch=1, seq=SEQ, groups=2, head_dim=HEAD_DIM, dtype=jnp.float32, seed=0):
  """q [b, t, kvh * groups, d], k/v [b, t, kvh, d], hedgehog W [kvh, d, F], decay [heads]."""
  rng = np.random.default_rng(seed)  # numpy, so that new shapes cost no compilation
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  heads = KV_HEADS * groups
  q = normal(batch, seq, heads, head_dim).astype(dtype)
  k = normal(batch, seq, KV_HEADS, head_dim).astype(dtype)
  v = normal(batch, seq, KV_HEADS, head_dim).astype(dtype)
  w = 0.3 * normal(KV_HEADS, head_dim, HEDGEHOG_F)
  decay = jnp.asarray(np.linspace(0.8, 1.0, heads), jnp.float32)
  return q, k, v, w, decay


def max_err(a, b):
  return float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))


def assert_close(a, b, tol):
  """|a - b| <= tol * max(1, max|b|)."""
  scale = max(1.0, float(jnp.max(jnp.abs(b.astype(jnp.float32)))))
  assert max_err(a, b) <= tol * scale, (max_err(a, b), scale)


def kwargs(feature, w, decay):
  return dict(feature=feature, feature_params=w if feature == "hedgehog" else None, decay=decay)


@functools.partial(jax.jit, static_argnames=("feature", "chunk_size"))
def all_three(q, k, v, w, decay, *, feature, chunk_size=16):
  kw = kwargs(feature, w, decay)
  return (la.linear_attention(q, k, v, chunk_size=chunk_size, **kw),
          la.reference_linear_attention_quadratic(q, k, v, **kw),
          la.reference_linear_attention_recurrent(q, k, v, **kw))


# Every feature map with and without decay; GQA ratios 1 and 2 spread over them (each case is a
# separate interpret-mode compilation, so the full cross product would be slow).
FORWARD_CASES = [("elu+1", False, 1), ("elu+1", True, 2), ("relu", False, 2), ("relu", True, 1),
                 ("hedgehog", False, 1), ("hedgehog", True, 2), ("taylor", False, 1),
                 ("taylor", True, 2)]


@pytest.mark.slow
@pytest.mark.parametrize("feature,use_decay,groups", FORWARD_CASES)
def test_chunked_equals_quadratic_equals_recurrent(feature, use_decay, groups):
  q, k, v, w, decay = make_inputs(groups=groups)
  if feature == "hedgehog" and groups == 2:  # separate q and k maps: (W_q [heads], W_k [kv_heads])
    w = (jnp.concatenate([w, 1.0 - w]), w)
  chunked, quadratic, recurrent = all_three(q, k, v, w, decay if use_decay else None,
                                            feature=feature)
  assert chunked.shape == q.shape and chunked.dtype == q.dtype
  assert_close(chunked, quadratic, 1e-5)
  assert_close(recurrent, quadratic, 1e-5)


def test_chunk_larger_than_seq_and_batch_2():
  q, k, v, w, decay = make_inputs(batch=2, seq=13)
  chunked, quadratic, _ = all_three(q, k, v, w, decay, feature="relu", chunk_size=64)
  assert_close(chunked, quadratic, 1e-5)


def _grads(fn, q, k, v, w, decay, feature):
  """Gradients w.r.t. q, k, v, hedgehog W and decay of a loss on fn's output."""

  def loss(q, k, v, w, decay):
    out = fn(q, k, v, **kwargs(feature, w, decay))
    return jnp.sum(jnp.sin(out) * jnp.arange(out.size).reshape(out.shape) / out.size)

  return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(q, k, v, w, decay)


@pytest.mark.slow
def test_gradients_match_quadratic():
  feature = "hedgehog"
  q, k, v, w, decay = make_inputs(groups=2, seq=29)
  chunked = _grads(functools.partial(la.linear_attention, chunk_size=8), q, k, v, w, decay,
                   feature)
  reference = _grads(la.reference_linear_attention_quadratic, q, k, v, w, decay, feature)
  for name, got, want in zip(("q", "k", "v", "W", "decay"), chunked, reference):
    assert float(jnp.max(jnp.abs(want))) > 0, name
    assert_close(got, want, 1e-4)


def test_recurrent_step_matches_chunked():
  q, k, v, w, decay = make_inputs(batch=2, seq=11)
  kw = kwargs("hedgehog", w, decay)
  chunked = jax.jit(functools.partial(la.linear_attention, chunk_size=4, **kw))(q, k, v)
  state = la.init_state(2, q.shape[2], la.feature_dim("hedgehog", HEAD_DIM, w), HEAD_DIM)
  step = jax.jit(functools.partial(la.recurrent_step, **kw))
  outs = []
  for t in range(q.shape[1]):
    out_t, state = step(state, q[:, t], k[:, t], v[:, t])
    outs.append(out_t)
  assert_close(jnp.stack(outs, axis=1), chunked, 1e-5)


def test_taylor_feature_map_is_second_order_exp():
  q, k, _, _, _ = make_inputs(groups=1, seq=3)
  phi_q, phi_k = la.feature_map(q, "taylor"), la.feature_map(k, "taylor")
  assert phi_q.shape[-1] == la.feature_dim("taylor", HEAD_DIM) == 1 + HEAD_DIM + HEAD_DIM**2
  s = jnp.einsum("btd,btd->bt", q[:, :, 0], k[:, :, 0]) / HEAD_DIM**0.5
  assert_close(jnp.einsum("btf,btf->bt", phi_q[:, :, 0], phi_k[:, :, 0]), 1 + s + s**2 / 2, 1e-5)


def test_bf16_inputs():
  q, k, v, w, decay = make_inputs(groups=2)
  bf = [x.astype(jnp.bfloat16) for x in (q, k, v)]
  chunked = jax.jit(functools.partial(la.linear_attention, feature="elu+1", chunk_size=16))(
      *bf, decay=decay)
  assert chunked.dtype == jnp.bfloat16
  assert_close(chunked, la.reference_linear_attention_quadratic(q, k, v, decay=decay), 3e-2)


@pytest.mark.parametrize("groups,use_segments", [(1, False), (2, True)])
def test_hybrid_full_window_is_softmax(groups, use_segments):
  q, k, v, w, _ = make_inputs(batch=2, groups=groups)
  seg = np.repeat(np.array([[0, 1, 2], [5, 4, 4]]), [10, 20, 7], axis=1)
  seg = jnp.asarray(seg) if use_segments else None
  factor = jnp.full((q.shape[2],), 0.3)

  @jax.jit
  def run(q, k, v, w, seg):
    hybrid = functools.partial(hybrid_attention, q, k, v, feature="hedgehog", feature_params=w,
                               segment_ids=seg, window_factor=factor)
    want = reference_attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg)
    return hybrid(window=SEQ), hybrid(window=SEQ + 5), want

  at_seq, past_seq, want = run(q, k, v, w, seg)
  assert_close(at_seq, want, 2e-6)
  assert_close(past_seq, want, 2e-6)


HYBRID_SEGMENTS = jnp.asarray(np.repeat(np.array([[3, 1, 2], [0, 0, 0]]), [9, 21, 7], axis=1))


def _hybrid(fn, window, q, k, v, w, factor):
  return fn(q, k, v, window=window, feature="taylor" if window == 16 else "hedgehog",
            feature_params=w, segment_ids=HYBRID_SEGMENTS, window_factor=factor, chunk_size=8)


def test_hybrid_matches_materialised_reference():
  q, k, v, w, _ = make_inputs(batch=2, groups=2)
  factor = jnp.array([0.2, 0.4, 0.6, 0.8])

  @jax.jit
  def run(*args):
    return [(_hybrid(hybrid_attention, window, *args),
             _hybrid(reference_hybrid_attention, window, *args)) for window in (1, 16)]

  for got, want in run(q, k, v, w, factor):
    assert_close(got, want, 1e-5)


def test_hybrid_gradients_match_materialised_reference():
  q, k, v, w, _ = make_inputs(batch=2, groups=2)
  factor = jnp.array([0.2, 0.4, 0.6, 0.8])
  loss = lambda fn, *args: (jnp.sum(jnp.sin(out := _hybrid(fn, 5, *args))), out)
  grad = lambda fn: jax.grad(functools.partial(loss, fn), (0, 1, 2, 3, 4), has_aux=True)
  (got, got_out), (want, want_out) = jax.jit(
      lambda *a: (grad(hybrid_attention)(*a), grad(reference_hybrid_attention)(*a)))(
          q, k, v, w, factor)
  assert_close(got_out, want_out, 1e-5)
  for got_g, want_g in zip(got, want):
    assert float(jnp.max(jnp.abs(want_g))) > 0
    assert_close(got_g, want_g, 1e-4)


def test_bad_inputs():
  q, k, v, w, _ = make_inputs(groups=2, seq=5)
  with pytest.raises(ValueError, match="elu\\+1, relu, hedgehog, taylor"):
    la.linear_attention(q, k, v, feature="cosformer")
  with pytest.raises(ValueError, match="unknown feature map"):
    la.feature_map(q, "softmax")
  with pytest.raises(ValueError, match="unknown feature map"):
    hybrid_attention(q, k, v, window=2, feature="exp")
  with pytest.raises(ValueError, match="head dims do not match"):
    la.linear_attention(q, k[..., :4], v[..., :4])
  with pytest.raises(ValueError, match="does not divide"):
    la.linear_attention(q[:, :, :3], k, v)
  with pytest.raises(ValueError, match="does not divide"):
    hybrid_attention(q[:, :, :3], k, v, window=2, feature="relu")
  with pytest.raises(ValueError, match="hedgehog"):
    la.linear_attention(q, k, v, feature="hedgehog")
  with pytest.raises(ValueError, match="decay"):
    la.linear_attention(q, k, v, decay=jnp.ones(3))
  with pytest.raises(ValueError, match="window"):
    hybrid_attention(q, k, v, window=0, feature="relu")
  with pytest.raises(ValueError, match="state"):
    la.recurrent_step(la.init_state(1, 4, 3, HEAD_DIM), q[:, 0], k[:, 0], v[:, 0])
  np.testing.assert_array_equal(la.init_state(2, 4, 6, 8).k_sum, np.zeros((2, 4, 6)))
