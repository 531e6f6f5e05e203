"""Checkpoints: async saves, resharding restore, retention, corruption fallback, clear errors."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from pretrainx import checkpoint, storage
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
  assert q.sharding == NamedSharding(mesh, PartitionSpec(None, ("fsdp", "context"), "tensor", None))
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
  # A failed write keeps its OS error, not the store's JSON spec that tensorstore appends.
  spec = "{" + ",".join(f'\\"k{i}\\":{{\\"path\\":\\"/run/x\\"}}' for i in range(20)) + "}"
  err = ValueError('OUT_OF_RANGE: Error opening "zarr" driver: Error writing local file '
                   '"/run/checkpoints/2.orbax-checkpoint-tmp/state/guard.consecutive_bad/.zarray": '
                   'Failed to write 206 bytes to file 4: File too large [os_error_code=\'27\'] '
                   f"[tensorstore_spec='{spec}']")
  described = checkpoint.describe_error(err)
  assert described.endswith("File too large [os_error_code='27']"), described
  assert "tensorstore_spec" not in described and len(described) < 230, described


# The bucket's server as the client sees it: a TCP proxy (a process of its own) in front of the
# GCS emulator. SIGKILL stops it: open connections drop and new ones are refused, while the
# emulator behind it keeps the objects for the test to inspect.
_PROXY = r"""
import socket, sys, threading
listen, target = int(sys.argv[1]), int(sys.argv[2])
server = socket.create_server(("127.0.0.1", listen))


def pipe(a, b):
  try:
    while data := a.recv(65536):
      b.sendall(data)
  except OSError:
    pass
  for s in (a, b):
    try:
      s.shutdown(socket.SHUT_RDWR)
    except OSError:
      pass


def serve(client):
  upstream = socket.create_connection(("127.0.0.1", target))
  threading.Thread(target=pipe, args=(client, upstream), daemon=True).start()
  pipe(upstream, client)


print("ready", flush=True)
while True:
  threading.Thread(target=serve, args=(server.accept()[0],), daemon=True).start()
"""

# A process that saves step 1, starts saving step 2 and stops the server (the proxy) while that
# save is in flight. gcsfs retries a refused connection 6 times over ~30 s before giving up;
# here its back-off sleeps are skipped, so the failure arrives in seconds.
_STOPPED_MID_SAVE = r"""
import json, os, signal, sys, time
import gcsfs.retry
import jax.numpy as jnp


class _NoBackoff:
  @staticmethod
  async def sleep(_):
    return None


gcsfs.retry.asyncio = _NoBackoff
from pretrainx import storage
from pretrainx.checkpoint import Checkpointer, CheckpointWriteError

ckpt = Checkpointer("gs://runs/" + sys.argv[2])
ckpt.save(1, {"w": jnp.ones((64, 64))}, {"step": 1}, block=True)
kept = sorted(storage.listdir(ckpt.step_path(1)))
ckpt.save(2, {"w": jnp.ones((1024, 1024))}, {"step": 2})
os.kill(int(sys.argv[1]), signal.SIGKILL)
stopped = time.time()
try:
  ckpt.wait()
  error = None
except CheckpointWriteError as err:
  error = str(err)
ckpt.close()
print(json.dumps({"error": error, "kept": kept, "stopped": stopped}))
"""


def test_a_server_stopped_mid_save_is_one_error_and_the_last_checkpoint_stays(gcs_server):
  """The save fails as one CheckpointWriteError naming the step and the storage error; the
  process exits at once (Orbax's threads waiting on the failed save are released, not left to
  time out after 300 s); behind the stopped server, step 1 is whole and step 2 not finalised."""
  import json
  import subprocess
  import sys
  import time
  import uuid

  from conftest import GCS_PORT
  from servers import free_port, gcs_env
  port, prefix = free_port(), f"stopped-mid-save-{uuid.uuid4().hex[:8]}"
  proxy = subprocess.Popen([sys.executable, "-c", _PROXY, str(port), str(GCS_PORT)],
                           stdout=subprocess.PIPE, text=True)
  try:
    assert proxy.stdout.readline().strip() == "ready"
    out = subprocess.run([sys.executable, "-c", _STOPPED_MID_SAVE, str(proxy.pid), prefix],
                         env={**os.environ, **gcs_env(port)}, capture_output=True, text=True,
                         timeout=240)
    exited = time.time()
  finally:
    proxy.kill()
    proxy.wait()
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result["error"] and result["error"].startswith(
      f"checkpoint step 2 could not be written to gs://runs/{prefix} (ClientConnectorError: "
      f"Cannot connect to host 127.0.0.1:{port}"), result
  assert "the last complete checkpoint is step 1" in result["error"]
  assert "\n" not in result["error"] and "Traceback" not in out.stderr, out.stderr[-3000:]
  assert exited - result["stopped"] < 60  # not Orbax's 300 s signal timeout
  step1 = storage.listdir(f"gs://runs/{prefix}/1")
  assert step1 == result["kept"] and checkpoint.COMMIT_MARKER in step1
  assert not storage.exists(f"gs://runs/{prefix}/2/{checkpoint.COMMIT_MARKER}")
  assert Checkpointer(f"gs://runs/{prefix}", create=False).finalised_steps() == [1]


def test_a_disk_that_fills_mid_run_stops_training_with_one_line_and_exit_2(run_cli, tmp_path,
                                                                          monkeypatch, caplog):
  """From the save of step 2 on, no file may grow past 32 KiB (RLIMIT_FSIZE: writes fail as on a
  full disk; the metrics files stay smaller). The run exits 2 with one line naming step 2 and
  the storage error, step 1 stays the newest finalised checkpoint, and step 2 is left only as
  Orbax's unfinalised tmp directory."""
  import gc
  import resource
  import sys

  limit = resource.getrlimit(resource.RLIMIT_FSIZE)
  real_save = Checkpointer.save

  def save(self, step, *args, **kwargs):
    if step == 2:
      self.wait()  # step 1's async save is finalised first, under no limit
      resource.setrlimit(resource.RLIMIT_FSIZE, (32 * 1024, limit[1]))
    return real_save(self, step, *args, **kwargs)

  monkeypatch.setattr(Checkpointer, "save", save)
  unraisable = []  # what would reach the terminal as 'Exception ignored' tracebacks
  monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
  run_dir = tmp_path / "run"
  try:
    out = run_cli("train", "--gin_file=gin_configs/tiny.gin", f"--run_dir={run_dir}",
                  "--peak_tflops=1", "--gin_param=RunConfig.steps=3",
                  "--gin_param=RunConfig.log_every=1", "--gin_param=RunConfig.eval_every=1",
                  "--gin_param=RunConfig.eval_batches=1", "--gin_param=SampleConfig.tokens=0",
                  "--gin_param=CheckpointConfig.every_steps=1")
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, limit)
  assert out.returncode == 2, out.stderr[-3000:]
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith(f"pretrainx train: error: checkpoint step 2 could not be written to "
                         f"{run_dir}/checkpoints ("), last
  # The OS error (EFBIG) is named: its words, or its code where TensorStore's message is long.
  assert ("File too large" in last or "os_error_code='27'" in last) and (
      "the last complete checkpoint is step 1" in last), last
  assert "Traceback" not in out.stderr
  assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records]
  gc.collect()
  assert not unraisable, [u.exc_value for u in unraisable]
  ckpt = Checkpointer(str(run_dir / "checkpoints"), create=False)
  assert ckpt.finalised_steps() == [1]
  names = os.listdir(run_dir / "checkpoints")
  assert "1" in names and "2" not in names and [n for n in names if n.startswith("2.")], names
  ckpt.close()
