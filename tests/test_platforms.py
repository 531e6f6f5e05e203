"""No libtpu on hosts without TPU chips: JAX_PLATFORMS chosen before JAX starts (issue 36.4)."""

import os
import subprocess
import sys

from conftest import REPO
from pretrainx import platforms


def _no_chips(tmp_path):
  (tmp_path / "sys/bus/pci/devices").mkdir(parents=True)
  return str(tmp_path)


def test_a_host_without_tpu_chips_keeps_jax_off_libtpu(tmp_path):
  root = _no_chips(tmp_path)  # (libtpu is installed in the test environment)
  env = {}
  assert platforms.choose_platforms(env, root, plugins=[]) == "cpu"
  assert env == {"JAX_PLATFORMS": "cpu"}
  env = {}
  assert platforms.choose_platforms(env, root, plugins=["xla_cuda12"]) == "cuda,cpu"
  # A plugin of a platform pretrainx cannot name: JAX is left to choose.
  assert platforms.choose_platforms({}, root, plugins=["some_vendor"]) is None
  # What the user set wins, even an empty JAX_PLATFORMS.
  for given in ({"JAX_PLATFORMS": ""}, {"JAX_PLATFORMS": "tpu"}, {"JAX_FORCE_TPU_INIT": "1"}):
    env = dict(given)
    assert platforms.choose_platforms(env, root, plugins=[]) is None and env == given


def test_a_tpu_host_is_left_to_jax(tmp_path):
  device = tmp_path / "sys/bus/pci/devices/0000:00:04.0"
  device.mkdir(parents=True)
  (device / "vendor").write_text("0x1ae0\n")
  (device / "device").write_text("0x0062\n")  # a v5p chip
  env = {}
  assert platforms.choose_platforms(env, str(tmp_path), plugins=[]) is None and env == {}


def test_cli_commands_print_no_libtpu_lines_on_a_cpu_host():
  """A user's shell: libtpu installed, JAX_PLATFORMS unset. Neither a command that runs JAX on
  this host nor an AOT plan for a TPU slice (which loads libtpu's compiler) prints its errors."""
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS",)}
  for args in (["peak", "--size=64"],
               ["plan", "--gin_file=gin_configs/tiny.gin", "--topology=v5e-1"]):
    proc = subprocess.run([sys.executable, "-m", "pretrainx", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    noise = [line for line in proc.stderr.splitlines()
             if any(w in line for w in ("TPU", "libtpu", "E0000", "InitGoogle", "Source Location"))]
    assert not noise, f"pretrainx {args[0]} printed libtpu's lines:\n" + "\n".join(noise)
