"""Width growth (pretrainx.cpt.width): the grown model computes the source's logits at step 0
(fp32, atol 1e-5) for embed, heads and mlp growth, alone and together, tied and untied, scanned
and unrolled, combined with G_stack, from pretrainx and Hugging Face sources; it trains; only
the copies train with TuneConfig.new_width_only; shrinking is one line and exit 2.
"""

import dataclasses
import functools

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pretrainx.config import ModelConfig
from pretrainx.cpt.growth import stack_layers
from pretrainx.cpt.width import grow_width, new_width_mask
from pretrainx.model import Transformer

SRC = ModelConfig(vocab_size=64, vocab_multiple=64, embed_dim=16, num_layers=2, num_heads=4,
                  num_kv_heads=2, mlp_dim=24, max_seq_len=16, sow_kurtosis=False)
TOKENS = np.random.default_rng(0).integers(0, 64, size=(2, 12)).astype(np.int32)


def _perturbed(params, seed=1):
  """Params with norm gains and biases away from their 1 / 0 init and a wider embedding (so the
  tied logits are of substance)."""
  flat = flax.traverse_util.flatten_dict(params, sep="/")
  keys = jax.random.split(jax.random.key(seed), len(flat))
  for key, name in zip(keys, sorted(flat)):
    x = flat[name]
    if "norm" in name or "bias" in name or "embedding" in name:
      x = x + 0.3 * jax.random.normal(key, x.shape, x.dtype)
    flat[name] = x
  return flax.traverse_util.unflatten_dict(flat, sep="/")


@functools.lru_cache(maxsize=None)
def _source(cfg):
  init = lambda key: nn.unbox(Transformer(cfg).init(key, jnp.asarray(TOKENS))["params"])
  return jax.jit(lambda key: _perturbed(init(key)))(jax.random.key(0))


def _logits(cfg, params):
  return np.asarray(Transformer(cfg).apply({"params": params}, jnp.asarray(TOKENS)))


def _assert_same(a, b):
  assert np.std(a) > 0.3  # logits of substance
  np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


LAYOUTS = {
    "tied-scanned": {}, "untied-unrolled": dict(tie_embeddings=False, scan_layers=False),
    "bias-scalar-projection": dict(qkv_bias=True, norm_scale="scalar", embed_projection=True),
}
GROWTHS = {
    "embed": dict(embed_dim=32),
    "heads": dict(num_heads=8),
    "kv_heads": dict(num_heads=8, num_kv_heads=4),
    "mlp": dict(mlp_dim=48),
    "all": dict(embed_dim=32, num_heads=8, num_kv_heads=4, mlp_dim=48),
}


@pytest.mark.parametrize("growth,layout", [
    *((g, "tied-scanned") for g in ("embed", "heads", "kv_heads", "mlp", "all")),
    ("all", "untied-unrolled"), ("all", "bias-scalar-projection")])
def test_grown_logits_equal_the_source(growth, layout):
  src = dataclasses.replace(SRC, **LAYOUTS[layout])
  params = _source(src)
  target = dataclasses.replace(src, **{"head_dim": 4, **GROWTHS[growth]})
  grown, cfg = grow_width(params, src, target, method="hypercloning")
  assert cfg.embed_dim == target.embed_dim and cfg.mlp_dim == target.mlp_dim
  _assert_same(_logits(cfg, grown), _logits(src, params))


def test_bert2bert_non_multiples_and_noise_keep_the_function():
  """bert2BERT copies random heads and neurons into any larger width; zero-sum noise on the
  divided weights keeps the function and makes the copies differ."""
  params = _source(SRC)
  target = dataclasses.replace(SRC, num_heads=6, num_kv_heads=3, mlp_dim=31, embed_dim=32,
                               head_dim=4)
  grown, cfg = grow_width(params, SRC, target, method="bert2bert", noise=0.1, seed=3)
  _assert_same(_logits(cfg, grown), _logits(SRC, params))
  down = np.asarray(grown["layers"]["mlp"]["down_proj"])  # [layers, mlp, embed]
  assert not np.allclose(down[:, :, :16], down[:, :, 16:])  # embed copies differ


def test_width_and_depth_growth_commute():
  """G_stack after widening and widening after G_stack both keep the function, and agree."""
  params = _source(SRC)
  target = dataclasses.replace(SRC, head_dim=4, **GROWTHS["all"])
  wide, cfg = grow_width(params, SRC, target)
  a, cfg_a = stack_layers(wide, cfg, factor=2)
  deep, deep_cfg = stack_layers(params, SRC, factor=2)
  b, cfg_b = grow_width(deep, deep_cfg, dataclasses.replace(deep_cfg, head_dim=4, **GROWTHS["all"]))
  assert cfg_a == cfg_b
  stacked = _logits(deep_cfg, deep)
  _assert_same(_logits(cfg_a, a), stacked)
  _assert_same(_logits(cfg_b, b), stacked)


def test_new_width_mask_marks_only_copies():
  params = _source(SRC)
  target = dataclasses.replace(SRC, head_dim=4, **GROWTHS["all"])
  grown, cfg = grow_width(params, SRC, target)
  mask = new_width_mask(grown, SRC, cfg, "hypercloning")
  emb = np.broadcast_to(mask["embed"]["embedding"], grown["embed"]["embedding"].shape)
  assert not emb[:, :16].any() and emb[:, 16:].all()
  down = np.broadcast_to(mask["layers"]["mlp"]["down_proj"],
                         grown["layers"]["mlp"]["down_proj"].shape)  # [layers, mlp, embed]
  assert not down[:, :24, :16].any() and down[:, 24:].all() and down[:, :, 16:].all()


@pytest.mark.parametrize("change,match", [
    (dict(embed_dim=8, head_dim=4), "smaller than the source's 16"),
    (dict(embed_dim=24, head_dim=4), "not an integer multiple"),
    (dict(mlp_dim=36), "integer multiples"),
    (dict(embed_dim=32), "keeps head_dim=4"),
])
def test_impossible_growth_is_one_line(change, match):
  with pytest.raises(ValueError, match=match) as err:
    grow_width(_source(SRC), SRC, dataclasses.replace(SRC, **change))
  assert "\n" not in str(err.value)


# -- through initial_state ----------------------------------------------------------------------

WIDE = dict(embed_dim=128, num_heads=8, num_kv_heads=4, mlp_dim=384, head_dim=16)


def _export(exp, path):
  """A params export of `exp`'s model with perturbed norms and embedding (a trained stand-in)."""
  from pretrainx import checkpoint
  from pretrainx.config import experiment_to_gin

  params = _source(exp.model)
  return checkpoint.save_params(str(path), params, {"step": 0,
                                                    "config_gin": experiment_to_gin(exp)})


def _started(exp):
  from pretrainx.train.init import initial_state
  from pretrainx.train.runtime import build_runtime

  rt = build_runtime(exp)
  with rt.scope():
    state, _ = initial_state(rt, exp.init)
  return rt, state


@pytest.mark.slow  # compiles the grown train step: ~20 s on 2 shared cores
def test_export_source_grown_with_g_stack_keeps_the_function_and_trains_only_copies(tiny_exp,
                                                                                    tmp_path):
  """A pretrainx export widened (all widths x2) and G_stacked (x2) through initial_state computes
  the G_stacked source's logits; one step with TuneConfig.new_width_only lowers the loss and
  leaves the source's own entries as they were."""
  from pretrainx.config import InitConfig, TuneConfig
  from pretrainx.data.pipeline import TrainBatches

  src = tiny_exp()
  source = _export(src, tmp_path / "export")
  exp = tiny_exp(model={**WIDE, "num_layers": 4}, tune={"new_width_only": True},
                 optimizer={"weight_decay": 0.0})
  exp = dataclasses.replace(exp, init=InitConfig(source=source, grow_width="hypercloning",
                                                 stack_factor=2))
  rt, state = _started(exp)
  batch = TrainBatches(exp.data, exp.run.seq_len, 8).batch_at(0)
  tokens = jnp.asarray(batch["inputs"][:2, :16])
  ours = Transformer(exp.model).apply({"params": state.params}, tokens)
  deep, deep_cfg = stack_layers(_source(src.model), src.model, factor=2)  # G_stack's function
  theirs = Transformer(deep_cfg).apply({"params": deep}, tokens)
  _assert_same(np.asarray(ours), np.asarray(theirs))

  before = jax.device_get(state.params)
  losses = []
  for _ in range(3):  # the schedule's warmup starts at lr 0
    state, metrics = rt.train_step(state, rt.put_batch(batch))
    losses.append(float(metrics["loss"]))
  assert losses[-1] < losses[0] - 1e-3, losses
  after = jax.device_get(state.params)
  down0, down1 = before["layers"]["mlp"]["down_proj"], after["layers"]["mlp"]["down_proj"]
  np.testing.assert_array_equal(down1[:, :192, :64], down0[:, :192, :64])  # the source's
  assert not np.array_equal(down1[:, 192:], down0[:, 192:])  # the copies train


TINY_HF = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
               rms_norm_eps=1e-5, initializer_range=0.15)


@pytest.mark.slow  # builds the runtime of a grown run from an HF directory: ~10 s each
@pytest.mark.parametrize("kind,tied", [("Llama", False), ("Qwen2", True)])
def test_hugging_face_source_grown_keeps_its_logits(tiny_exp, tmp_path, kind, tied):
  """An HF Llama (untied) or Qwen2 (q/k/v biases, tied) source, grown through initial_state at
  the run's bound widths (with_source_architecture takes the rest from config.json), computes
  transformers' logits."""
  import torch
  import transformers

  from pretrainx.config import InitConfig, with_source_architecture

  torch.manual_seed(0)
  config = getattr(transformers, f"{kind}Config")(**TINY_HF, tie_word_embeddings=tied)
  model = getattr(transformers, f"{kind}ForCausalLM")(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name or name.endswith("bias"):
        p.add_(0.3 * torch.randn_like(p))
  model.save_pretrained(tmp_path / "hf", safe_serialization=True)
  wide = dict(embed_dim=128, num_heads=8, num_kv_heads=2, mlp_dim=256)
  exp = tiny_exp(model=wide, init={"source": str(tmp_path / "hf"), "grow_width": "hypercloning"})
  exp = with_source_architecture(exp, bound=set(wide))
  assert exp.model.head_dim == 16 and exp.model.vocab_size == 300
  _, state = _started(exp)
  tokens = np.random.default_rng(0).integers(0, 300, size=(2, 16))
  ours = np.asarray(Transformer(exp.model).apply({"params": state.params}, jnp.asarray(tokens)))
  with torch.no_grad():
    theirs = model(torch.from_numpy(tokens).long()).logits.numpy()
  np.testing.assert_allclose(ours[..., :300], theirs, atol=1e-4, rtol=0)


def test_a_smaller_width_is_one_line_and_exit_2(tiny_exp, tmp_path, run_cli):
  source = _export(tiny_exp(), tmp_path / "export")
  out = run_cli("train", "--gin_file=gin_configs/tiny.gin",
                f"--gin_param=RunConfig.run_dir='{tmp_path / 'run'}'",
                f"--gin_param=InitConfig.source='{source}'",
                "--gin_param=InitConfig.grow_width='hypercloning'",
                "--gin_param=ModelConfig.mlp_dim=96")
  assert out.returncode == 2
  assert "only grows" in out.stderr and "mlp_dim=96" in out.stderr
  assert len(out.stderr.strip().splitlines()) == 1, out.stderr
