"""Starting a run from an existing model: pretrainx checkpoints and exports, kept or reset state."""

import dataclasses

import chex
import jax
import numpy as np
import pytest

from pretrainx import checkpoint
from pretrainx.config import experiment_to_gin
from pretrainx.config import InitConfig
from pretrainx.config.sources import source_kind
from pretrainx.train.init import initial_state
from pretrainx.train.loop import train
from pretrainx.train.runtime import build_runtime, load_trained

pytestmark = pytest.mark.xdist_group("init")  # its module fixtures are built once


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
  import conftest

  exp = conftest.tiny_experiment(tmp_path_factory.mktemp("src") / "run",
                                 run={"steps": 4, "sample_tokens": 0, "eval_batches": 1,
                                      "log_every": 1})
  train(exp)
  return exp


def _continued(exp, tmp_path, **init):
  return dataclasses.replace(exp, run=dataclasses.replace(exp.run, run_dir=str(tmp_path / "cpt")),
                             init=InitConfig(**init))


@pytest.mark.slow
def test_continue_from_a_run_keeps_params_and_resets_or_keeps_the_rest(source_run, tmp_path):
  _, trained, step = load_trained(source_run)
  assert step == 4 and source_kind(source_run.run.run_dir) == "run"
  fresh = _continued(source_run, tmp_path, source=source_run.run.run_dir)
  rt = build_runtime(fresh)
  with rt.scope():
    state, start = initial_state(rt, fresh.init)
  assert start == 0 and int(state.step) == 0
  chex.assert_trees_all_equal(jax.device_get(state.params), jax.device_get(trained.params))
  mu = jax.tree.leaves(jax.device_get(state.opt_state))
  assert all(not np.any(x) for x in mu if x.ndim > 0 and x.dtype.kind == "f")  # reset moments
  kept = _continued(source_run, tmp_path, source=source_run.run.run_dir, keep_optimizer=True,
                    keep_step=True)
  with rt.scope():
    state, start = initial_state(rt, kept.init)
  assert start == 4
  chex.assert_trees_all_equal(jax.device_get(state.opt_state), jax.device_get(trained.opt_state))


@pytest.mark.slow
def test_training_continues_from_an_export(source_run, tmp_path):
  _, trained, step = load_trained(source_run)
  out = checkpoint.save_params(str(tmp_path / "export"), trained.params,
                               {"step": step, "config_gin": experiment_to_gin(source_run)})
  assert source_kind(out) == "export"
  exp = _continued(source_run, tmp_path, source=out)
  exp = dataclasses.replace(exp, run=dataclasses.replace(exp.run, steps=2))
  result = train(exp)
  assert result.steps == 2 and np.isfinite(result.eval_loss)
  # Starting from trained params, the first loss is well below the source's own first loss
  # (a random model's, ~log(259) = 5.6).
  import json
  first = lambda path: next(json.loads(l) for l in open(path) if "train/loss" in l)["train/loss"]
  src_metrics = source_run.run.run_dir + "/metrics.jsonl"
  assert first(result.paths.metrics) < first(src_metrics) - 0.5


def test_bad_sources_are_clear_errors(source_run, tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    source_kind(str(tmp_path / "nowhere"))
  (tmp_path / "junk").mkdir()
  with pytest.raises(ValueError, match="neither"):
    source_kind(str(tmp_path / "junk"))
  wider = _continued(source_run, tmp_path, source=source_run.run.run_dir)
  wider = dataclasses.replace(wider, model=dataclasses.replace(wider.model, mlp_dim=256))
  rt = build_runtime(wider)
  with rt.scope(), pytest.raises(ValueError, match="do not fit this run's ModelConfig"):
    initial_state(rt, wider.init)
  with pytest.raises(ValueError, match="growth"):
    InitConfig(source="x", keep_optimizer=True, stack_factor=2)


@pytest.mark.slow
def test_ema_is_kept_in_the_state_used_for_eval_and_resumed(tiny_exp):
  from pretrainx.config import EmaConfig

  exp = dataclasses.replace(tiny_exp(run={"steps": 4, "sample_tokens": 0, "eval_batches": 1}),
                            ema=EmaConfig(decay=0.5))
  train(exp)
  rt, state, _ = load_trained(exp)
  assert state.ema is not None
  ema, params = jax.device_get((state.ema, state.params))
  leaf = lambda t: t["embed"]["embedding"]
  assert not np.allclose(leaf(ema), leaf(params))  # an average, not the last params
  chex.assert_trees_all_equal(jax.device_get(rt.inference_params(state)), ema)
  longer = dataclasses.replace(exp, run=dataclasses.replace(exp.run, steps=5))
  assert train(longer).steps == 5  # the EMA restores with the rest of the state
