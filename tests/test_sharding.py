"""Sharded equals unsharded: the same loss and gradients on 1 device and on 8 in three layouts."""

import chex
import jax
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from pretrainx.data.pipeline import TrainBatches
from pretrainx.model import Transformer
from pretrainx.config import MeshConfig
from pretrainx.sharding import batch_sharding, check_batch_divisible, make_mesh, mesh_scope
from pretrainx.train.state import create_train_state
from pretrainx.train.step import loss_and_grads


def _loss_and_grads(exp, mesh_cfg, devices=None):
  mesh = make_mesh(mesh_cfg, devices)
  model = Transformer(exp.model)
  state, shardings = create_train_state(model, optax.sgd(0.1), mesh, mesh_cfg.rules, seed=0,
                                        seq_len=exp.run.seq_len)
  batch = TrainBatches(exp.data, exp.run.seq_len, exp.run.global_batch_size).batch_at(0)
  batch.pop("domain")  # [batch] row labels; only the [batch, seq] arrays go to the model
  bs = batch_sharding(mesh)
  with mesh_scope(mesh, mesh_cfg.rules):
    fn = jax.jit(lambda p, b: loss_and_grads(model, p, b), in_shardings=(shardings.params, bs))
    sums, grads = fn(state.params, {k: jax.device_put(v, bs) for k, v in batch.items()})
  return float(sums["ce"] / sums["tokens"]), grads, state.params


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2), (1, 4, 2)])
def test_sharded_equals_unsharded(tiny_exp, shape):
  exp = tiny_exp()
  one = MeshConfig(data=1, fsdp=1, tensor=1)
  loss1, grads1, _ = _loss_and_grads(exp, one, devices=jax.devices()[:1])
  mesh_cfg = MeshConfig(data=shape[0], fsdp=shape[1], tensor=shape[2])
  loss8, grads8, params8 = _loss_and_grads(exp, mesh_cfg)
  assert loss8 == pytest.approx(loss1, rel=1e-5)
  chex.assert_trees_all_close(jax.device_get(grads8), jax.device_get(grads1), atol=2e-6, rtol=1e-4)
  if shape[2] > 1:  # parameters really are split, not replicated
    q = params8["layers"]["attention"]["q_proj"]
    assert isinstance(q.sharding, NamedSharding)
    assert q.sharding.spec == PartitionSpec(None, ("fsdp", "context"), "tensor", None)
    assert q.addressable_shards[0].data.shape[2] == q.shape[2] // shape[2]


def test_mesh_product_must_match_devices():
  with pytest.raises(ValueError, match=r"data=2 x fsdp=2 x context=1 x expert=1 x tensor=3 = 12 devices, but 8"):
    make_mesh(MeshConfig(data=2, fsdp=2, tensor=3))
  with pytest.raises(ValueError, match="cannot fill 8 devices"):
    make_mesh(MeshConfig(data=-1, fsdp=3, tensor=1))
  assert dict(make_mesh(MeshConfig(data=-1, fsdp=2, tensor=2)).shape) == {
      "data": 2, "fsdp": 2, "context": 1, "expert": 1, "tensor": 2}


def test_batch_must_divide_data_parallel_size():
  mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  with pytest.raises(ValueError, match="not divisible by the data-parallel size 4"):
    check_batch_divisible(6, mesh)
  with pytest.raises(ValueError, match="microbatch 2"):
    check_batch_divisible(8, mesh, microbatches=4)
  check_batch_divisible(16, mesh, microbatches=4)


def test_batch_sharding_splits_rows():
  mesh = make_mesh(MeshConfig(data=4, fsdp=2, tensor=1))
  x = jax.device_put(np.arange(16 * 4).reshape(16, 4), batch_sharding(mesh))
  assert {s.data.shape for s in x.addressable_shards} == {(2, 4)}
