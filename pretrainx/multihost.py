"""Joining a multi-process job: explicit --num_processes/--coordinator_address flags, or a
multi-host Cloud TPU slice found from its environment (no flags: jax.distributed finds the rest).
Detection reads environment variables first and asks the GCE metadata server only on a TPU VM.
"""

from __future__ import annotations

import importlib.util
import os
import re
import urllib.error
import urllib.request
from typing import Callable, Mapping

from absl import logging

from pretrainx.platforms import tpu_chips_attached

# What JAX's own TPU cluster detection reads (jax/_src/clusters/cloud_tpu_cluster.py): on GKE the
# worker list comes from TPU_PROCESS_ADDRESSES or TPU_WORKER_HOSTNAMES (that order); on a GCE TPU
# VM from the metadata attributes below; multislice adds MEGASCALE_NUM_SLICES (env or tpu-env).
HOSTNAME_VARS = ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES")
METADATA_PATH = "/computeMetadata/v1/instance/attributes/"
DEFAULT_METADATA_HOST = "metadata.google.internal"
METADATA_TIMEOUT_S = 2.0
OPT_OUT_VAR = "PRETRAINX_NO_DISTRIBUTED"

# Chips one host of a generation holds (more means a multi-host slice, whose hosts hold 4 each).
HOST_CHIPS = {"v2": 4, "v3": 4, "v4": 4, "v5p": 4, "v5e": 8, "v6e": 8}
CHIPS_PER_MULTIHOST_HOST = 4



def _slice_hosts(accelerator_type: str) -> int | None:
  """Hosts of the slice `accelerator_type` names (v5p-16 -> 2, v5e-8 -> 1); None if unknown."""
  from pretrainx import topology  # pylint: disable=import-outside-toplevel  # (no jax import)

  name = accelerator_type.strip().lower()
  old = re.fullmatch(r"(v[23])-(\d+)", name)  # v2/v3: the number counts cores, 2 a chip
  try:
    if old:
      gen, chips = old.group(1), int(old.group(2)) // 2
    else:
      gen, grid = topology.parse(name)
      chips = 1
      for g in grid:
        chips *= g
  except ValueError:
    logging.info("Accelerator type %r is not one pretrainx knows; ignoring it.", accelerator_type)
    return None
  if chips <= HOST_CHIPS[gen]:
    return 1
  return max(chips // CHIPS_PER_MULTIHOST_HOST, 2)


def _int_or_none(value: str | None, what: str) -> int | None:
  if value is None or not value.strip():
    return None
  try:
    return int(value.strip().strip("'\""))
  except ValueError:
    logging.warning("Ignoring %s=%r (not an integer).", what, value)
    return None


def _describe(hosts: int | None, slices: int | None, accelerator_type: str | None,
              source: str) -> str | None:
  """A multi-host description, or None when the numbers say one host."""
  hosts, slices = hosts or 1, slices or 1
  accel = f" {accelerator_type}" if accelerator_type else ""
  if slices > 1:
    each = f" of {hosts} hosts each" if hosts > 1 else ""
    return f"{slices} TPU slices{accel}{each} ({source})"
  if hosts > 1:
    return f"TPU slice{accel} with {hosts} hosts ({source})"
  return None


def _from_environment(environ: Mapping[str, str]) -> tuple[bool, str | None]:
  """(whether any topology variable is set, the multi-host description they give or None)."""
  accel = environ.get("TPU_ACCELERATOR_TYPE", "").strip() or None
  slices = _int_or_none(environ.get("MEGASCALE_NUM_SLICES"), "MEGASCALE_NUM_SLICES")
  hosts, sources = None, []
  for var in HOSTNAME_VARS:
    if environ.get(var, "").strip():
      hosts = len([h for h in environ[var].split(",") if h.strip()])
      sources.append(var)
      break
  if hosts is None and accel:  # the worker list, where given, outranks the slice name
    hosts = _slice_hosts(accel)  # None for a name we cannot read: as if unset
    if hosts:
      sources.append("TPU_ACCELERATOR_TYPE")
  spoke = hosts is not None or slices is not None
  if slices and slices > 1:
    sources.append("MEGASCALE_NUM_SLICES")
  return spoke, _describe(hosts, slices, accel, ", ".join(sources))


def _libtpu_present(environ: Mapping[str, str]) -> bool:
  path = environ.get("TPU_LIBRARY_PATH")
  if path and os.path.isfile(path):
    return True
  return importlib.util.find_spec("libtpu") is not None


def looks_like_tpu_vm(environ: Mapping[str, str] = os.environ, root: str = "/") -> bool:
  """Whether JAX would run on a Cloud TPU here: libtpu installed and TPU chips attached (or, with
  libtpu, a GCE metadata server named in the environment)."""
  if not _libtpu_present(environ):
    return False
  hint = environ.get("GCE_METADATA_HOST") or environ.get("GCE_METADATA_IP")
  return bool(hint) or tpu_chips_attached(root) > 0


def metadata_host_from(environ: Mapping[str, str]) -> str:
  # JAX's get_metadata reads GCE_METADATA_IP; google-auth reads GCE_METADATA_HOST.
  return (environ.get("GCE_METADATA_IP") or environ.get("GCE_METADATA_HOST")
          or DEFAULT_METADATA_HOST)


def _metadata(host: str, key: str, timeout_s: float) -> str | None:
  """The instance attribute `key` from the metadata server at `host`, or None on any failure."""
  base = host if "://" in host else f"http://{host}"
  request = urllib.request.Request(base.rstrip("/") + METADATA_PATH + key,
                                   headers={"Metadata-Flavor": "Google"})
  opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
  try:
    with opener.open(request, timeout=timeout_s) as response:
      return response.read().decode("utf-8", "replace").strip()
  except (urllib.error.URLError, OSError, ValueError) as err:  # HTTPError is a URLError
    logging.info("GCE metadata %s from %s: %s", key, host, err)
    return None


def _from_metadata(host: str, timeout_s: float) -> str | None:
  endpoints = _metadata(host, "worker-network-endpoints", timeout_s)
  if endpoints is None:
    return None
  hosts = len([e for e in endpoints.split(",") if e.strip()])
  accel = _metadata(host, "accelerator-type", timeout_s)
  sources, slices = ["GCE metadata worker-network-endpoints"], None
  tpu_env = _metadata(host, "tpu-env", timeout_s) or ""  # lines like MEGASCALE_NUM_SLICES: '2'
  for line in tpu_env.splitlines():
    key, _, value = line.partition(":")
    if key.strip() == "MEGASCALE_NUM_SLICES":
      slices = _int_or_none(value, "tpu-env MEGASCALE_NUM_SLICES")
  if slices and slices > 1:
    sources.append("tpu-env MEGASCALE_NUM_SLICES")
  return _describe(hosts, slices, accel or None, ", ".join(sources))


def multihost_tpu_environment(environ: Mapping[str, str] = os.environ, *,
                              probe: Callable[[Mapping[str, str]], bool] = looks_like_tpu_vm,
                              metadata_host: str | None = None,
                              timeout_s: float = METADATA_TIMEOUT_S) -> str | None:
  """A description of the multi-host TPU slice (or multislice) this process runs in, or None.

  Imports no jax. Environment variables decide when any is set (more than one host in
  TPU_PROCESS_ADDRESSES / TPU_WORKER_HOSTNAMES, MEGASCALE_NUM_SLICES > 1, or a TPU_ACCELERATOR_TYPE
  larger than one host). Only when they are silent, `probe(environ)` says this is a TPU VM and
  TPU_SKIP_MDS_QUERY is unset is the GCE metadata server (`metadata_host`, else GCE_METADATA_IP /
  GCE_METADATA_HOST, else metadata.google.internal) asked, within `timeout_s` a request.
  """
  spoke, found = _from_environment(environ)
  if spoke:
    return found
  if environ.get("TPU_SKIP_MDS_QUERY") is not None or not probe(environ):
    return None
  return _from_metadata(metadata_host or metadata_host_from(environ), timeout_s)


def _opted_out(environ: Mapping[str, str]) -> bool:
  return environ.get(OPT_OUT_VAR, "").strip().lower() not in ("", "0", "false", "no")


def initialize(coordinator_address: str | None, num_processes: int, process_id: int,
               environ: Mapping[str, str] = os.environ, detect: bool = True) -> str:
  """Joins the jax.distributed job the flags describe, or the multi-host TPU slice found here;
  returns one line saying what it did. Imports jax only when it joins (XLA flags come first).

  Explicit flags (num_processes > 1) always win; PRETRAINX_NO_DISTRIBUTED=1 (or `detect` False,
  for commands that never run JAX across hosts) turns off only the automatic TPU join.
  """
  if num_processes > 1:
    if not coordinator_address:
      raise ValueError("--num_processes > 1 needs --coordinator_address=HOST:PORT of process 0.")
    if not 0 <= process_id < num_processes:
      raise ValueError(f"--process_id={process_id} must lie in [0, {num_processes}).")
    import jax  # pylint: disable=import-outside-toplevel

    # CPU collectives across processes go through gloo (only the CPU backend reads this option;
    # asking for the backend here would initialise it too early).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
    if jax.default_backend() == "cpu" and jax.config.jax_enable_compilation_cache:
      # jax 0.12 on CPU: a step loaded from the persistent compilation cache (a second run of
      # the same config with JAX_COMPILATION_CACHE_DIR set) waits forever in its first
      # cross-process collective, so CPU processes compile afresh.
      jax.config.update("jax_enable_compilation_cache", False)
      logging.info("multi-process CPU run: the persistent compilation cache is off (its "
                   "executables deadlock in gloo collectives).")
    return f"joined {coordinator_address} as process {process_id} of {num_processes}"
  if not detect:
    return "single process"
  if _opted_out(environ):
    return f"single process ({OPT_OUT_VAR} is set)"
  found = multihost_tpu_environment(environ)
  if found is None:
    return "single process"
  logging.info("Multi-host TPU: %s; joining with jax.distributed.initialize() (set %s=1 to run "
               "this host alone).", found, OPT_OUT_VAR)
  import jax  # pylint: disable=import-outside-toplevel

  jax.distributed.initialize()  # JAX finds the coordinator, process count and id itself
  return f"joined the {found} as process {jax.process_index()} of {jax.process_count()}"
