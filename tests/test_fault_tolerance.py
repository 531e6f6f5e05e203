"""Real processes: SIGTERM saves and exits 0; SIGKILL + resume equals an uninterrupted run bit for
bit, with the run directory on local disk and in a bucket (the GCS emulator), against one
uninterrupted reference run. The run changes its sequence length and RoPE base at step 30, just
before the kill."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from pretrainx import storage
from pretrainx.metrics import read_metrics_text

from conftest import REPO, subprocess_env

pytestmark = pytest.mark.xdist_group("fault_tolerance")  # one reference run per suite

STEPS = 80
ARGS = ["--gin_file=gin_configs/tiny.gin", f"--gin_param=RunConfig.steps={STEPS}",
        "--gin_param=RunConfig.global_batch_size=32", "--gin_param=RunConfig.log_every=1",
        "--gin_param=RunConfig.progress_bar=False", "--gin_param=RunConfig.sample_tokens=0",
        "--gin_param=RunConfig.eval_batches=2", "--gin_param=CheckpointConfig.every_steps=10",
        "--peak_tflops=0.1",
        # From step 30 the sequence doubles (same tokens per step) with a new RoPE base: the
        # kill lands right after that change, and the resumed run starts in the new stage.
        "--gin_param=DataConfig.stages=[@short/Stage(), @long/Stage()]",
        "--gin_param=long/Stage.start_step=30", "--gin_param=long/Stage.seq_len=128",
        "--gin_param=long/Stage.tokens_per_step=2048",
        "--gin_param=long/Stage.rope={'rope_theta': 40000.0}"]


def _cmd(run_dir):
  return [sys.executable, "-m", "pretrainx", "--cpu_devices=2", "train", *ARGS,
          f"--run_dir={run_dir}"]


def _env():
  return subprocess_env()


def _train(run_dir):
  out = subprocess.run(_cmd(run_dir), cwd=REPO, env=_env(), capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 0, out.stderr[-4000:]
  return out


def _loss_rows(run_dir):
  out = {}
  try:  # in a bucket, the parts of metrics.jsonl joined
    text = read_metrics_text(storage.join(run_dir, "metrics.jsonl"))
  except FileNotFoundError:
    return out
  for line in text.splitlines(keepends=True):
    if not line.endswith("\n"):  # the writer is mid-line (we poll a live run)
      break
    row = json.loads(line)
    if "train/loss" in row:
      out.setdefault(row["step"], []).append(row["train/loss"])
  return out


def _losses(run_dir):
  """{step: train loss}; a resumed run drops the rows logged past its checkpoint, so each step
  is there once."""
  rows = _loss_rows(run_dir)
  twice = sorted(step for step, losses in rows.items() if len(losses) > 1)
  assert not twice, f"metrics.jsonl holds steps {twice} more than once"
  return {step: losses[0] for step, losses in rows.items()}


def _params(run_dir, step):
  """The params of a run's checkpoint, restored here onto this process's 8 devices."""
  import jax
  from pretrainx.config import load_run_experiment
  from pretrainx.train.runtime import load_trained
  _, state, _ = load_trained(load_run_experiment(run_dir), step=step)
  return jax.tree.leaves(jax.tree.map(np.asarray, state.params))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted run, on local disk, and its final params."""
  run_dir = str(tmp_path_factory.mktemp("ref") / "run")
  _train(run_dir)
  return run_dir, _losses(run_dir), _params(run_dir, STEPS)


def _start_and_signal(run_dir, sig, at_step):
  """Starts the run and sends `sig` once its metrics hold `at_step` steps; (code, out, err)."""
  proc = subprocess.Popen(_cmd(run_dir), cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if len(_losses(run_dir)) >= at_step:
      proc.send_signal(sig)
      break
    time.sleep(0.02)
  stdout, stderr = proc.communicate(timeout=300)
  return proc.returncode, stdout, stderr


@pytest.mark.slow
@pytest.mark.parametrize("where", ["local", "gs"])
def test_sigkill_then_resume_is_bit_identical(reference, where, tmp_path, request):
  run_dir = str(tmp_path / "run") if where == "local" else request.getfixturevalue("gcs_dir")
  code, _, err = _start_and_signal(run_dir, signal.SIGKILL, at_step=32)
  assert code == -signal.SIGKILL, err[-3000:]
  reached = max(_losses(run_dir))  # in a bucket too, the metrics arrived at every log point
  assert 32 <= reached < STEPS, "the run finished before it could be killed"
  _train(run_dir)
  _, ref_losses, ref_params = reference
  assert _losses(run_dir) == ref_losses
  for a, b in zip(_params(run_dir, STEPS), ref_params):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_sigterm_saves_the_step_reached_and_exits_zero(reference, tmp_path):
  run_dir = str(tmp_path / "run")
  code, stdout, stderr = _start_and_signal(run_dir, signal.SIGTERM, at_step=25)
  assert code == 0, stderr
  assert "preempted at step" in stdout
  step = int(stdout.split("preempted at step ")[1].split(";")[0])
  assert 25 <= step < STEPS
  assert os.path.exists(os.path.join(run_dir, "checkpoints", str(step), "commit_success.txt"))
  _train(run_dir)
  assert _losses(run_dir) == reference[1]
