"""Real processes: SIGTERM saves and exits 0; SIGKILL + resume equals an uninterrupted run bit for bit."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO

STEPS = 200
ARGS = ["--gin_file=gin_configs/tiny.gin", f"--gin_param=RunConfig.steps={STEPS}",
        "--gin_param=RunConfig.global_batch_size=32", "--gin_param=RunConfig.log_every=1",
        "--gin_param=RunConfig.progress_bar=False", "--gin_param=RunConfig.sample_tokens=0",
        "--gin_param=RunConfig.eval_batches=2", "--gin_param=CheckpointConfig.every_steps=10",
        "--peak_tflops=0.1"]


def _cmd(run_dir):
  return [sys.executable, "-m", "pretrainx", "--cpu_devices=2", "train", *ARGS,
          f"--run_dir={run_dir}"]


def _env():
  return {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}


def _losses(run_dir):
  out = {}
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    for line in f:
      if not line.endswith("\n"):  # the writer is mid-line (we poll a live run)
        break
      row = json.loads(line)
      if "train/loss" in row:
        out[row["step"]] = row["train/loss"]  # a resumed run rewrites steps: the last one counts
  return out


def _params(run_dir, step):
  """The params of a run's checkpoint, restored here onto this process's 8 devices."""
  import jax
  from pretrainx.config import load_run_experiment
  from pretrainx.train.runtime import load_trained
  _, state, _ = load_trained(load_run_experiment(run_dir), step=step)
  return jax.tree.leaves(jax.tree.map(np.asarray, state.params))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  run_dir = str(tmp_path_factory.mktemp("ref") / "run")
  out = subprocess.run(_cmd(run_dir), cwd=REPO, env=_env(), capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 0, out.stderr
  return run_dir


def _start_and_signal(run_dir, sig, at_step):
  proc = subprocess.Popen(_cmd(run_dir), cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  metrics = os.path.join(run_dir, "metrics.jsonl")
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(metrics) and len(_losses(run_dir)) >= at_step:
      proc.send_signal(sig)
      break
    time.sleep(0.02)
  stdout, stderr = proc.communicate(timeout=300)
  return proc.returncode, stdout, stderr


def test_sigkill_then_resume_is_bit_identical(reference, tmp_path):
  run_dir = str(tmp_path / "run")
  code, _, _ = _start_and_signal(run_dir, signal.SIGKILL, at_step=47)
  assert code == -signal.SIGKILL
  reached = max(_losses(run_dir))
  assert reached < STEPS, "the run finished before it could be killed"
  out = subprocess.run(_cmd(run_dir), cwd=REPO, env=_env(), capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 0, out.stderr
  assert _losses(run_dir) == _losses(reference)
  for a, b in zip(_params(run_dir, STEPS), _params(reference, STEPS)):
    np.testing.assert_array_equal(a, b)


def test_sigterm_saves_the_step_reached_and_exits_zero(reference, tmp_path):
  run_dir = str(tmp_path / "run")
  code, stdout, stderr = _start_and_signal(run_dir, signal.SIGTERM, at_step=33)
  assert code == 0, stderr
  assert "preempted at step" in stdout
  step = int(stdout.split("preempted at step ")[1].split(";")[0])
  assert 33 <= step < STEPS
  assert os.path.exists(os.path.join(run_dir, "checkpoints", str(step), "commit_success.txt"))
  out = subprocess.run(_cmd(run_dir), cwd=REPO, env=_env(), capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 0, out.stderr
  assert _losses(run_dir) == _losses(reference)
