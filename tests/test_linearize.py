"""Linearizing (LoLCATs): conversion keeps the model, stage 1 trains only feature maps and lowers
each layer's MSE, stage 2 trains only LoRA, generation forms agree, bad input is explained."""

import dataclasses
import json
import os

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import conftest
from pretrainx.generate import generate
from pretrainx.cpt import linearize as C
from pretrainx.linearize import transfer as T
from pretrainx.linearize.pipeline import linearize
from pretrainx.config import ModelConfig
from pretrainx.model import Transformer
from pretrainx.config import InitConfig
from pretrainx.train.init import initial_state
from pretrainx.train.loop import train
from pretrainx.train.runtime import build_runtime, load_trained

SEQ = 64


def _random_model(scan=True, **kw):
  """A random tiny model with a larger init, so attention is far from uniform."""
  cfg = ModelConfig(scan_layers=scan, max_seq_len=SEQ, init_std=0.2, **kw)
  params = nn.unbox(Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
  return cfg, params


def _batch(seed=0, batch=4):
  tokens = jax.random.randint(jax.random.key(seed), (batch, SEQ), 3, 259)
  return {"inputs": tokens, "positions": jnp.broadcast_to(jnp.arange(SEQ), (batch, SEQ)),
          "segment_ids": jnp.ones((batch, SEQ), jnp.int32), "loss_mask": jnp.ones((batch, SEQ))}


def _flat(tree):
  return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.slow
@pytest.mark.parametrize("scan, layers", [(True, None), (True, (1,)), (False, (0,))])
def test_window_covering_the_sequence_reproduces_the_original_logits(scan, layers):
  src, params = _random_model(scan)
  dst = C.linearized_config(src, C.LinearizeConfig(layers=layers, window=SEQ))
  converted = C.convert_params(params, src, dst, jax.random.key(1))
  tokens = _batch()["inputs"]
  want = Transformer(src).apply({"params": params}, tokens)
  got = Transformer(dst).apply({"params": converted}, tokens)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
  expected = ("hybrid",) * 2 if layers is None else tuple(
      "hybrid" if i in layers else "reference" for i in range(2))
  assert dst.layer_impls == expected and dst.scan_layers == (scan and layers is None)


def test_conversion_carries_every_source_weight_and_adds_only_feature_maps():
  src, params = _random_model(scan=True)
  dst = C.linearized_config(src, C.LinearizeConfig(layers=(1,), window=8))
  converted = _flat(C.convert_params(params, src, dst, jax.random.key(1)))
  source = _flat(C.unstack_layers(params, 2))
  for key, value in source.items():
    np.testing.assert_array_equal(converted[key], value)
  assert sorted(set(converted) - set(source)) == [
      "['layers_1']['attention']['feature_map']", "['layers_1']['attention']['feature_map_k']",
      "['layers_1']['attention']['window_factor']"]
  assert C.new_param_paths(src, dst) == [("layers_1", "attention", n) for n in
                                         ("feature_map", "feature_map_k", "window_factor")]


def _transfer(mode, steps=30, layers=None):
  src, params = _random_model(scan=True)
  lin = C.LinearizeConfig(layers=layers, window=8, feature_dim=16)
  dst = C.linearized_config(src, lin)
  converted = C.convert_params(params, src, dst, jax.random.key(1))
  result = T.run_transfer(
      converted, student=dst, teacher=C.teacher_config(dst, src),
      layers=C.layers_to_convert(src, lin), trainable_paths=C.new_param_paths(src, dst),
      train_batches=lambda step: _batch(100 + step), eval_batches=[_batch(0), _batch(1)],
      steps=steps, learning_rate=3e-2, mode=mode, eval_every=5)
  return converted, result, dst


@pytest.mark.slow
def test_stage1_lowers_every_layer_mse_monotonically_and_changes_only_feature_maps():
  converted, result, dst = _transfer("joint")
  assert [h["step"] for h in result.history] == [0, 5, 10, 15, 20, 25, 30]
  for i in result.layers:
    mse = [h[f"mse/layer_{i}"] for h in result.history]
    assert all(b <= a for a, b in zip(mse, mse[1:])), (i, mse)
    assert mse[-1] < 0.7 * mse[0], (i, mse)
  before, after = _flat(converted), _flat(result.params)
  changed = sorted(k for k in before if not np.array_equal(before[k], after[k]))
  assert changed == ["['layers']['attention']['feature_map']",
                     "['layers']['attention']['feature_map_k']",
                     "['layers']['attention']['window_factor']"]
  assert dst.attention_impl == "hybrid"


@pytest.mark.slow
def test_layerwise_transfer_trains_one_layer_at_a_time():
  _, result, _ = _transfer("layerwise", steps=20)
  first, mid, last = result.history[0], result.history[2], result.history[-1]  # steps 0, 10, 20
  assert mid["step"] == 10
  assert mid["mse/layer_0"] < first["mse/layer_0"]
  assert mid["mse/layer_1"] == pytest.approx(first["mse/layer_1"], rel=1e-6)  # not yet its turn
  assert last["mse/layer_1"] < mid["mse/layer_1"]
  assert last["mse/layer_0"] == pytest.approx(mid["mse/layer_0"], rel=1e-6)  # done: untouched


@pytest.mark.slow
def test_linearized_model_generates_the_same_tokens_recurrent_and_chunked():
  _, result, dst = _transfer("joint", steps=10)
  model = Transformer(dst)
  prompt = np.asarray([5, 70, 71, 72, 9], np.int32)
  kw = dict(rng=jax.random.key(0), temperature=0.0, top_k=None)
  recurrent = generate(model, result.params, prompt, 40, recurrent=True, **kw)
  chunked = generate(model, result.params, prompt, 40, recurrent=False, **kw)
  assert len(recurrent) == 40
  np.testing.assert_array_equal(recurrent, chunked)


@pytest.mark.parametrize("lin, source_kw, message", [
    (C.LinearizeConfig(layers=(0, 2)), {}, r"\[2\] out of range: the model has 2 layers"),
    (C.LinearizeConfig(layers=(-1,)), {}, "out of range"),
    (C.LinearizeConfig(window=SEQ + 1), {}, "exceeds the model's max_seq_len=64"),
    (C.LinearizeConfig(), {"attention_impl": "hybrid", "attention_window": 8},
     "no softmax attention layer to convert"),
])
def test_bad_linearize_input_is_explained(lin, source_kw, message):
  src = ModelConfig(max_seq_len=SEQ, **source_kw)
  with pytest.raises(ValueError, match=message):
    C.linearized_config(src, lin)


def test_bad_linearize_config_fields():
  with pytest.raises(ValueError, match="choose one of"):
    C.LinearizeConfig(attention_impl="softmax")
  with pytest.raises(ValueError, match="'joint' or 'layerwise'"):
    C.LinearizeConfig(transfer_mode="greedy")
  with pytest.raises(ValueError, match="names a layer twice"):
    C.linearized_config(ModelConfig(), C.LinearizeConfig(layers=(1, 1)))


def test_per_layer_attention_needs_unscanned_layers_of_the_right_count():
  with pytest.raises(ValueError, match="scan_layers=False"):
    ModelConfig(layer_attention_impls=("reference", "hybrid"))
  with pytest.raises(ValueError, match="one per layer"):
    ModelConfig(scan_layers=False, layer_attention_impls=("hybrid",))


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  exp = conftest.tiny_experiment(tmp_path_factory.mktemp("lin") / "source",
                                 run={"steps": 30, "sample_tokens": 0, "eval_batches": 1})
  train(exp)
  return exp


@pytest.mark.slow
@pytest.mark.xdist_group("linearize_pretrained")  # `pretrained` is built once
def test_a_run_can_start_from_a_softmax_checkpoint_with_hybrid_attention(pretrained, tmp_path):
  exp = pretrained
  hybrid = dataclasses.replace(exp, model=dataclasses.replace(
      exp.model, attention_impl="hybrid", attention_window=exp.model.max_seq_len),
      init=InitConfig(source=exp.run.run_dir), run=dataclasses.replace(
          exp.run, run_dir=str(tmp_path / "h")))
  rt = build_runtime(hybrid)
  with rt.scope():
    state, _ = initial_state(rt, hybrid.init)
  _, source_state, _ = load_trained(exp)
  tokens = _batch()["inputs"]
  want = Transformer(exp.model).apply({"params": source_state.params}, tokens)
  got = Transformer(hybrid.model).apply({"params": state.params}, tokens)
  # fp32 round-off only: the CPU softmax runs as causal query chunks, the hybrid in one pass, so
  # their sums run in different orders (logits up to ~5 differ by up to ~1e-5 relative).
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


@pytest.mark.slow
@pytest.mark.xdist_group("linearize_pretrained")  # `pretrained` is built once
def test_linearize_end_to_end_report_and_frozen_stages(pretrained, tmp_path):
  exp = pretrained.replace(run={"log_every": 5})
  lin = C.LinearizeConfig(window=16, feature_dim=16, transfer_steps=10, lora_steps=6,
                          lora_lr=3e-3, eval_batches=1, sample_tokens=16)
  out = tmp_path / "out"
  report = linearize(pretrained.run.run_dir, exp, lin, str(out))
  names = [r["model"] for r in report.rows]
  assert names == ["original (softmax)", "converted, untrained", "stage 1: attention transfer",
                   "stage 2: + LoRA"]
  pretrain_tokens = 30 * 8 * 64
  assert report.rows[2]["tokens"] == 10 * 8 * 64
  assert report.rows[3]["fraction_of_pretraining"] == pytest.approx(16 * 8 * 64 / pretrain_tokens)
  assert all(set(r["domain_ppl"]) == {"prose", "code"} for r in report.rows)
  assert report.recurrent and report.recurrent_matches_chunked
  first, last = report.transfer[0], report.transfer[-1]
  assert last["mse/mean"] < first["mse/mean"]
  for name in ("report.md", "report.json", "report.png"):
    assert (out / name).stat().st_size > 100
  assert json.loads((out / "report.json").read_text())["layers"] == [0, 1]
  # stage 2 trained only the adapters: its base is exactly the stage-1 export
  stage2 = dataclasses.replace(exp, model=C.linearized_config(exp.model, lin), tune=dataclasses.replace(
      exp.tune, lora=lin.lora), run=dataclasses.replace(exp.run, run_dir=str(out / "stage2")))
  _, state, step = load_trained(stage2)
  assert step == 6
  stage1 = jax.device_get(state.params["base"])
  rt1 = build_runtime(dataclasses.replace(stage2, tune=dataclasses.replace(exp.tune, lora=None)))
  from pretrainx.checkpoint import load_params
  exported, _ = load_params(str(out / "stage1" / "export"), rt1.abstract_state.params)
  chex.assert_trees_all_equal(stage1, jax.device_get(exported))
  b = jax.device_get(state.params["lora"]["layers"]["attention"]["q_proj"]["lora_b"])
  assert np.abs(b).max() > 0  # the adapters moved
  # the output directory remembers its settings: other ones need restart
  with pytest.raises(ValueError, match="holds a linearization with other .*linearize; pass --restart"):
    linearize(pretrained.run.run_dir, exp, dataclasses.replace(lin, window=8), str(out))


@pytest.mark.slow
@pytest.mark.xdist_group("linearize_pretrained")  # `pretrained` is built once
def test_cli_linearize_errors(pretrained, tmp_path, capsys):
  from pretrainx.cli import main

  gin = os.path.join(conftest.REPO, "gin_configs/linearize/tiny.gin")
  assert main(["linearize", "--from", str(tmp_path / "nope"), f"--gin_file={gin}"]) == 2
  assert "does not exist" in capsys.readouterr().err
  src = pretrained.run.run_dir
  assert main(["linearize", "--from", src, f"--gin_file={gin}",
               "--gin_param=LinearizeConfig.layers=(3,)"]) == 2
  assert "out of range: the model has 2 layers" in capsys.readouterr().err
  assert main(["linearize", "--from", src, f"--gin_file={gin}",
               "--gin_param=LinearizeConfig.window=1000"]) == 2
  assert "exceeds the model's max_seq_len=256" in capsys.readouterr().err
  assert main(["linearize", "--from", src, f"--gin_file={gin}",
               "--gin_param=LinearizeConfig.windw=8"]) == 2
  assert "Did you mean LinearizeConfig.window" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["tiny", "quickstart"])
def test_linearize_gin_files_parse(name):
  from pretrainx.config import parse_gin_with

  gin = os.path.join(conftest.REPO, f"gin_configs/linearize/{name}.gin")
  exp, extra = parse_gin_with([gin], [], (C.LinearizeConfig,))
  lin = extra["LinearizeConfig"]
  assert lin.window < exp.model.max_seq_len and lin.transfer_steps > 0 and lin.lora_steps > 0
  assert C.linearized_config(exp.model, lin).attention_impl == "hybrid"


def test_mixed_stack_counts_params_and_flops_per_layer():
  from pretrainx.flops import flops_per_token
  from pretrainx.flops import count_params

  src, params = _random_model(scan=False)
  mixed = C.linearized_config(src, C.LinearizeConfig(layers=(1,), window=8))
  hybrid = C.linearized_config(src, C.LinearizeConfig(window=8))
  converted = C.convert_params(params, src, mixed, jax.random.key(1))
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(converted))
  padding = (src.padded_vocab_size - src.vocab_size) * src.embed_dim  # count_params is unpadded
  assert count_params(mixed)["total"] == n - padding
  f_src, f_mixed, f_hybrid = (flops_per_token(c, SEQ) for c in (src, mixed, hybrid))
  assert f_mixed != f_src and f_mixed != f_hybrid
  assert f_mixed - f_src == pytest.approx((f_hybrid - f_src) / 2, rel=1e-6)
