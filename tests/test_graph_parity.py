"""The graph TPUs and GPUs run, executed on CPU: kernels.graph('accelerator') traces plain
dot_generals and reference_attention under autodiff where CPU runs project()'s written-out
gradient, RoPE's tables computed once and softmax_vjp. A sharded train step with remat and
gradient accumulation gives the same losses, gradients and updated params either way."""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pretrainx.config import MeshConfig
from pretrainx.data.pipeline import TrainBatches
from pretrainx.model import Transformer, kernels
from pretrainx.sharding import batch_sharding, make_mesh, mesh_scope
from pretrainx.train.state import create_train_state
from pretrainx.train.step import make_train_step

LR = 0.1
MESH = MeshConfig(data=2, fsdp=2, tensor=2)


def _sgd_keeping_grads() -> optax.GradientTransformation:
  """SGD whose state is the last step's gradient, so that the step itself hands it back."""
  return optax.GradientTransformation(
      init=lambda params: jax.tree.map(jnp.zeros_like, params),
      update=lambda grads, state, params=None, **_: (jax.tree.map(lambda g: -LR * g, grads),
                                                       grads))


def _train(exp, kind: str, steps: int = 2):
  """(the step's jaxpr text, [(metrics, grads)] per step, final params) under graph(kind)."""
  mesh = make_mesh(MESH)
  model = Transformer(exp.model)
  opt = _sgd_keeping_grads()
  state, shardings = create_train_state(model, opt, mesh, MESH.rules, 0, exp.run.seq_len)
  batch = TrainBatches(exp.data, exp.run.seq_len, exp.run.global_batch_size).batch_at(0)
  batch.pop("domain")  # [batch] row labels; the step takes the [batch, seq] arrays
  batch["loss_mask"][:, :5] = 0  # unequal token counts per microbatch make the weighting matter
  bs = batch_sharding(mesh)
  batch = {k: jax.device_put(v, bs) for k, v in batch.items()}
  step = make_train_step(model, opt, optax.constant_schedule(LR), z_loss=1e-4,
                         microbatches=exp.accumulation.microbatches)
  with kernels.graph(kind), mesh_scope(mesh, MESH.rules):  # a fresh jit: traced in this graph
    traced = jax.jit(step, in_shardings=(shardings, bs), out_shardings=(shardings, None)
                     ).trace(state, batch)
    # LLVM's optimisation level only (the HLO graphs stay as traced): halves the compile
    compiled = traced.lower().compile(compiler_options={"xla_backend_optimization_level": 0})
  history = []
  for _ in range(steps):
    state, metrics = compiled(state, batch)
    history.append(jax.device_get((metrics, state.opt_state)))
  return str(traced.jaxpr), history, jax.device_get(state.params)


@pytest.mark.slow
def test_accelerator_graph_on_cpu_matches_cpu_graph(tiny_exp):
  exp = tiny_exp(model={"remat_policy": "dots"}, accumulation={"microbatches": 2})
  assert exp.model.attention_impl == "reference" and exp.run.global_batch_size == 8
  cpu_jaxpr, cpu_steps, cpu_params = _train(exp, "cpu")
  acc_jaxpr, acc_steps, acc_params = _train(exp, "accelerator")

  # Two different graphs, both rematerialised: only the CPU one has the custom VJPs
  # (project's _matmul, softmax_vjp) and project's named checkpoint.
  assert cpu_jaxpr != acc_jaxpr
  for jaxpr in (cpu_jaxpr, acc_jaxpr):  # jax.checkpoint's primitive, 'remat2' in jax 0.10
    assert re.search(r"\b(checkpoint|remat2?)\[", jaxpr) and "scan[" in jaxpr
  assert "custom_vjp_call" in cpu_jaxpr and "custom_vjp_call" not in acc_jaxpr
  assert "name=projection" in cpu_jaxpr and "name=projection" not in acc_jaxpr

  # The same numbers, to fp32 round-off (the two graphs sum in different orders).
  for (cpu_m, cpu_g), (acc_m, acc_g) in zip(cpu_steps, acc_steps):
    assert float(cpu_m["bad_step"]) == float(acc_m["bad_step"]) == 0.0
    for name in ("loss", "z_loss", "grad_norm", "param_norm"):
      np.testing.assert_allclose(acc_m[name], cpu_m[name], rtol=1e-5, err_msg=name)
    chex.assert_trees_all_close(acc_g, cpu_g, rtol=1e-5, atol=1e-6)
  assert float(cpu_steps[1][0]["loss"]) < float(cpu_steps[0][0]["loss"])  # it trained
  chex.assert_trees_all_close(acc_params, cpu_params, rtol=1e-5, atol=1e-6)


def test_graph_switch(monkeypatch):
  monkeypatch.delenv(kernels.GRAPH_ENV, raising=False)
  assert jax.default_backend() == "cpu" and kernels.cpu_tuned_graph()
  with kernels.graph("accelerator"):
    assert not kernels.cpu_tuned_graph()
    with kernels.graph("cpu"):
      assert kernels.cpu_tuned_graph()
    assert not kernels.cpu_tuned_graph()
  assert kernels.cpu_tuned_graph()
  monkeypatch.setenv(kernels.GRAPH_ENV, "accelerator")  # a whole program's default
  assert not kernels.cpu_tuned_graph()
  with kernels.graph("auto"):  # graph() wins over the environment
    assert kernels.cpu_tuned_graph()
  monkeypatch.setenv(kernels.GRAPH_ENV, "gpu")
  with pytest.raises(ValueError, match="PRETRAINX_GRAPH='gpu'"):
    kernels.cpu_tuned_graph()
  with pytest.raises(ValueError, match="graph kind 'tpu'"):
    with kernels.graph("tpu"):
      pass
