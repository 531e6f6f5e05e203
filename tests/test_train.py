"""The loop: the tiny model learns, outputs land in the run directory, resume and NaN handling."""

import json
import os
import shutil

import numpy as np
import pytest

from pretrainx import checkpoint
from pretrainx.config import parse_gin
from pretrainx.metrics import read_metrics
from pretrainx.train import loop


def test_tiny_model_learns_in_100_steps(tiny_exp):
  exp = tiny_exp(run={"steps": 100, "log_every": 1, "eval_every": 50, "sample_tokens": 16})
  result = loop.train(exp)
  rows = read_metrics(result.paths.metrics)
  losses = [r["train/loss"] for r in rows if "train/loss" in r]
  assert losses[0] > 5.0  # starts near log(259) = 5.56
  assert np.mean(losses[-3:]) < losses[0] - 2.0, losses
  assert result.eval_loss < result.unigram_entropy - 0.2  # beats the unigram baseline
  assert [r["step"] for r in rows if "eval/loss" in r] == [50, 100]
  for path in (result.paths.metrics, result.paths.loss_plot, result.paths.config):
    assert os.path.getsize(path) > 0
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(result.paths.tensorboard))
  assert checkpoint.latest_step(result.paths.checkpoints) == 100
  meta = checkpoint.read_meta(result.paths.checkpoints)
  assert parse_gin([result.paths.config]) == exp
  assert meta["config_gin"] == open(result.paths.config).read()
  assert result.sample.startswith("def ") and result.tokens_per_second > 0


def test_resume_from_checkpoint_reproduces_the_uninterrupted_run(tiny_exp):
  exp = tiny_exp(run={"log_every": 1, "sample_tokens": 0, "eval_batches": 1, "steps": 12,
                      "checkpoint_every": 6})
  full = loop.train(exp)
  losses = lambda: {r["step"]: r["train/loss"] for r in read_metrics(full.paths.metrics)
                    if "train/loss" in r}
  expected = losses()
  assert sorted(expected) == list(range(1, 13))
  # Forget everything after step 6, as if the run had died there.
  shutil.rmtree(os.path.join(full.paths.checkpoints, "12"))
  kept = [line for line in open(full.paths.metrics) if json.loads(line)["step"] <= 6]
  open(full.paths.metrics, "w").writelines(kept)
  assert checkpoint.latest_step(full.paths.checkpoints) == 6
  resumed = loop.train(exp)
  assert losses() == expected  # bit-for-bit on CPU
  assert resumed.eval_loss == full.eval_loss


def test_nan_loss_stops_with_a_clear_error(tiny_exp, monkeypatch):
  build = loop.build_runtime

  def poisoned(exp):
    rt = build(exp)
    step = rt.train_step

    def nan_at_3(state, batch):
      state, metrics = step(state, batch)
      metrics = dict(metrics, loss=np.where(int(state.step) >= 3, np.nan, metrics["loss"]))
      return state, metrics

    rt.train_step = nan_at_3
    return rt

  monkeypatch.setattr(loop, "build_runtime", poisoned)
  with pytest.raises(FloatingPointError, match=r"training diverged: loss=nan.*at step 3.*"
                                               r"Lower OptimizerConfig.learning_rate"):
    loop.train(tiny_exp(run={"log_every": 1, "steps": 10}))


def test_restart_discards_previous_outputs(tiny_exp):
  exp = tiny_exp(run={"steps": 3, "log_every": 1, "sample_tokens": 0, "eval_batches": 1})
  loop.train(exp)
  result = loop.train(exp, restart=True)
  steps = [r["step"] for r in read_metrics(result.paths.metrics) if "train/loss" in r]
  assert steps == [1, 2, 3]
  assert json.loads(open(result.paths.metrics).readline())["step"] == 1
