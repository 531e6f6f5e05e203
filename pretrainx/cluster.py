"""Ray for the work around training: connect to a cluster (or start one here) and run functions
as tasks with declared resources and retries, or run the same functions in this process.

`data prepare --ray` and `sweep --ray` go through `run_tasks`; without a cluster it calls the
functions one after another here, so both paths run the same code. Ray is imported only here, and
only when a cluster is asked for.

What a job carries: Ray keeps a job's runtime environment with the job and shows it to whoever can
see the cluster, so only variables that locate storage (endpoints, regions, emulator hosts) and
pretrainx's own settings travel with it, never credentials. Workers use their own credential
chain, as a TPU VM or a GKE node does (its service account, an instance profile, a credentials
file of its own); a local cluster started here inherits this process's environment.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from typing import Any, Callable, Iterator, Sequence

from absl import logging

# Environment that tasks on other hosts need to reach the same storage (buckets, emulators) and
# behave as this process does; forwarded to every task of a job: these names, and those starting
# with these prefixes (AWS_ENDPOINT_URL_S3 and the like)...
FORWARDED_ENV_NAMES = frozenset({"STORAGE_EMULATOR_HOST", "GOOGLE_CLOUD_PROJECT", "AWS_REGION",
                                 "AWS_DEFAULT_REGION", "JAX_PLATFORMS"})
FORWARDED_ENV_PREFIXES = ("PRETRAINX_", "TENSORSTORE_", "EPATH_", "HF_", "AWS_ENDPOINT_URL")
# ...but never a name that looks like a secret, whatever its prefix. Paths of credential files
# (GOOGLE_APPLICATION_CREDENTIALS, AWS_SHARED_CREDENTIALS_FILE) stay here too: a path on this
# machine locates nothing on another host, and one that is missing there breaks the worker's own
# credential chain (google-auth raises instead of asking the metadata server). Set them in the
# workers' environment (`ray start` passes its own on), where the file is.
SECRET_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSW|CREDENTIAL|AUTH|COOKIE|PRIVATE", re.IGNORECASE)
CONNECT_TIMEOUT_S = 5.0  # TCP connect, then Ray's handshake, each at most this long
# Every process of a local cluster started here carries this variable (its value names the
# cluster), so that a watchdog stops exactly those when this process ends, even by SIGKILL.
CLUSTER_TAG_ENV = "PRETRAINX_LOCAL_RAY_CLUSTER"
REAP_GRACE_S = 30.0  # SIGTERM, then SIGKILL for what is left this long after
RAY_GRACE_S = 3.0  # ...and for Ray's own processes this long after
WAIT_POLL_S = 0.5  # run_tasks looks at Ctrl-C at least this often while tasks run
_REAPERS: list = []
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
ADDRESS_HELP = ("give HOST:PORT of a Ray head's GCS (e.g. 10.0.0.2:6379, what `ray start --head` "
                "prints; not the dashboard's 8265), ray://HOST:10001 for Ray Client, 'auto' for "
                "the cluster this machine belongs to, or no address to start a local cluster")


class ClusterError(ValueError):
  """A Ray cluster that cannot be reached or started (the CLI's exit status 2)."""


@dataclasses.dataclass(frozen=True)
class Cluster:
  """Where tasks run: `address` None runs them in this process, one after another."""

  address: str | None = None
  num_cpus: float = 0.0  # the cluster's CPUs (0 in-process)

  @property
  def is_ray(self) -> bool:
    return self.address is not None

  def describe(self) -> str:
    if not self.is_ray:
      return "in this process"
    return f"Ray cluster {self.address} ({self.num_cpus:g} CPUs)"


IN_PROCESS = Cluster()


def forwarded_env(environ=None) -> dict[str, str]:
  """The variables every task of a job gets: what locates storage, never what looks secret."""
  environ = os.environ if environ is None else environ
  return {k: v for k, v in environ.items()
          if (k in FORWARDED_ENV_NAMES or k.startswith(FORWARDED_ENV_PREFIXES))
          and not SECRET_NAME.search(k) and k != CLUSTER_TAG_ENV}


def _host_port(address: str) -> tuple[str, int]:
  host, _, port = address.split("://", 1)[-1].rpartition(":")
  if not host or not port.isdigit():
    raise ClusterError(f"--ray={address}: {ADDRESS_HELP}.")
  return host.strip("[]"), int(port)


def _check_reachable(address: str) -> None:
  """Fails fast, in one line, for an address nothing listens on (ray.init would retry long)."""
  host, port = _host_port(address)
  try:
    with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
      pass
  except OSError as err:
    raise ClusterError(f"cannot reach a Ray cluster at {address} ({err.strerror or err}): start "
                       "its head with `ray start --head` (launch/ray_tpu.sh head on TPU VMs), "
                       "check the address and firewall, or pass --ray without an address to "
                       "start a local cluster.") from None


def _check_ray_head(address: str) -> None:
  """Fails in seconds, in one line, where something answers at `address` but not a Ray head
  that lets this machine in (an HTTP server, the dashboard, a head that wants a token): there
  ray.init retries for minutes (20 tries of 40 s), a warning a second.

  It asks the server for its cluster id, as ray.init does first: a Ray GCS answers; a Ray Client
  server (ray://) has no such method. The auth token goes along only where RAY_AUTH_MODE=token
  says so: like ray.init, this machine's token is never sent to an address unasked."""
  import grpc  # pylint: disable=import-outside-toplevel  (one of Ray's own dependencies)

  code = _ask_cluster_id(grpc, address, with_token=False)
  if code == grpc.StatusCode.UNAUTHENTICATED:
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
      raise ClusterError(f"the Ray cluster at {address} asks for its auth token: set "
                         "RAY_AUTH_MODE=token, and RAY_AUTH_TOKEN (or ~/.ray/auth_token) to the "
                         "head's token (`ray get-auth-token` on the head prints it).")
    code = _ask_cluster_id(grpc, address, with_token=True)
    if code == grpc.StatusCode.UNAUTHENTICATED:
      raise ClusterError(f"the Ray cluster at {address} refuses this machine's auth token: set "
                         "RAY_AUTH_TOKEN (or ~/.ray/auth_token) to the head's token (`ray "
                         "get-auth-token` on the head prints it).")
  if code is None or (address.startswith("ray://") and code == grpc.StatusCode.UNIMPLEMENTED):
    return
  why = {grpc.StatusCode.UNAVAILABLE: "it does not speak gRPC: a web server, or the dashboard?",
         grpc.StatusCode.UNIMPLEMENTED: "a gRPC server without Ray's GCS; ray://HOST:PORT for a "
                                        "Ray Client server",
         grpc.StatusCode.DEADLINE_EXCEEDED: f"no answer within {CONNECT_TIMEOUT_S:g} s"}.get(
             code, f"gRPC status {code.name}")
  raise ClusterError(f"{address} answers, but not as a Ray head ({why}); {ADDRESS_HELP}.")


def _ask_cluster_id(grpc, address: str, with_token: bool):
  """None if the server at `address` gives its Ray cluster id, else the gRPC status code."""
  from ray.core.generated import gcs_service_pb2 as pb  # pylint: disable=import-outside-toplevel
  from ray.core.generated import gcs_service_pb2_grpc as pb_grpc  # pylint: disable=C0415

  metadata = ()
  if with_token:
    from ray._raylet import AuthenticationTokenLoader  # pylint: disable=import-outside-toplevel

    metadata = tuple(AuthenticationTokenLoader.instance().get_token_for_http_header().items())
  host, port = _host_port(address)
  with grpc.insecure_channel(f"{host}:{port}") as channel:
    try:
      pb_grpc.NodeInfoGcsServiceStub(channel).GetClusterId(
          pb.GetClusterIdRequest(), timeout=CONNECT_TIMEOUT_S, metadata=metadata)
      return None
    except grpc.RpcError as err:
      return err.code()


def _resolve(address: str | None) -> str | None:
  """The address to join, or None to start a local cluster ('' or 'local')."""
  address = (address or "").strip()
  if address == "auto":
    address = os.environ.get("RAY_ADDRESS", "").strip() or _this_machines_cluster()
  return None if address in ("", "local") else address


def _this_machines_cluster() -> str:
  """The cluster `ray start` made this machine part of (Ray's own lookup, without its hint)."""
  from ray._private import services  # pylint: disable=import-outside-toplevel

  level = services.logger.level  # its warning on several clusters names an `--address` flag
  services.logger.setLevel("ERROR")
  try:
    return services.get_ray_address_from_environment("auto", None)
  except ConnectionError:
    raise ClusterError("--ray=auto: no Ray cluster runs on this machine and RAY_ADDRESS is "
                       "unset: start one with `ray start --head` (launch/ray_tpu.sh head on TPU "
                       "VMs), give --ray=HOST:PORT, or pass --ray without an address to start a "
                       "local cluster.") from None
  finally:
    services.logger.setLevel(level)


def _print_only_job_logs(ray_worker) -> None:
  """Keeps other processes' logs out of the driver's output. Ray's log monitor streams, besides
  the workers' output, every file of each node's logs/tpu_logs (libtpu's log folder, which Ray
  links there): XLA logs of any process on that host, 100+ lines a compile. Those lines carry no
  worker pid; workers', raylet's and the autoscaler's lines are printed as before."""
  print_fn = getattr(ray_worker, "print_to_stdstream", None)
  if print_fn is None or getattr(print_fn, "pretrainx_filter", False):
    return

  def print_to_stdstream(data, *args, **kwargs):
    if data.get("pid") is None and not data.get("job"):
      return
    print_fn(data, *args, **kwargs)

  print_to_stdstream.pretrainx_filter = True
  ray_worker.print_to_stdstream = print_to_stdstream  # what ray.init hands its log thread


def connect(address: str | None = "", num_cpus: int | None = None) -> Cluster:
  """Joins the Ray cluster at `address`, or starts a local one ('' or 'local').

  'auto' means $RAY_ADDRESS, else the cluster this machine runs (`ray start` here). `num_cpus`
  sizes a local cluster (default: every core). Calling it again in the same process reuses the
  connection. An address where no Ray head answers fails in seconds with one line. A local
  cluster stops when this process ends, however it ends (see `reap`).
  """
  try:
    import ray  # pylint: disable=import-outside-toplevel
    from ray._private import worker as ray_worker  # pylint: disable=import-outside-toplevel
  except ImportError as err:
    raise ClusterError("--ray needs Ray: pip install 'pretrainx[ray]' (or 'ray[default]').") \
        from err
  if not ray.is_initialized():
    address = _resolve(address)
    if address is not None:
      _check_reachable(address)
      _check_ray_head(address)
    if not sys.stderr.isatty():  # workers' lines without colour codes in logs and pipes
      os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    _print_only_job_logs(ray_worker)
    runtime_env = {"env_vars": forwarded_env()}
    try:
      if address is None:
        with _reaped_local_cluster():
          ray.init(num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False,
                   runtime_env=runtime_env, log_to_driver=True, logging_level="WARNING")
      else:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True,
                 logging_level="WARNING")
    except (ConnectionError, RuntimeError, ValueError) as err:
      where = address or "a new local cluster"
      raise ClusterError(f"cannot connect to Ray at {where}: {str(err).splitlines()[0]}; start "
                         "a head with `ray start --head` or pass --ray without an address.") \
          from None
  context = ray.get_runtime_context()
  cpus = float(ray.cluster_resources().get("CPU", 0.0))
  address = getattr(context, "gcs_address", None) or "local"
  logging.info("connected to Ray at %s with %g CPUs", address, cpus)
  return Cluster(address=address, num_cpus=cpus)


@contextlib.contextmanager
def _reaped_local_cluster():
  """While a local cluster starts: a watchdog process for it, and a tag in the environment that
  every process of the cluster inherits (GCS, raylet, agents, workers, what they start)."""
  tag = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
  reaper = subprocess.Popen(
      [sys.executable, "-c", "import sys; from pretrainx import cluster; cluster.reap(sys.argv[1])",
       tag], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, start_new_session=True)
  _REAPERS.append(reaper)  # its stdin stays open for as long as this process lives
  os.environ[CLUSTER_TAG_ENV] = tag
  try:
    yield
  finally:  # the cluster's processes have it; this process's other children need not
    os.environ.pop(CLUSTER_TAG_ENV, None)


def reap(tag: str, grace_s: float = REAP_GRACE_S) -> None:
  """The watchdog of a local cluster (`python -c ...cluster.reap(TAG)`). Waits until the process
  that started it ends (its stdin closes: a normal exit, an error or SIGKILL), then sends SIGTERM
  to every process still carrying CLUSTER_TAG_ENV=TAG, and SIGKILL to Ray's own (GCS, raylet,
  agents, workers: its agents wait a minute on the dead GCS) after RAY_GRACE_S and to the rest
  (the runs tasks started, writing their checkpoints) after `grace_s`. Other clusters' processes
  and every folder are left alone."""
  signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the driver, which then exits
  sys.stdin.buffer.read()
  procs = _tagged(tag)
  for pid in procs:
    with contextlib.suppress(OSError):
      os.kill(pid, signal.SIGTERM)
  for wait_s, ray_only in ((RAY_GRACE_S, True), (grace_s, False)):
    deadline = time.monotonic() + wait_s
    while True:
      procs.update(_tagged(tag))  # newcomers too; a process on its way out may hide its environ
      left = [pid for pid, (start, ray_own) in procs.items()
              if (ray_own or not ray_only) and _start_time(pid) == start]
      if not left or time.monotonic() > deadline:
        break
      time.sleep(0.2)
    for pid in left:
      with contextlib.suppress(OSError):
        os.kill(pid, signal.SIGKILL)


def _start_time(pid: int) -> int | None:
  """When a live process started (clock ticks after boot), None if it is gone or a zombie."""
  try:
    with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
      fields = f.read().rsplit(")", 1)[1].split()
  except OSError:
    return None
  return None if fields[0] in ("Z", "X") else int(fields[19])


def _tagged(tag: str) -> dict[int, tuple[int, bool]]:
  """{pid: (start time, whether it is one of Ray's own processes)} of this user's processes
  started with CLUSTER_TAG_ENV=tag in their environment."""
  needle = f"{CLUSTER_TAG_ENV}={tag}".encode()
  procs = {}
  for name in os.listdir("/proc"):
    if name.isdigit() and int(name) != os.getpid():
      try:
        with open(f"/proc/{name}/environ", "rb") as f:
          if needle not in f.read().split(b"\0"):
            continue
        with open(f"/proc/{name}/cmdline", "rb") as f:
          argv = f.read().split(b"\0")[:3]
      except OSError:  # gone, or another user's
        continue
      start = _start_time(int(name))
      if start is not None:
        procs[int(name)] = (start, argv[0].startswith(b"ray::") or
                            any(b"/ray/" in a for a in argv))
  return procs


def shutdown() -> None:
  """Leaves the Ray cluster this process joined; one it started here (`--ray` without an address)
  stops with its workers and agents. Other clusters on this machine, and their folders under
  /tmp/ray, are left alone."""
  if "ray" in sys.modules and sys.modules["ray"].is_initialized():
    sys.modules["ray"].shutdown()


@dataclasses.dataclass(frozen=True)
class Resources:
  """What one task asks the scheduler for."""

  num_cpus: float = 1.0
  custom: dict[str, float] = dataclasses.field(default_factory=dict)  # e.g. {'TPU': 4}

  def describe(self) -> str:
    parts = [f"{self.num_cpus:g} CPU"] + [f"{v:g} {k}" for k, v in sorted(self.custom.items())]
    return ", ".join(parts)


def run_tasks(cluster: Cluster, fn: Callable, items: Sequence[Any], *,
              resources: Resources = Resources(), max_retries: int = 2,
              retry_on: bool | tuple[type, ...] = True,
              max_in_flight: int | None = None) -> Iterator[tuple[int, Any]]:
  """Runs fn(item) for every item; yields (index, result or the exception it ended with).

  On a cluster each call is a Ray task with `resources`, retried up to `max_retries` times when its
  worker dies or it raises (any exception, or those of `retry_on`), at most `max_in_flight` at
  once; results come as tasks finish, and a task's exception is the one it raised (see
  `remote_cause`). In this process the calls run in order and an exception is yielded, not raised.
  Interrupting the caller (Ctrl-C) cancels the tasks still pending or running.
  """
  if not cluster.is_ray:
    for i, item in enumerate(items):
      try:
        yield i, fn(item)
      except Exception as err:  # pylint: disable=broad-except
        yield i, err
    return
  import ray  # pylint: disable=import-outside-toplevel

  remote = ray.remote(fn).options(num_cpus=resources.num_cpus,
                                  resources=dict(resources.custom) or None,
                                  max_retries=max_retries,
                                  retry_exceptions=retry_on if retry_on is True else list(retry_on))
  limit = max_in_flight or max(1, int(cluster.num_cpus // max(resources.num_cpus, 1e-9)))
  pending: dict[Any, int] = {}
  queue = list(enumerate(items))
  try:
    with _interrupt_as_flag() as interrupted:
      while queue or pending:
        while queue and len(pending) < limit:
          i, item = queue.pop(0)
          pending[remote.remote(item)] = i
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=WAIT_POLL_S)
        if interrupted.is_set():
          raise KeyboardInterrupt
        for ref in ready:
          i = pending.pop(ref)
          try:
            yield i, ray.get(ref)
          except ray.exceptions.RayTaskError as err:
            yield i, remote_cause(err, f"task {i}")
          except ray.exceptions.RayError as err:  # the worker or its node died past the retries
            yield i, RuntimeError(f"task {i} was lost: {str(err).splitlines()[0]}")
          if interrupted.is_set():
            raise KeyboardInterrupt
  except BaseException:
    cancel(pending)
    raise


@contextlib.contextmanager
def _interrupt_as_flag() -> Iterator[threading.Event]:
  """SIGINT sets the event instead of raising KeyboardInterrupt wherever the main thread is: one
  raised inside a finalizer or a callback of Ray's is swallowed ("Exception ignored in ..."), and
  Ctrl-C would be lost. The caller checks the event and raises itself. Elsewhere than the main
  thread, an event that is never set."""
  flag = threading.Event()
  if threading.current_thread() is not threading.main_thread():
    yield flag
    return
  previous = signal.signal(signal.SIGINT, lambda *_: flag.set())
  try:
    yield flag
  finally:
    signal.signal(signal.SIGINT, previous)


def remote_cause(err: BaseException, what: str = "a task") -> BaseException:
  """The exception a Ray task raised, as it would read raised here (its own type and one-line
  message), for a RayTaskError; Ray's remote traceback, colour codes and all, goes to the debug
  log only (PRETRAINX_VERBOSE=2 shows it)."""
  import ray  # pylint: disable=import-outside-toplevel

  while isinstance(err, ray.exceptions.RayTaskError):
    logging.debug("%s failed on Ray:\n%s", what, ANSI_ESCAPE.sub("", str(err)))
    cause = getattr(err, "cause", None)
    if not isinstance(cause, BaseException):
      cause = ray.exceptions.RayError(err.traceback_str or type(err).__name__)
    err = cause
  if isinstance(err, ray.exceptions.RayError):  # Ray's own: a lost object, an unpicklable cause
    lines = [l for l in ANSI_ESCAPE.sub("", str(err)).splitlines() if l.strip()]
    return RuntimeError(f"{what} failed on Ray: {lines[-1] if lines else type(err).__name__}")
  return err


def cancel(refs) -> None:
  """Cancels Ray tasks (each gets KeyboardInterrupt, so it can clean up) and waits briefly."""
  import ray  # pylint: disable=import-outside-toplevel

  refs = list(refs)
  if not ray.is_initialized():  # already shut down (at exit): its tasks went with it
    return
  for ref in refs:
    try:
      ray.cancel(ref, force=False)
    except Exception:  # pylint: disable=broad-except
      pass
  if refs:
    ray.wait(refs, num_returns=len(refs), timeout=10.0)
