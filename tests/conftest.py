"""Test setup: 8 fake CPU devices (set before jax is imported) and tiny experiments."""

import os
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Token stores (the embedded corpus is tokenized on first use) go to a fresh directory per test
# process, never to the user's ~/.cache.
os.environ["PRETRAINX_DATA_DIR"] = tempfile.mkdtemp(prefix="pretrainx-test-stores-")

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_experiment(run_dir, **sections):
  """The tiny gin preset as an Experiment, quiet, in `run_dir`, with section overrides."""
  from pretrainx.config import parse_gin

  exp = parse_gin([os.path.join(REPO, "gin_configs/tiny.gin")])
  run = {"run_dir": str(run_dir), "progress_bar": False, "peak_tflops": 1.0,
         **sections.pop("run", {})}
  return exp.replace(run=run, **sections)


@pytest.fixture
def tiny_exp(tmp_path):
  return lambda **sections: tiny_experiment(tmp_path / "run", **sections)
