"""The core (train loop, model, CLI) imports without TensorFlow or seqio."""

import subprocess
import sys


def test_core_imports_without_tensorflow():
  code = ("import sys, pretrainx.cli, pretrainx.train.loop, pretrainx.model, pretrainx.config;"
          "bad = [m for m in ('tensorflow', 'seqio') if m in sys.modules];"
          "assert not bad, bad")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
  assert out.returncode == 0, out.stderr
