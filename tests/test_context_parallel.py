"""Context parallelism: a sequence split over devices computes the same function as one device.

The tiny model's loss and gradients on a mesh that splits the sequence (context 2 and 4, with
data, fsdp and tensor; and over two simulated slices) equal one device's, for packed and
unpacked batches, 'reference' and 'flash' (Pallas, interpreted), with GQA, RoPE positions and a
sliding window. Also the zigzag layout itself and the one-line refusals.
"""

import dataclasses

import chex
import jax
import numpy as np
import optax
import pytest

from pretrainx.config import MeshConfig
from pretrainx.model import Transformer, context_parallel
from pretrainx.sharding import batch_sharding, make_mesh, mesh_scope
from pretrainx.train.state import create_train_state
from pretrainx.train.step import loss_and_grads

SEQ = 64


def test_zigzag_layout_gives_every_device_an_early_and_a_late_chunk():
  order = context_parallel.layout(16, 2, load_balance=True)  # 4 chunks of 4: device 0 has 0, 3
  assert order.tolist() == [0, 1, 2, 3, 12, 13, 14, 15, 4, 5, 6, 7, 8, 9, 10, 11]
  x = np.arange(2 * 24 * 3).reshape(2, 24, 3)
  balanced = np.asarray(context_parallel.balance(x, 3))
  np.testing.assert_array_equal(balanced, x[:, context_parallel.layout(24, 3, True)])
  np.testing.assert_array_equal(np.asarray(context_parallel.restore(balanced, 3)), x)
  # causal work (keys each query sees) is equal on every device
  work = [(order[r * 8:(r + 1) * 8] + 1).sum() for r in range(2)]
  assert work[0] == work[1]
  assert context_parallel.layout(16, 2, load_balance=False).tolist() == list(range(16))


def _batch(packed: bool, batch: int = 4):
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, 259, size=(batch, SEQ + 1)).astype(np.int32)
  if packed:  # documents of 20, 30 and 14 tokens (ends not on chunk boundaries); RoPE restarts
    lengths = [20, 30, 14]
    segment_ids = np.repeat(np.arange(1, 4), lengths)[None].repeat(batch, 0).astype(np.int32)
    positions = np.concatenate([np.arange(n) for n in lengths])[None].repeat(batch, 0)
  else:
    segment_ids = np.ones((batch, SEQ), np.int32)
    positions = np.arange(SEQ)[None].repeat(batch, 0)
  loss_mask = np.ones((batch, SEQ), np.float32)
  loss_mask[:, -3:] = 0.0
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": segment_ids,
          "positions": positions.astype(np.int32), "loss_mask": loss_mask}


def _loss_and_grads(exp, mesh_cfg, batch, devices=None):
  mesh = make_mesh(mesh_cfg, devices)
  model = Transformer(exp.model)
  state, shardings = create_train_state(model, optax.sgd(0.1), mesh, mesh_cfg.rules, seed=0,
                                        seq_len=SEQ)
  bs = batch_sharding(mesh)
  with mesh_scope(mesh, mesh_cfg.rules):
    fn = jax.jit(lambda p, b: loss_and_grads(model, p, b), in_shardings=(shardings.params, bs))
    sums, grads = fn(state.params, {k: jax.device_put(v, bs) for k, v in batch.items()})
  return float(sums["ce"] / sums["tokens"]), jax.device_get(grads)


CASES = {  # name: (mesh, attention_impl, packed, sliding window, load balance)
    "context2_data2_fsdp2_reference_packed": (dict(context=2, data=2, fsdp=2), "reference", True,
                                              None, True),
    "context4_tensor2_reference_window": (dict(context=4, data=1, tensor=2), "reference", False,
                                          24, True),
    "context2_fsdp2_tensor2_flash_packed_window": (dict(context=2, data=1, fsdp=2, tensor=2),
                                                   "flash", True, 24, True),
    "context4_data2_flash_unbalanced": (dict(context=4, data=2), "flash", True, None, False),
    "two_slices_x4_context2_flash": (dict(dcn_data=2, data=1, fsdp=2, context=2), "flash", False,
                                     None, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_split_sequence_equals_one_device(tiny_exp, case):
  mesh, impl, packed, window, balance = CASES[case]
  exp = tiny_exp(model=dict(attention_impl=impl, sliding_window=window, kernel_interpret=True,
                            flash_block_q=8, flash_block_k=8, context_load_balance=balance))
  batch = _batch(packed)
  loss1, grads1 = _loss_and_grads(exp, MeshConfig(data=1), batch, jax.devices()[:1])
  loss8, grads8 = _loss_and_grads(exp, MeshConfig(**mesh), batch)
  assert loss8 == pytest.approx(loss1, rel=1e-5)
  chex.assert_trees_all_close(grads8, grads1, atol=2e-6, rtol=1e-4)


def test_sequence_the_split_does_not_divide_is_refused(tiny_exp):
  exp = tiny_exp()
  mesh_cfg = MeshConfig(context=4, data=2)
  mesh = make_mesh(mesh_cfg)
  model = Transformer(exp.model)
  tokens = np.zeros((2, 36), np.int32)  # 36 = 4 x 9 but not a multiple of 2 x 4
  with mesh_scope(mesh, mesh_cfg.rules), pytest.raises(
      ValueError, match=r"sequence length 36 cannot be split into 2 x context = 8 chunks"):
    jax.eval_shape(lambda t: model.init(jax.random.key(0), t), tokens)
  linear = Transformer(dataclasses.replace(exp.model, attention_impl="linear"))
  with mesh_scope(mesh, mesh_cfg.rules), pytest.raises(
      ValueError, match=r"attention_impl 'linear' cannot split a sequence over "
                        r"MeshConfig.context=4"):
    jax.eval_shape(lambda t: linear.init(jax.random.key(0), t), np.zeros((2, 32), np.int32))


@pytest.mark.parametrize("params, message", [
    (["RunConfig.seq_len=36", "MeshConfig.context=4", "MeshConfig.data=2"],
     "sequence length 36 cannot be split into 2 x context = 8 chunks (causal load balancing); "
     "use a sequence length that is a multiple of 8"),
    (["MeshConfig.context=2", "MeshConfig.data=4", "ModelConfig.attention_impl='linear'"],
     "attention_impl 'linear' cannot split a sequence over MeshConfig.context=2"),
    (["MeshConfig.dcn_data=3"], "8 devices cannot form 3 slices of equal size"),
])
def test_train_refuses_what_cannot_split_with_one_line(run_cli, tmp_path, params, message):
  out = run_cli("train", "--gin_file=gin_configs/tiny.gin", f"--run_dir={tmp_path / 'run'}",
                *(f"--gin_param={p}" for p in params))
  assert out.returncode == 2, out.stderr[-2000:]
  last = out.stderr.strip().splitlines()[-1]
  assert message in last and len(out.stderr.strip().splitlines()) <= 3, out.stderr[-2000:]


def test_harness_scorer_on_a_split_sequence_equals_one_device(tiny_exp):
  """The lm-eval scorer's per-token log-probabilities and greedy flags, rows split over
  context=4 (zigzag), equal those of the unsharded model; its rows round up to the 8 chunks."""
  from pretrainx.harness.scoring import TokenScorer

  exp = tiny_exp()
  model = Transformer(exp.model)
  mesh_cfg = MeshConfig(data=2, context=4)
  mesh = make_mesh(mesh_cfg)
  state, _ = create_train_state(model, optax.sgd(0.1), mesh, mesh_cfg.rules, seed=0, seq_len=SEQ)
  rng = np.random.default_rng(1)
  requests = [(rng.integers(3, 259, size=n).tolist(), rng.integers(3, 259, size=m).tolist())
              for n, m in [(5, 3), (20, 7), (1, 12), (33, 2), (9, 9)]]
  split = TokenScorer(model, state.params, SEQ, 4, sharding=batch_sharding(mesh),
                      scope=lambda: mesh_scope(mesh, mesh_cfg.rules))
  whole = TokenScorer(model, jax.device_get(state.params), SEQ, 4)
  assert split.row_multiple == 8 and whole.row_multiple == 1
  for a, b in zip(split.score(requests), whole.score(requests)):
    np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(a.greedy, b.greedy)
