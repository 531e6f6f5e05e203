"""The Makefile's choice of interpreter: jax >= 0.11 needs Python >= 3.12, so `make` takes the
first 3.12 or newer it finds (pyenv's included) and stops with one line when there is none.
In an empty directory: the first is a dry run (`make -n`), the second stops before installing."""

import os
import subprocess
import sys

from conftest import REPO


def _make(tmp_path, bin_dir, *flags):
  """`make [flags] install` in tmp_path (pyproject.toml and the lock linked in) with only bin_dir
  on PATH and tmp_path as HOME, so no pyenv is found."""
  for name in ("pyproject.toml", "requirements"):
    os.symlink(os.path.join(REPO, name), tmp_path / name)
  env = {"PATH": str(bin_dir), "HOME": str(tmp_path)}
  return subprocess.run(["make", *flags, "-f", os.path.join(REPO, "Makefile"), "install"],
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
  old = "/usr/bin/python3.11" if os.path.exists("/usr/bin/python3.11") else None
  links = {"python3.12": sys.executable} | ({"python3": old} if old else {})
  out = _make(tmp_path, _bin(tmp_path, **links), "-n")
  assert out.returncode == 0, out.stderr
  # the 3.12 interpreter makes the venv, not python3 (3.11)
  assert f"{tmp_path}/bin/python3.12 -m venv .venv" in out.stdout


def test_make_without_python_3_12_says_so_in_one_line(tmp_path):
  links = {"python3": "/usr/bin/python3.11"} if os.path.exists("/usr/bin/python3.11") else {}
  out = _make(tmp_path, _bin(tmp_path, **links))
  assert out.returncode == 2
  assert ("make: pretrainx needs Python >= 3.12 (jax >= 0.11 requires it) and found none: "
          "install python3.12, or name one with make PYTHON=/path/to/python3.12") in out.stdout
  assert not (tmp_path / ".venv").exists()
