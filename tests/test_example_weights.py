"""Per-token loss weights in the step: a batch's `loss_weight`, and 'loss' example weighting."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pretrainx.config import MeshConfig, OptimizerConfig, ScheduleConfig
from pretrainx.data.pipeline import TrainBatches
from pretrainx.metrics import read_metrics
from pretrainx.model import Transformer
from pretrainx.optim import make_optimizer
from pretrainx.sharding import make_mesh
from pretrainx.train import loop
from pretrainx.train.guard import GuardState
from pretrainx.train.state import TrainState, create_train_state
from pretrainx.train.step import loss_and_grads, make_train_step, model_logits

pytestmark = pytest.mark.xdist_group("example_weights")  # its module fixtures are built once


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  from conftest import tiny_experiment

  exp = tiny_experiment(tmp_path_factory.mktemp("run"))
  mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  model = Transformer(exp.model)
  state, _ = create_train_state(model, optax.sgd(0.1), mesh, MeshConfig().rules, 0,
                                exp.run.seq_len)
  batch = TrainBatches(exp.data, exp.run.seq_len, 16).batch_at(3)
  batch["loss_mask"][:, :5] = 0  # unequal token counts per row
  batch["loss_mask"][2, :] = 0  # a row without loss tokens
  return model, state.params, batch


def _token_ce(model, params, batch):
  logits = model_logits(model, params, batch).astype(jnp.float32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  ce = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
  return ce * batch["loss_mask"]


def _grads(model, **kw):
  return jax.jit(lambda p, b: loss_and_grads(model, p, b, **kw))


@pytest.mark.slow
def test_loss_weighting_favours_high_loss_rows_and_its_gradient_is_the_weighted_loss(setup):
  model, params, batch = setup
  temperature = 0.05  # row losses at init differ by ~0.1 nats
  sums, grads = _grads(model, example_temperature=temperature)(params, batch)
  mask = batch["loss_mask"].astype(np.float64)
  ce = np.asarray(_token_ce(model, params, batch), np.float64)
  row_tokens = mask.sum(1)
  has = row_tokens > 0
  row_loss = ce.sum(1) / np.maximum(row_tokens, 1)
  e = np.where(has, np.exp((row_loss - row_loss[has].max()) / temperature), 0.0)
  row_w = e / e.sum()
  row_w *= mask.sum() / (row_w * row_tokens).sum()  # mean 1 over the loss tokens
  # Heavier rows are those with higher loss, and by a lot at this temperature.
  live = np.flatnonzero(has)
  assert np.array_equal(np.argsort(row_w[live]), np.argsort(row_loss[live]))
  assert row_w[live].max() / row_w[live].min() > 1.5
  weighted = (ce * row_w[:, None]).sum()
  tol = 1e-4  # float32 row losses, divided by a small temperature
  assert float(sums["weighted_ce"]) == pytest.approx(weighted, rel=tol)
  assert float(sums["weighted_ce"]) > float(sums["ce"])  # high-loss rows weigh more
  assert float(sums["weight"]) == pytest.approx(mask.sum(), rel=1e-5)
  assert float(sums["weight_max"]) == pytest.approx(row_w.max(), rel=tol)
  assert float(sums["weight_min"]) == pytest.approx(row_w[live].min(), rel=tol)
  fixed = jnp.asarray(row_w[:, None] * mask, jnp.float32)
  manual = jax.grad(lambda p: jnp.sum(_token_ce(model, p, batch) * fixed) / mask.sum())(params)
  chex.assert_trees_all_close(grads, manual, atol=1e-6, rtol=1e-4)


@pytest.mark.slow
def test_a_loss_weight_of_ones_changes_nothing(setup):
  model, params, batch = setup
  plain, g_plain = _grads(model, z_loss=1e-4)(params, batch)
  ones = dict(batch, loss_weight=np.ones(batch["loss_mask"].shape, np.float32))
  weighted, g_ones = _grads(model, z_loss=1e-4)(params, ones)
  assert float(weighted["ce"]) == float(plain["ce"])
  assert float(weighted["weighted_ce"]) == float(plain["ce"])
  chex.assert_trees_all_equal(g_ones, g_plain)


def _step(model, params, **kw):
  opt, schedule = make_optimizer(OptimizerConfig(), 100, ScheduleConfig(warmup_steps=0))
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt.init(params),
                     guard=GuardState.create())
  return jax.jit(make_train_step(model, opt, schedule, **kw)), state


@pytest.mark.slow
def test_weighted_loss_metrics_match_a_manual_computation(setup):
  model, params, batch = setup
  rng = np.random.default_rng(0)
  lw = rng.uniform(0.2, 3.0, batch["loss_mask"].shape).astype(np.float32)
  step, state = _step(model, params)
  _, plain = step(state, batch)
  _, m = step(state, dict(batch, loss_weight=lw))
  mask = batch["loss_mask"].astype(np.float64)
  ce = np.asarray(_token_ce(model, params, batch), np.float64)
  assert float(m["loss"]) == float(plain["loss"])  # train/loss stays the unweighted mean
  assert "weighted_loss" not in plain and "example_weight/mean" not in plain
  expected = (ce * lw).sum() / (lw * mask).sum()
  assert float(m["weighted_loss"]) == pytest.approx(expected, rel=1e-5)
  assert float(m["weighted_loss"]) != pytest.approx(float(m["loss"]), rel=1e-4)
  scaled = (lw * mask.sum() / (lw * mask).sum())[mask > 0]
  assert float(m["example_weight/mean"]) == pytest.approx(1.0, rel=1e-5)
  assert float(m["example_weight/std"]) == pytest.approx(scaled.std(), rel=1e-3)
  assert float(m["example_weight/min"]) == pytest.approx(scaled.min(), rel=1e-5)
  assert float(m["example_weight/max"]) == pytest.approx(scaled.max(), rel=1e-5)


def test_score_weights_accumulate_like_one_batch(setup):
  model, params, batch = setup
  lw = np.random.default_rng(1).uniform(0.0, 2.0, batch["loss_mask"].shape).astype(np.float32)
  weighted = dict(batch, loss_weight=lw)
  s1, g1 = _grads(model, z_loss=1e-4)(params, weighted)
  s4, g4 = _grads(model, z_loss=1e-4, microbatches=4)(params, weighted)
  for k in ("ce", "weighted_ce", "weight", "weight_sq"):
    assert float(s4[k]) == pytest.approx(float(s1[k]), rel=1e-5), k
  assert float(s4["weight_min"]) == float(s1["weight_min"])
  assert float(s4["weight_max"]) == float(s1["weight_max"])
  chex.assert_trees_all_close(g4, g1, atol=1e-6, rtol=1e-4)


@pytest.mark.slow
def test_loss_weighting_runs_in_the_loop_and_is_logged(tiny_exp):
  exp = tiny_exp(run={"steps": 2, "log_every": 1, "sample_tokens": 0, "eval_batches": 1},
                 loss={"example_weighting": "loss", "example_temperature": 2.0})
  rows = [r for r in read_metrics(loop.train(exp).paths.metrics) if "train/loss" in r]
  assert [r["step"] for r in rows] == [1, 2]
  for r in rows:
    assert r["train/example_weight/mean"] == pytest.approx(1.0, rel=1e-5)
    assert r["train/example_weight/max"] > 1.0 > r["train/example_weight/min"]
    assert r["train/weighted_loss"] > r["train/loss"]  # temperature > 0: hard rows weigh more
