"""Runs and data in buckets, end to end through the CLI against the real servers on 127.0.0.1:
train on gs:// from JSON-lines files in the bucket, skip a garbled checkpoint,
eval/generate/export/convert from the bucket, token stores and data on s3://, and one clear line
(exit 2) for each bad place. Elsewhere: kill -9 and resume in a bucket (test_fault_tolerance.py),
two processes writing one run directory in a bucket (test_multiprocess.py), a results table and
a store lease in a bucket (test_storage.py)."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from pretrainx import storage
from pretrainx.metrics import read_metrics

from conftest import REPO, subprocess_env

pytestmark = pytest.mark.xdist_group("bucket_runs")  # the module's runs are built once

TASK_GIN = """
include 'gin_configs/tiny.gin'
DataConfig.domains = ['web']
DataConfig.tasks = [@web/FileTask()]
DataConfig.store_dir = '{stores}'
web/FileTask.name = 'web'
web/FileTask.train_patterns = ['{data}/train-*.jsonl']
web/FileTask.validation_patterns = ['{data}/valid.jsonl']
RunConfig.log_every = 1
RunConfig.progress_bar = False
RunConfig.eval_batches = 2
RunConfig.sample_tokens = 8
CheckpointConfig.every_steps = 5
"""


def _env():
  """Without the suite's 8 fake devices (--cpu_devices=2 says how many)."""
  return subprocess_env()


def _cli(*args, timeout=600, check=True):
  out = subprocess.run([sys.executable, "-m", "pretrainx", "--cpu_devices=2", *args], cwd=REPO,
                       env=_env(), capture_output=True, text=True, timeout=timeout)
  if check:
    assert out.returncode == 0, out.stderr[-4000:]
  return out


def _write_corpus(data_dir: str) -> None:
  """JSON-lines documents (Python source from the embedded corpus) in the bucket."""
  from pretrainx.data import corpus
  docs = [d.text for d in corpus.load_documents("train", ("code",), 0.05)][:60]
  for shard in range(2):
    storage.write_text(f"{data_dir}/train-{shard}.jsonl", "".join(
        json.dumps({"text": t}) + "\n" for t in docs[shard::2][:25]))
  storage.write_text(f"{data_dir}/valid.jsonl", "".join(
      json.dumps({"text": t}) + "\n" for t in docs[50:]))


def _experiment_file(root: str, stores: str, tmp_path) -> str:
  gin = tmp_path / "bucket_task.gin"
  gin.write_text(TASK_GIN.format(stores=stores, data=f"{root}/data"))
  return str(gin)


def _losses(metrics_path: str) -> dict[int, float]:
  out = {}
  for row in read_metrics(metrics_path):  # in a bucket, its parts joined
    if "train/loss" in row:
      out[row["step"]] = row["train/loss"]
  return out


@pytest.fixture(scope="module")
def bucket_data(gcs_server, tmp_path_factory):
  """JSON-lines files in gs://runs/<module>/data, prepared into token stores in the bucket."""
  root = f"gs://runs/bucket-runs-{os.getpid()}"
  _write_corpus(f"{root}/data")
  tmp = tmp_path_factory.mktemp("gin")
  gin = _experiment_file(root, f"{root}/stores", tmp)
  out = _cli("data", "prepare", "web", f"--gin_file={gin}")
  assert "web/train: 50 documents" in out.stdout and f"in {root}/stores/web/train" in out.stdout
  return root, gin


@pytest.fixture(scope="module")
def reference_run(bucket_data):
  """An uninterrupted 20-step run with its run directory in the bucket."""
  root, gin = bucket_data
  run_dir = f"{root}/reference"
  out = _cli("train", f"--gin_file={gin}", "--gin_param=RunConfig.steps=20",
             f"--run_dir={run_dir}", "--peak_tflops=0.1")
  assert f"checkpoint:  {run_dir}/checkpoints/20" in out.stdout
  return run_dir


@pytest.fixture
def cli(run_cli):
  """`pretrainx ARGS` in this process (conftest.run_cli); exit 0 is asserted unless check=False."""
  def run(*args, check=True):
    out = run_cli(*args)
    if check:
      assert out.returncode == 0, out.stderr[-4000:]
    return out
  return run


@pytest.mark.slow
def test_a_run_directory_in_the_bucket_holds_everything(reference_run):
  names = storage.listdir(reference_run)
  assert names == ["checkpoints", "config.gin", "goodput.jsonl.parts", "loss.png",
                   "metrics.jsonl.parts", "tensorboard"]
  from pretrainx.train.goodput import summarize  # pylint: disable=import-outside-toplevel
  assert summarize(reference_run)["status"] == "finished"  # read back from its parts
  assert storage.listdir(f"{reference_run}/checkpoints") == ["10", "15", "20"]  # keep_last 3
  assert storage.exists(f"{reference_run}/checkpoints/20/commit_success.txt")
  assert sorted(_losses(f"{reference_run}/metrics.jsonl")) == list(range(1, 21))
  events = storage.listdir(f"{reference_run}/tensorboard")
  assert events and all(e.startswith("events.out.tfevents") for e in events)
  assert storage.read_bytes(f"{reference_run}/loss.png")[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_garbled_newest_checkpoint_in_the_bucket_is_skipped_and_kept(bucket_data, tmp_path, cli):
  root, gin = bucket_data
  run_dir = f"{root}/garbled"
  cli("train", f"--gin_file={gin}", "--gin_param=RunConfig.steps=10", f"--run_dir={run_dir}",
       "--gin_param=RunConfig.sample_tokens=0")
  ckpts = f"{run_dir}/checkpoints"
  assert storage.listdir(ckpts) == ["10", "5"]
  garbled = [p for p in storage.glob(f"{ckpts}/10/state/**/*") if "/d/" in p]
  assert garbled, storage.glob(f"{ckpts}/10/**/*")
  for p in garbled:
    storage.write_bytes(p, b"\x00garbage" * 64)
  out = cli("eval", f"--run_dir={run_dir}", "--eval_batches=1")
  assert "step 5: validation loss" in out.stdout
  assert "checkpoint step 10" in out.stderr and "moved it to" in out.stderr
  names = storage.listdir(ckpts)
  assert "5" in names and "10" not in names
  corrupt = [n for n in names if n.startswith("corrupt-10-")]
  assert len(corrupt) == 1  # kept for inspection, bytes and all
  kept = {p.replace(f"/{corrupt[0]}/", "/10/") for p in storage.glob(f"{ckpts}/{corrupt[0]}/**/*")}
  assert set(garbled) <= kept
  assert not storage.exists(f"{ckpts}/10")


@pytest.mark.slow
def test_eval_generate_export_convert_from_a_bucket_run(reference_run, bucket_data, cli):
  root, _ = bucket_data
  out = cli("eval", f"--run_dir={reference_run}", "--eval_batches=1")
  assert out.stdout.startswith("step 20: validation loss ")
  out = cli("generate", f"--run_dir={reference_run}", "--max_new_tokens=8", "--temperature=0")
  assert out.stdout.strip()
  export = f"{root}/export"
  out = cli("export", f"--run_dir={reference_run}", f"--out={export}")
  assert f"exported the params of step 20 to {export}" in out.stdout
  hf_dir = f"{root}/hf"
  out = cli("convert", export, hf_dir)
  assert f"pretrainx-to-hf: wrote {hf_dir}" in out.stdout
  assert set(storage.listdir(hf_dir)) == {"config.json", "model.safetensors", "tokenizer.json",
                                          "tokenizer_config.json"}  # the byte tokenizer
  back = f"{root}/back"
  out = cli("convert", hf_dir, back)
  assert f"hf-to-pretrainx: wrote {back}" in out.stdout
  from pretrainx.checkpoint import load_params
  import jax
  from pretrainx.config import load_run_experiment
  from pretrainx.train.runtime import build_runtime
  exp = load_run_experiment(reference_run)
  rt = build_runtime(exp)
  original, _ = load_params(export, rt.abstract_state.params)
  again, _ = load_params(back, rt.abstract_state.params)
  vocab, padded = exp.data.vocabulary.vocab_size, exp.model.padded_vocab_size
  for a, b in zip(jax.tree.leaves(original), jax.tree.leaves(again)):
    a, b = np.asarray(a), np.asarray(b)
    if a.shape[0] == padded:  # rows past the vocabulary are padding, which HF does not keep
      a, b = a[:vocab], b[:vocab]
    if a.shape[-1] == padded:
      a, b = a[..., :vocab], b[..., :vocab]
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_continue_from_a_hugging_face_directory_in_the_bucket(reference_run, bucket_data, cli):
  root, gin = bucket_data
  hf_dir = f"{root}/hf-source"
  cli("export", f"--run_dir={reference_run}", f"--out={root}/export-src")
  cli("convert", f"{root}/export-src", hf_dir)
  out = cli("train", f"--gin_file={gin}", "--gin_param=RunConfig.steps=3",
             f"--gin_param=InitConfig.source='{hf_dir}'", f"--run_dir={root}/continued",
             "--gin_param=RunConfig.sample_tokens=0")
  first = _losses(f"{root}/continued/metrics.jsonl")[1]
  assert first < _losses(f"{reference_run}/metrics.jsonl")[1] - 0.2  # it started trained


@pytest.mark.slow
def test_token_stores_and_data_files_on_s3(s3_dir, tmp_path, cli):
  _write_corpus(f"{s3_dir}/data")
  gin = _experiment_file(s3_dir, f"{s3_dir}/stores", tmp_path)
  out = cli("data", "prepare", "web", f"--gin_file={gin}")
  assert f"web/validation: 10 documents" in out.stdout
  assert storage.exists(f"{s3_dir}/stores/web/train/manifest.json")
  out = cli("train", f"--gin_file={gin}", "--gin_param=RunConfig.steps=4",
             f"--run_dir={tmp_path / 'run'}", "--gin_param=RunConfig.sample_tokens=0")
  assert "final validation loss" in out.stdout


def test_an_s3_run_directory_is_refused_up_front(s3_dir, tmp_path, cli):
  out = cli("train", "--gin_file=gin_configs/tiny.gin", f"--run_dir={s3_dir}/run", check=False)
  assert out.returncode == 2
  assert out.stderr.strip().splitlines()[-1] == (
      f"pretrainx train: error: cannot write the run directory {s3_dir}/run/checkpoints: "
      "orbax-checkpoint cannot write s3:// paths (it collapses 's3://' to 's3:/'). Put the run "
      "directory or export on gs:// or a local/shared disk; token stores and data files may stay "
      "on s3://.")
  assert not storage.exists(f"{s3_dir}/run")  # nothing half-written


@pytest.mark.slow
@pytest.mark.parametrize("what", ["run_dir", "store_dir", "data"])
def test_missing_bucket_exits_2_and_writes_nothing(what, gcs_server, tmp_path, cli):
  missing = "gs://no-such-bucket/x"
  params = {"run_dir": [f"--run_dir={missing}"],
            "store_dir": [f"--gin_param=DataConfig.store_dir='{missing}'",
                          f"--run_dir={tmp_path / 'run'}"],
            "data": []}[what]
  if what == "data":
    gin = tmp_path / "t.gin"
    gin.write_text(TASK_GIN.format(stores=str(tmp_path / "stores"), data=missing))
    args = ["data", "prepare", "web", f"--gin_file={gin}"]
  else:
    args = ["train", "--gin_file=gin_configs/tiny.gin", *params]
  out = cli(*args, check=False)
  assert out.returncode == 2, out.stderr[-3000:]
  last = out.stderr.strip().splitlines()[-1]
  assert "bucket gs://no-such-bucket does not exist; create it (`gcloud storage buckets create " \
         "gs://no-such-bucket`) or fix the path." in last
  assert not os.path.exists(tmp_path / "run" / "config.gin")


def test_glob_without_matches_in_a_bucket_exits_2(gcs_dir, tmp_path, cli):
  gin = tmp_path / "t.gin"
  gin.write_text(TASK_GIN.format(stores=f"{gcs_dir}/stores", data=f"{gcs_dir}/empty"))
  out = cli("data", "prepare", "web", f"--gin_file={gin}", check=False)
  assert out.returncode == 2
  assert out.stderr.strip().splitlines()[-1] == (
      f"pretrainx data: error: task 'web': no files match ['{gcs_dir}/empty/train-*.jsonl']; "
      "check the paths.")
  assert not storage.exists(f"{gcs_dir}/stores/web/train/manifest.json")


def test_corpus_stores_in_a_bucket_are_built_once(gcs_dir):
  from pretrainx.data import store as token_store
  from pretrainx.vocab import ByteVocabulary
  first = token_store.ensure_corpus_store(gcs_dir, "prose", "validation", ByteVocabulary(), 0.05)
  again = token_store.ensure_corpus_store(gcs_dir, "prose", "validation", ByteVocabulary(), 0.05)
  assert first.manifest == again.manifest and first.num_docs > 0
  assert storage.listdir(f"{gcs_dir}/prose") == ["validation"]  # the lease is gone


@pytest.mark.slow
def test_sweep_and_fit_with_results_in_the_bucket(gcs_server, tmp_path, cli):
  root = f"gs://runs/sweep-{os.getpid()}-{time.time_ns()}"
  sweep = tmp_path / "sweep.gin"
  sweep.write_text(f"""
SweepConfig.name = 'b'
SweepConfig.gin_files = ['gin_configs/tiny.gin']
SweepConfig.bindings = ['RunConfig.sample_tokens = 0', 'RunConfig.eval_batches = 1',
                        'RunConfig.steps = 3']
SweepConfig.grid = {{'OptimizerConfig.learning_rate': [1e-2, 3e-3]}}
SweepConfig.run_root = '{root}/runs'
SweepConfig.results = '{root}/results'
""")
  out = cli("sweep", str(sweep))
  from pretrainx.scaling.results import load_results
  rows = load_results(f"{root}/results")
  assert [r["status"] for r in rows] == ["done", "done"]
  assert len(storage.listdir(f"{root}/runs")) == 2
  again = cli("sweep", str(sweep), "--dry_run")
  assert again.stdout.count(" done ") == 2
