"""The Makefile's choice of interpreter: jax >= 0.11 needs Python >= 3.12, so `make` takes the
first 3.12 or newer it finds (pyenv's included) and stops with one line when there is none.
Dry runs (`make -n`) in an empty directory: nothing is installed."""

import os
import subprocess
import sys

from conftest import REPO


def _make(tmp_path, path_dirs, home):
  env = {"PATH": os.pathsep.join(map(str, path_dirs)), "HOME": str(home)}
  return subprocess.run(["make", "-n", "-f", os.path.join(REPO, "Makefile"), "install"],
                        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)


def _bin(tmp_path, **links):
  """A PATH directory holding `make`, `sh`, `ls` and the named interpreters."""
  d = tmp_path / "bin"
  d.mkdir(exist_ok=True)
  for tool in ("make", "sh", "ls", "test", "touch"):
    os.symlink(subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True,
                              text=True, check=True).stdout.strip(), d / tool)
  for name, target in links.items():
    os.symlink(target, d / name)
  return d


def test_make_takes_a_python_that_is_3_12_or_newer(tmp_path):
  for name in ("pyproject.toml", "requirements"):
    os.symlink(os.path.join(REPO, name), tmp_path / name)
  old = "/usr/bin/python3.11" if os.path.exists("/usr/bin/python3.11") else None
  links = {"python3.12": sys.executable} | ({"python3": old} if old else {})
  out = _make(tmp_path, [_bin(tmp_path, **links)], tmp_path)
  assert out.returncode == 0, out.stderr
  # the 3.12 interpreter makes the venv, not python3 (3.11)
  assert f"{tmp_path}/bin/python3.12 -m venv .venv" in out.stdout


def test_make_without_python_3_12_says_so_in_one_line(tmp_path):
  for name in ("pyproject.toml", "requirements"):
    os.symlink(os.path.join(REPO, name), tmp_path / name)
  links = {"python3": "/usr/bin/python3.11"} if os.path.exists("/usr/bin/python3.11") else {}
  bin_dir = _bin(tmp_path, **links)
  env = {"PATH": str(bin_dir), "HOME": str(tmp_path)}  # no pyenv under this HOME
  out = subprocess.run(["make", "-f", os.path.join(REPO, "Makefile"), "install"], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=60)
  assert out.returncode == 2
  assert ("make: pretrainx needs Python >= 3.12 (jax >= 0.11 requires it) and found none: "
          "install python3.12, or name one with make PYTHON=/path/to/python3.12") in out.stdout
  assert not (tmp_path / ".venv").exists()
