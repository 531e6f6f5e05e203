"""Optimizers: each trains the tiny model; Muon, Sophia and Adafactor checked against their maths."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pretrainx.metrics import read_metrics
from pretrainx.model import Transformer
from pretrainx.config.optim import OPTIMIZERS
from pretrainx.config import AdafactorConfig, MuonConfig, OptimizerConfig, ScheduleConfig
from pretrainx.optim import make_optimizer, muon_dimension_numbers
from pretrainx.config import MeshConfig
from pretrainx.sharding import make_mesh, mesh_scope
from pretrainx.train import loop
from pretrainx.train.state import create_train_state
from pretrainx.train.step import gnb_grads

LEARNING_RATES = {"adamw": 1e-2, "adafactor": 1e-2, "lion": 1e-3, "muon": 2e-2, "sophia": 1e-2}


@pytest.mark.slow
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_each_optimizer_decreases_the_loss(tiny_exp, name):
  exp = tiny_exp(run={"steps": 40, "log_every": 1, "sample_tokens": 0, "eval_batches": 1},
                 optimizer={"name": name, "learning_rate": LEARNING_RATES[name],
                            "adafactor_min_dim": 32, "sophia_interval": 5})
  result = loop.train(exp)
  losses = [r["train/loss"] for r in read_metrics(result.paths.metrics) if "train/loss" in r]
  assert np.mean(losses[-5:]) < losses[0] - 1.0, (name, losses[0], losses[-5:])


def test_newton_schulz_output_is_near_orthogonal():
  from optax.contrib._muon import orthogonalize_via_newton_schulz  # pylint: disable=import-outside-toplevel
  x = jax.random.normal(jax.random.key(0), (64, 192))
  y = orthogonalize_via_newton_schulz(x, jnp.array((3.4445, -4.775, 2.0315)), 5)
  s = np.linalg.svd(np.asarray(y), compute_uv=False)
  # the quintic iteration trades exactness for speed: singular values land in ~[0.7, 1.2]
  assert s.min() > 0.6 and s.max() < 1.25, (s.min(), s.max())
  s_in = np.linalg.svd(np.asarray(x), compute_uv=False)
  assert s_in.max() / s_in.min() > 3  # the input was far from orthogonal


def _muon_update(exp, mesh_cfg, devices=None):
  mesh = make_mesh(mesh_cfg, devices)
  model = Transformer(exp.model)
  tx, _ = make_optimizer(OptimizerConfig(name="muon"), 10, ScheduleConfig(warmup_steps=0))
  state, shardings = create_train_state(model, tx, mesh, mesh_cfg.rules, 0, 16)
  grads = jax.tree.map(lambda p: jnp.sin(jnp.arange(p.size, dtype=jnp.float32).reshape(p.shape)),
                       state.params)
  with mesh_scope(mesh, mesh_cfg.rules):
    grads = jax.device_put(grads, shardings.params)
    updates, _ = jax.jit(tx.update)(grads, state.opt_state, state.params)
  return jax.device_get(updates)


@pytest.mark.slow
def test_muon_step_is_the_same_sharded_and_unsharded(tiny_exp):
  exp = tiny_exp()
  one = _muon_update(exp, MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  eight = _muon_update(exp, MeshConfig(data=2, fsdp=2, tensor=2))
  chex.assert_trees_all_close(eight, one, atol=1e-5, rtol=1e-4)
  assert float(optax.tree.norm(one)) > 0


def test_muon_routes_matrices_to_muon_and_the_rest_to_adamw(tiny_exp):
  exp = tiny_exp()
  params = jax.eval_shape(lambda: Transformer(exp.model).init(
      jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
  params = jax.tree.map(lambda b: b.value, params, is_leaf=lambda b: hasattr(b, "value"))
  dims = muon_dimension_numbers(params, OptimizerConfig(name="muon"))
  attn, mlp = dims["layers"]["attention"], dims["layers"]["mlp"]
  assert tuple(attn["q_proj"].reduction_axis) == (1,) and tuple(attn["q_proj"].output_axis) == (2, 3)
  assert tuple(attn["o_proj"].reduction_axis) == (1, 2) and tuple(attn["o_proj"].output_axis) == (3,)
  assert tuple(mlp["down_proj"].reduction_axis) == (1,)
  assert dims["embed"]["embedding"] is None and dims["final_norm"]["scale"] is None
  with pytest.raises(ValueError, match=r"Muon cannot orthogonalise parameter final_norm/scale of "
                                       r"shape \(64,\).*MuonConfig.fallback = 'adamw'"):
    muon_dimension_numbers(params, OptimizerConfig(name="muon", muon=MuonConfig(
        fallback=None, exclude=("embed",))))


def test_gnb_estimate_matches_the_exact_hessian_diagonal_in_expectation():
  """Softmax regression: the Gauss-Newton matrix is the Hessian, so E[B g^2] = diag(H)."""
  n, d, c = 6, 4, 5
  x = jax.random.normal(jax.random.key(0), (n, d))
  w = 0.5 * jax.random.normal(jax.random.key(1), (d, c))
  mask = jnp.ones((n,), jnp.int32)
  logits_fn = lambda p: x @ p

  def estimate(key):
    grads, count = gnb_grads(logits_fn, w, mask, key)
    return count * grads**2

  mean = jnp.mean(jax.vmap(estimate)(jax.random.split(jax.random.key(2), 20000)), axis=0)
  mean_ce = lambda p: jnp.mean(jax.nn.logsumexp(x @ p, -1) - (x @ p)[:, 0])
  exact = jnp.diag(jax.hessian(mean_ce)(w).reshape(d * c, d * c)).reshape(d, c)
  np.testing.assert_allclose(np.asarray(mean), np.asarray(exact), rtol=0.08, atol=1e-3)


def test_adafactor_state_is_factored(tiny_exp):
  exp = tiny_exp()
  tx, _ = make_optimizer(OptimizerConfig(name="adafactor", adafactor=AdafactorConfig(min_dim=32)), 10)
  params = Transformer(exp.model).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  params = jax.tree.map(lambda b: b.value, params, is_leaf=lambda b: hasattr(b, "value"))
  state = tx.init(params)
  factored = state[1][0]
  up = params["layers"]["mlp"]["up_proj"]  # [layers, embed, mlp] = [2, 64, 192]
  assert factored.v_row["layers"]["mlp"]["up_proj"].shape == (2, 64)
  assert factored.v_col["layers"]["mlp"]["up_proj"].shape == (2, 192)
  assert factored.v["layers"]["mlp"]["up_proj"].size == 1  # no full second moment
  n_state = sum(x.size for x in jax.tree.leaves(factored))
  assert n_state < 0.3 * sum(x.size for x in jax.tree.leaves(params)) + up.size * 0


def test_unknown_optimizer_is_refused():
  with pytest.raises(ValueError, match=r"unknown optimizer OptimizerConfig.name='adam'; choose one "
                                       r"of \('adamw'"):
    OptimizerConfig(name="adam")
