"""pretrainx.peft: LoRA init/merge, freezing masks and the masked optimizer, Llama-Pro block
expansion and G_stack depth growth, on tiny scanned and unrolled models."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pretrainx.cpt import growth, peft
from pretrainx.config import ModelConfig
from pretrainx.model import Transformer
from pretrainx.config import OptimizerConfig, ScheduleConfig
from pretrainx.optim import make_optimizer

CFG = ModelConfig(vocab_size=259, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  mlp_dim=64, max_seq_len=32, sow_kurtosis=False)
LAYOUTS = pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unrolled"])


@functools.lru_cache(maxsize=None)
def _model(scan, num_layers=2):
  """(cfg, model, unboxed params, tokens), built once per layout (callers never mutate them)."""
  cfg = dataclasses.replace(CFG, scan_layers=scan, num_layers=num_layers)
  model = Transformer(cfg)
  rng = np.random.default_rng(num_layers + 10 * scan)
  tokens = jnp.asarray(rng.integers(3, cfg.vocab_size, (2, 8)), jnp.int32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), tokens)["params"]  # no init compile
  params = jax.tree.map(lambda x: jnp.asarray(0.2 * rng.standard_normal(x.value.shape),
                                              jnp.float32), shapes, is_leaf=peft.is_box)
  return cfg, model, params, tokens


def _init_lora(params, lcfg, seed=0):
  """peft.init_lora under one jit (eager jax.random compiles once per shape: slow on CPU)."""
  return jax.jit(lambda p, r: peft.init_lora(p, lcfg, r))(params, jax.random.key(seed))


@functools.lru_cache(maxsize=None)
def _jit_apply(cfg):
  return jax.jit(Transformer(cfg).apply)


def _logits(model, params, tokens):
  """model.apply, jitted once per config (eager applies dispatch op by op and are slow)."""
  return _jit_apply(model.cfg)({"params": params}, tokens)


def _flat(tree):
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {peft.path_name(p): np.asarray(x) for p, x in leaves}


def _nonzero_b(lora, seed=3):
  """The adapters with B drawn at random (as after some training)."""
  rng = np.random.default_rng(seed)

  def fill(path, x):
    if peft.path_name(path).endswith(peft.LORA_B):
      return jnp.asarray(0.1 * rng.standard_normal(x.shape), x.dtype)
    return x
  return jax.tree_util.tree_map_with_path(fill, lora)


def _loss(model, params, tokens):
  logits = _logits(model, params, tokens)
  return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(
      logits, jnp.roll(tokens, -1, 1)[..., None], -1)[..., 0])


# ----------------------------------------------------------------------------- LoRA


def _manual_merge(params, lora, scale):
  """An independent merge, written per kernel with named einsums."""
  subscripts = {"q_proj": "...dr,...rhk->...dhk", "k_proj": "...dr,...rhk->...dhk",
                "v_proj": "...dr,...rhk->...dhk", "o_proj": "...hkr,...rd->...hkd"}
  flat, out = _flat(lora), dict(_flat(params))
  for path in out:
    if path + "/lora_a" in flat:
      a, b = flat[path + "/lora_a"], flat[path + "/lora_b"]
      out[path] = out[path] + scale * np.einsum(subscripts[path.rsplit("/", 1)[1]], a, b)
  treedef = jax.tree.structure(params)
  return jax.tree.unflatten(treedef, [out[peft.path_name(p)] for p, _ in
                                      jax.tree_util.tree_flatten_with_path(params)[0]])


@LAYOUTS
def test_lora_identity_at_init_and_merge_equals_base_plus_lora(scan):
  _, model, params, tokens = _model(scan)
  lcfg = peft.LoraConfig(rank=4, alpha=8.0)
  lora = _init_lora(params, lcfg, 7)
  base = _logits(model, params, tokens)
  at_init = _logits(model, peft.lora_merge(params, lora, lcfg), tokens)
  np.testing.assert_array_equal(np.asarray(at_init), np.asarray(base))  # B = 0: unchanged

  lora = _nonzero_b(lora)
  exported = _logits(model, peft.lora_merge(params, lora, lcfg), tokens)
  train_fwd = jax.jit(lambda p, l: _logits(model, peft.lora_merge(p, l, lcfg), tokens))
  reference = _logits(model, _manual_merge(params, lora, lcfg.scale), tokens)
  np.testing.assert_allclose(np.asarray(train_fwd(params, lora)), np.asarray(exported),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(exported), np.asarray(reference), rtol=1e-5, atol=1e-5)
  assert np.max(np.abs(np.asarray(exported) - np.asarray(base))) > 1e-3


def test_lora_factorisation_is_over_contracted_dims():
  """x @ merged == x @ W + scale * (x @ A) @ B, with A contracting what the layer contracts."""
  _, _, params, _ = _model(False)
  lcfg = peft.LoraConfig(rank=3, alpha=6.0, targets=(r"q_proj", r"o_proj", r"down_proj"))
  lora = _nonzero_b(_init_lora(params, lcfg, 2))
  merged = peft.lora_merge(params, lora, lcfg)
  blk, lblk, mblk = params["layers_0"], lora["layers_0"], merged["layers_0"]
  rng = np.random.default_rng(4)
  x = rng.standard_normal((2, 5, 32), np.float32)  # [b, s, embed]
  o = rng.standard_normal((2, 5, 4, 8), np.float32)  # [b, s, heads, head_dim]
  hid = rng.standard_normal((2, 5, 64), np.float32)  # [b, s, mlp]
  cases = [("attention", "q_proj", x, "bsd,dhk->bshk", "bsd,dr->bsr", "bsr,rhk->bshk"),
           ("attention", "o_proj", o, "bshk,hkd->bsd", "bshk,hkr->bsr", "bsr,rd->bsd"),
           ("mlp", "down_proj", hid, "bsm,md->bsd", "bsm,mr->bsr", "bsr,rd->bsd")]
  for mod, name, act, full, s_a, s_b in cases:
    ab = lblk[mod][name]
    adapter = jnp.einsum(s_b, jnp.einsum(s_a, act, ab["lora_a"]), ab["lora_b"])
    expected = jnp.einsum(full, act, blk[mod][name]) + lcfg.scale * adapter
    np.testing.assert_allclose(np.asarray(jnp.einsum(full, act, mblk[mod][name])),
                               np.asarray(expected), rtol=1e-5, atol=1e-5)


@LAYOUTS
def test_lora_shapes_count_and_errors(scan):
  _, _, params, _ = _model(scan)
  lcfg = peft.LoraConfig(rank=4, targets=(r"attention/(q|o)_proj", r"mlp/(gate|down)_proj"))
  lora = jax.eval_shape(lambda r: peft.init_lora(params, lcfg, r), jax.random.key(0))
  lead = (2,) if scan else ()
  blk = lora["layers"] if scan else lora["layers_1"]
  assert blk["attention"]["q_proj"]["lora_a"].shape == lead + (32, 4)
  assert blk["attention"]["q_proj"]["lora_b"].shape == lead + (4, 4, 8)
  assert blk["attention"]["o_proj"]["lora_a"].shape == lead + (4, 8, 4)
  assert blk["attention"]["o_proj"]["lora_b"].shape == lead + (4, 32)
  assert blk["mlp"]["down_proj"]["lora_a"].shape == lead + (64, 4)
  assert "k_proj" not in blk["attention"] and "up_proj" not in blk["mlp"]
  per_layer = (32 * 4 + 4 * 32) * 2 + (32 * 4 + 4 * 64) + (64 * 4 + 4 * 32)
  assert peft.lora_param_count(lora) == 2 * per_layer
  with pytest.raises(ValueError, match=r"matches no parameter path.*attention/q_proj"):
    peft.init_lora(params, peft.LoraConfig(targets=(r"attn/qkv",)), jax.random.key(0))
  with pytest.raises(ValueError, match="matches no parameter path"):  # vectors are not adapted
    peft.init_lora(params, peft.LoraConfig(targets=(r"final_norm",)), jax.random.key(0))
  with pytest.raises(ValueError, match="rank"):
    peft.LoraConfig(rank=0)


def test_lora_skips_biases_and_vectors():
  params = {"attention": {"q_proj": np.ones((8, 2, 4), np.float32),
                          "q_bias": np.ones((2, 4), np.float32)},
            "norm": {"scale": np.ones((8,), np.float32)}}
  lora = jax.eval_shape(lambda r: peft.init_lora(params, peft.LoraConfig(targets=("",)), r),
                        jax.random.key(0))
  assert peft.lora_targets(params, peft.LoraConfig(targets=("",))) == ["attention/q_proj"]
  assert set(lora["attention"]) == {"q_proj"} and "norm" not in lora
  with pytest.raises(ValueError, match=r"'q_bias' matches no parameter path.*attention/q_proj"):
    peft.lora_targets(params, peft.LoraConfig(targets=("q_bias",)))


def test_lora_keeps_logical_axis_names_of_boxed_params():
  model = Transformer(CFG)
  boxed = jax.eval_shape(lambda r: model.init(r, jnp.zeros((1, 8), jnp.int32))["params"],
                         jax.random.key(0))
  lora = jax.eval_shape(lambda r: peft.init_lora(boxed, peft.LoraConfig(rank=2), r),
                        jax.random.key(0))
  o = lora["layers"]["attention"]["o_proj"]
  assert o["lora_a"].names == ("layers", "heads", "head_dim", None)
  assert o["lora_b"].names == ("layers", None, "embed")
  assert lora["layers"]["attention"]["q_proj"]["lora_b"].names == ("layers", None, "heads",
                                                                   "head_dim")


# ----------------------------------------------------------------------------- freezing


def _state_sizes(state):
  return sum(x.size for x in jax.tree.leaves(state) if np.ndim(x) > 0)


def test_masked_optimizer_trains_only_lora():
  """One adamw step (weight decay on) through the merged forward: only the adapters move."""
  _, model, params, tokens = _model(True)
  lcfg = peft.LoraConfig(rank=4)
  tree = {"base": params, "lora": _nonzero_b(_init_lora(params, lcfg, 1))}
  loss = lambda t: _loss(model, peft.lora_merge(t["base"], t["lora"], lcfg), tokens)
  grads = jax.jit(jax.grad(loss))(tree)
  assert all(np.any(np.asarray(g)) for g in jax.tree.leaves(grads))  # nonzero for everything
  opt = peft.masked_optimizer(optax.adamw(1e-2, weight_decay=0.1),
                              peft.trainable_mask(tree, train=(r"^lora/",)))
  state = opt.init(tree)
  assert _state_sizes(state) == 2 * peft.lora_param_count(tree["lora"])  # mu, nu of LoRA only
  updates, state = jax.jit(opt.update)(grads, state, tree)
  new = optax.apply_updates(tree, updates)
  for a, b in zip(jax.tree.leaves(tree["base"]), jax.tree.leaves(new["base"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for a, b in zip(jax.tree.leaves(tree["lora"]), jax.tree.leaves(new["lora"])):
    assert np.all(np.asarray(a) != np.asarray(b))


def test_trainable_mask_freeze_with_project_optimizer():
  _, _, params, _ = _model(False)
  mask = peft.trainable_mask(params, freeze=(r"embed", r"norm", r"^layers_0/"))
  flat = _flat(mask)
  assert flat["layers_1/attention/q_proj"] and flat["layers_1/mlp/up_proj"]
  assert not flat["embed/embedding"] and not flat["final_norm/scale"]
  assert not flat["layers_1/input_norm/scale"] and not flat["layers_0/attention/q_proj"]
  only_mlp = _flat(peft.trainable_mask(params, train=(r"mlp/",), freeze=(r"gate",)))
  assert {p for p, v in only_mlp.items() if v} == {"layers_0/mlp/up_proj", "layers_0/mlp/down_proj",
                                                   "layers_1/mlp/up_proj", "layers_1/mlp/down_proj"}
  opt, _ = make_optimizer(OptimizerConfig(learning_rate=1e-2), 10, ScheduleConfig(warmup_steps=0))
  opt = peft.masked_optimizer(opt, mask)
  grads = jax.tree.map(jnp.ones_like, params)
  state = opt.init(params)
  trained = [np.asarray(x) for x, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask)) if m]
  assert _state_sizes(state) == 2 * sum(x.size for x in trained)
  new = optax.apply_updates(params, jax.jit(opt.update)(grads, state, params)[0])
  for (path, old), now in zip(_flat(params).items(), _flat(new).values()):
    assert np.array_equal(old, now) != flat[path], path


def test_trainable_mask_errors():
  _, _, params, _ = _model(True)
  with pytest.raises(ValueError, match=r"'blocks/' matches no parameter path.*layers/mlp"):
    peft.trainable_mask(params, train=(r"blocks/",))
  with pytest.raises(ValueError, match="freeze regex 'nothing'"):
    peft.trainable_mask(params, freeze=("nothing",))
  with pytest.raises(ValueError, match="no trainable param"):
    peft.trainable_mask(params, freeze=(".",))
  with pytest.raises(ValueError, match="tuple of regexes"):
    peft.trainable_mask(params, train="mlp")
  with pytest.raises(ValueError, match="no param trainable"):
    peft.masked_optimizer(optax.sgd(0.1), jax.tree.map(lambda _: False, params))


# ----------------------------------------------------------------------------- growth


def _block(params, cfg, j):
  if cfg.scan_layers:
    return jax.tree.map(lambda x: np.asarray(x[j]), params["layers"])
  return jax.tree.map(np.asarray, params[f"layers_{j}"])


def _assert_tree_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


def _non_blocks(params):
  return {k: v for k, v in params.items() if not k.startswith("layers")}


@LAYOUTS
def test_expanded_model_is_exact_and_only_new_blocks_train(scan):
  cfg, model, params, tokens = _model(scan, num_layers=3)
  big, big_cfg, new = growth.expand_blocks(params, cfg, every=2)  # [0, 1, 1', 2]
  assert new == [2] and big_cfg.num_layers == 4 and big_cfg.scan_layers == scan
  big_model = Transformer(big_cfg)
  np.testing.assert_array_equal(np.asarray(_logits(big_model, big, tokens)),
                                np.asarray(_logits(model, params, tokens)))
  src = [0, 1, 1, 2]
  copy = _block(big, big_cfg, 2)
  assert not np.any(copy["attention"]["o_proj"]) and not np.any(copy["mlp"]["down_proj"])
  _assert_tree_equal(copy["mlp"]["up_proj"], _block(params, cfg, 1)["mlp"]["up_proj"])
  _assert_tree_equal(copy["attention"]["q_proj"], _block(params, cfg, 1)["attention"]["q_proj"])

  mask = growth.new_block_mask(big, new, big_cfg)
  opt = peft.masked_optimizer(optax.adamw(1e-2, weight_decay=0.1), mask)
  grads = jax.jit(jax.grad(lambda p: _loss(big_model, p, tokens)))(big)
  updates, _ = jax.jit(opt.update)(grads, opt.init(big), big)
  stepped = optax.apply_updates(big, updates)
  for j in (0, 1, 3):
    _assert_tree_equal(_block(stepped, big_cfg, j), _block(params, cfg, src[j]))
  _assert_tree_equal(_non_blocks(stepped), _non_blocks(params))
  trained = _block(stepped, big_cfg, 2)
  assert np.any(trained["attention"]["o_proj"]) and np.any(trained["mlp"]["down_proj"])


@LAYOUTS
def test_expand_positions_order_and_errors(scan):
  cfg, _, params, _ = _model(scan, num_layers=3)
  big, big_cfg, new = growth.expand_blocks(params, cfg, positions=[2, 0])
  assert new == [1, 4] and big_cfg.num_layers == 5
  for j, i in enumerate([0, 0, 1, 2, 2]):
    np.testing.assert_array_equal(_block(big, big_cfg, j)["mlp"]["up_proj"],
                                  _block(params, cfg, i)["mlp"]["up_proj"])
  for bad in ([3], [-1], [1, 1], []):
    with pytest.raises(ValueError, match=r"positions=.* in \[0, 2\]"):
      growth.expand_blocks(params, cfg, positions=bad)
  with pytest.raises(ValueError, match="positive int"):
    growth.expand_blocks(params, cfg, every=0)
  with pytest.raises(ValueError, match="exactly one"):
    growth.expand_blocks(params, cfg, every=1, positions=[0])
  with pytest.raises(ValueError, match="num_layers=4"):
    growth.expand_blocks(params, dataclasses.replace(cfg, num_layers=4), every=1)
  with pytest.raises(ValueError, match="new_block_indices"):
    growth.new_block_mask(big, [5], big_cfg)


@LAYOUTS
def test_stack_layers_order(scan):
  cfg, _, params, tokens = _model(scan, num_layers=2)
  deep, deep_cfg = growth.stack_layers(params, cfg, factor=3)
  assert deep_cfg.num_layers == 6
  for j in range(6):
    _assert_tree_equal(_block(deep, deep_cfg, j), _block(params, cfg, j % 2))
  _assert_tree_equal(_non_blocks(deep), _non_blocks(params))
  assert _logits(Transformer(deep_cfg), deep, tokens).shape == (2, 8, 384)
  same, same_cfg = growth.stack_layers(params, cfg, factor=1)
  assert same_cfg == cfg
  _assert_tree_equal(same, params)
  for bad in (0, -2, 1.5):
    with pytest.raises(ValueError, match="factor"):
      growth.stack_layers(params, cfg, factor=bad)
  with pytest.raises(ValueError, match="scan_layers"):
    growth.stack_layers(params, dataclasses.replace(cfg, scan_layers=not scan), factor=2)
