"""pretrainx.multihost: multi-host TPU detection from faked environments and a real metadata server
on 127.0.0.1, and `initialize` with jax.distributed.initialize replaced by a recorder.
"""

import http.server
import socket
import threading
import time

import pytest

from pretrainx import multihost

ON_TPU_VM = lambda environ: True  # noqa: E731
NOT_TPU_VM = lambda environ: False  # noqa: E731


# -- environment variables --


@pytest.mark.parametrize("var", ["TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES"])
def test_worker_list_with_two_hosts_is_multihost(var):
  found = multihost.multihost_tpu_environment({var: "t1k-w-0,t1k-w-1"}, probe=NOT_TPU_VM)
  assert found == f"TPU slice with 2 hosts ({var})"


def test_worker_list_names_the_accelerator_type():
  env = {"TPU_WORKER_HOSTNAMES": "a,b,c,d", "TPU_WORKER_ID": "1",
         "TPU_ACCELERATOR_TYPE": "v5litepod-16"}
  assert (multihost.multihost_tpu_environment(env, probe=NOT_TPU_VM)
          == "TPU slice v5litepod-16 with 4 hosts (TPU_WORKER_HOSTNAMES)")


def test_single_host_worker_list_is_not_multihost_and_asks_no_metadata(metadata_server):
  server = metadata_server(endpoints="a,b")
  env = {"TPU_WORKER_HOSTNAMES": "localhost", "TPU_WORKER_ID": "0",
         "TPU_ACCELERATOR_TYPE": "v5p-16"}  # the worker list outranks the slice name
  assert multihost.multihost_tpu_environment(env, probe=ON_TPU_VM,
                                             metadata_host=server.host) is None
  assert server.requests == []


@pytest.mark.parametrize("slices, expected", [
    ("2", "2 TPU slices (MEGASCALE_NUM_SLICES)"),
    ("4", "4 TPU slices (MEGASCALE_NUM_SLICES)"),
    ("1", None),
])
def test_megascale_slices(slices, expected):
  env = {"MEGASCALE_NUM_SLICES": slices, "MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.2"}
  assert multihost.multihost_tpu_environment(env, probe=NOT_TPU_VM) == expected


def test_megascale_with_multihost_slices():
  env = {"MEGASCALE_NUM_SLICES": "2", "TPU_WORKER_HOSTNAMES": "a,b",
         "TPU_ACCELERATOR_TYPE": "v5p-16"}
  assert (multihost.multihost_tpu_environment(env, probe=NOT_TPU_VM)
          == "2 TPU slices v5p-16 of 2 hosts each (TPU_WORKER_HOSTNAMES, MEGASCALE_NUM_SLICES)")


@pytest.mark.parametrize("accelerator_type, hosts", [
    ("v5p-8", None), ("v5p-16", 2), ("v5p-256", 32), ("v4-8", None), ("v4-32", 4),
    ("v5e-1", None), ("v5e-8", None), ("v5e-16", 4), ("v5litepod-16", 4), ("v6e-8", None),
    ("v6e-256", 64), ("v3-8", None), ("v3-32", 4), ("v2-8", None),
])
def test_accelerator_type(accelerator_type, hosts):
  found = multihost.multihost_tpu_environment({"TPU_ACCELERATOR_TYPE": accelerator_type},
                                              probe=NOT_TPU_VM)
  if hosts is None:
    assert found is None
  else:
    assert found == f"TPU slice {accelerator_type} with {hosts} hosts (TPU_ACCELERATOR_TYPE)"


def test_unknown_accelerator_type_falls_through_to_metadata(metadata_server):
  server = metadata_server(endpoints="10.0.0.1,10.0.0.2", accelerator_type="tpu9z-16")
  found = multihost.multihost_tpu_environment({"TPU_ACCELERATOR_TYPE": "tpu9z-16"},
                                              probe=ON_TPU_VM, metadata_host=server.host)
  assert found == "TPU slice tpu9z-16 with 2 hosts (GCE metadata worker-network-endpoints)"


def test_nothing_on_this_cpu_machine_with_an_empty_env():
  start = time.monotonic()
  assert multihost.multihost_tpu_environment({}) is None
  assert not multihost.looks_like_tpu_vm({})  # no TPU chips and no metadata hint here
  assert time.monotonic() - start < 2.0


def _fake_root(tmp_path, device_id):
  pci = tmp_path / "sys/bus/pci/devices/0000:00:05.0"
  pci.mkdir(parents=True)
  (pci / "vendor").write_text("0x1ae0\n")
  (pci / "device").write_text(f"{device_id}\n")
  other = tmp_path / "sys/bus/pci/devices/0000:00:01.0"
  other.mkdir(parents=True)
  (other / "vendor").write_text("0x8086\n")
  (other / "device").write_text("0x0062\n")
  return str(tmp_path)


def test_tpu_vm_probe_reads_pci_devices_and_needs_libtpu(tmp_path):
  lib = tmp_path / "libtpu.so"
  lib.write_text("")
  with_lib = {"TPU_LIBRARY_PATH": str(lib)}
  tpu_root = _fake_root(tmp_path / "tpu", "0x0062")  # a v5p chip
  assert multihost.tpu_chips_attached(tpu_root) == 1
  assert multihost.looks_like_tpu_vm(with_lib, root=tpu_root)
  nic_root = _fake_root(tmp_path / "nic", "0x0001")  # a Google device that is no TPU
  assert multihost.tpu_chips_attached(nic_root) == 0
  assert not multihost.looks_like_tpu_vm(with_lib, root=nic_root)
  vfio_root = tmp_path / "vfio"
  (vfio_root / "dev/vfio/0").mkdir(parents=True)
  (vfio_root / "dev/vfio/vfio").mkdir()
  assert multihost.tpu_chips_attached(str(vfio_root)) == 1


def test_tpu_vm_probe_without_libtpu_is_false(tmp_path, monkeypatch):
  monkeypatch.setattr(multihost.importlib.util, "find_spec", lambda name: None)
  tpu_root = _fake_root(tmp_path, "0x0063")
  assert multihost.tpu_chips_attached(tpu_root) == 1
  assert not multihost.looks_like_tpu_vm({}, root=tpu_root)
  assert not multihost.looks_like_tpu_vm({"GCE_METADATA_HOST": "127.0.0.1:1"}, root=tpu_root)


# -- the GCE metadata server --


class _MetadataServer:
  """A tiny metadata server on 127.0.0.1: instance attributes, 403 without Metadata-Flavor."""

  def __init__(self, attributes):
    self.attributes, self.requests = attributes, []
    outer = self

    class Handler(http.server.BaseHTTPRequestHandler):
      def do_GET(self):  # noqa: N802
        outer.requests.append((self.path, self.headers.get("Metadata-Flavor")))
        prefix = "/computeMetadata/v1/instance/attributes/"
        value = outer.attributes.get(self.path[len(prefix):]) if self.path.startswith(
            prefix) else None
        if self.headers.get("Metadata-Flavor") != "Google":
          code, body = 403, b"Missing Metadata-Flavor:Google header."
        elif value is None:
          code, body = 404, b"not found"
        else:
          code, body = 200, value.encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

      def log_message(self, *args):
        pass

    self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.host = f"127.0.0.1:{self.httpd.server_address[1]}"
    self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,),
                                   daemon=True)
    self.thread.start()

  def keys(self):
    return [path.rsplit("/", 1)[-1] for path, _ in self.requests]

  def stop(self):
    self.httpd.shutdown()
    self.httpd.server_close()


@pytest.fixture
def metadata_server():
  servers = []

  def start(endpoints=None, accelerator_type=None, tpu_env=None):
    attributes = {"worker-network-endpoints": endpoints, "accelerator-type": accelerator_type,
                  "tpu-env": tpu_env, "agent-worker-number": "0"}
    servers.append(_MetadataServer({k: v for k, v in attributes.items() if v is not None}))
    return servers[-1]

  yield start
  for server in servers:
    server.stop()


@pytest.mark.parametrize("endpoints", [
    "10.130.0.7,10.130.0.8",  # the new format: addresses
    "t1v-n-0-w-0:0:10.130.0.7,t1v-n-0-w-1:1:10.130.0.8",  # the old: name:id:ip
])
def test_metadata_worker_endpoints_with_two_hosts(metadata_server, endpoints):
  server = metadata_server(endpoints=endpoints, accelerator_type="v5p-16")
  found = multihost.multihost_tpu_environment({}, probe=ON_TPU_VM, metadata_host=server.host)
  assert found == "TPU slice v5p-16 with 2 hosts (GCE metadata worker-network-endpoints)"
  assert server.keys()[:2] == ["worker-network-endpoints", "accelerator-type"]
  assert {flavor for _, flavor in server.requests} == {"Google"}


def test_metadata_single_worker_is_not_multihost(metadata_server):
  server = metadata_server(endpoints="10.130.0.7", accelerator_type="v5p-8")
  assert multihost.multihost_tpu_environment({}, probe=ON_TPU_VM,
                                             metadata_host=server.host) is None
  assert "worker-network-endpoints" in server.keys()


def test_metadata_tpu_env_multislice(metadata_server):
  server = metadata_server(endpoints="10.0.0.1", accelerator_type="v5litepod-8",
                           tpu_env="ACCELERATOR_TYPE: 'v5litepod-8'\nMEGASCALE_NUM_SLICES: '2'\n")
  found = multihost.multihost_tpu_environment({}, probe=ON_TPU_VM, metadata_host=server.host)
  assert found == ("2 TPU slices v5litepod-8 (GCE metadata worker-network-endpoints, "
                   "tpu-env MEGASCALE_NUM_SLICES)")


def test_metadata_host_comes_from_the_environment(metadata_server):
  server = metadata_server(endpoints="a,b,c,d")
  for var in ("GCE_METADATA_IP", "GCE_METADATA_HOST"):
    found = multihost.multihost_tpu_environment({var: server.host}, probe=ON_TPU_VM)
    assert found == "TPU slice with 4 hosts (GCE metadata worker-network-endpoints)"


def test_metadata_without_endpoints_is_none(metadata_server):
  server = metadata_server(accelerator_type="v5p-16")  # a GCE VM, but no TPU slice: 404
  assert multihost.multihost_tpu_environment({}, probe=ON_TPU_VM,
                                             metadata_host=server.host) is None
  assert server.keys() == ["worker-network-endpoints"]


def test_metadata_is_not_asked_off_a_tpu_vm_or_with_skip(metadata_server):
  server = metadata_server(endpoints="a,b")
  probed = []
  assert multihost.multihost_tpu_environment(
      {}, probe=lambda env: probed.append(env) or False, metadata_host=server.host) is None
  assert probed == [{}]
  assert multihost.multihost_tpu_environment({"TPU_SKIP_MDS_QUERY": "1"}, probe=ON_TPU_VM,
                                             metadata_host=server.host) is None
  assert server.requests == []


def test_unreachable_metadata_host_is_none_quickly():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    closed = f"127.0.0.1:{s.getsockname()[1]}"  # nothing listens once the socket closes
  start = time.monotonic()
  assert multihost.multihost_tpu_environment({}, probe=ON_TPU_VM, metadata_host=closed) is None
  assert time.monotonic() - start < 2.0


def test_silent_metadata_host_times_out():
  with socket.socket() as listener:  # accepts connections (backlog), never answers
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    host = f"127.0.0.1:{listener.getsockname()[1]}"
    start = time.monotonic()
    assert multihost.multihost_tpu_environment({}, probe=ON_TPU_VM, metadata_host=host,
                                               timeout_s=0.3) is None
    elapsed = time.monotonic() - start
  assert 0.25 < elapsed < 2.0


# -- initialize --


@pytest.fixture
def recorder(monkeypatch):
  """jax.distributed.initialize replaced by a recorder (the one boundary a CPU host cannot
  reach); the CPU collectives option restored afterwards."""
  import jax

  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **kw: calls.append((a, kw)))
  before = jax.config.jax_cpu_collectives_implementation
  yield calls
  jax.config.update("jax_cpu_collectives_implementation", before)


MULTIHOST_ENV = {"TPU_WORKER_HOSTNAMES": "w0,w1", "TPU_WORKER_ID": "0",
                 "TPU_ACCELERATOR_TYPE": "v5p-16"}


def test_initialize_joins_a_multihost_tpu_slice_with_no_arguments(recorder):
  did = multihost.initialize(None, 1, 0, environ=MULTIHOST_ENV)
  assert recorder == [((), {})]
  assert did.startswith("joined the TPU slice v5p-16 with 2 hosts (TPU_WORKER_HOSTNAMES) as "
                        "process ")


@pytest.mark.parametrize("value", ["1", "true"])
def test_initialize_opt_out_skips_the_join(recorder, value):
  env = {**MULTIHOST_ENV, "PRETRAINX_NO_DISTRIBUTED": value}
  did = multihost.initialize(None, 1, 0, environ=env)
  assert recorder == []
  assert did == "single process (PRETRAINX_NO_DISTRIBUTED is set)"


def test_initialize_opt_out_zero_still_joins(recorder):
  multihost.initialize(None, 1, 0, environ={**MULTIHOST_ENV, "PRETRAINX_NO_DISTRIBUTED": "0"})
  assert recorder == [((), {})]


def test_initialize_single_process_does_nothing(recorder):
  assert multihost.initialize(None, 1, 0, environ={}) == "single process"
  assert multihost.initialize(None, 1, 0, environ={"TPU_ACCELERATOR_TYPE": "v5e-8"}) == (
      "single process")
  assert recorder == []


def test_initialize_explicit_flags_pass_through(recorder):
  import jax

  did = multihost.initialize("10.0.0.2:1234", 2, 1,
                             environ={**MULTIHOST_ENV, "PRETRAINX_NO_DISTRIBUTED": "1"})
  assert recorder == [((), {"coordinator_address": "10.0.0.2:1234", "num_processes": 2,
                            "process_id": 1})]
  assert jax.config.jax_cpu_collectives_implementation == "gloo"
  assert did == "joined 10.0.0.2:1234 as process 1 of 2"


def test_initialize_needs_a_coordinator(recorder):
  with pytest.raises(ValueError, match=r"--num_processes > 1 needs --coordinator_address"):
    multihost.initialize(None, 2, 0, environ={})
  with pytest.raises(ValueError, match=r"--num_processes > 1 needs --coordinator_address"):
    multihost.initialize("", 2, 0, environ={})
  assert recorder == []


@pytest.mark.parametrize("process_id", [2, -1])
def test_initialize_rejects_a_process_id_out_of_range(recorder, process_id):
  with pytest.raises(ValueError, match=rf"--process_id={process_id} must lie in \[0, 2\)"):
    multihost.initialize("10.0.0.2:1234", 2, process_id, environ={})
  assert recorder == []


def test_cli_joins_the_slice_only_for_commands_that_run_across_hosts(monkeypatch):
  """On a faked multi-host TPU VM, train joins with no arguments; a Ray sweep driver, a dry run
  and data preparation stay single-process (joining would wait for the other hosts)."""
  import argparse

  import jax

  from pretrainx import cli

  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
  monkeypatch.setattr(jax, "process_index", lambda: 0)
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "10.0.0.1,10.0.0.2")
  monkeypatch.delenv("PRETRAINX_NO_DISTRIBUTED", raising=False)

  def joins(command, **flags):
    calls.clear()
    cli.initialize_distributed(argparse.Namespace(
        command=command, coordinator_address=None, num_processes=1, process_id=0, **flags))
    return calls == [((), {})]

  assert joins("train")
  assert joins("sweep", ray=None, dry_run=False)  # a grid point's process on one slice host
  assert not joins("sweep", ray="auto", dry_run=False)
  assert not joins("sweep", ray=None, dry_run=True)
  assert not joins("data")
  assert not joins("plan")
