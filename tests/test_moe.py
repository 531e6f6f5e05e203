"""Mixture-of-experts: the routed MLP against the dense one, expert parallelism against one device,
the balance loss, capacity drops, sparse upcycling and Lifelong-MoE, active-param accounting, the
TPU compile with an expert axis, and the errors bad MoE settings give."""

import dataclasses
import functools
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import conftest
from pretrainx.checkpoint import Checkpointer
from pretrainx.config import MeshConfig, ModelConfig, MoeConfig
from pretrainx.cpt.upcycle import upcycle
from pretrainx.flops import count_params, flops_per_token
from pretrainx.model import Transformer
from pretrainx.sharding import make_mesh, mesh_scope
from pretrainx.train.init import initial_state
from pretrainx.train.loop import train
from pretrainx.train.runtime import build_runtime
from pretrainx.train.step import loss_and_grads
from pretrainx.tree import unbox_tree

REPO = conftest.REPO
DENSE = ModelConfig(vocab_size=259, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    mlp_dim=64, max_seq_len=32, sow_kurtosis=False)


def _moe(cfg=DENSE, **moe):
  return dataclasses.replace(cfg, moe=MoeConfig(**moe))


@functools.lru_cache(maxsize=None)
def _params(cfg: ModelConfig, seed: int = 0):
  tokens = jnp.zeros((1, 8), jnp.int32)
  return jax.jit(lambda k: unbox_tree(Transformer(cfg).init(k, tokens)["params"]))(
      jax.random.key(seed))


def _tokens(shape=(8, 16), seed=1):
  return jnp.asarray(np.random.default_rng(seed).integers(3, 259, shape), jnp.int32)


def _logits(cfg, params, tokens):
  return np.asarray(jax.jit(lambda p, t: Transformer(cfg).apply({"params": p}, t))(params, tokens))


@pytest.mark.parametrize("impl", ["einsum", "ragged"])
def test_one_expert_with_top1_equals_the_dense_mlp(impl):
  cfg = _moe(num_experts=1, top_k=1, impl=impl)
  dense = _params(DENSE)
  params = {**dense, "layers": {k: v for k, v in dense["layers"].items() if k != "mlp"}}
  params["layers"]["moe"] = {name: w[:, None] for name, w in dense["layers"]["mlp"].items()}
  params["layers"]["moe"]["router"] = jnp.ones((DENSE.num_layers, DENSE.embed_dim, 1))
  tokens = _tokens()
  np.testing.assert_allclose(_logits(cfg, params, tokens), _logits(DENSE, dense, tokens),
                             atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_ragged_and_einsum_dispatch_compute_the_same_function():
  cfg = _moe(num_experts=4, top_k=2, impl="einsum", capacity_factor=1.0)
  params, tokens = _params(cfg), _tokens()
  ragged = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, impl="ragged"))
  np.testing.assert_allclose(_logits(ragged, params, tokens), _logits(cfg, params, tokens),
                             atol=1e-5, rtol=1e-5)


def _batch(shape=(8, 16), seed=1):
  tokens = _tokens((shape[0], shape[1] + 1), seed)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "loss_mask": jnp.ones(shape, jnp.int32), "segment_ids": jnp.ones(shape, jnp.int32),
          "positions": jnp.broadcast_to(jnp.arange(shape[1], dtype=jnp.int32), shape)}


def _sums_and_grads(cfg, params, batch, mesh_cfg=None):
  model = Transformer(cfg)
  fn = jax.jit(lambda p, b: loss_and_grads(model, p, b))
  if mesh_cfg is None:
    return jax.device_get(fn(params, batch))
  with mesh_scope(make_mesh(mesh_cfg), mesh_cfg.rules):
    return jax.device_get(fn(params, batch))


@pytest.mark.slow
@pytest.mark.parametrize("impl, mesh", [
    ("einsum", dict(data=2, expert=4)), ("ragged", dict(expert=8)),
    ("ragged", dict(fsdp=2, expert=2, tensor=2))],
    ids=["einsum-data2-expert4", "ragged-expert8", "ragged-fsdp2-expert2-tensor2"])
def test_expert_parallel_on_8_devices_equals_one_device(impl, mesh):
  """Loss, router losses and every gradient: the all_to_all exchange computes what one device
  computes (dropless; with a capacity, drops are per device group, as in GShard)."""
  cfg = _moe(num_experts=8, top_k=2, impl=impl, shared_experts=1, shared_gate=True)
  params, batch = _params(cfg), _batch()
  one_sums, one_grads = _sums_and_grads(cfg, params, batch)
  ep_sums, ep_grads = _sums_and_grads(cfg, params, batch, MeshConfig(**{"data": 1, **mesh}))
  for key in ("ce", "moe_aux", "moe/load", "moe/dropped"):
    np.testing.assert_allclose(ep_sums[key], one_sums[key], rtol=1e-5, atol=1e-6, err_msg=key)
  flat_one, flat_ep = jax.tree.leaves(one_grads), jax.tree.leaves(ep_grads)
  for a, b in zip(flat_ep, flat_one):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * float(np.max(np.abs(b))) + 1e-8)


@pytest.mark.slow
def test_capacity_drops_late_tokens_and_a_large_capacity_drops_none():
  tokens = _tokens()
  tight = _moe(num_experts=4, top_k=2, capacity_factor=0.5, impl="einsum")
  params = _params(tight)
  sums = _sums_and_grads(tight, params, _batch())[0]
  dropped = sums["moe/dropped"] / sums["tokens"]
  assert np.all(dropped >= 0.5 - 1e-6)  # half the slots at most, so at least half dropped
  loose = _moe(num_experts=4, top_k=2, capacity_factor=4.0, impl="einsum")
  dropless = _moe(num_experts=4, top_k=2, impl="einsum")
  np.testing.assert_array_equal(_logits(loose, params, tokens), _logits(dropless, params, tokens))
  assert not np.allclose(_logits(tight, params, tokens), _logits(dropless, params, tokens))


def test_the_balance_loss_is_lowest_when_balanced_and_its_gradient_unloads_the_busiest_expert():
  """The Switch loss E * sum_e load_e * importance_e: 1 for uniform routing, E for a collapse,
  and descending it through the router's probabilities moves tokens off the busiest expert.
  (What it does to a training run's load is measured in bench/moe.py.)"""
  from pretrainx.model.moe import router_statistics

  num_experts, top_k = 4, 2

  def stats(w, x):
    logits = x @ w  # [tokens, experts]
    experts = jax.lax.top_k(logits, top_k)[1]  # [tokens, k]
    return router_statistics(logits, jax.nn.softmax(logits), experts, num_experts)

  uniform = router_statistics(jnp.zeros((8, 4)), jnp.full((8, 4), 0.25),
                              jnp.tile(jnp.arange(4).reshape(4, 1), (2, 2)) % 4, num_experts)
  assert float(uniform["balance_loss"]) == pytest.approx(1.0)
  collapsed = router_statistics(jnp.zeros((8, 4)), jnp.eye(4)[jnp.zeros(8, int)],
                                jnp.zeros((8, 1), int), num_experts)
  assert float(collapsed["balance_loss"]) == pytest.approx(num_experts)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(256, 8)), jnp.float32).at[:, 0].set(1.0)  # a bias feature
  w = jnp.asarray(rng.normal(size=(8, 4)) * 0.3, jnp.float32).at[0, 0].set(2.0)  # favours e0
  grad = jax.jit(jax.grad(lambda w: stats(w, x)["balance_loss"]))
  first = stats(w, x)
  for _ in range(50):
    w = w - 0.5 * grad(w)
  last = stats(w, x)
  busiest = int(jnp.argmax(first["load"]))
  assert float(first["load"][busiest]) * num_experts > 1.5  # the router starts collapsed
  assert float(last["load"][busiest]) < float(first["load"][busiest]) - 0.1
  assert float(last["balance_loss"]) < float(first["balance_loss"])


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
  """A dense tiny run trained 2 steps: the source of the upcycling tests."""
  exp = conftest.tiny_experiment(tmp_path_factory.mktemp("dense") / "run",
                                 run={"steps": 2, "eval_every": 0, "eval_batches": 1},
                                 sample={"tokens": 0})
  train(exp)
  return exp


def _restore_params(exp):
  rt = build_runtime(exp)
  ckpt = Checkpointer(os.path.join(exp.run.run_dir, "checkpoints"), create=False)
  try:
    with rt.scope():
      state, _, _ = ckpt.restore(rt.abstract_state)
  finally:
    ckpt.close()
  return rt.inference_params(state)


@pytest.mark.slow
@pytest.mark.xdist_group("moe_dense_run")  # `dense_run` is built once
@pytest.mark.parametrize("moe", [dict(num_experts=4, top_k=2),
                                 dict(num_experts=4, top_k=1, shared_experts=1, shared_gate=True),
                                 dict(num_experts=2, top_k=2, every=2)],
                         ids=["top2", "top1-shared", "every2-unrolled"])
def test_the_upcycled_model_computes_the_dense_function_at_step_0(dense_run, tmp_path, moe):
  dense_params = _restore_params(dense_run)
  model = {"moe": moe, **({"scan_layers": False} if moe.get("every", 1) > 1 else {})}
  exp = conftest.tiny_experiment(tmp_path / "up", init={"source": dense_run.run.run_dir},
                                 model=model)
  rt = build_runtime(exp)
  state, step = initial_state(rt, exp.init)
  assert step == 0
  tokens = _tokens((4, 32))
  up = _logits(exp.model, jax.device_get(state.params), tokens)
  np.testing.assert_allclose(up, _logits(dense_run.model, jax.device_get(dense_params), tokens),
                             atol=2e-5, rtol=2e-5)
  layer = state.params["layers"]["moe"] if exp.model.scan_layers else state.params["layers_1"]["moe"]
  assert layer["gate_proj"].shape[-3] == moe["num_experts"]


@pytest.mark.slow
def test_added_experts_train_while_the_frozen_old_ones_stay(tmp_path):
  """Lifelong-MoE: a 2-expert run grows to 4 experts with the first 2 frozen."""
  small = conftest.tiny_experiment(tmp_path / "small", run={"steps": 2, "eval_every": 0,
                                                            "eval_batches": 1},
                                   sample={"tokens": 0}, model={"moe": {"num_experts": 2}})
  train(small)
  old = jax.device_get(_restore_params(small))["layers"]["moe"]
  keep = conftest.tiny_experiment(tmp_path / "keep", init={"source": small.run.run_dir,
                                                           "keep_optimizer": True},
                                  model={"moe": {"num_experts": 4}})
  with pytest.raises(ValueError, match="keep_optimizer cannot be combined with upcycling"):
    initial_state(build_runtime(keep), keep.init)
  grown = conftest.tiny_experiment(
      tmp_path / "grown", run={"steps": 3, "eval_every": 0, "eval_batches": 1},
      sample={"tokens": 0}, init={"source": small.run.run_dir},
      model={"moe": {"num_experts": 4}}, tune={"frozen_experts": 2})
  train(grown)
  new = jax.device_get(_restore_params(grown))["layers"]["moe"]
  for name in ("gate_proj", "up_proj", "down_proj"):
    np.testing.assert_array_equal(new[name][:, :2], old[name])
    assert not np.allclose(new[name][:, 2:], 0) and new[name].shape[1] == 4
  np.testing.assert_array_equal(new["router"][..., :2], old["router"])
  assert new["router"].shape[-1] == 4


def test_upcycling_a_source_without_an_mlp_says_what_it_needs():
  src = DENSE
  params = _params(src)
  broken = {**params, "layers": {k: v for k, v in params["layers"].items() if k != "mlp"}}
  with pytest.raises(ValueError, match=r"layer 0 of the source has no MLP to upcycle .*copies a "
                                       r"dense SwiGLU MLP \('mlp'\) into every expert"):
    upcycle(broken, src, _moe(num_experts=4), jax.random.key(0))
  with pytest.raises(ValueError, match="leave expert_mlp_dim unset"):
    upcycle(params, src, _moe(num_experts=4, expert_mlp_dim=32), jax.random.key(0))


def test_active_parameters_drive_flops():
  moe = _moe(num_experts=8, top_k=2)
  counts, dense = count_params(moe), count_params(DENSE)
  mlp = 3 * DENSE.embed_dim * DENSE.mlp_dim * DENSE.num_layers
  router = DENSE.embed_dim * 8 * DENSE.num_layers
  assert counts["non_embedding"] == dense["non_embedding"] + 7 * mlp + router
  assert counts["active_non_embedding"] == dense["non_embedding"] + mlp + router
  assert flops_per_token(moe, 32) - flops_per_token(DENSE, 32) == 6 * (mlp + router)
  n = sum(x.size for x in jax.tree.leaves(_params(moe)))
  assert n == counts["total"] + (DENSE.padded_vocab_size - DENSE.vocab_size) * DENSE.embed_dim


def test_top_k_larger_than_the_expert_count_is_refused():
  with pytest.raises(ValueError, match=r"MoeConfig.top_k=3 must be between 1 and num_experts=2; "
                                       "lower top_k or add experts."):
    MoeConfig(num_experts=2, top_k=3)


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "pretrainx", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=300,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})


@pytest.mark.parametrize("bindings, message", [
    (["MoeConfig.num_experts = 2", "MoeConfig.top_k = 3"],
     "MoeConfig.top_k=3 must be between 1 and num_experts=2"),
    (["MoeConfig.num_experts = 6", "MeshConfig.expert = 4", "MeshConfig.data = 2"],
     "MoeConfig.num_experts=6 is not divisible by MeshConfig.expert=4"),
])
def test_bad_moe_settings_exit_2_with_one_line(tmp_path, bindings, message):
  params = [f"--gin_param={b}" for b in bindings]
  out = _cli("train", "--gin_file=gin_configs/tiny.gin", f"--run_dir={tmp_path / 'run'}", *params)
  assert out.returncode == 2, out.stderr[-2000:]
  assert message in out.stderr.strip().splitlines()[-1]
  assert "Traceback" not in out.stderr
  assert not (tmp_path / "run").exists()


def test_an_expert_axis_that_does_not_divide_the_experts_is_refused_in_the_model():
  cfg = _moe(num_experts=6, top_k=2)
  mesh_cfg = MeshConfig(data=2, expert=4)
  with pytest.raises(ValueError, match=r"MoeConfig.num_experts=6 is not divisible by the 'expert' "
                                       r"mesh axis \(4 devices\)"):
    _sums_and_grads(cfg, _params(cfg), _batch(), mesh_cfg)


@pytest.mark.slow
def test_moe_train_step_compiles_for_v5p_with_an_expert_axis():
  """The real TPU compiler: experts split over 'expert', tokens exchanged with all-to-all, the
  grouped matmul as ragged dots."""
  from pretrainx import topology
  from pretrainx.config import parse_gin
  from pretrainx.plan import abstract_batch
  exp = parse_gin([os.path.join(REPO, "gin_configs/moe_tiny.gin")],
                  ["MeshConfig.data = 1", "MeshConfig.fsdp = 2", "MeshConfig.expert = 4"])
  rt = build_runtime(exp, topology.load("v5p-16").devices)
  with rt.scope():
    compiled = rt.train_step.lower(rt.abstract_state, abstract_batch(rt.exp, rt.mesh)).compile()
  text = compiled.as_text()
  assert {d.platform for d in rt.mesh.devices.flat} == {"tpu"}
  assert "all-to-all" in text
  assert "ragged" in text


def test_muon_orthogonalises_each_expert_on_its_own():
  from pretrainx.config import OptimizerConfig
  from pretrainx.optim import muon_dimension_numbers
  cfg = _moe(num_experts=4, top_k=2)
  dims = muon_dimension_numbers(_params(cfg), OptimizerConfig(name="muon"))["layers"]["moe"]
  # [layers, experts, embed, mlp]: layers and experts are batch axes, embed is reduced
  assert dims["gate_proj"].reduction_axis == (2,) and dims["gate_proj"].output_axis == (3,)
  assert dims["down_proj"].reduction_axis == (2,) and dims["down_proj"].output_axis == (3,)
  assert dims["router"].reduction_axis == (1,) and dims["router"].output_axis == (2,)


def test_a_hugging_face_dense_model_upcycles_through_gin(tmp_path):
  """The gin file binds only the experts; config.json sets the rest, the MLPs become experts."""
  from pretrainx import hf
  from pretrainx.config import parse_gin
  src = dataclasses.replace(DENSE, num_layers=2, tie_embeddings=False, max_seq_len=64)
  params = _params(src)
  directory = str(tmp_path / "llama")
  hf.export_hf(params, src, directory, architecture="LlamaForCausalLM", dtype="float32")
  gin = tmp_path / "up.gin"
  gin.write_text("\n".join([
      "include 'gin_configs/runs/pretrain.gin'", "STEPS = 1", "BATCH_SIZE = 8", "SEQ_LEN = 32",
      "LEARNING_RATE = 1e-3", f"InitConfig.source = '{directory}'", "SampleConfig.tokens = 0",
      f"RunConfig.run_dir = '{tmp_path / 'run'}'", "MoeConfig.num_experts = 4",
      "MoeConfig.top_k = 2"]))
  exp = parse_gin([str(gin)])
  assert exp.model.mlp_dim == src.mlp_dim and exp.model.moe.num_experts == 4
  state, _ = initial_state(build_runtime(exp), exp.init)
  tokens = _tokens((2, 32))
  np.testing.assert_allclose(_logits(exp.model, jax.device_get(state.params), tokens)[..., :259],
                             _logits(src, params, tokens)[..., :259], atol=2e-5, rtol=2e-5)


def test_upcycling_builds_only_each_devices_share_of_the_experts():
  """On 8 devices with expert=4, the surgery is one program whose outputs are the run's shards:
  per-device bytes are the sharded ones, the compiled program never holds every expert, and no
  array with all the experts sits whole on one device."""
  from pretrainx.cpt.upcycle import fresh_routers, upcycle_program, upcycle_sharded
  from pretrainx.sharding import logical_to_shardings
  mesh_cfg, cfg = MeshConfig(data=2, expert=4), _moe(num_experts=8, top_k=2)
  mesh = make_mesh(mesh_cfg)

  def shardings(c):
    boxed = jax.eval_shape(lambda k: Transformer(c).init(k, jnp.zeros((1, 8), jnp.int32))["params"],
                           jax.random.key(0))
    return logical_to_shardings(boxed, mesh, mesh_cfg.rules)

  before = {id(x) for x in jax.live_arrays()}  # other tests' arrays live in this process too
  dense = jax.device_put(_params(DENSE), shardings(DENSE))
  out_shardings, rng = shardings(cfg), jax.random.key(2)
  up = upcycle_sharded(dense, DENSE, cfg, rng, out_shardings)
  experts = up["layers"]["moe"]["gate_proj"]
  assert experts.shape == (2, 8, 32, 64)
  every_expert = sum(up["layers"]["moe"][n].nbytes for n in ("gate_proj", "up_proj", "down_proj"))
  expected = sum(math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize
                 for x, s in zip(jax.tree.leaves(up), jax.tree.leaves(out_shardings)))
  for device in mesh.devices.flat:
    held = sum(s.data.nbytes for x in jax.tree.leaves(up) for s in x.addressable_shards
               if s.device == device)
    assert held == expected
  assert {s.data.shape for s in experts.addressable_shards} == {(2, 2, 32, 64)}
  for x in jax.live_arrays():  # nothing made here holds the 8 experts whole on one device
    if id(x) not in before and x.ndim == 4 and x.shape[:2] == (2, 8):
      assert all(s.data.shape[1] == 2 for s in x.addressable_shards), x.sharding
  compiled = upcycle_program(DENSE, cfg, out_shardings).lower(
      dense, rng, fresh_routers(dense, DENSE, cfg, rng)).compile()
  memory = compiled.memory_analysis()
  leaves = len(jax.tree.leaves(up))  # the output tuple adds a pointer per leaf
  assert expected <= memory.output_size_in_bytes <= expected + 8 * leaves
  assert memory.temp_size_in_bytes + memory.output_size_in_bytes < every_expert
  np.testing.assert_array_equal(jax.device_get(up)["layers"]["moe"]["down_proj"][:, 5],
                                jax.device_get(dense)["layers"]["mlp"]["down_proj"])
