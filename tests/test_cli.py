"""The command line end to end (train -> eval -> generate on tiny) and its error messages: in
this process (8 fake devices) through pretrainx.cli.main, and once as `python -m pretrainx`."""

import os
import subprocess
import sys

import pytest

from conftest import REPO


def test_help_lists_subcommands():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = subprocess.run([sys.executable, "-m", "pretrainx", "--help"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0
  for cmd in ("train", "eval", "generate", "peak"):
    assert cmd in out.stdout


@pytest.mark.slow
def test_train_eval_generate(tmp_path, run_cli):
  run_dir = str(tmp_path / "tiny")
  out = run_cli("train", "--gin_file=gin_configs/tiny.gin", f"--run_dir={run_dir}",
                "--gin_param=RunConfig.steps=30", "--gin_param=RunConfig.progress_bar=False",
                "--peak_tflops=0.1")
  assert out.returncode == 0, out.stderr
  assert "final validation loss" in out.stdout and "unigram-entropy baseline" in out.stdout
  assert os.path.join(run_dir, "checkpoints", "30") in out.stdout
  assert os.path.exists(os.path.join(run_dir, "loss.png"))

  assert "batches per domain, RunConfig.eval_batches" in out.stdout  # says which loss it is

  out = run_cli("eval", f"--run_dir={run_dir}", "--eval_batches=2")
  assert out.returncode == 0, out.stderr
  assert out.stdout.startswith("step 30: validation loss")
  assert "tokens of 2 batches per domain" in out.stdout
  assert "per-domain validation loss: prose " in out.stdout and ", code " in out.stdout
  # the whole split: hundreds of eval batches over 8 devices (once deadlocked XLA CPU collectives)
  whole = run_cli("eval", f"--run_dir={run_dir}")
  assert whole.returncode == 0, whole.stderr[-2000:]
  tokens = lambda s: float(s.split(" over ")[1].split()[0])
  assert tokens(whole.stdout) > 100 * tokens(out.stdout)
  assert "of the whole validation split" in whole.stdout

  out = run_cli("generate", f"--run_dir={run_dir}", "--prompt=import ", "--max_new_tokens=20",
                "--temperature=0")
  assert out.returncode == 0, out.stderr
  assert out.stdout.startswith("import ")
  again = run_cli("generate", f"--run_dir={run_dir}", "--prompt=import ", "--max_new_tokens=20",
                  "--temperature=0")
  assert again.stdout == out.stdout  # greedy is deterministic

  export_dir = str(tmp_path / "export")
  out = run_cli("export", f"--run_dir={run_dir}", f"--out={export_dir}")
  assert out.returncode == 0, out.stderr
  assert f"exported the params of step 30 to {export_dir}" in out.stdout
  assert sorted(n for n in os.listdir(export_dir)
                if os.path.isdir(os.path.join(export_dir, n))) == ["meta", "params"]


@pytest.mark.slow
@pytest.mark.parametrize("args,message", [
    (["train", "--gin_file=gin_configs/tiny.gin", "--gin_param=ModelConfig.num_layer=3"],
     "Did you mean ModelConfig.num_layers"),
    (["train", "--gin_file=gin_configs/tiny.gin", "--gin_param=MeshConfig.data=3"],
     "= 3 devices, but 8 devices are available"),
    (["train", "--gin_file=gin_configs/tiny.gin", "--gin_param=RunConfig.global_batch_size=7"],
     "global batch 7 (microbatch 7) is not divisible by the data-parallel size 8"),
    (["train", "--gin_file=gin_configs/tiny.gin", "--gin_param=RunConfig.microbatches=3"],
     "global_batch_size=8 is not divisible by microbatches=3"),
    (["train", "--gin_file=gin_configs/tiny.gin", "--gin_param=RunConfig.seq_len=1024"],
     "exceeds ModelConfig.max_seq_len=256"),
    (["eval", "--run_dir=/nonexistent/run"], "is not a pretrainx run directory"),
    (["eval", "--gin_file=gin_configs/tiny.gin", "--checkpoint_dir=/nonexistent/ckpt"],
     "checkpoint directory /nonexistent/ckpt does not exist"),
])
def test_bad_input_gets_a_clear_message(args, message, tmp_path, run_cli):
  run_dir = tmp_path / "run"
  if args[0] == "train":
    args = [*args, f"--run_dir={run_dir}"]
  out = run_cli(*args)
  assert out.returncode == 2
  assert message in out.stderr
  assert "Traceback" not in out.stderr
  assert not run_dir.exists()  # refused before anything was written


def test_peak_reports_flops(run_cli):
  out = run_cli("peak", "--size=256")
  assert out.returncode == 0, out.stderr
  assert "GFLOP/s" in out.stdout and "--peak_tflops=" in out.stdout


def test_a_run_is_read_from_the_directory_named_not_its_stored_relative_path(tmp_path, run_cli,
                                                                              monkeypatch):
  """config.gin keeps RunConfig.run_dir as it was given ('runs/x'); eval and export, run from
  another folder, read the run named on the command line, not ./runs/x."""
  (tmp_path / "a").mkdir()
  (tmp_path / "b" / "runs" / "x").mkdir(parents=True)  # another folder's run of the same name
  monkeypatch.chdir(tmp_path / "a")
  out = run_cli("train", f"--gin_file={os.path.join(REPO, 'gin_configs/tiny.gin')}",
                "--run_dir=runs/x", "--gin_param=RunConfig.steps=2",
                "--gin_param=SampleConfig.tokens=0", "--gin_param=RunConfig.eval_batches=1",
                "--gin_param=RunConfig.progress_bar=False")
  assert out.returncode == 0, out.stderr
  monkeypatch.chdir(tmp_path / "b")
  run = str(tmp_path / "a" / "runs" / "x")
  out = run_cli("eval", f"--run_dir={run}", "--eval_batches=1")
  assert out.returncode == 0 and out.stdout.startswith("step 2: validation loss"), out.stderr
  out = run_cli("export", f"--run_dir={run}", f"--out={tmp_path / 'export'}")
  assert out.returncode == 0, out.stderr
  assert f"exported the params of step 2 to {tmp_path / 'export'}" in out.stdout
  # A config.gin that no longer describes the checkpoint's model (same shapes, other RoPE base):
  # refused, rather than evaluated as if it did.
  config = os.path.join(run, "config.gin")
  with open(config, "a", encoding="utf-8") as f:
    f.write("\nModelConfig.rope_theta = 5.0\n")
  out = run_cli("export", f"--run_dir={run}", f"--out={tmp_path / 'export2'}")
  assert out.returncode == 2 and "was written by another model" in out.stderr, out.stderr
  assert "ModelConfig.rope_theta: checkpoint 10000.0, run 5.0" in out.stderr


def _no_backend(monkeypatch):
  """From here on, starting a JAX backend (jax.devices(), process_index(), any compile) fails."""
  from jax._src import xla_bridge

  def refuse(*_, **__):
    raise AssertionError("a JAX backend was asked for before the input was validated")

  monkeypatch.setattr(xla_bridge, "backends", refuse)
  return lambda: monkeypatch.undo()


def test_a_failed_start_leaves_nothing_and_comes_before_jax_starts(tmp_path, run_cli,
                                                                   monkeypatch):
  """A missing source or data file is reported as itself, before any JAX backend starts; the
  run directory is not written, so the corrected command needs no --restart; and a --restart
  that fails keeps the run it would have replaced."""
  run_dir = tmp_path / "run"
  tiny = ["--gin_file=gin_configs/tiny.gin", f"--run_dir={run_dir}",
          "--gin_param=RunConfig.progress_bar=False", "--gin_param=SampleConfig.tokens=0",
          "--gin_param=RunConfig.eval_batches=1", "--gin_param=RunConfig.steps=1"]
  missing_task = ("--gin_param=DataConfig.tasks = [@FileTask()]",
                  "--gin_param=FileTask.name = 'web'",
                  f"--gin_param=FileTask.train_patterns = ['{tmp_path}/web/*.jsonl']",
                  "--gin_param=DataConfig.domains = ['web']")
  nowhere = tmp_path / "nowhere"
  restore = _no_backend(monkeypatch)
  out = run_cli("train", *tiny, f"--gin_param=InitConfig.source = '{nowhere}'")
  assert out.returncode == 2 and f"InitConfig.source {nowhere} does not exist" in out.stderr, \
      out.stderr
  out = run_cli("train", *tiny, *missing_task)
  assert out.returncode == 2 and "no token store" in out.stderr, out.stderr
  assert not run_dir.exists()
  restore()

  out = run_cli("train", *tiny)  # corrected: no --restart needed
  assert out.returncode == 0, out.stderr
  # Its only step also compiled: no throughput or MFU made up from it.
  assert "throughput: nothing to time" in out.stdout and "MFU" not in out.stdout
  before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
  metrics = (run_dir / "metrics.jsonl").read_text()
  out = run_cli("train", *tiny, "--restart", f"--gin_param=InitConfig.source = '{nowhere}'")
  assert out.returncode == 2 and "does not exist" in out.stderr
  assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before
  assert (run_dir / "metrics.jsonl").read_text() == metrics
