"""Continued pretraining with LoRA, freezing and block expansion, end to end through train()."""

import dataclasses

import chex
import jax
import numpy as np
import pytest

from pretrainx.config import LoraConfig
from pretrainx.config import InitConfig
from pretrainx.train.init import initial_state
from pretrainx.train.loop import train
from pretrainx.train.runtime import build_runtime, load_trained
from pretrainx.config import TuneConfig

pytestmark = pytest.mark.xdist_group("tuning")  # its module fixtures are built once


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  import conftest

  exp = conftest.tiny_experiment(tmp_path_factory.mktemp("src") / "run",
                                 run={"steps": 3, "sample_tokens": 0, "eval_batches": 1})
  train(exp)
  return exp, jax.device_get(load_trained(exp)[1].params)


def _continue(exp, tmp_path, tune, **init):
  run = dataclasses.replace(exp.run, run_dir=str(tmp_path / "cpt"), steps=2)
  return dataclasses.replace(exp, run=run, tune=tune,
                             init=InitConfig(source=exp.run.run_dir, **init))


@pytest.mark.slow
def test_lora_trains_only_adapters_and_exports_merged_weights(source, tmp_path):
  exp, base = source
  cpt = _continue(exp, tmp_path, TuneConfig(lora=LoraConfig(rank=4)))
  train(cpt)
  rt, state, _ = load_trained(cpt)
  params = jax.device_get(state.params)
  chex.assert_trees_all_equal(params["base"], base)  # the base model is frozen
  b = params["lora"]["layers"]["attention"]["q_proj"]["lora_b"]
  assert np.abs(b).max() > 0  # adapters moved from their zero init
  merged = jax.device_get(rt.inference_params(state))
  assert jax.tree.structure(merged) == jax.tree.structure(base)
  assert not np.allclose(merged["layers"]["attention"]["q_proj"],
                         base["layers"]["attention"]["q_proj"])
  chex.assert_trees_all_equal(merged["layers"]["mlp"], base["layers"]["mlp"])  # not targeted


@pytest.mark.slow
def test_frozen_params_do_not_move(source, tmp_path):
  exp, base = source
  cpt = _continue(exp, tmp_path, TuneConfig(freeze=("embed", "norm")))
  train(cpt)
  params = jax.device_get(load_trained(cpt)[1].params)
  chex.assert_trees_all_equal(params["embed"], base["embed"])
  chex.assert_trees_all_equal(params["final_norm"], base["final_norm"])
  assert not np.array_equal(params["layers"]["mlp"]["up_proj"], base["layers"]["mlp"]["up_proj"])


@pytest.mark.slow
def test_block_expansion_starts_identical_and_trains_only_new_blocks(source, tmp_path):
  exp, base = source
  grown = _continue(exp, tmp_path, TuneConfig(new_blocks_only=True), expand_every=2)
  grown = dataclasses.replace(grown, model=dataclasses.replace(grown.model, num_layers=3))
  rt = build_runtime(grown)
  src_rt = build_runtime(exp)
  tokens = np.tile(np.arange(3, 35, dtype=np.int32), (8, 1))  # 8 rows: one per device
  with rt.scope():
    state, _ = initial_state(rt, grown.init)
    np.testing.assert_array_equal(np.asarray(rt.model.apply({"params": state.params}, tokens)),
                                  np.asarray(src_rt.model.apply({"params": base}, tokens)))
  train(grown)
  params = jax.device_get(load_trained(grown)[1].params)
  q = params["layers"]["attention"]["q_proj"]  # [layers, ...]: blocks 0, 1 old, 2 new
  np.testing.assert_array_equal(q[:2], base["layers"]["attention"]["q_proj"])
  assert not np.array_equal(q[2], base["layers"]["attention"]["q_proj"][1])
  chex.assert_trees_all_equal(params["embed"], base["embed"])


def test_bad_tuning_configs_are_clear_errors():
  with pytest.raises(ValueError, match="adapters only"):
    TuneConfig(lora=LoraConfig(), freeze=("embed",))


@pytest.mark.parametrize("name", ["rewarm_replay", "lora", "expand", "grow_stack", "grow_width"])
def test_cpt_gin_files_parse_and_round_trip(name, tmp_path):
  import os

  from pretrainx.config import experiment_to_gin, parse_gin

  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  exp = parse_gin([os.path.join(repo, "gin_configs/quickstart.gin"),
                   os.path.join(repo, f"gin_configs/cpt/{name}.gin")])
  assert exp.init.source == "runs/quickstart"
  written = tmp_path / "config.gin"
  written.write_text(experiment_to_gin(exp))
  assert parse_gin([str(written)]) == exp
