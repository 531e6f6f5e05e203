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
  kq, kk, kv, kw = jax.random.split(jax.random.PRNGKey(seed), 4)
  heads = KV_HEADS * groups
  q = jax.random.normal(kq, (batch, seq, heads, head_dim), dtype)
  k = jax.random.normal(kk, (batch, seq, KV_HEADS, head_dim), dtype)
  v = jax.random.normal(kv, (batch, seq, KV_HEADS, head_dim), dtype)
  w = 0.3 * jax.random.normal(kw, (KV_HEADS, head_dim, HEDGEHOG_F))
  decay = jnp.linspace(0.8, 1.0, heads)
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


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("use_decay", [False, True])
@pytest.mark.parametrize("feature", la.FEATURE_MAPS)
def test_chunked_equals_quadratic_equals_recurrent(feature, use_decay, groups):
  q, k, v, w, decay = make_inputs(groups=groups)
  chunked, quadratic, recurrent = all_three(q, k, v, w, decay if use_decay else None,
                                            feature=feature)
  assert chunked.shape == q.shape and chunked.dtype == q.dtype
  assert_close(chunked, quadratic, 1e-5)
  assert_close(recurrent, quadratic, 1e-5)


@pytest.mark.parametrize("chunk_size", [1, 64])
def test_chunk_sizes_and_batch(chunk_size):
  q, k, v, w, decay = make_inputs(batch=2, seq=13)
  chunked, quadratic, _ = all_three(q, k, v, w, decay, feature="elu+1", chunk_size=chunk_size)
  assert_close(chunked, quadratic, 1e-5)


def _grads(fn, q, k, v, w, decay, feature):
  """Gradients w.r.t. q, k, v, hedgehog W and decay of a loss on fn's output."""

  def loss(q, k, v, w, decay):
    out = fn(q, k, v, **kwargs(feature, w, decay))
    return jnp.sum(jnp.sin(out) * jnp.arange(out.size).reshape(out.shape) / out.size)

  return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(q, k, v, w, decay)


@pytest.mark.parametrize("feature,groups", [("hedgehog", 2), ("elu+1", 1), ("taylor", 2)])
def test_gradients_match_quadratic(feature, groups):
  q, k, v, w, decay = make_inputs(groups=groups, seq=29)
  chunked = _grads(functools.partial(la.linear_attention, chunk_size=8), q, k, v, w, decay,
                   feature)
  reference = _grads(la.reference_linear_attention_quadratic, q, k, v, w, decay, feature)
  for name, got, want in zip(("q", "k", "v", "W", "decay"), chunked, reference):
    if name == "W" and feature != "hedgehog":
      continue
    assert float(jnp.max(jnp.abs(want))) > 0, name
    assert_close(got, want, 1e-4)


def test_recurrent_step_matches_chunked():
  q, k, v, w, decay = make_inputs(batch=2, seq=11)
  kw = kwargs("hedgehog", w, decay)
  chunked = la.linear_attention(q, k, v, chunk_size=4, **kw)
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


def test_hedgehog_pair_of_maps():
  q, k, v, w, _ = make_inputs(groups=2, seq=9)
  pair = (jnp.repeat(w, 2, axis=0), w)  # the shared map written as separate q and k maps
  shared = la.linear_attention(q, k, v, feature="hedgehog", feature_params=w, chunk_size=4)
  split = la.linear_attention(q, k, v, feature="hedgehog", feature_params=pair, chunk_size=4)
  assert_close(split, shared, 1e-6)


def test_bf16_inputs():
  q, k, v, w, decay = make_inputs(groups=2)
  bf = [x.astype(jnp.bfloat16) for x in (q, k, v)]
  chunked = la.linear_attention(*bf, feature="elu+1", decay=decay, chunk_size=16)
  assert chunked.dtype == jnp.bfloat16
  assert_close(chunked, la.reference_linear_attention_quadratic(q, k, v, decay=decay), 3e-2)


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("use_segments", [False, True])
def test_hybrid_full_window_is_softmax(groups, use_segments):
  q, k, v, w, _ = make_inputs(batch=2, groups=groups)
  seg = jnp.repeat(jnp.array([[0, 1, 2], [5, 4, 4]]), jnp.array([10, 20, 7]), axis=1)
  seg = seg if use_segments else None
  want = reference_attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg)
  for window in (SEQ, SEQ + 5):
    got = hybrid_attention(q, k, v, window=window, feature="hedgehog", feature_params=w,
                           segment_ids=seg, window_factor=jnp.full((q.shape[2],), 0.3))
    assert_close(got, want, 2e-6)


@pytest.mark.parametrize("window", [1, 5, 16])
def test_hybrid_matches_materialised_reference(window):
  q, k, v, w, _ = make_inputs(batch=2, groups=2)
  seg = jnp.repeat(jnp.array([[3, 1, 2], [0, 0, 0]]), jnp.array([9, 21, 7]), axis=1)
  factor = jnp.array([0.2, 0.4, 0.6, 0.8])

  def loss(fn, q, k, v, w, factor):
    out = fn(q, k, v, window=window, feature="hedgehog", feature_params=w, segment_ids=seg,
             window_factor=factor, chunk_size=8)
    return jnp.sum(jnp.sin(out)), out

  grad = lambda fn: jax.jit(jax.grad(functools.partial(loss, fn), (0, 1, 2, 3, 4), has_aux=True))
  got_grads, got = grad(hybrid_attention)(q, k, v, w, factor)
  want_grads, want = grad(reference_hybrid_attention)(q, k, v, w, factor)
  assert_close(got, want, 1e-5)
  for got_g, want_g in zip(got_grads, want_grads):
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
