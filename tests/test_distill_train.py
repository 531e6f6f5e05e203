"""Distillation in real runs (issue 41): the loop loads an online teacher beside the student and
never checkpoints it, a resumed run is bit-exact across SALT's switch to CE, 8 devices equal 1,
the students of the other features (LoRA, MoE, hybrid) distil, and bad input is one line."""

import json
import os
import shutil

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pretrainx import checkpoint
from pretrainx.config import LoraConfig, Selection, Stage, experiment_to_gin
from pretrainx.data.pipeline import TrainBatches
from pretrainx.model import Transformer
from pretrainx.train import loop
from pretrainx.train.runtime import build_runtime
from pretrainx.train.state import create_train_state
from pretrainx.train.teacher import load_teacher_params, teacher_for

from conftest import REPO, tiny_experiment

pytestmark = pytest.mark.xdist_group("distill_train")  # one teacher export per module


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
  """A params export of a (random) 3-layer teacher with the tiny student's vocabulary."""
  root = tmp_path_factory.mktemp("teacher")
  exp = tiny_experiment(root / "run", model={"num_layers": 3, "embed_dim": 48})
  params = nn.unbox(Transformer(exp.model).init(jax.random.key(7),
                                                jnp.zeros((1, exp.run.seq_len), jnp.int32)))
  return checkpoint.save_params(str(root / "export"), params["params"],
                                {"step": 0, "config_gin": experiment_to_gin(exp)})


def _losses(path):
  return {r["step"]: r["train/loss"] for r in map(json.loads, open(path)) if "train/loss" in r}


def test_resumed_distillation_is_bit_exact_across_the_switch_to_ce(tiny_exp, teacher):
  """SALT (KD until step 5) over a stage that doubles the sequence (same tokens per step) and
  selects the longest prose documents at step 4: the checkpoints hold only the student;
  resuming at step 4 reloads the teacher, crosses both changes, and every loss matches the
  uninterrupted run bit for bit."""
  stages = (Stage(), Stage(start_step=4, seq_len=128, tokens_per_step=16 * 64,
                           selections=(Selection(domains=("prose",), score="length",
                                                 top_fraction=0.5),)))
  exp = tiny_exp(run={"steps": 8, "log_every": 1, "sample_tokens": 0, "eval_batches": 1,
                      "global_batch_size": 16},
                 checkpoint={"every_steps": 4}, data={"stages": stages},
                 distill={"teacher": teacher, "alpha": 0.7, "alpha_schedule": "until",
                          "alpha_end_step": 5, "temperature": 2.0, "top_k": 16})
  full = loop.train(exp)
  records = [json.loads(line) for line in open(full.paths.metrics)]
  alpha = {r["step"]: r["train/distill/alpha"] for r in records if "train/distill/alpha" in r}
  assert alpha == {s: pytest.approx(0.7) for s in range(1, 6)}  # steps 6..8: no teacher
  kd = [r["train/distill/kd"] for r in records if "train/distill/kd" in r]
  assert all(np.isfinite(kd)) and min(kd) > 0
  assert all(0 <= r["train/distill/top1_agreement"] <= 1 for r in records
             if "train/distill/kd" in r)
  expected = _losses(full.paths.metrics)
  shutil.rmtree(os.path.join(full.paths.checkpoints, "8"))
  kept = [line for line in open(full.paths.metrics) if json.loads(line)["step"] <= 4]
  open(full.paths.metrics, "w").writelines(kept)
  resumed = loop.train(exp)
  assert _losses(full.paths.metrics) == expected
  assert resumed.eval_loss == full.eval_loss


def _two_steps(exp, devices, teacher_params_from=None):
  """Losses and params after two distilled steps of `exp` on `devices`."""
  rt = build_runtime(exp, devices, teacher=teacher_for(exp))
  data = TrainBatches(exp.data, exp.run.seq_len, exp.run.global_batch_size, distill=exp.distill)
  with rt.scope():
    state, _ = create_train_state(rt.model, rt.optimizer, rt.mesh, exp.mesh.rules, 0,
                                  exp.run.seq_len)
    params = load_teacher_params(rt)
    losses = []
    for step in range(2):
      state, metrics = rt.train_step(state, rt.put_batch(data.batch_at(step)), params)
      losses.append(float(metrics["loss"]) + float(metrics["distill/kd"]))
  return losses, jax.device_get(state.params)


def test_eight_devices_equal_one(tiny_exp, teacher):
  exp = tiny_exp(distill={"teacher": teacher, "alpha": 0.5, "divergence": "jsd"},
                 run={"global_batch_size": 8})
  one, p1 = _two_steps(exp.replace(mesh={"data": 1}), jax.devices()[:1])
  eight, p8 = _two_steps(exp.replace(mesh={"data": 2, "fsdp": 2, "tensor": 2}), jax.devices())
  np.testing.assert_allclose(eight, one, rtol=2e-5)
  chex.assert_trees_all_close(p8, p1, atol=2e-5, rtol=2e-4)


@pytest.mark.parametrize("student", [
    {"tune": {"lora": LoraConfig(rank=4)}},
    {"model": {"moe": {"num_experts": 4, "top_k": 2}}},
    {"model": {"attention_impl": "hybrid"}},
], ids=["lora", "moe", "hybrid"])
def test_students_of_every_kind_distil(tiny_exp, teacher, student):
  """A LoRA, an MoE and a hybrid-attention (LoLCATs-like) student each take a distilled step:
  finite KD, and the trained params move."""
  exp = tiny_exp(distill={"teacher": teacher, "alpha": 1.0}, mesh={"data": 1},
                 run={"global_batch_size": 4}, schedule={"warmup_steps": 0}, **student)
  rt = build_runtime(exp, jax.devices()[:1], teacher=teacher_for(exp))
  data = TrainBatches(exp.data, exp.run.seq_len, 4, distill=exp.distill)
  with rt.scope():
    state, _ = create_train_state(rt.model, rt.optimizer, rt.mesh, exp.mesh.rules, 0,
                                  exp.run.seq_len, tune=exp.tune)
    before = jax.device_get(state.params)
    state, metrics = rt.train_step(state, rt.put_batch(data.batch_at(0)), load_teacher_params(rt))
  assert np.isfinite(float(metrics["distill/kd"])) and float(metrics["distill/kd"]) > 0
  assert float(metrics["distill/alpha"]) == 1.0
  moved = jax.tree.map(lambda a, b: bool(np.any(a != b)), before, jax.device_get(state.params))
  assert any(jax.tree.leaves(moved))


@pytest.mark.parametrize("binding, message", [
    ("DistillConfig.teacher='{missing}'", r"DistillConfig.teacher \S+ does not exist"),
    ("DistillConfig.alpha=1.5", r"DistillConfig.alpha=1.5 is outside \[0, 1\]"),
    ("DistillConfig.teacher='{other}'", r"has vocab_size=320 but the student has 259"),
], ids=["missing-teacher", "alpha", "vocabulary"])
def test_bad_distillation_input_is_one_line(run_cli, tmp_path, teacher, binding, message):
  other = tiny_experiment(tmp_path / "other", model={"vocab_size": 320})
  params = nn.unbox(Transformer(other.model).init(jax.random.key(0),
                                                  jnp.zeros((1, 8), jnp.int32)))
  other_path = checkpoint.save_params(str(tmp_path / "other_export"), params["params"],
                                      {"step": 0, "config_gin": experiment_to_gin(other)})
  binding = binding.format(missing=tmp_path / "nowhere", other=other_path)
  run = run_cli("train", "--gin_file=gin_configs/tiny.gin", f"--gin_param={binding}",
                f"--gin_param=RunConfig.run_dir='{tmp_path / 'run'}'",
                "--gin_param=RunConfig.steps=2", "--gin_param=RunConfig.progress_bar=False")
  assert run.returncode == 2, run.stderr
  last = run.stderr.strip().splitlines()[-1]
  assert "Traceback" not in run.stderr and __import__("re").search(message, last), last
  assert not os.path.exists(tmp_path / "run" / "checkpoints")


@pytest.mark.parametrize("name", ["kd", "salt", "cached"])
def test_the_distillation_presets_parse_and_validate(name):
  from pretrainx.config import parse_gin, validate

  exp = parse_gin([os.path.join(REPO, "gin_configs/quickstart.gin"),
                   os.path.join(REPO, f"gin_configs/distill/{name}.gin")])
  validate(exp)
  assert exp.distill.teacher == "runs/quickstart" and exp.distill.enabled
  assert exp.distill.online == (name != "cached")
  assert exp.distill.active(47, exp.run.steps) and (
      exp.distill.active(48, exp.run.steps) == (name != "salt"))


def test_plan_counts_the_frozen_teacher(tiny_exp, teacher):
  """`plan` compiles the distilling step: the teacher's params (bf16, sharded like the student's
  on the same mesh) are in the per-device memory and its forward in the FLOPs."""
  from pretrainx import plan
  from pretrainx.train.teacher import teacher_model_config

  from pretrainx.flops import flops_per_token

  exp = tiny_exp(distill={"teacher": teacher}, mesh={"data": 2, "fsdp": 4})
  report = plan.plan(exp)
  cfg = teacher_model_config(exp)
  params = nn.unbox(Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
  total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype("bfloat16")}
  assert total / 8 <= report.teacher_bytes < total / 2  # sharded over the 4-way fsdp axis
  tokens = exp.run.global_batch_size * exp.run.seq_len
  assert report.teacher_flops_per_step == pytest.approx(
      flops_per_token(cfg, exp.run.seq_len) / 3 * tokens)  # a forward: a third of training's
  assert report.analytic_flops_per_step == pytest.approx(
      flops_per_token(exp.model, exp.run.seq_len) * tokens + report.teacher_flops_per_step)
