"""The Llama presets build abstractly (no memory) with the published parameter counts and shard."""

import os

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from pretrainx.config import parse_gin
from pretrainx.model import Transformer
from pretrainx.flops import count_params
from pretrainx.optim import make_optimizer
from pretrainx.config import MeshConfig
from pretrainx.sharding import make_mesh
from pretrainx.train.state import state_shardings

from conftest import REPO


def _model_cfg(name):
  return parse_gin([os.path.join(REPO, f"gin_configs/models/{name}.gin")]).model


@pytest.mark.parametrize("name,expected", [("llama_7b", 6.74e9), ("llama_70b", 68.98e9)])
def test_llama_parameter_counts(name, expected):
  cfg = _model_cfg(name)
  model = Transformer(cfg)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jax.numpy.zeros((1, 8), "int32")))
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
  assert n == pytest.approx(expected, rel=0.01)
  assert count_params(cfg)["total"] == n  # 32000 is already a multiple of 128: no padding


@pytest.mark.parametrize("name", ["llama_125m", "llama_1b", "llama_7b", "llama_70b"])
def test_presets_shard_on_a_2x2x2_mesh(name):
  cfg = _model_cfg(name)
  mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  optimizer, _ = make_optimizer(parse_gin([]).optimizer, 100)
  abstract, shardings = state_shardings(Transformer(cfg), optimizer, mesh,
                                        MeshConfig().rules, seq_len=8)
  q = abstract.params["layers"]["attention"]["q_proj"]
  assert q.sharding.spec == PartitionSpec(None, ("fsdp", "context"), "tensor", None)  # layers, embed, heads, hd
  mu = abstract.opt_state[1][0].mu["layers"]["mlp"]["up_proj"]  # Adam moments follow params
  assert mu.sharding.spec == PartitionSpec(None, ("fsdp", "context"), "tensor")
  # every large parameter is split 4 ways (fsdp x tensor) or more
  for leaf in jax.tree.leaves(abstract.params):
    if np.prod(leaf.shape) > 1e6:
      shard = leaf.sharding.shard_shape(leaf.shape)
      assert np.prod(shard) * 4 <= np.prod(leaf.shape), leaf


@pytest.mark.parametrize("name,tensor", [("llama_7b", 1), ("llama_70b", 4)])
def test_pod_experiment_files_parse_and_fill_256_chips(name, tensor):
  exp = parse_gin([os.path.join(REPO, f"gin_configs/{name}.gin")])
  assert exp.model == _model_cfg(name)
  assert exp.mesh.resolved_shape(256) == (1, 256 // tensor, 1, 1, tensor)
  assert exp.run.global_batch_size * exp.run.seq_len == 256 * 4096


@pytest.mark.parametrize("name,devices,slices,shape", [
    ("llama_70b_32k", 512, 4, (4, 16, 8, 1, 1)),  # 4 v5p-256 slices on dcn_data
    ("llama_8b_128k", 128, 1, (1, 8, 16, 1, 1)),
])
def test_long_context_presets_split_their_sequences(name, devices, slices, shape):
  exp = parse_gin([os.path.join(REPO, f"gin_configs/{name}.gin")])
  assert exp.mesh.resolved_shape(devices, slices) == shape
  assert exp.mesh.num_slices(slices) == slices
  assert exp.model.attention_impl == "flash" and exp.run.seq_len == exp.model.max_seq_len
  assert exp.run.seq_len % (2 * exp.mesh.context) == 0  # zigzag chunks
  data_ranks = shape[0] * shape[1]
  assert exp.run.global_batch_size == data_ranks  # one sequence per data-parallel rank


def test_progressive_extension_preset_keeps_its_tokens_and_splits_every_stage():
  from pretrainx.config import phases
  exp = parse_gin([os.path.join(REPO, "gin_configs/llama_8b_8k_to_128k.gin")])
  stages = phases(exp)
  assert [p.seq_len for p in stages] == [8192, 32768, 131072]
  assert {p.tokens_per_step for p in stages} == {1 << 20}
  data_ranks = exp.mesh.resolved_shape(128, 1)[1]  # fsdp: what 16-way context leaves of 128
  for p in stages:
    assert p.seq_len % (2 * exp.mesh.context) == 0 and p.global_batch_size % data_ranks == 0
  assert dict(stages[-1].rope)["rope_theta"] > dict(stages[1].rope)["rope_theta"] > \
      exp.model.rope_theta
