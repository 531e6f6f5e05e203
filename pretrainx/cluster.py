"""Ray for the work around training: connect to a cluster (or start one here) and run functions
as tasks with declared resources and retries, or run the same functions in this process.

`data prepare --ray` and `sweep --ray` go through `run_tasks`; without a cluster it calls the
functions one after another here, so both paths run the same code. Ray is imported only here, and
only when a cluster is asked for.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
from typing import Any, Callable, Iterator, Sequence

from absl import logging

# Environment that tasks on other hosts need to reach the same storage (buckets, emulators) and
# behave as this process does; forwarded to every task of a job.
FORWARDED_ENV_PREFIXES = ("PRETRAINX_", "STORAGE_EMULATOR_HOST", "TENSORSTORE_", "AWS_",
                          "GOOGLE_", "EPATH_", "JAX_PLATFORMS", "HF_")
CONNECT_TIMEOUT_S = 5.0


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


def _forwarded_env() -> dict[str, str]:
  return {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES)}


def _check_reachable(address: str) -> None:
  """Fails fast, in one line, for an address nothing listens on (ray.init would retry long)."""
  hostport = address.split("://", 1)[-1]
  host, _, port = hostport.rpartition(":")
  if not host or not port.isdigit():
    raise ClusterError(f"--ray={address}: give HOST:PORT of a Ray head (e.g. 10.0.0.2:6379), "
                       "ray://HOST:10001, 'auto' for the cluster this machine belongs to, or no "
                       "address to start a local cluster.")
  try:
    with socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S):
      pass
  except OSError as err:
    raise ClusterError(f"cannot reach a Ray cluster at {address} ({err.strerror or err}): start "
                       "its head with `ray start --head` (launch/ray_tpu.sh head on TPU VMs), "
                       "check the address and firewall, or pass --ray without an address to "
                       "start a local cluster.") from None


def connect(address: str | None = "", num_cpus: int | None = None) -> Cluster:
  """Joins the Ray cluster at `address`, or starts a local one ('' or 'local').

  'auto' means $RAY_ADDRESS, else the cluster this machine runs (`ray start` here). `num_cpus`
  sizes a local cluster (default: every core). Calling it again in the same process reuses the
  connection.
  """
  try:
    import ray  # pylint: disable=import-outside-toplevel
  except ImportError as err:
    raise ClusterError("--ray needs Ray: pip install 'pretrainx[ray]' (or 'ray[default]').") \
        from err
  if not ray.is_initialized():
    runtime_env = {"env_vars": _forwarded_env()}
    address = (address or "").strip()
    if address in ("", "local"):
      kwargs: dict[str, Any] = {"num_cpus": num_cpus or os.cpu_count() or 1}
      address = None
    else:
      if address == "auto" and os.environ.get("RAY_ADDRESS"):
        address = os.environ["RAY_ADDRESS"]
      if address != "auto":
        _check_reachable(address)
      kwargs = {"address": address}
    try:
      ray.init(include_dashboard=False, runtime_env=runtime_env, log_to_driver=True,
               logging_level="WARNING", **kwargs)
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


def shutdown() -> None:
  """Leaves (and, for a local one, stops) the Ray cluster this process started or joined."""
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
  worker dies or it raises (any exception, or those of `retry_on`), at most `max_in_flight` at once; results come as tasks finish. In
  this process the calls run in order and an exception is yielded, not raised. Interrupting the
  caller (Ctrl-C) cancels the tasks still pending or running.
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
    while queue or pending:
      while queue and len(pending) < limit:
        i, item = queue.pop(0)
        pending[remote.remote(item)] = i
      ready, _ = ray.wait(list(pending), num_returns=1)
      for ref in ready:
        i = pending.pop(ref)
        try:
          yield i, ray.get(ref)
        except ray.exceptions.RayTaskError as err:
          yield i, err.as_instanceof_cause()
        except ray.exceptions.RayError as err:  # the worker or its node died past the retries
          yield i, RuntimeError(f"task {i} was lost: {str(err).splitlines()[0]}")
  except BaseException:
    cancel(pending)
    raise


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
