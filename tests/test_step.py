"""The pure train step: loss masking, z-loss, gradient accumulation, optimizer schedules and masks."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pretrainx.data.pipeline import TrainBatches
from pretrainx.model import Transformer, kernels
from pretrainx.config import OptimizerConfig, ScheduleConfig
from pretrainx.optim import decay_mask, make_optimizer
from pretrainx.schedules import make_schedule
from pretrainx.config import MeshConfig
from pretrainx.sharding import make_mesh
from pretrainx.train.state import create_train_state
from pretrainx.train.step import (cross_entropy_sums, loss_and_grads, make_train_step,
                                  target_logits)


def test_cross_entropy_sums_respect_mask_and_z_loss():
  logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]]))
  targets = jnp.array([[0, 1]])
  s = cross_entropy_sums(logits, targets, jnp.array([[1, 0]]), z_loss=0.0)
  assert float(s["ce"]) == pytest.approx(-np.log(0.5), rel=1e-6)
  assert float(s["tokens"]) == 1.0
  s = cross_entropy_sums(logits + 1.0, targets, jnp.array([[1, 1]]), z_loss=0.5)
  assert float(s["z"]) == pytest.approx(0.5 * 2 * 1.0, rel=1e-5)  # log Z = 1 for both tokens


def _gathered_loss(logits, targets, mask):
  """cross_entropy_sums' ce + z as it was written before issue 38.3: the target logit gathered."""
  log_z = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  m = mask.astype(jnp.float32)
  return jnp.sum((log_z - picked) * m) + 1e-4 * jnp.sum(jnp.square(log_z) * m)


@pytest.mark.parametrize("graph", ["cpu", "accelerator"])
def test_the_target_logit_and_the_gradient_equal_a_gathers(graph):
  """Both graphs' target logits (the CPU's gather, the TPU/GPU one-hot sum) give the loss and
  gradient of take_along_axis, bit for bit."""
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  logits = 4.0 * jax.random.normal(k1, (3, 17, 50), jnp.float32)
  targets = jax.random.randint(k2, (3, 17), 0, 50)
  mask = jax.random.bernoulli(k3, 0.8, (3, 17)).astype(jnp.int32)
  with kernels.graph(graph):  # fresh functions: traced in this graph
    picked = jax.jit(lambda x: target_logits(x, targets))(logits)
    ours = jax.jit(jax.value_and_grad(lambda x: _summed_loss(x, targets, mask)))(logits)
  np.testing.assert_array_equal(picked,
                                jnp.take_along_axis(logits, targets[..., None], -1)[..., 0])
  gathered = jax.jit(jax.value_and_grad(lambda x: _gathered_loss(x, targets, mask)))(logits)
  for a, b in zip(ours, gathered):
    np.testing.assert_array_equal(a, b)


def _summed_loss(logits, targets, mask):
  sums = cross_entropy_sums(logits, targets, mask, z_loss=1e-4)
  return sums["ce"] + sums["z"]


def test_the_loss_keeps_no_fp32_copy_of_the_logits_on_tpu():
  """TPU compiler (AOT): the loss of bf16 logits cast to fp32, and its gradient, hold the bf16
  logits and their gradient, not an fp32 [b, s, vocab] copy besides (as the gather did: 1000 MiB
  per device at llama_7b's peak on v5p-256, issue 38.3)."""
  from pretrainx import topology
  if not topology.libtpu_available():
    pytest.skip("needs libtpu (the TPU compiler)")
  mesh = jax.sharding.Mesh(topology.load("v5p-8").devices[:1], ("x",))
  one = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  b, s, d, vocab = 2, 1024, 512, 32000
  args = [jax.ShapeDtypeStruct(shape, dtype, sharding=one) for shape, dtype in
          [((b, s, d), jnp.bfloat16), ((d, vocab), jnp.bfloat16), ((b, s), jnp.int32),
           ((b, s), jnp.int32)]]

  def loss(x, w, targets, mask):  # the model's lm head: a bf16 matmul, cast to fp32
    return _summed_loss(jnp.dot(x, w).astype(jnp.float32), targets, mask)

  with jax.set_mesh(mesh):  # as the train step is traced: for the TPU, hence its graph
    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(*args).compile()
  # the bf16 logits and their gradient: 2.0 x (b, s, vocab) bf16 on libtpu 0.0.52; with the
  # gather (_gathered_loss) 3.0 x, the fp32 logits besides
  assert compiled.memory_analysis().temp_size_in_bytes < 2.5 * (b * s * vocab * 2)


def _setup(exp):
  mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  model = Transformer(exp.model)
  state, _ = create_train_state(model, optax.sgd(0.1), mesh, MeshConfig().rules, 0,
                                exp.run.seq_len)
  batch = TrainBatches(exp.data, exp.run.seq_len, 16).batch_at(3)
  batch["loss_mask"][:, :5] = 0  # unequal token counts per row make the weighting matter
  return model, state.params, batch


def test_gradient_accumulation_equals_one_big_batch(tiny_exp):
  model, params, batch = _setup(tiny_exp())
  sums1, g1 = jax.jit(lambda p, b: loss_and_grads(model, p, b, z_loss=1e-4))(params, batch)
  sums4, g4 = jax.jit(lambda p, b: loss_and_grads(model, p, b, z_loss=1e-4, microbatches=4)
                      )(params, batch)
  assert float(sums4["tokens"]) == float(sums1["tokens"])
  assert float(sums4["ce"]) == pytest.approx(float(sums1["ce"]), rel=1e-5)
  chex.assert_trees_all_close(g4, g1, atol=1e-6, rtol=1e-4)


@pytest.mark.slow
def test_train_step_updates_and_reports(tiny_exp):
  exp = tiny_exp()
  model, params, batch = _setup(exp)
  opt, schedule = make_optimizer(OptimizerConfig(), 100, ScheduleConfig(warmup_steps=0))
  from pretrainx.train.guard import GuardState
  from pretrainx.train.state import TrainState
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt.init(params),
                     guard=GuardState.create())
  step = jax.jit(make_train_step(model, opt, schedule, z_loss=1e-4))
  new, metrics = step(state, batch)
  assert int(new.step) == 1
  assert set(metrics) >= {"loss", "z_loss", "grad_norm", "learning_rate", "loss_tokens"}
  assert float(metrics["learning_rate"]) == pytest.approx(float(schedule(0)))
  assert float(metrics["loss_tokens"]) == float(batch["loss_mask"].sum())
  _, m2 = step(new, batch)
  assert float(m2["loss"]) < float(metrics["loss"])  # same batch again: loss went down


def test_schedules():
  cos = make_schedule(ScheduleConfig(warmup_steps=10, end_lr_ratio=0.1), 1.0, 100)
  assert float(cos(0)) == 0.0 and float(cos(10)) == pytest.approx(1.0)
  assert float(cos(100)) == pytest.approx(0.1, abs=1e-6)
  assert float(cos(50)) < float(cos(30))
  wsd = make_schedule(ScheduleConfig(warmup_steps=10, name="wsd", decay_fraction=0.2,
                                     end_lr_ratio=0.0), 1.0, 100)
  assert [float(wsd(s)) for s in (10, 50, 80)] == pytest.approx([1.0, 1.0, 1.0])
  assert float(wsd(90)) == pytest.approx(0.5, abs=1e-6) and float(wsd(100)) == pytest.approx(0.0)
  with pytest.raises(ValueError, match="ScheduleConfig.name='step'"):
    ScheduleConfig(name="step")


def test_weight_decay_mask_skips_norms_and_embeddings(tiny_exp):
  model, params, _ = _setup(tiny_exp())
  mask = decay_mask(params, OptimizerConfig())
  assert mask["layers"]["attention"]["q_proj"] and mask["layers"]["mlp"]["down_proj"]
  assert not mask["embed"]["embedding"]
  assert not mask["layers"]["input_norm"]["scale"] and not mask["final_norm"]["scale"]
  everything = decay_mask(params, OptimizerConfig(no_decay_patterns=(), decay_vectors=True))
  assert all(jax.tree.leaves(everything))
