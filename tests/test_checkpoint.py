"""Checkpoints: async saves, resharding restore, retention, corruption fallback, clear errors."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from pretrainx import checkpoint
from pretrainx.config import CheckpointConfig
from pretrainx.checkpoint import Checkpointer, CheckpointError
from pretrainx.model import Transformer
from pretrainx.config import OptimizerConfig
from pretrainx.optim import make_optimizer
from pretrainx.config import MeshConfig
from pretrainx.sharding import make_mesh, mesh_scope
from pretrainx.train.state import create_train_state, state_shardings


def _state(exp, mesh_cfg):
  mesh = make_mesh(mesh_cfg)
  opt, _ = make_optimizer(OptimizerConfig(), 10)
  model = Transformer(exp.model)
  state, _ = create_train_state(model, opt, mesh, mesh_cfg.rules, 0, 16)
  abstract, _ = state_shardings(model, opt, mesh, mesh_cfg.rules, 16)
  return state, abstract, mesh


def _close(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


@pytest.mark.slow
def test_restore_onto_a_different_mesh_reshards(tiny_exp, tmp_path):
  exp = tiny_exp()
  saved, _, _ = _state(exp, MeshConfig(data=8, fsdp=1, tensor=1))
  ckpt = Checkpointer(str(tmp_path / "ck"))
  ckpt.save(3, saved, {"step": 3}, block=True)
  target = MeshConfig(data=2, fsdp=2, tensor=2)
  _, abstract, mesh = _state(exp, target)
  with mesh_scope(mesh, target.rules):
    restored, meta, step = ckpt.restore(abstract)
  assert step == 3 and meta == {"step": 3}
  _close(restored, saved)
  q = restored.params["layers"]["attention"]["q_proj"]
  assert q.sharding == NamedSharding(mesh, PartitionSpec(None, "fsdp", "tensor", None))
  ckpt.close()


def test_async_save_returns_before_the_files_are_complete(tmp_path):
  state = {"w": jnp.ones((4096, 4096), jnp.float32)}  # 64 MiB
  ckpt = Checkpointer(str(tmp_path / "ck"), CheckpointConfig(async_save=True))
  ckpt.save(1, state, {"step": 1})
  assert not os.path.exists(os.path.join(ckpt.step_path(1), checkpoint.COMMIT_MARKER))
  assert ckpt.latest_step() is None  # not finalised yet
  ckpt.wait()
  assert ckpt.latest_step() == 1
  restored, _, _ = ckpt.restore({"w": jax.ShapeDtypeStruct((4096, 4096), jnp.float32)})
  assert float(restored["w"].sum()) == 4096 * 4096
  ckpt.close()


def test_retention_keeps_the_last_n_and_every_kth_and_never_zero(tmp_path):
  ckpt = Checkpointer(str(tmp_path / "ck"), CheckpointConfig(keep_last=1, keep_every=4))
  for step in range(1, 10):
    ckpt.save(step, {"x": jnp.full((1000,), step, jnp.float32)}, {"step": step})
    # while a save is in flight the previous checkpoint is still there and finalised
    assert ckpt.latest_step() is not None or step == 1
  ckpt.wait()
  assert ckpt.finalised_steps() == [4, 8, 9]
  ckpt.close()


def _garble(step_dir):
  for root, _, files in os.walk(os.path.join(step_dir, "state")):
    for f in files:
      path = os.path.join(root, f)
      if f != checkpoint.COMMIT_MARKER and os.path.getsize(path) > 0:
        with open(path, "r+b") as fh:
          fh.write(os.urandom(os.path.getsize(path)))


def test_corrupted_or_unfinalised_latest_falls_back_to_the_newest_valid(tmp_path, caplog):
  directory = str(tmp_path / "ck")
  ckpt = Checkpointer(directory, CheckpointConfig(async_save=False))
  for step in (5, 10, 15):
    ckpt.save(step, {"x": jnp.full((256,), step, jnp.float32)}, {"step": step})
  os.remove(os.path.join(ckpt.step_path(15), checkpoint.COMMIT_MARKER))  # unfinalised
  _garble(ckpt.step_path(10))  # garbled bytes
  abstract = {"x": jax.ShapeDtypeStruct((256,), jnp.float32)}
  restored, meta, step = Checkpointer(directory).restore(abstract)
  assert step == 5 and meta["step"] == 5 and float(restored["x"][0]) == 5.0
  text = caplog.text
  assert "step 15" in text and "never finalised" in text
  assert "step 10" in text and "unreadable" in text
  moved = sorted(n for n in os.listdir(directory) if n.startswith("corrupt-"))
  assert [n.split("-")[1] for n in moved] == ["10", "15"]  # moved aside, not deleted
  # training can go on: step 10 can be written again
  ckpt2 = Checkpointer(directory, CheckpointConfig(async_save=False))
  ckpt2.save(10, {"x": jnp.full((256,), 10.0)}, {"step": 10})
  assert ckpt2.finalised_steps() == [5, 10]


@pytest.mark.slow
def test_shape_mismatch_lists_the_parameters(tiny_exp, tmp_path):
  exp = tiny_exp()
  state, _, _ = _state(exp, MeshConfig(data=1, fsdp=8, tensor=1))
  ckpt = Checkpointer(str(tmp_path / "ck"))
  ckpt.save(1, state, {}, block=True)
  wider = exp.replace(model={"mlp_dim": 256})
  _, abstract, mesh = _state(wider, MeshConfig(data=1, fsdp=8, tensor=1))
  with pytest.raises(CheckpointError, match=r"does not fit this model \(9 parameter\(s\) differ\)"
                                            r":\n  params/layers/mlp/down_proj: checkpoint \(2, 192, 64\) -> model "
                                            r"\(2, 256, 64\)"):
    ckpt.restore(abstract)
  assert ckpt.latest_step() == 1  # a wrong model is not corruption: nothing was moved


def test_missing_and_non_checkpoint_directories(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist; train first"):
    Checkpointer(str(tmp_path / "nope"), create=False)
  (tmp_path / "notckpt").mkdir()
  (tmp_path / "notckpt" / "readme.txt").write_text("hello")
  with pytest.raises(FileNotFoundError, match="holds no finished checkpoint"):
    Checkpointer(str(tmp_path / "notckpt"), create=False).restore({})


def test_no_pickle_in_checkpoints(tmp_path):
  ckpt = Checkpointer(str(tmp_path / "ck"), CheckpointConfig(async_save=False))
  ckpt.save(1, {"a": jnp.arange(10.0), "b": {"c": jnp.ones((3, 3))}}, {"step": 1, "x": [1, 2]})
  for root, _, files in os.walk(str(tmp_path / "ck")):
    for f in files:
      head = open(os.path.join(root, f), "rb").read(2)
      assert not (len(head) == 2 and head[0] == 0x80 and head[1] <= 5), f"pickle in {f}"


def test_export_writes_params_only(tmp_path):
  params = {"w": jnp.arange(6.0).reshape(2, 3)}
  path = checkpoint.save_params(str(tmp_path / "export"), params, {"step": 7})
  assert sorted(n for n in os.listdir(path) if os.path.isdir(os.path.join(path, n))) == [
      "meta", "params"]  # no optimizer state
  loaded, meta = checkpoint.load_params(path, {"w": jax.ShapeDtypeStruct((2, 3), jnp.float32)})
  _close(loaded, params)
  assert meta == {"step": 7}


def test_an_unreadable_checkpoint_is_described_in_words():
  """The corrupt-checkpoint warning names the error, without the repr of a pybind11 method
  that some tensorstore errors carry in place of their text."""
  err = ValueError("DATA_LOSS: Error reading \"x/.zarray\" <bound method pybind11_detail_function_"
                   "record_v1_system_libstdcpp_gxx_abi_1xxx_use_cxx11_abi_1.read of "
                   "<tensorstore.KvStore object at 0x7f>>\nsecond line")
  assert checkpoint.describe_error(err) == 'ValueError: DATA_LOSS: Error reading "x/.zarray"'
  assert checkpoint.describe_error(OSError()) == "OSError: no message"
