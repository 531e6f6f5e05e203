"""Two processes on 127.0.0.1 (jax.distributed, 2 CPU devices each) train like one process with the
same 4 devices and global batch (the sequence split across both), writing one run directory in a
bucket (the GCS emulator), and their checkpoint restores in a single process; a SIGTERM stops both
at one step. Processes as slices (DCN axes across them) resuming bit for bit:
test_tiered_checkpoints.py, four of them."""

import os
import subprocess
import sys

import pytest

from pretrainx import storage
from pretrainx.metrics import read_metrics

from conftest import REPO, subprocess_env

ARGS = ["--gin_file=gin_configs/tiny.gin", "--gin_param=RunConfig.steps=12",
        "--gin_param=RunConfig.log_every=1", "--gin_param=RunConfig.progress_bar=False",
        "--gin_param=RunConfig.sample_tokens=0", "--gin_param=RunConfig.eval_batches=2",
        "--gin_param=MeshConfig.data=2", "--gin_param=MeshConfig.fsdp=2", "--peak_tflops=0.1"]


def _env():
  return subprocess_env()


def _losses(run_dir):
  rows = read_metrics(f"{run_dir}/metrics.jsonl")  # in a bucket, its parts joined
  return [r["train/loss"] for r in rows if "train/loss" in r]


def test_two_processes_equal_one_and_restore_in_one(tmp_path, gcs_dir, run_cli):
  """The sequence is split over both processes (MeshConfig.context=4 over 2 x 2 devices): both
  load the same rows and give their devices their half of each sequence."""
  args = [a for a in ARGS if "MeshConfig" not in a] + ["--gin_param=MeshConfig.data=1",
                                                      "--gin_param=MeshConfig.context=4"]
  two, one = f"{gcs_dir}/two", str(tmp_path / "one")
  out = subprocess.run(["bash", "launch/local_multiprocess.sh", "2", "--devices_per_process", "2",
                        "train", *args, f"--run_dir={two}"], cwd=REPO, env=_env(),
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stdout[-3000:]
  assert out.stdout.count("final validation loss") == 1  # only process 0 reports
  out1 = subprocess.run([sys.executable, "-m", "pretrainx", "--cpu_devices=4", "train", *args,
                         f"--run_dir={one}"], cwd=REPO, env=_env(), capture_output=True,
                        text=True, timeout=600)
  assert out1.returncode == 0, out1.stderr
  assert _losses(two) == pytest.approx(_losses(one), rel=1e-5)
  assert len(_losses(two)) == 12
  assert storage.exists(f"{two}/checkpoints/12/commit_success.txt")
  # the 2-process checkpoint restores in one process (this one: 8 devices, resharded on restore)
  ev, ev1 = (run_cli("eval", f"--run_dir={run}", "--gin_param=MeshConfig.data=-1",
                     "--gin_param=MeshConfig.fsdp=1", "--eval_batches=2") for run in (two, one))
  assert ev.returncode == 0 and ev1.returncode == 0, ev.stderr + ev1.stderr
  loss = lambda s: float(s.split("validation loss ")[1].split()[0])
  assert loss(ev.stdout) == pytest.approx(loss(ev1.stdout), rel=1e-4)


def test_launcher_dry_run_prints_the_commands():
  out = subprocess.run(["bash", "launch/local_multiprocess.sh", "2", "--dry-run", "train",
                        "--gin_file=gin_configs/tiny.gin"], cwd=REPO, capture_output=True,
                       text=True, env={**_env(), "PORT": "12345"})
  assert out.returncode == 0
  lines = out.stdout.strip().splitlines()
  assert len(lines) == 2
  for i, line in enumerate(lines):
    assert "--coordinator_address=127.0.0.1:12345 --num_processes=2" in line
    assert f"--process_id={i} train --gin_file=gin_configs/tiny.gin" in line


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_the_same_step(tmp_path):
  import signal
  import time
  run_dir = str(tmp_path / "run")
  args = [a for a in ARGS if "RunConfig.steps" not in a] + ["--gin_param=RunConfig.steps=2000"]
  proc = subprocess.Popen(["bash", "launch/local_multiprocess.sh", "2", "--devices_per_process",
                           "2", "train", *args, f"--run_dir={run_dir}"], cwd=REPO, env=_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  metrics = os.path.join(run_dir, "metrics.jsonl")
  deadline = time.time() + 300
  while time.time() < deadline and not (os.path.exists(metrics) and len(_losses(run_dir)) > 20):
    time.sleep(0.1)
  pid = subprocess.run(["pgrep", "-f", f"process_id=1 train .*{run_dir}"], capture_output=True,
                       text=True).stdout.split()[0]
  os.kill(int(pid), signal.SIGTERM)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out[-3000:]
  steps = [line for line in out.splitlines() if "preempted at step" in line and "rerun" not in line]
  assert len(steps) == 1  # process 0's summary
  step = int(steps[0].split("preempted at step ")[1].split(";")[0])
  assert 20 < step < 2000
  assert os.listdir(os.path.join(run_dir, "checkpoints")) == [str(step)]
