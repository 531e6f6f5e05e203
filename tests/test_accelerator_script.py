"""bench/accelerator.sh --dry: the GPU check's own code at tiny shapes on CPU, so the script that
runs on an H200 stays working without one."""

import subprocess
import sys

import pytest

from conftest import REPO, subprocess_env


@pytest.mark.slow
def test_accelerator_script_dry_run_reports_every_section():
  # Not the suite's 8 fake devices (the script reports on the one device it finds), but its LLVM
  # optimisation level 0 (conftest.py): the same HLO, compiled in a third of the time (78 s -> 27 s;
  # the interpret-mode kernels are large graphs).
  env = subprocess_env()
  out = subprocess.run(["bash", "bench/accelerator.sh", "--dry"], cwd=REPO, capture_output=True,
                       text=True, timeout=600, env={**env, "PYTHON": sys.executable})
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
  text = out.stdout
  assert text.startswith("device: cpu (cpu), jax ")
  for kernel in ("flash", "flash (window 32)", "linear", "hybrid"):
    for tensor in ("out", "dq", "dk", "dv"):
      assert f"| {kernel} | {tensor} | " in text
  assert "| NO |" not in text
  assert "| b=1 s=256 h=4 d=64 bf16 causal, vs xla | " in text
  assert "| tiny | " in text and "% |" in text
