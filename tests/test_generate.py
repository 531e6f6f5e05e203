"""Sampling: greedy decoding equals the argmax of a full forward pass; top-k limits choices;
recurrent decoding of 'linear'/'hybrid' equals recomputing the buffer, with constant-size state."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import meta

from pretrainx.generate import _buffer_decoder, decode_step, generate, prefill, sample_logits
from pretrainx.model import ModelConfig, Transformer


def test_greedy_generation_matches_forward_argmax():
  cfg = ModelConfig(embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64,
                    max_seq_len=32)
  model = Transformer(cfg)
  params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  prompt = np.array([10, 20, 30], np.int32)
  out = generate(model, params, prompt, 6, rng=jax.random.key(1), temperature=0.0)
  assert out.shape == (6,)
  seq = list(prompt)
  for _ in range(6):
    logits = model.apply({"params": params}, jnp.array([seq]))
    seq.append(int(jnp.argmax(logits[0, -1])))
  assert list(out) == seq[3:]


def test_top_k_only_picks_among_the_k_best():
  logits = jnp.tile(jnp.arange(10.0)[None], (512, 1))
  picks = sample_logits(logits, jax.random.key(0), temperature=5.0, top_k=3)
  assert set(np.asarray(picks).tolist()) == {7, 8, 9}


def _random_params(model, seed=0):
  """Parameters of init's shapes drawn by numpy (no init compilation), away from init values."""
  shapes = meta.unbox(jax.eval_shape(model.init, jax.random.key(0),
                                     jnp.zeros((1, 8), jnp.int32))["params"])
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: jnp.asarray(0.3 * rng.standard_normal(x.shape), jnp.float32),
                      shapes)


@pytest.mark.parametrize("impl,scan_layers", [("linear", True), ("hybrid", False)])
def test_recurrent_generation_matches_full_recompute(impl, scan_layers):
  """'linear'/'hybrid' decode with constant-size state; the greedy tokens equal those of
  recomputing the whole buffer with the chunked (parallel) form, and so do the logits."""
  cfg = ModelConfig(embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64,
                    max_seq_len=32, attention_impl=impl, scan_layers=scan_layers,
                    linear_feature_dim=8, linear_chunk=8, attention_window=4,
                    linear_decay=impl == "linear")
  model = Transformer(cfg)
  params = _random_params(model)
  prompt = np.array([10, 20, 30], np.int32)
  rng = jax.random.key(1)
  out = generate(model, params, prompt, 12, rng=rng, temperature=0.0)
  recompute = jax.jit(_buffer_decoder(model, prompt, 15, 0.0, None))(params, rng)
  assert list(out) == list(np.asarray(recompute))
  assert len(set(out.tolist())) > 2  # a non-degenerate continuation

  tokens = jnp.asarray(np.concatenate([prompt, out]))[None]  # [1, 15]
  full = jax.jit(model.apply)({"params": params}, tokens)[0]  # [15, vocab]
  logits, cache = jax.jit(functools.partial(prefill, model))(params, tokens[:, :3])
  size = lambda c: jax.tree.map(lambda x: (x.shape, x.dtype), c)
  first = size(cache)
  step = jax.jit(functools.partial(decode_step, model))
  for t in range(3, 15):
    np.testing.assert_allclose(np.asarray(logits[0]), np.asarray(full[t - 1]), atol=1e-4)
    logits, cache = step(params, cache, tokens[:, t], t)
    assert size(cache) == first  # the state does not grow with the tokens decoded
  assert size(prefill(model, params, tokens[:, :11])[1]) == first
  # state per layer: 'linear' (S, z); 'hybrid' adds a window-sized ring buffer and an index
  expect = {"k_sum", "kv"} | ({"k_window", "v_window", "index"} if impl == "hybrid" else set())
  layer = cache["layers"] if scan_layers else cache["layers_0"]
  assert set(layer["attention"]) == expect
