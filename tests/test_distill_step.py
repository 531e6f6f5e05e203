"""An online teacher inside the pure train step (issue 41): the teacher equal to the student gives
zero KD and (1 - alpha) times the CE gradients, microbatching changes nothing, alpha = 0 is plain
training, and the step reports the 'distill/*' metrics."""

import chex
import jax
import jax.numpy as jnp
import optax
import pytest

from pretrainx.config import DistillConfig, MeshConfig, OptimizerConfig, ScheduleConfig
from pretrainx.data.pipeline import TrainBatches
from pretrainx.model import Transformer
from pretrainx.optim import make_optimizer
from pretrainx.sharding import make_mesh
from pretrainx.train.distill_loss import OnlineTeacher
from pretrainx.train.guard import GuardState
from pretrainx.train.state import TrainState, create_train_state
from pretrainx.train.step import loss_and_grads, make_train_step, model_logits


def _setup(exp):
  mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  model = Transformer(exp.model)
  state, _ = create_train_state(model, optax.sgd(0.1), mesh, MeshConfig().rules, 0,
                                exp.run.seq_len)
  batch = TrainBatches(exp.data, exp.run.seq_len, 8).batch_at(3)
  batch["loss_mask"][:, :5] = 0
  return model, state.params, batch


def _teacher(model, **cfg):
  return OnlineTeacher(lambda p, b: model_logits(model, p, b),
                       DistillConfig(teacher="self", **cfg), total_steps=10)


def test_self_teacher_gives_zero_kd_and_scaled_ce_gradients(tiny_exp):
  model, params, batch = _setup(tiny_exp())
  teacher = _teacher(model, alpha=0.3, temperature=2.0, top_k=8, truncation="other")
  plain = jax.jit(lambda p, b: loss_and_grads(model, p, b))
  kd = jax.jit(lambda p, b: loss_and_grads(model, p, b, teacher=teacher, teacher_params=p,
                                           alpha=0.3, microbatches=2))
  (sums0, g0), (sums1, g1) = plain(params, batch), kd(params, batch)
  assert abs(float(sums1["kd"])) < 1e-4
  assert float(sums1["teacher_ce"]) == pytest.approx(float(sums0["ce"]), rel=1e-5)
  assert float(sums1["top1_agree"]) == float(sums1["tokens"])
  chex.assert_trees_all_close(g1, jax.tree.map(lambda g: 0.7 * g, g0), atol=1e-6, rtol=1e-4)


def _state(params, opt):
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt.init(params),
                    guard=GuardState.create())


def test_train_step_reports_distill_metrics_and_alpha_zero_is_plain(tiny_exp):
  exp = tiny_exp()
  model, params, batch = _setup(exp)
  teacher_params = jax.tree.map(lambda x: 1.1 * x, params)  # a different (frozen) teacher
  opt, schedule = make_optimizer(OptimizerConfig(), 10, ScheduleConfig(warmup_steps=0))
  step = jax.jit(make_train_step(model, opt, schedule,
                                 teacher=_teacher(model, alpha=0.5, alpha_schedule="linear")))
  new, metrics = step(_state(params, opt), batch, teacher_params)
  assert {"distill/kd", "distill/ce", "distill/teacher_ce", "distill/top1_agreement",
          "distill/alpha"} <= set(metrics)
  assert float(metrics["distill/kd"]) > 0 and float(metrics["distill/alpha"]) == 0.5
  assert float(metrics["distill/ce"]) == float(metrics["loss"])
  _, metrics = step(new, batch, teacher_params)
  assert float(metrics["distill/alpha"]) == pytest.approx(0.45)

  off = jax.jit(make_train_step(model, opt, schedule, teacher=_teacher(model, alpha=0.0)))
  plain = jax.jit(make_train_step(model, opt, schedule))
  a, ma = off(_state(params, opt), batch, teacher_params)
  b, mb = plain(_state(params, opt), batch)
  assert "distill/kd" not in ma and float(ma["loss"]) == float(mb["loss"])
  chex.assert_trees_all_equal(a.params, b.params)


def _export(exp, path):
  """A params export of a freshly initialised model of `exp` (a stand-in teacher)."""
  from pretrainx import checkpoint
  from pretrainx.config import experiment_to_gin
  import flax.linen as nn

  model = Transformer(exp.model)
  params = nn.unbox(model.init(jax.random.key(7), jnp.zeros((1, exp.run.seq_len), jnp.int32)))
  return checkpoint.save_params(str(path), params["params"], {"step": 0,
                                                    "config_gin": experiment_to_gin(exp)})


def test_teacher_loads_frozen_in_its_dtype(tiny_exp, tmp_path):
  """The teacher's params come in teacher_dtype on the run's mesh, its logits as wide as the
  student's padded vocabulary (another vocabulary is refused: test_distill_train's CLI test)."""
  from pretrainx.train.runtime import build_runtime
  from pretrainx.train.teacher import load_teacher

  exp = tiny_exp()
  source = _export(exp, tmp_path / "teacher")
  rt = build_runtime(exp)
  with rt.scope():
    teacher, params = load_teacher(rt, DistillConfig(teacher=source, teacher_dtype="bfloat16"))
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype("bfloat16")}
  assert teacher.total_steps == exp.run.steps and teacher.online
  batch = TrainBatches(exp.data, exp.run.seq_len, 8).batch_at(0)
  with rt.scope():
    logits = jax.jit(teacher.apply)(params, rt.put_batch(batch))
  assert logits.shape == (8, exp.run.seq_len, exp.model.padded_vocab_size)
  assert logits.dtype == jnp.float32
