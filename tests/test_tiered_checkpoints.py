"""Four processes on 127.0.0.1 (jax.distributed, one CPU device each, a 2x2 mesh over four
'slices'), local checkpoints every 2 steps copied to a peer, persistent ones every 10. One
process is SIGKILLed after step 13 and the job is restarted: with that host's local directory
wiped it resumes from step 12 through its peer's copy; with every local tier wiped, from the
persistent step 10 (goodput counts the recomputed steps); with the peer's copy of step 12 also
corrupt, it skips it with a warning naming it and resumes from step 10's local copies. Each
resumed run ends with params bit-identical to an uninterrupted run's."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from pretrainx.checkpoint.local import run_key
from pretrainx.train.goodput import summarize

from conftest import REPO, subprocess_env

pytestmark = pytest.mark.xdist_group("tiered_checkpoints")  # one reference run per suite

STEPS, PROCESSES = 20, 4
ARGS = ["--gin_file=gin_configs/tiny.gin", f"--gin_param=RunConfig.steps={STEPS}",
        "--gin_param=RunConfig.log_every=1", "--gin_param=RunConfig.progress_bar=False",
        "--gin_param=RunConfig.sample_tokens=0", "--gin_param=RunConfig.eval_batches=1",
        "--gin_param=RunConfig.global_batch_size=8",
        "--gin_param=MeshConfig.data=1", "--gin_param=MeshConfig.fsdp=1",
        "--gin_param=MeshConfig.dcn_data=2", "--gin_param=MeshConfig.dcn_fsdp=2",
        "--gin_param=CheckpointConfig.every_steps=10",
        "--gin_param=CheckpointConfig.local_every_steps=2", "--peak_tflops=0.1"]


def _port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(run_dir, local_dir, fault=""):
  """The four processes of one job (each prints to its own log under run_dir/../logs)."""
  port, procs = _port(), []
  logs = os.path.join(os.path.dirname(run_dir), "logs")
  os.makedirs(logs, exist_ok=True)
  env = subprocess_env()
  env["PRETRAINX_FAULT"] = fault
  for i in range(PROCESSES):
    cmd = [sys.executable, "-m", "pretrainx", "--cpu_devices=1",
           f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={PROCESSES}",
           f"--process_id={i}", "train", *ARGS, f"--run_dir={run_dir}",
           f"--gin_param=CheckpointConfig.local_dir='{local_dir}'"]
    log = open(os.path.join(logs, f"{len(os.listdir(logs))}-process{i}.log"), "w")
    procs.append((subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT),
                  log))
  return procs


def _logs(procs):
  out = []
  for _, log in procs:
    log.close()
    with open(log.name) as f:
      out.append(f.read())
  return out


def _run(run_dir, local_dir):
  procs = _start(run_dir, local_dir)
  codes = [p.wait(timeout=600) for p, _ in procs]
  logs = _logs(procs)
  assert codes == [0] * PROCESSES, "\n".join(log[-3000:] for log in logs)
  return logs


def _killed_after_13(run_dir, local_dir):
  """Process 1 SIGKILLs itself after step 13; the others, stuck in its collectives, are killed
  as a scheduler would when a host is lost."""
  procs = _start(run_dir, local_dir, fault="after_step:13:1")
  victim = procs[1][0]
  assert victim.wait(timeout=600) == -signal.SIGKILL, _logs(procs)[1][-3000:]
  for p, _ in procs:
    if p.poll() is None:
      p.kill()
    p.wait()
  _logs(procs)


def _params(run_dir, step=STEPS):
  """The params of a run's persistent checkpoint, read as numpy arrays (no mesh needed)."""
  import jax
  import orbax.checkpoint as ocp
  path = os.path.join(run_dir, "checkpoints", str(step), "state")
  ckptr = ocp.PyTreeCheckpointer()
  tree = ckptr.metadata(path).item_metadata.tree
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  restored = ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))
  leaves = jax.tree.leaves(restored["params"])
  assert leaves and all(isinstance(x, np.ndarray) for x in leaves)
  return leaves


def _resumed(run_dir):
  """(step, tier) the last attempt started from, as goodput.jsonl recorded it."""
  last = summarize(run_dir)["attempts"][-1]
  return last["started_step"], last["resumed_from"]


def _reached(run_dir):
  """The highest step the killed attempt recorded (it reached 13; a step or two more may have
  been dispatched before its peers stopped)."""
  return summarize(run_dir)["attempts"][0]["last_step"]


def _home(local_dir, run_dir, process):
  return os.path.join(local_dir, run_key(run_dir), f"process_{process}")


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
  """(reference params, a job killed after step 13: its run and local directories)."""
  base = tmp_path_factory.mktemp("tiers")
  ref = str(base / "ref" / "run")
  _run(ref, str(base / "ref" / "local"))
  run_dir, local_dir = str(base / "killed" / "run"), str(base / "killed" / "local")
  _killed_after_13(run_dir, local_dir)
  return _params(ref), run_dir, local_dir


def _copy(killed, tmp_path):
  """A copy of the killed job's directories, under the same run directory name (the local tier
  is keyed by it)."""
  _, run_dir, local_dir = killed
  new_run, new_local = str(tmp_path / "run"), str(tmp_path / "local")
  shutil.copytree(run_dir, new_run)
  shutil.copytree(os.path.join(local_dir, run_key(run_dir)),
                  os.path.join(new_local, run_key(new_run)))
  return new_run, new_local


@pytest.mark.slow
def test_a_lost_host_resumes_from_its_peer_copy_and_a_lost_local_tier_from_persistent(
    killed, tmp_path):
  ref_params, run_dir, local_dir = killed
  # Before any restart: the local tier holds step 12 on every process, each with its peer's copy,
  # and the persistent tier step 10.
  for p in range(PROCESSES):
    assert "12" in os.listdir(os.path.join(_home(local_dir, run_dir, p), "own"))
  assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["10"]

  # 1. The killed host comes back empty: step 12 of process 1 comes from its peer's copy.
  lost_host_run, lost_host_local = _copy(killed, tmp_path / "lost_host")
  shutil.rmtree(_home(lost_host_local, lost_host_run, 1))
  _run(lost_host_run, lost_host_local)
  assert _resumed(lost_host_run) == (12, "peer")
  for a, b in zip(_params(lost_host_run), ref_params):
    np.testing.assert_array_equal(a, b)
  reached = _reached(run_dir)
  assert reached >= 13
  assert summarize(lost_host_run)["recomputed_steps"] == reached - 12

  # 2. Every host comes back empty: the persistent step 10, with steps 11-13 recomputed.
  all_lost_run, all_lost_local = _copy(killed, tmp_path / "all_lost")
  shutil.rmtree(all_lost_local)
  _run(all_lost_run, all_lost_local)
  assert _resumed(all_lost_run) == (10, "persistent")
  for a, b in zip(_params(all_lost_run), ref_params):
    np.testing.assert_array_equal(a, b)
  gp = summarize(all_lost_run)
  assert gp["recomputed_steps"] == reached - 10
  assert gp["badput_s"]["recomputed"] > 0 and 0 < gp["goodput_percent"] < 100


@pytest.mark.slow
def test_a_corrupt_peer_copy_is_skipped_with_a_warning_that_names_it(killed, tmp_path):
  ref_params, *_ = killed
  run_dir, local_dir = _copy(killed, tmp_path / "corrupt")
  shutil.rmtree(_home(local_dir, run_dir, 1))
  keeper = 2  # process 1's copies live with process 2 (the next slice)
  replica = os.path.join(_home(local_dir, run_dir, keeper), "replica_of_1", "12")
  victim = max((os.path.join(r, f) for r, _, fs in os.walk(replica) for f in fs
                if "ocdbt.process_1" in r), key=os.path.getsize)
  with open(victim, "r+b") as f:  # flip bytes in the middle of the biggest data file
    f.seek(os.path.getsize(victim) // 2)
    data = f.read(8)
    f.seek(os.path.getsize(victim) // 2)
    f.write(bytes(b ^ 0xFF for b in data))
  logs = _run(run_dir, local_dir)
  warned = [line for line in logs[keeper].splitlines() if replica in line and "unusable" in line]
  assert warned and "differs from its checksum" in warned[0]
  assert _resumed(run_dir) == (10, "peer")  # step 10's copies are intact
  for a, b in zip(_params(run_dir), ref_params):
    np.testing.assert_array_equal(a, b)
  assert summarize(run_dir)["recomputed_steps"] == _reached(killed[1]) - 10
