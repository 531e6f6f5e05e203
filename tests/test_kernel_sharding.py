"""Pallas kernels under shard_map: flash attention split over data x fsdp x tensor on 8 CPU
devices (interpret mode) gives the reference's loss and gradients; the mesh axes come from the
logical rules; bad splits get one line."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pretrainx.model import kernels
from conftest import abstract_gpu_mesh
from pretrainx.config import MeshConfig
from pretrainx.sharding import make_mesh, mesh_scope


def _step_metrics(tiny_exp, impl, mesh, interpret=True, **model):
  from pretrainx.data.pipeline import TrainBatches
  from pretrainx.train.runtime import build_runtime
  from pretrainx.train.state import create_train_state
  exp = tiny_exp(model={"attention_impl": impl, "kernel_interpret": interpret, **model},
                 mesh=mesh)
  rt = build_runtime(exp)
  state, _ = create_train_state(rt.model, rt.optimizer, rt.mesh, exp.mesh.rules, 0,
                                exp.run.seq_len)
  batch = rt.put_batch(TrainBatches(exp.data, exp.run.seq_len, exp.run.global_batch_size)
                       .batch_at(0))  # packed rows: segment_ids reach the kernel
  with rt.scope():
    state, metrics = rt.train_step(state, batch)
  return jax.device_get(metrics), jax.tree.leaves(jax.device_get(state.params))


@pytest.mark.slow
@pytest.mark.parametrize("mesh", [{"data": 2, "fsdp": 2, "tensor": 2},
                                  {"data": 1, "fsdp": 4, "tensor": 2}])
def test_sharded_flash_matches_the_reference(tiny_exp, mesh):
  ref, ref_params = _step_metrics(tiny_exp, "reference", mesh)
  got, params = _step_metrics(tiny_exp, "flash", mesh)
  assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5)
  assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4)
  for a, b in zip(params, ref_params):  # one update: the gradients agree leaf by leaf
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)


@pytest.mark.slow
def test_sharded_linear_kernel_with_packed_segments_matches_its_pure_jax_twin(tiny_exp):
  """The linear kernel (hedgehog maps and a decay per head, split with the heads) resets its
  state at segment starts: one train step equals the pure-JAX chunked scan."""
  mesh = {"data": 2, "fsdp": 2, "tensor": 2}
  model = {"linear_feature": "hedgehog", "linear_decay": True}
  ref, ref_params = _step_metrics(tiny_exp, "linear", mesh, interpret=False, **model)
  got, params = _step_metrics(tiny_exp, "linear", mesh, interpret=True, **model)
  assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5)
  for a, b in zip(params, ref_params):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)


def test_kernel_runs_on_shards_split_by_the_rules():
  mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  seen = []

  def kernel(q, k, v, seg, prefix, *_):
    seen.append((q.shape, k.shape, seg.shape, prefix))
    return q * 2

  q = jnp.ones((8, 16, 4, 8))
  k = jnp.ones((8, 16, 2, 8))
  seg = jnp.ones((8, 16), jnp.int32)
  with mesh_scope(mesh, MeshConfig().rules):
    out = jax.jit(lambda q, k, s: kernels.shard_attention(kernel, q, k, k, s))(q, k, seg)
    assert kernels.platform() == "cpu"
  np.testing.assert_array_equal(out, 2 * q)
  assert seen == [((2, 16, 2, 8), (2, 16, 1, 8), (2, 16), None)]  # batch / 4, heads / 2


def test_dimensions_that_do_not_split_stay_whole():
  mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=4))
  seen = []

  def kernel(q, k, v, seg, prefix, *_):
    seen.append((q.shape, k.shape))
    return q + 1

  q, k = jnp.ones((1, 16, 4, 8)), jnp.ones((1, 16, 2, 8))  # batch 1, kv_heads 2 < tensor 4
  with mesh_scope(mesh, MeshConfig().rules):
    out = jax.jit(lambda q, k: kernels.shard_attention(kernel, q, k, k))(q, k)
  np.testing.assert_array_equal(out, q + 1)
  assert seen == [((1, 16, 4, 8), (1, 16, 2, 8))]


def test_a_split_sequence_gathers_the_keys_and_gives_each_query_its_index():
  """Context parallelism: each device's kernel sees its queries, the whole sequence's keys and
  the natural-order index of every token (here the zigzag layout of 16 tokens over 4 devices)."""
  from pretrainx.model import context_parallel

  mesh = make_mesh(MeshConfig(data=2, context=4))
  layout = context_parallel.layout(16, 4, load_balance=True)
  q = jnp.zeros((2, 16, 2, 1))
  k = jnp.broadcast_to(jnp.arange(16.0)[None, :, None, None], (2, 16, 2, 1))

  def kernel(q, k, v, seg, prefix, hp, kvp, split):
    assert k.shape[1] == 16 and q.shape[1] == 4  # gathered keys, this device's queries
    keys_seen = k.sum(axis=1, keepdims=True) + (split.kv_positions[0] == layout).all()
    return q + 100.0 * split.q_positions[:, :, None, None] + keys_seen

  with mesh_scope(mesh, MeshConfig().rules):
    out = jax.jit(lambda q, k: kernels.shard_attention(kernel, q, k, k, layout=layout))(q, k)
  expected = 100.0 * layout + 120.0 + 1.0  # the sum of all 16 keys; the keys' indices in order
  np.testing.assert_array_equal(np.asarray(out)[0, :, 0, 0], expected)


def test_kernels_lower_to_triton_for_gpu():
  """Lowered for CUDA from this CPU (jax.export): both kernels become Triton calls (the GPU
  compiles the Triton IR itself)."""
  from jax import export

  from pallas_kernels import flash_attention as fa
  from pallas_kernels import linear_attention as la
  sd = jax.ShapeDtypeStruct
  args = (sd((2, 256, 4, 64), jnp.float32), sd((2, 256, 2, 64), jnp.float32),
          sd((2, 256, 2, 64), jnp.float32), sd((2, 256), jnp.int32))
  kernels_ = {
      "linear": lambda q, k, v, s: la.linear_attention(
          q, k, v, segment_ids=s, decay=jnp.full((4,), 0.99), interpret=False, backend="gpu"),
      "flash": lambda q, k, v, s: fa.flash_attention(q, k, v, segment_ids=s, interpret=False,
                                                     backend="gpu")}
  triton = export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
  for name, fn in kernels_.items():
    with abstract_gpu_mesh():
      exported = export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=[triton])(*args)
    assert "__gpu$xla.gpu.triton" in exported.mlir_module(), name
