"""The config layer after the sections split: a Hugging Face (or pretrainx) source sets the
architecture, explicit bindings that disagree are refused, and a run directory written before
the split still resumes, to the same losses the old code computed."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pretrainx import hf
from pretrainx.config import ModelConfig, parse_gin
from pretrainx.model import Transformer
from pretrainx.train.init import initial_state
from pretrainx.train.runtime import build_runtime

pytestmark = pytest.mark.xdist_group("config_layers")  # its module fixtures are built once

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEFORE_SPLIT = os.path.join(REPO, "tests", "data", "run_before_sections")
# Shapes unlike ModelConfig's defaults, so that a filled field cannot pass by accident.
SOURCE = ModelConfig(vocab_size=259, embed_dim=32, num_layers=3, num_heads=2, num_kv_heads=1,
                     mlp_dim=48, max_seq_len=128, tie_embeddings=False, rope_theta=500.0,
                     norm_eps=1e-6)


@pytest.fixture(scope="module")
def hf_source(tmp_path_factory):
  """A random Llama-shaped model saved as a Hugging Face directory; (directory, params)."""
  params = Transformer(SOURCE).init(jax.random.key(3), jnp.zeros((1, 8), jnp.int32))["params"]
  params = jax.tree.map(lambda x: x.value if hasattr(x, "value") else x, params,
                        is_leaf=lambda x: hasattr(x, "value"))
  directory = str(tmp_path_factory.mktemp("hf") / "llama")
  hf.export_hf(params, SOURCE, directory, architecture="LlamaForCausalLM", dtype="float32")
  return directory, params


def _cpt_gin(tmp_path, source, *extra):
  """A continual-pretraining gin file that binds no ModelConfig shape at all."""
  path = tmp_path / "cpt.gin"
  path.write_text("\n".join([
      "include 'gin_configs/runs/pretrain.gin'", "STEPS = 2", "BATCH_SIZE = 8", "SEQ_LEN = 32",
      "LEARNING_RATE = 1e-3", f"InitConfig.source = '{source}'", "SampleConfig.tokens = 0",
      "RunConfig.eval_batches = 1", "RunConfig.progress_bar = False",
      f"RunConfig.run_dir = '{tmp_path / 'run'}'", "ModelConfig.scan_layers = False", *extra]))
  return str(path)


@pytest.mark.slow
def test_a_hugging_face_source_sets_the_architecture(hf_source, tmp_path):
  directory, params = hf_source
  exp = parse_gin([_cpt_gin(tmp_path, directory)])
  for field in ("vocab_size", "embed_dim", "num_layers", "num_heads", "num_kv_heads", "mlp_dim",
                "max_seq_len", "tie_embeddings", "rope_theta", "norm_eps", "qkv_bias"):
    assert getattr(exp.model, field) == getattr(SOURCE, field), field
  assert exp.model.scan_layers is False  # how the model runs stays the run's own
  rt = build_runtime(exp)
  tokens = jnp.arange(16, dtype=jnp.int32)[None] % 200
  state, step = initial_state(rt, exp.init)
  with rt.scope():
    ours = jax.jit(lambda p: rt.model.apply({"params": p}, tokens))(state.params)
  theirs = Transformer(SOURCE).apply({"params": params}, tokens)
  assert step == 0
  np.testing.assert_allclose(np.asarray(ours)[..., :259], np.asarray(theirs)[..., :259],
                             atol=1e-5)


def test_a_binding_that_disagrees_with_config_json_is_refused(hf_source, tmp_path):
  directory, _ = hf_source
  gin = _cpt_gin(tmp_path, directory)
  with pytest.raises(ValueError, match=r"ModelConfig.num_layers: bound 5, the source has 3"):
    parse_gin([gin], ["ModelConfig.num_layers = 5"])
  # agreeing bindings are fine, and a shorter context than the source's is the run's choice
  exp = parse_gin([gin], ["ModelConfig.num_layers = 3", "ModelConfig.max_seq_len = 64"])
  assert (exp.model.num_layers, exp.model.max_seq_len, exp.model.embed_dim) == (3, 64, 32)
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = subprocess.run([sys.executable, "-m", "pretrainx", "train", f"--gin_file={gin}",
                        "--gin_param=ModelConfig.num_layers=5"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 2 and "Traceback" not in out.stderr
  assert "ModelConfig.num_layers: bound 5, the source has 3" in out.stderr


def test_a_pretrainx_run_as_source_sets_the_architecture_too(tmp_path):
  exp = parse_gin([_cpt_gin(tmp_path, BEFORE_SPLIT)])
  assert (exp.model.embed_dim, exp.model.num_layers, exp.model.mlp_dim) == (16, 1, 32)
  grown = parse_gin([_cpt_gin(tmp_path, BEFORE_SPLIT, "InitConfig.stack_factor = 2")])
  assert grown.model.num_layers == 2  # the grown depth, not the source's


@pytest.mark.slow
def test_a_run_directory_from_before_the_split_resumes_as_the_old_code_did(tmp_path):
  """Written by the code before the config sections split (steps 1-2); resuming it to step 4
  gives the losses the old code gave when it resumed the same directory, to fp32 round-off: the
  CPU attention has since changed its summation order (query chunks), which moves the 7th digit.
  A binding read wrongly (the z-loss, the schedule, the model) moves them by far more.

  The embedded corpus is this interpreter's standard library, so the losses depend on the Python
  version: '3.11' holds the old code's, '3.12' this code's on 3.12's corpus (on token stores
  built by 3.11 it gives the '3.11' losses to the last digit, with jax 0.12)."""
  run_dir = tmp_path / "old_run"
  shutil.copytree(BEFORE_SPLIT, run_dir, ignore=shutil.ignore_patterns("expected_resume.json"))
  with open(os.path.join(BEFORE_SPLIT, "expected_resume.json")) as f:
    expected = json.load(f)[f"{sys.version_info.major}.{sys.version_info.minor}"]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = subprocess.run(
      [sys.executable, "-m", "pretrainx", "train", f"--run_dir={run_dir}",
       f"--gin_file={run_dir}/config.gin", "--gin_param=RunConfig.steps=4",
       f"--gin_param=RunConfig.run_dir='{run_dir}'"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
  train = {r["step"]: r for r in rows if "train/loss" in r}
  for step in ("3", "4"):
    assert train[int(step)]["train/loss"] == pytest.approx(expected[step]["train/loss"], rel=1e-6)
    assert train[int(step)]["train/grad_norm"] == pytest.approx(
        expected[step]["train/grad_norm"], rel=1e-6)
  evals = [r["eval/loss"] for r in rows if r["step"] == 4 and "eval/loss" in r]
  assert evals == [pytest.approx(expected["eval_at_4"], rel=1e-6)]
  assert "LossConfig.z_loss = 0.001" in (run_dir / "config.gin").read_text()


def test_a_source_that_is_not_there_leaves_the_config_as_bound(tmp_path):
  """A resumed run needs no source and a preview (schedule, plan) may come first: parsing goes
  on with the bindings as they are; starting from a missing source fails when it is loaded."""
  exp = parse_gin([_cpt_gin(tmp_path, tmp_path / "gone")], ["ModelConfig.num_layers = 3"])
  assert exp.model == ModelConfig(num_layers=3, scan_layers=False)
