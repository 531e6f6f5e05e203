"""The local checkpoint tier's parts in one process: which peer keeps whose copy, which steps are
complete across processes, checksums that catch a flipped byte or a missing file, the config's
one-line errors, and a process SIGKILLed in the middle of a local save, which resumes from the
local step before it with the same losses."""

import json
import os
import subprocess
import sys

import pytest

from pretrainx import faults
from pretrainx.checkpoint.local import (CHECKSUMS, COMMIT_MARKER, complete_steps, keepers, run_key,
                                        step_problem, write_checksums)
from pretrainx.config import CheckpointConfig
from pretrainx.metrics import read_metrics
from pretrainx.train.goodput import summarize

from conftest import REPO, subprocess_env


def test_each_process_is_kept_by_the_same_place_in_the_next_slice():
  assert keepers([0, 1, 2, 3]) == {0: 1, 1: 2, 2: 3, 3: 0}  # a slice per process
  assert keepers([0, 0, 1, 1]) == {0: 2, 1: 3, 2: 0, 3: 1}  # two slices of two hosts
  assert keepers([0, 0, 0]) == {0: 1, 1: 2, 2: 0}  # one slice: the next host
  assert keepers([0]) == {}


def test_a_step_is_complete_when_every_process_has_its_shards_somewhere():
  # process 1 lost its disk: step 12 of process 1 survives only as process 2's copy
  infos = [{"process": 0, "own": [10, 12], "replicas": {"3": [10, 12]}},
           {"process": 1, "own": [], "replicas": {}},
           {"process": 2, "own": [10, 12], "replicas": {"1": [12]}},
           {"process": 3, "own": [10, 12], "replicas": {"2": [10, 12]}}]
  assert complete_steps(infos, 4) == [12]  # step 10 of process 1 is nowhere
  infos[2]["replicas"]["1"] = []
  assert complete_steps(infos, 4) == []


def test_checksums_catch_a_flipped_byte_a_missing_file_and_an_unfinished_step(tmp_path):
  step = tmp_path / "12"
  (step / "state").mkdir(parents=True)
  (step / "state" / "data").write_bytes(bytes(range(256)) * 64)
  (step / "_METADATA").write_text("{}")
  assert step_problem(str(step)) == "never finalised"
  (step / COMMIT_MARKER).write_text("")
  assert "no CHECKSUMS" in step_problem(str(step))
  write_checksums(str(step))
  assert step_problem(str(step)) is None
  assert set(json.loads((step / CHECKSUMS).read_text())) == {"state/data", "_METADATA",
                                                            COMMIT_MARKER}
  with open(step / "state" / "data", "r+b") as f:
    f.seek(5000)
    f.write(b"\x00")
  assert step_problem(str(step)) == "state/data differs from its checksum"
  (step / "state" / "data").unlink()
  assert "missing ['state/data']" in step_problem(str(step))


def test_run_key_is_readable_and_unique_per_run_directory():
  assert run_key("gs://bucket/runs/exp1").startswith("exp1-")
  assert run_key("/a/exp1") != run_key("/b/exp1")


def test_bad_local_tier_settings_are_one_line_each(run_cli, tmp_path):
  with pytest.raises(ValueError, match="needs CheckpointConfig.local_dir"):
    CheckpointConfig(local_every_steps=2)
  with pytest.raises(ValueError, match="is remote"):
    CheckpointConfig(local_every_steps=2, local_dir="gs://bucket/local")
  out = run_cli("train", "--gin_file=gin_configs/tiny.gin", f"--run_dir={tmp_path / 'run'}",
                "--gin_param=CheckpointConfig.local_every_steps=2",
                "--gin_param=CheckpointConfig.local_dir='gs://b/x'")
  assert out.returncode == 2
  assert "is remote" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_a_malformed_fault_plan_is_refused(monkeypatch):
  monkeypatch.setenv(faults.ENV, "after_step:x")
  with pytest.raises(ValueError, match="POINT:STEP"):
    faults.planned()
  monkeypatch.setenv(faults.ENV, "local_save:6:0")
  assert faults.planned() == ("local_save", 6, 0)


@pytest.mark.slow
def test_sigkill_during_a_local_save_resumes_from_the_local_step_before(tmp_path):
  """Killed while step 6's local files are being written: step 6 is never restored (its
  temporary directory is removed), the run resumes from local step 4, and steps 5-6 repeat
  their losses bit for bit."""
  run_dir, local_dir = str(tmp_path / "run"), str(tmp_path / "local")
  cmd = [sys.executable, "-m", "pretrainx", "--cpu_devices=2", "train",
         "--gin_file=gin_configs/tiny.gin", "--gin_param=RunConfig.steps=8",
         "--gin_param=RunConfig.log_every=1", "--gin_param=RunConfig.progress_bar=False",
         "--gin_param=RunConfig.sample_tokens=0", "--gin_param=RunConfig.eval_batches=1",
         "--gin_param=CheckpointConfig.local_every_steps=2",
         f"--gin_param=CheckpointConfig.local_dir='{local_dir}'", "--peak_tflops=0.1",
         f"--run_dir={run_dir}"]
  env = subprocess_env()
  killed = subprocess.run(cmd, cwd=REPO, env={**env, faults.ENV: "local_save:6"},
                          capture_output=True, text=True, timeout=600)
  assert killed.returncode == -9, killed.stderr[-3000:]
  losses = lambda: {r["step"]: r["train/loss"] for r in read_metrics(f"{run_dir}/metrics.jsonl")
                    if "train/loss" in r}
  before = losses()
  own = os.path.join(local_dir, run_key(run_dir), "process_0", "own")
  assert "4" in os.listdir(own) and "6" not in os.listdir(own)
  resumed = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert not [n for n in os.listdir(own) if "tmp" in n]
  assert "steps recomputed after restores" in resumed.stdout  # the goodput line of the summary
  last = summarize(run_dir)["attempts"][-1]
  assert (last["started_step"], last["resumed_from"]) == (4, "local")
  after = losses()
  assert sorted(after) == list(range(1, 9))
  assert all(after[s] == before[s] for s in before)  # steps 5.. recomputed: the same bits


def test_the_tiered_preset_parses_into_both_tiers():
  from pretrainx.config import parse_gin
  exp = parse_gin([f"{REPO}/gin_configs/tiny.gin", f"{REPO}/gin_configs/checkpoint/tiered.gin"])
  assert exp.checkpoint.local_tier and exp.checkpoint.local_dir == "/dev/shm/pretrainx"
  assert (exp.checkpoint.local_every_steps, exp.checkpoint.every_steps) == (50, 1000)
