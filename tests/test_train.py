"""The loop: the tiny model learns, outputs land in the run directory, resume, bad-step policies."""

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest

from pretrainx.checkpoint import Checkpointer
from pretrainx.config import Stage, parse_gin
from pretrainx.data.pipeline import TrainBatches
from pretrainx.metrics import read_metrics
from pretrainx.train import loop


def _losses(path):
  return {r["step"]: r["train/loss"] for r in read_metrics(path) if "train/loss" in r}


@pytest.mark.slow
def test_tiny_model_learns_in_100_steps(tiny_exp):
  exp = tiny_exp(run={"steps": 100, "log_every": 1, "eval_every": 50, "sample_tokens": 16,
                      "peak_tflops": None})  # MFU against this machine's measured peak
  result = loop.train(exp)
  rows = read_metrics(result.paths.metrics)
  # Throughput over whole synchronised windows: finite from the first window on, and possible.
  mfus = [r["perf/mfu"] for r in rows if "perf/mfu" in r]
  assert len(mfus) == 100 and all(0 < m <= 1 for m in mfus), max(mfus)
  assert 0 < result.mfu <= 1 and "throughput nothing" not in loop.result_summary(result)
  losses = [r["train/loss"] for r in rows if "train/loss" in r]
  assert losses[0] > 5.0  # starts near log(259) = 5.56
  assert np.mean(losses[-3:]) < losses[0] - 2.0, losses
  # Beats the unigram baseline (eval weighs the small prose domain as much as code).
  assert result.eval_loss < result.unigram_entropy - 0.1
  assert result.eval_domain_losses["code"] < result.unigram_entropy - 0.2
  assert [r["step"] for r in rows if "eval/loss" in r] == [50, 100]
  for path in (result.paths.metrics, result.paths.loss_plot, result.paths.config):
    assert os.path.getsize(path) > 0
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(result.paths.tensorboard))
  ckpt = Checkpointer(result.paths.checkpoints, create=False)
  assert ckpt.latest_step() == 100
  meta = ckpt.read_meta()
  assert parse_gin([result.paths.config]) == exp
  assert meta["config_gin"] == open(result.paths.config).read()
  tokens = meta["data"].pop("domain_tokens")
  assert meta["data"] == {"seed": 0, "offset": 0, "next_batch": 100}
  assert set(tokens) == {"prose", "code"} and sum(tokens.values()) > 0
  assert result.sample.startswith("def ") and result.tokens_per_second > 0


@pytest.mark.slow
def test_resume_from_checkpoint_reproduces_the_uninterrupted_run(tiny_exp):
  """Across a stage that doubles the sequence length (keeping the tokens per step) and changes
  the RoPE base: the resumed run compiles the new shape and matches the uninterrupted one."""
  stages = (Stage(), Stage(start_step=8, seq_len=128, tokens_per_step=16 * 64,
                           rope={"rope_theta": 40_000.0}))
  exp = tiny_exp(run={"log_every": 1, "sample_tokens": 0, "eval_batches": 1, "steps": 12,
                      "global_batch_size": 16},
                 checkpoint={"every_steps": 6}, data={"stages": stages})
  full = loop.train(exp)
  expected = _losses(full.paths.metrics)
  assert sorted(expected) == list(range(1, 13))
  shapes = {r["step"]: (r["data/seq_len"], r["data/global_batch_size"])
            for r in read_metrics(full.paths.metrics) if "data/seq_len" in r}
  assert shapes[8] == (64, 16) and shapes[9] == shapes[12] == (128, 8)
  assert np.isfinite(full.tokens_per_second) and 0 < full.mfu <= 1
  # Forget everything after step 6, as if the run had died there.
  shutil.rmtree(os.path.join(full.paths.checkpoints, "12"))
  kept = [line for line in open(full.paths.metrics) if json.loads(line)["step"] <= 6]
  open(full.paths.metrics, "w").writelines(kept)
  resumed = loop.train(exp)
  assert _losses(full.paths.metrics) == expected  # bit-for-bit on CPU
  assert resumed.eval_loss == full.eval_loss


@pytest.mark.slow
def test_a_run_directory_of_another_config_is_refused(tiny_exp):
  exp = tiny_exp(run={"steps": 2, "sample_tokens": 0, "eval_batches": 1})
  loop.train(exp)
  other = exp.replace(model={"num_layers": 3})
  with pytest.raises(ValueError, match=r"another configuration:\n  ModelConfig.num_layers: 2 -> 3"
                                       r"\nPass --restart"):
    loop.train(other)
  assert loop.train(other, restart=True).steps == 2
  longer = other.replace(run={"steps": 4})  # more steps of the same experiment is a resume
  assert loop.train(longer).steps == 4


@pytest.fixture
def poison(monkeypatch):
  """poison(indices): those batches get an out-of-vocabulary token, whose embedding is NaN."""
  seen = []
  original = TrainBatches.batch_at

  def install(bad):
    def batch_at(self, index):
      seen.append(int(index))
      batch = original(self, index)
      if int(index) in bad:
        batch["inputs"] = batch["inputs"].copy()
        batch["inputs"][0, 0] = 10_000
      return batch
    monkeypatch.setattr(TrainBatches, "batch_at", batch_at)
    return seen
  return install


@pytest.mark.slow
def test_nan_step_is_skipped_and_the_run_finishes(tiny_exp, poison):
  poison({3})
  result = loop.train(tiny_exp(run={"log_every": 1, "steps": 10, "sample_tokens": 0,
                                    "eval_batches": 1}))
  rows = {r["step"]: r for r in read_metrics(result.paths.metrics) if "train/loss" in r}
  assert np.isnan(rows[4]["train/loss"]) and rows[4]["train/bad_step"] == 1.0
  assert rows[5]["train/bad_step"] == 0.0 and rows[10]["train/skipped_steps"] == 1.0
  assert result.skipped_steps == 1 and np.isfinite(result.eval_loss)
  # the skipped step changed nothing (the optimizer did not run): params after step 4 equal
  # params after step 3, and it reports no update
  assert rows[4]["train/param_norm"] == rows[3]["train/param_norm"]
  assert rows[4]["train/update_norm"] == 0.0 and rows[5]["train/update_norm"] > 0.0


@pytest.mark.slow
def test_bad_step_rolls_back_and_skips_the_batches(tiny_exp, poison):
  seen = poison({5})
  exp = tiny_exp(run={"log_every": 1, "steps": 10, "sample_tokens": 0, "eval_batches": 1},
                 guard={"policy": "rollback"}, checkpoint={"every_steps": 4, "async_save": False})
  result = loop.train(exp)
  assert result.steps == 10 and np.isfinite(result.eval_loss)
  # Step 6 reads the bad batch 5; metrics are read one step late, so step 7 (batch 6) has run when
  # the loop rolls back to step 4 and goes on from batch 7: steps 5-10 read batches 7-12.
  assert seen[:6] == [0, 1, 2, 3, 4, 5]
  restart = next(i for i in range(1, len(seen)) if seen[i] < seen[i - 1])  # a new iterator
  assert seen[restart] == 7 and 5 not in seen[restart:]
  meta = Checkpointer(result.paths.checkpoints, create=False).read_meta()
  assert meta["data"]["offset"] == 3 and meta["data"]["next_batch"] == 13


@pytest.mark.slow
@pytest.mark.parametrize("policy,bad,message", [
    ("raise", {3}, r"1 bad step\(s\) by step 4 \(1 in a row"),
    ("skip", set(range(3, 100)), r"by step \d+ \(5 in a row"),
])
def test_diverging_runs_stop_with_a_clear_error(tiny_exp, poison, policy, bad, message):
  poison(bad)
  exp = tiny_exp(run={"log_every": 1, "steps": 20}, guard={"policy": policy})
  with pytest.raises(FloatingPointError, match=message + r".*Lower OptimizerConfig.learning_rate"):
    loop.train(exp)


@pytest.mark.slow
def test_restart_discards_previous_outputs(tiny_exp):
  exp = tiny_exp(run={"steps": 3, "log_every": 1, "sample_tokens": 0, "eval_batches": 1})
  loop.train(exp)
  result = loop.train(exp, restart=True)
  steps = [r["step"] for r in read_metrics(result.paths.metrics) if "train/loss" in r]
  assert steps == [1, 2, 3]


def test_the_summary_says_worse_when_the_loss_is_above_the_baseline():
  from pretrainx.config import RunPaths

  result = loop.TrainResult(run_dir="r", steps=2, train_loss=3.0, eval_loss=3.1,
                            unigram_entropy=3.0778, tokens_per_second=1.0, mfu=0.1,
                            compile_seconds=1.0, sample="", paths=RunPaths.under("r"))
  assert "baseline 3.0778 (0.0222 worse)" in loop.result_summary(result)
  better = dataclasses.replace(result, eval_loss=2.0)
  assert "baseline 3.0778 (1.0778 better)" in loop.result_summary(better)


def test_a_window_faster_than_the_measured_peak_raises_the_peak(caplog):
  """A peak timed while the host was busy elsewhere can be below what the run then reaches: the
  measured peak is raised to it (MFU never above 100%), a given --peak_tflops only warned about."""
  for measured, expected in ((True, 1.0), (False, None)):
    meter = loop._Throughput(lambda a, b: ((b - a) * 1000, (b - a) * 1000 * 1e6), peak=1e3,
                             peak_measured=measured)
    meter.restart_clock(None, 0)
    values = meter.read(None, 4)
    assert np.isfinite(values["perf/mfu"]) and values["perf/tokens_per_second"] > 0
    if expected is None:
      assert values["perf/mfu"] > 1 and "--peak_tflops is too low" in caplog.text
    else:
      assert values["perf/mfu"] == expected and meter.run_mfu <= 1
      assert "MFU is reported against what the run reached" in caplog.text
