"""Sampling: greedy decoding equals the argmax of a full forward pass; top-k limits choices;
recurrent decoding of 'linear'/'hybrid' equals recomputing the buffer, with constant-size state;
KV-cache decoding of 'reference'/'flash' equals it too; batched prompts of different lengths equal
each prompt alone; stop, eos and the token budget end rows; all of it inside a mesh as well."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import meta

from pretrainx import generate as gen
from pretrainx.generate import (_buffer_decoder, decode_step, generate, generate_batch, prefill, sample_logits)
from pretrainx.config import ModelConfig
from pretrainx.model import Transformer
from pretrainx.config import MeshConfig
from pretrainx.sharding import logical_to_shardings, make_mesh, mesh_scope


@pytest.mark.slow
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


@pytest.mark.slow
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


# ----------------------------------------------------------------------------- KV-cache decoding


def _model(impl="reference", scan_layers=True, cache_len=0, **overrides):
  """A tiny model of `impl` ('mixed': a 'reference' and a 'linear' layer) with random params."""
  kw = dict(embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64, max_seq_len=32,
            attention_impl=impl, scan_layers=scan_layers, linear_feature_dim=8, linear_chunk=8,
            attention_window=4, linear_decay=impl == "linear")
  if impl == "flash":  # the Pallas kernel itself, interpreted on CPU
    kw.update(kernel_interpret=True, flash_block_q=8, flash_block_k=16)
  if impl == "mixed":
    kw.update(attention_impl="reference", layer_attention_impls=("reference", "linear"))
  model = Transformer(ModelConfig(**{**kw, **overrides}), cache_len=cache_len)
  return model, _random_params(model, seed=1)


def _cache_layers(cache, cfg):
  return [cache["layers"]] if cfg.scan_layers else [cache[f"layers_{i}"]
                                                     for i in range(cfg.num_layers)]


@pytest.mark.slow
@pytest.mark.parametrize("impl,scan_layers", [
    ("reference", True), ("reference", False), ("flash", True), ("linear", False),
    ("hybrid", True), ("mixed", False)])
def test_cached_generation_matches_full_recompute(impl, scan_layers):
  """Greedy tokens of cached decoding (KV cache / recurrent state) equal recomputing the whole
  buffer; the prefill's last logits equal the full forward's; a softmax layer's cache is
  [batch, cache_len, kv_heads, head_dim] with the valid mask and the next slot."""
  model, params = _model(impl, scan_layers)
  prompt = np.array([10, 20, 30, 40], np.int32)
  rng = jax.random.key(1)
  cached = generate_batch(model, params, [prompt], 12, rng=rng, chunk=5)[0]
  recompute = generate_batch(model, params, [prompt], 12, rng=rng, kv_cache=False)[0]
  assert cached.shape == (12,)
  np.testing.assert_array_equal(cached, recompute)
  assert len(set(cached.tolist())) > 2  # a non-degenerate continuation
  np.testing.assert_array_equal(
      generate(model, params, prompt, 12, rng=rng, temperature=0.0), recompute)

  full = jax.jit(model.apply)({"params": params}, jnp.asarray(prompt)[None])[0, -1]
  logits, cache = jax.jit(functools.partial(prefill, model))(params, jnp.asarray(prompt)[None])
  np.testing.assert_allclose(np.asarray(logits[0]), np.asarray(full), atol=1e-5, rtol=1e-5)
  if impl in ("reference", "flash"):
    lead = (2,) if scan_layers else ()  # scanned layers stack their caches
    for layer in _cache_layers(cache, model.cfg):
      c = layer["attention"]
      assert set(c) == {"k_cache", "v_cache", "valid", "index"}
      assert c["k_cache"].shape == c["v_cache"].shape == lead + (1, 32, 2, 8)
      assert c["valid"].shape == lead + (1, 32)
      np.testing.assert_array_equal(c["valid"], np.broadcast_to(np.arange(32) < 4, lead + (1, 32)))
      np.testing.assert_array_equal(c["index"], np.full(lead, 4))


def test_sampled_cached_generation_follows_the_same_rng_stream():
  """With temperature and top-k the cached decoder draws what the buffer decoder draws."""
  model, params = _model("reference")
  prompt = np.array([3, 1, 4, 1, 5], np.int32)
  kw = dict(rng=jax.random.key(7), temperature=1.0, top_k=20)
  cached = generate(model, params, prompt, 10, **kw)
  np.testing.assert_array_equal(cached, generate(model, params, prompt, 10, **kw))
  np.testing.assert_array_equal(cached, generate(model, params, prompt, 10, kv_cache=False, **kw))
  assert len(set(cached.tolist())) > 2


PROMPTS = [np.array(p, np.int32) for p in ([5, 6, 7], [9, 8, 7, 6, 5, 4, 3], [42], [1, 2, 3, 4, 5])]


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["reference", "hybrid"])
def test_batched_prompts_of_different_lengths_equal_each_alone(impl):
  """Prompts of different lengths decoded together (softmax: one left-padded batch) give each
  prompt's tokens decoded alone, greedy."""
  model, params = _model(impl)
  rng = jax.random.key(0)
  batch = generate_batch(model, params, PROMPTS, 9, rng=rng, chunk=4)
  assert [len(b) for b in batch] == [9] * len(PROMPTS)
  for prompt, out in zip(PROMPTS, batch):
    np.testing.assert_array_equal(out, generate_batch(model, params, [prompt], 9, rng=rng)[0])
  if impl == "reference":  # and the recompute reference, per prompt
    np.testing.assert_array_equal(batch[1], generate_batch(model, params, [PROMPTS[1]], 9, rng=rng,
                                                           kv_cache=False)[0])


def test_left_padding_is_cached_as_invalid():
  """decode=True with segment_ids 0 on left padding: each row's logits at its real tokens equal
  the prompt's own forward pass (RoPE positions 0, 1, ... from the first real token)."""
  model, params = _model("reference", scan_layers=False)
  width = max(len(p) for p in PROMPTS)
  tokens, positions, seg = (np.zeros((len(PROMPTS), width), np.int32) for _ in range(3))
  for r, p in enumerate(PROMPTS):
    tokens[r, width - len(p):], positions[r, width - len(p):] = p, np.arange(len(p))
    seg[r, width - len(p):] = 1
  apply = jax.jit(functools.partial(model.apply, decode=True, mutable=["cache"]))
  logits, variables = apply({"params": params}, tokens, positions, seg)
  forward = jax.jit(model.apply)
  for r, p in enumerate(PROMPTS):
    alone = forward({"params": params}, jnp.asarray(p)[None])[0]
    np.testing.assert_allclose(np.asarray(logits[r, width - len(p):]), np.asarray(alone),
                               atol=1e-5, rtol=1e-5)
    valid = variables["cache"]["layers_0"]["attention"]["valid"][r]
    slots = np.arange(32)
    np.testing.assert_array_equal(valid, (slots >= width - len(p)) & (slots < width))
  assert np.isfinite(np.asarray(logits)).all()  # padding queries see no key: zeros, not NaN
  linear, linear_params = _model("linear")
  with pytest.raises(ValueError, match="one document per row"):
    linear.apply({"params": linear_params}, tokens, positions, seg, decode=True, mutable=["cache"])


@pytest.mark.slow
def test_stop_eos_and_the_token_budget_end_rows():
  """stop(row, ids) ends its row after that token, eos cuts before itself, the budget is capped
  by max_seq_len / cache_len, and the reference decoder applies the same rules."""
  model, params = _model("reference")
  rng = jax.random.key(0)
  prompts = PROMPTS[:2]
  base = generate_batch(model, params, prompts, 10, rng=rng, chunk=4)
  calls = []

  def stop(row, ids):
    calls.append((row, len(ids)))
    return row == 1 and len(ids) == 3

  out = generate_batch(model, params, prompts, 10, rng=rng, chunk=4, stop=stop)
  np.testing.assert_array_equal(out[0], base[0])
  np.testing.assert_array_equal(out[1], base[1][:3])
  assert [n for r, n in calls if r == 1] == [1, 2, 3]  # never called for an ended row
  assert [n for r, n in calls if r == 0] == list(range(1, 11))
  assert [len(o) for o in generate_batch(model, params, prompts, 10, rng=rng,
                                         stop=lambda r, ids: True)] == [1, 1]

  eos = int(base[0][3])
  cut = lambda ids: ids[:list(ids).index(eos)] if eos in list(ids) else ids
  out = generate_batch(model, params, prompts, 10, rng=rng, chunk=4, eos_id=eos, stop=stop)
  np.testing.assert_array_equal(out[0], cut(base[0]))
  np.testing.assert_array_equal(out[1], cut(base[1][:3]))
  assert len(out[0]) <= 3
  recompute = generate_batch(model, params, prompts, 10, rng=rng, eos_id=eos, stop=stop,
                             kv_cache=False)
  for a, b in zip(out, recompute):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(generate(model, params, prompts[0], 10, rng=rng, temperature=0.0,
                                         eos_id=eos), cut(base[0]))

  long = np.arange(1, 29, dtype=np.int32)  # 28 of max_seq_len=32: room for 4
  assert [len(o) for o in generate_batch(model, params, [long, prompts[0]], 10, rng=rng)] == [4, 10]
  assert [len(o) for o in generate_batch(model, params, prompts, 0, rng=rng)] == [0, 0]
  tight = Transformer(dataclasses.replace(model.cfg, max_seq_len=20))  # padding stays within it
  assert [len(o) for o in generate_batch(tight, params, [long[:17], prompts[0]], 10,
                                         rng=rng)] == [3, 10]
  small = Transformer(model.cfg, cache_len=16)  # cache_len caps prompt + new ids
  assert len(generate(small, params, np.arange(1, 11), 20, rng=rng, temperature=0.0)) == 6
  with pytest.raises(ValueError, match="16 tokens leaves no room within the model's cache_len=16"):
    generate_batch(small, params, [np.arange(1, 17)], 4, rng=rng)
  with pytest.raises(ValueError, match="prompt 1 is empty"):
    generate_batch(model, params, [prompts[0], np.array([], np.int32)], 4, rng=rng)
  with pytest.raises(ValueError, match="prompt is empty"):
    generate(model, params, np.array([], np.int32), 4, rng=rng)


def test_the_chunk_function_compiles_once_per_batch_and_cache_shape():
  model, params = _model("reference")
  rng = jax.random.key(0)
  generate_batch(model, params, PROMPTS[:2], 10, rng=rng, chunk=3)  # 4 chunks, the last short
  size = gen._decode_chunk._cache_size()
  generate_batch(model, params, PROMPTS[:2], 10, rng=rng, chunk=3)
  generate_batch(model, params, PROMPTS[:2][::-1], 10, rng=rng, chunk=3)
  assert gen._decode_chunk._cache_size() == size


def test_generation_under_a_mesh_equals_without():
  """As the runtime samples: params sharded by their logical axes, inside mesh_scope."""
  model, params = _model("reference")
  rng = jax.random.key(0)
  plain = generate_batch(model, params, PROMPTS, 6, rng=rng)
  mesh_cfg = MeshConfig(data=2, fsdp=2, tensor=2)
  mesh = make_mesh(mesh_cfg)
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  sharded = jax.device_put(params, logical_to_shardings(abstract, mesh, mesh_cfg.rules))
  with mesh_scope(mesh, mesh_cfg.rules):
    meshed = generate_batch(model, sharded, PROMPTS, 6, rng=rng)
    one = generate(model, sharded, PROMPTS[1], 6, rng=rng, temperature=0.0)
  for a, b in zip(plain, meshed):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(one, plain[1])
