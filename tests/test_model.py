"""The decoder LM: shapes, dtypes, causality, packed segments, RoPE, input validation."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.reference import reference_attention
from pretrainx.config import ModelConfig
from pretrainx.model import Transformer
from pretrainx.flops import count_params
from pretrainx.model.layers import apply_rope, project

CFG = ModelConfig(vocab_size=259, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  mlp_dim=64, max_seq_len=64)


def _init(cfg, seq=16, batch=2):
  model = Transformer(cfg)
  tokens = jax.random.randint(jax.random.key(1), (batch, seq), 3, cfg.vocab_size)
  params = model.init(jax.random.key(0), tokens)["params"]
  return model, params, tokens


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("scan_layers", [True, False])
def test_shapes_and_dtypes(dtype, scan_layers):
  cfg = ModelConfig(**{**CFG.__dict__, "dtype": dtype, "scan_layers": scan_layers})
  model, params, tokens = _init(cfg)
  logits = model.apply({"params": params}, tokens)
  chex.assert_shape(logits, (2, 16, cfg.padded_vocab_size))
  chex.assert_type(logits, jnp.float32)
  chex.assert_tree_all_finite(logits)
  for leaf in jax.tree.leaves(params):
    chex.assert_type(leaf.value if hasattr(leaf, "value") else leaf, jnp.float32)
  n = sum(np.prod(x.shape) for x in jax.tree.leaves(jax.tree.map(lambda b: b.value, params,
                                                                 is_leaf=lambda b: hasattr(b, "value"))))
  padding = (cfg.padded_vocab_size - cfg.vocab_size) * cfg.embed_dim
  assert n == count_params(cfg)["total"] + padding
  # padded vocabulary ids are never predicted
  assert float(jnp.max(logits[..., cfg.vocab_size:])) < -1e8


@pytest.mark.slow
def test_untied_embeddings_and_remat_match():
  cfg = ModelConfig(**{**CFG.__dict__, "tie_embeddings": False})
  model, params, tokens = _init(cfg)
  remat = Transformer(ModelConfig(**{**cfg.__dict__, "remat_policy": "full"}))
  loss = lambda m, p: jnp.mean(jax.nn.logsumexp(m.apply({"params": p}, tokens), -1))
  g1 = jax.grad(lambda p: loss(model, p))(params)
  g2 = jax.grad(lambda p: loss(remat, p))(params)
  chex.assert_trees_all_close(g1, g2, atol=1e-6)
  assert "lm_head" in params


@pytest.mark.slow
@pytest.mark.parametrize("unroll,remat", [(2, "none"), (2, "full"), (3, "none")],
                         ids=["all", "all-remat", "past-depth"])
def test_unrolled_scan_keeps_the_stacked_params_and_the_function(unroll, remat):
  base = ModelConfig(**{**CFG.__dict__, "remat_policy": remat})
  model, params, tokens = _init(base)
  unrolled = Transformer(ModelConfig(**{**base.__dict__, "scan_unroll": unroll}))
  assert jax.tree.structure(unrolled.init(jax.random.key(0), tokens)["params"]) == \
      jax.tree.structure(params)  # still stacked: params["layers"][...] is [layers, ...]
  loss = lambda m, p: jnp.mean(jax.nn.logsumexp(m.apply({"params": p}, tokens), -1))
  l1, g1 = jax.value_and_grad(lambda p: loss(model, p))(params)
  l2, g2 = jax.value_and_grad(lambda p: loss(unrolled, p))(params)
  np.testing.assert_allclose(l1, l2, rtol=1e-6)
  chex.assert_trees_all_close(g1, g2, atol=1e-6)


def test_causality():
  model, params, tokens = _init(CFG)
  changed = tokens.at[:, 10].set((tokens[:, 10] + 7) % CFG.vocab_size)
  a = model.apply({"params": params}, tokens)
  b = model.apply({"params": params}, changed)
  np.testing.assert_array_equal(np.asarray(a[:, :10]), np.asarray(b[:, :10]))
  assert not np.allclose(np.asarray(a[:, 10:]), np.asarray(b[:, 10:]))


@pytest.mark.slow
def test_packed_segments_do_not_leak():
  """Logits of document 2 are the same whether or not document 1 precedes it in the pack."""
  model, params, _ = _init(CFG)
  doc1 = jax.random.randint(jax.random.key(5), (7,), 3, 259)
  doc2 = jax.random.randint(jax.random.key(6), (9,), 3, 259)
  packed = jnp.concatenate([doc1, doc2])[None]
  seg = jnp.array([[1] * 7 + [2] * 9])
  pos = jnp.array([list(range(7)) + list(range(9))])
  packed_logits = model.apply({"params": params}, packed, pos, seg)[0, 7:]
  alone = model.apply({"params": params}, doc2[None])[0]
  np.testing.assert_allclose(np.asarray(packed_logits), np.asarray(alone), atol=1e-5, rtol=1e-5)
  # ...and without segment ids it does leak, so the test can fail.
  leaky = model.apply({"params": params}, packed, pos)[0, 7:]
  assert not np.allclose(np.asarray(leaky), np.asarray(alone), atol=1e-3)


def test_rope_scores_depend_only_on_relative_position():
  q = jax.random.normal(jax.random.key(0), (1, 1, 1, 16))
  k = jax.random.normal(jax.random.key(1), (1, 1, 1, 16))

  def score(pq, pk):
    rq = apply_rope(q, jnp.array([[pq]]), ModelConfig())
    rk = apply_rope(k, jnp.array([[pk]]), ModelConfig())
    return float(jnp.sum(rq * rk))

  assert score(5, 2) == pytest.approx(score(103, 100), rel=1e-4, abs=1e-5)
  assert score(7, 7) == pytest.approx(score(0, 0), rel=1e-4, abs=1e-5)
  assert abs(score(5, 2) - score(5, 4)) > 1e-3


def test_reference_attention_gqa_equals_repeated_kv():
  q = jax.random.normal(jax.random.key(0), (2, 8, 4, 16))
  k = jax.random.normal(jax.random.key(1), (2, 8, 2, 16))
  v = jax.random.normal(jax.random.key(2), (2, 8, 2, 16))
  out = reference_attention(q, k, v)
  full = reference_attention(q, jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2))
  np.testing.assert_allclose(np.asarray(out), np.asarray(full), atol=1e-6)
  # explicit softmax for head 0, batch 0
  s = jnp.einsum("qd,kd->qk", q[0, :, 0], k[0, :, 0]) / 4.0
  s = jnp.where(jnp.tril(jnp.ones((8, 8), bool)), s, -jnp.inf)
  expect = jax.nn.softmax(s) @ v[0, :, 0]
  np.testing.assert_allclose(np.asarray(out[0, :, 0]), np.asarray(expect), atol=1e-5)


def test_bad_attention_inputs():
  q = jnp.zeros((1, 4, 4, 8))
  with pytest.raises(ValueError, match="head dims do not match"):
    reference_attention(q, jnp.zeros((1, 4, 2, 16)), jnp.zeros((1, 4, 2, 16)))
  with pytest.raises(ValueError, match="does not divide num_heads"):
    reference_attention(q, jnp.zeros((1, 4, 3, 8)), jnp.zeros((1, 4, 3, 8)))


def test_seq_len_above_max_is_refused():
  model, params, _ = _init(CFG)
  with pytest.raises(ValueError, match="exceeds the model's max_seq_len=64"):
    model.apply({"params": params}, jnp.zeros((1, 65), jnp.int32))


def test_bad_model_config():
  with pytest.raises(ValueError, match="num_kv_heads=3 must divide num_heads=4"):
    ModelConfig(num_heads=4, num_kv_heads=3)
  with pytest.raises(ValueError, match="unknown attention_impl 'nope'; choose one of reference"):
    ModelConfig(**{**CFG.__dict__, "attention_impl": "nope"})
  with pytest.raises(ValueError, match="scan_unroll=0 must be at least 1"):
    ModelConfig(**{**CFG.__dict__, "scan_unroll": 0})


@pytest.mark.parametrize("spec,x_shape,w_shape,contract,transposed", [
    ("bsd,dm->bsm", (2, 5, 8), (8, 12), 1, False),
    ("bsd,dhk->bshk", (2, 5, 8), (8, 3, 4), 1, False),
    ("bshk,hkd->bsd", (2, 5, 3, 4), (3, 4, 8), 2, False),
    ("bsd,vd->bsv", (2, 5, 8), (11, 8), 1, True),
])
def test_project_equals_the_einsum_forward_and_gradients(spec, x_shape, w_shape, contract,
                                                         transposed):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
  w = jnp.asarray(rng.standard_normal(w_shape), jnp.float32)
  y = jnp.einsum(spec, x, w)
  g = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
  ours = lambda x, w: jnp.sum(g * project(x, w, contract, transposed))
  ref = lambda x, w: jnp.sum(g * jnp.einsum(spec, x, w))
  np.testing.assert_allclose(project(x, w, contract, transposed), y, rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.jit(jax.grad(ours, (0, 1)))(x, w), jax.grad(ref, (0, 1))(x, w)):
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
