"""The fast local checkpoint tier: every process saves its own shards to its host's disk or RAM,
checksums them, and copies one peer's (on another slice where there is one), so losing a host
loses no local state. Restore takes the newest step whose every process's shards are intact on
some live host, agreed by all processes; anything unfinished or corrupt is skipped with a warning.

Built from Orbax's emergency P2P parts (orbax.checkpoint.experimental.emergency.p2p):
LocalCheckpointManager writes and reads one process's shards, P2PNode serves a directory over TCP
and fetches a peer's step; `exchange` (Orbax's sync_global_data, from host arrays) shares what
each process holds. Layout, per host:
       LOCAL_DIR/<run>/process_<i>/own/<step>/            this process's shards (Orbax's layout)
       LOCAL_DIR/<run>/process_<i>/replica_of_<p>/<step>/ process p's, copied after each save
Every complete step ends with CHECKSUMS (the size and CRC32 of each file), written last.
"""

from __future__ import annotations

import hashlib
import json
import logging as py_logging
import os
import re
import shutil
import threading
import time
import zlib
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint.experimental.emergency.p2p import args as p2p_args
from orbax.checkpoint.experimental.emergency.p2p import constants as p2p_constants
from orbax.checkpoint.experimental.emergency.p2p import local as p2p_local
from orbax.checkpoint.experimental.emergency.p2p import options as p2p_options
from orbax.checkpoint.experimental.emergency.p2p import service as p2p_service

from pretrainx import faults
from pretrainx.checkpoint.persistent import check_finite_arrays, shape_mismatches
from pretrainx.config import CheckpointConfig
from pretrainx.sharding import device_slices

CHECKSUMS = "CHECKSUMS"
COMMIT_MARKER = "commit_success.txt"
PEER_TIMEOUT_S = 300  # how long a replication waits for its peer's save or copy
_CHUNK = 16 << 20


def run_key(run_dir: str) -> str:
  """The run's directory name under local_dir: readable, and unique per run directory."""
  name = re.sub(r"[^A-Za-z0-9_.-]", "_", run_dir.rstrip("/").rsplit("/", 1)[-1]) or "run"
  return f"{name}-{hashlib.sha256(run_dir.encode()).hexdigest()[:8]}"


def keepers(process_slices: list[int]) -> dict[int, int]:
  """Process -> the peer that keeps a copy of its local checkpoints: the process at the same place
  in the next slice (slices of equal size), else the next process; {} for a single process."""
  count = len(process_slices)
  if count < 2:
    return {}
  groups: dict[int, list[int]] = {}
  for process, s in enumerate(process_slices):
    groups.setdefault(s, []).append(process)
  order = [groups[s] for s in sorted(groups)]
  if len(order) > 1 and len({len(g) for g in order}) == 1:
    return {p: order[(k + 1) % len(order)][i] for k, g in enumerate(order) for i, p in enumerate(g)}
  return {p: (p + 1) % count for p in range(count)}


def process_slices() -> list[int]:
  """The slice of each process (sharding.device_slices: TPU slices, else one per process)."""
  devices = jax.devices()
  slices, _ = device_slices(devices)
  by_process: dict[int, int] = {}
  for d, s in zip(devices, slices):
    by_process.setdefault(d.process_index, s)
  return [by_process[p] for p in range(jax.process_count())]


# -- checksums ---------------------------------------------------------------------------------


def _files(step_dir: str) -> list[str]:
  out = []
  for root, _, names in os.walk(step_dir):
    out.extend(os.path.relpath(os.path.join(root, n), step_dir) for n in names)
  return sorted(f for f in out if f != CHECKSUMS)


def _crc(path: str) -> int:
  crc = 0
  with open(path, "rb") as f:
    while chunk := f.read(_CHUNK):
      crc = zlib.crc32(chunk, crc)
  return crc


def write_checksums(step_dir: str) -> None:
  """CHECKSUMS of a finalised step, written through a temporary file: its presence marks the
  step complete."""
  sums = {f: [os.path.getsize(os.path.join(step_dir, f)), _crc(os.path.join(step_dir, f))]
          for f in _files(step_dir)}
  tmp = os.path.join(step_dir, CHECKSUMS + ".tmp")
  with open(tmp, "w") as f:
    json.dump(sums, f)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, os.path.join(step_dir, CHECKSUMS))


def step_problem(step_dir: str) -> str | None:
  """Why a local step cannot be used (unfinished, files missing, changed or added), or None."""
  if not os.path.isfile(os.path.join(step_dir, COMMIT_MARKER)):
    return "never finalised"
  try:
    with open(os.path.join(step_dir, CHECKSUMS)) as f:
      sums = json.load(f)
  except FileNotFoundError:
    return "no CHECKSUMS (the save or copy did not finish)"
  except (OSError, ValueError) as err:
    return f"unreadable CHECKSUMS ({err})"
  found = set(_files(step_dir))
  if found != set(sums):
    missing, extra = sorted(set(sums) - found), sorted(found - set(sums))
    return f"files missing {missing[:3]} or unexpected {extra[:3]}"
  for name, (size, crc) in sums.items():
    path = os.path.join(step_dir, name)
    if os.path.getsize(path) != size or _crc(path) != crc:
      return f"{name} differs from its checksum"
  return None


def _steps_in(directory: str) -> list[int]:
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def _move_aside(step_dir: str, why: str, what: str) -> None:
  target = f"{os.path.dirname(step_dir)}/corrupt-{os.path.basename(step_dir)}-{int(time.time())}"
  logging.warning("%s %s is unusable (%s); skipped it and moved it to %s", what, step_dir, why,
                  target)
  try:
    os.replace(step_dir, target)
  except OSError:
    shutil.rmtree(step_dir, ignore_errors=True)


# -- choosing a step ---------------------------------------------------------------------------


def holders_by_step(infos: list[dict[str, Any]], count: int) -> dict[int, dict[int, list]]:
  """step -> process -> [(holder, 'own' | 'replica')], from every process's inventory."""
  out: dict[int, dict[int, list]] = {}
  for info in infos:
    holder = info["process"]
    for step in info["own"]:
      out.setdefault(step, {}).setdefault(holder, []).append((holder, "own"))
    for owner, steps in info["replicas"].items():
      for step in steps:
        out.setdefault(step, {}).setdefault(int(owner), []).append((holder, "replica"))
  return {s: by for s, by in out.items() if len(by) == count}


def complete_steps(infos: list[dict[str, Any]], count: int) -> list[int]:
  """Steps whose every process's shards are held (own or replica) by a live process, newest
  first."""
  return sorted(holders_by_step(infos, count), reverse=True)


class LocalTier:
  """One process's local checkpoints and the replica of its peer's (all processes make one)."""

  def __init__(self, cfg: CheckpointConfig, run_dir: str, mesh: jax.sharding.Mesh):
    self.cfg, self.mesh = cfg, mesh
    self.process, self.count = jax.process_index(), jax.process_count()
    self.home = os.path.join(os.path.abspath(cfg.local_dir), run_key(run_dir),
                             f"process_{self.process}")
    self.own_dir = os.path.join(self.home, "own")
    self.topology = {"processes": self.count, "mesh": dict(mesh.shape)}
    keep = {} if cfg.local_replicas == 0 else keepers(process_slices())
    self.keeper = keep.get(self.process)
    self.ward = next((p for p, k in keep.items() if k == self.process), None)
    self.replica_dir = (os.path.join(self.home, f"replica_of_{self.ward}")
                        if self.ward is not None else None)
    for d in (self.own_dir, self.replica_dir):
      if d:
        os.makedirs(d, exist_ok=True)
        _remove_unfinished(d)
    options = p2p_options.CheckpointManagerOptions(local=p2p_options.LocalCheckpointOptions(
        save_interval_steps=cfg.local_every_steps, max_to_keep=cfg.local_keep))
    self._mngr = p2p_local.LocalCheckpointManager(self.own_dir, mesh, options=options)
    # Orbax's P2P file servers (TCP, on every interface, no authentication: for a pod's private
    # network): one for this process's steps (its keeper copies them; it fetches them back) and
    # one for its ward's copies. Only where there are peers.
    self._own_node = self._replica_node = None
    if self.keeper is not None:
      self._own_node = p2p_service.P2PNode(self.own_dir)
      self._own_node.start()
    if self.replica_dir:
      self._replica_node = p2p_service.P2PNode(self.replica_dir)
      self._replica_node.start()
    self.addresses = {int(a["process"]): a for a in exchange({
        "process": self.process, "ip": self._own_node.ip if self._own_node else None,
        "own_port": self._own_node.port if self._own_node else None,
        "replica_port": self._replica_node.port if self._replica_node else None})}
    _quiet_orbax_local_warnings()
    if self.count > 1 and self.keeper is None:
      logging.warning("the local checkpoint tier keeps no peer replica "
                      "(CheckpointConfig.local_replicas=0): a lost host falls back to the "
                      "persistent tier")
    self._thread: threading.Thread | None = None
    self._error: BaseException | None = None
    self._saves = 0  # saves made by this attempt, the same count on every process
    self._old_keys: list[list[str]] = []  # key-value store keys of earlier saves, to delete

  # -- saving -----------------------------------------------------------------------------------

  def due(self, step: int) -> bool:
    return step > 0 and step % self.cfg.local_every_steps == 0

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> str:
    """Starts the local save of `step` (all processes); returns once the arrays are copied to the
    host. The files, checksums and the peer's copy are finished in the background."""
    self.wait()
    if os.path.isdir(self.step_path(step)):  # on disk already: the state was restored from it
      return self.step_path(step)
    self._mngr.save(step, args=p2p_args.Composite(state=ocp.args.PyTreeSave(state)),
                    custom_metadata={**meta, "topology": self.topology}, force=True)
    faults.maybe_kill("local_save", step)
    self._saves += 1
    self._thread = threading.Thread(target=self._finish, args=(step, self._saves),
                                    name=f"local-checkpoint-{step}", daemon=True)
    self._thread.start()
    return self.step_path(step)

  def _finish(self, step: int, seq: int) -> None:
    try:
      self._mngr.wait_until_finished()
      step_dir = self.step_path(step)
      if not os.path.isfile(os.path.join(step_dir, COMMIT_MARKER)):
        raise OSError(f"local checkpoint {step_dir} was not finalised")
      write_checksums(step_dir)
      self._replicate(step, seq)
      self._prune_replicas()
    except BaseException as err:  # pylint: disable=broad-except
      self._error = err

  def _replicate(self, step: int, seq: int) -> None:
    """Tells the peers this step is saved, copies the ward's, and waits until the keeper holds a
    copy of this process's (so `wait` returns with the step safe on two hosts)."""
    client = _kv_client()
    if client is None or (self.ward is None and self.keeper is None):
      return
    key = f"pretrainx/local/{seq}/{step}"
    client.key_value_set(f"{key}/saved/{self.process}", "1")
    # The keys this process set two saves ago: every process has passed its next save since (the
    # train steps between are collectives), which first joined the thread that read them.
    if len(self._old_keys) >= 2:
      for old in self._old_keys.pop(0):
        client.key_value_delete(old)
    self._old_keys.append([f"{key}/saved/{self.process}"] +
                          ([f"{key}/copied/{self.ward}"] if self.ward is not None else []))
    if self.ward is not None:
      try:
        client.blocking_key_value_get(f"{key}/saved/{self.ward}", PEER_TIMEOUT_S * 1000)
        self._copy_from_ward(step)
        client.key_value_set(f"{key}/copied/{self.ward}", "1")
      except Exception as err:  # pylint: disable=broad-except
        logging.warning("local checkpoint %d of process %d was not copied here: %s", step,
                        self.ward, err)
    if self.keeper is not None:
      try:
        client.blocking_key_value_get(f"{key}/copied/{self.process}", PEER_TIMEOUT_S * 1000)
      except Exception as err:  # pylint: disable=broad-except
        logging.warning("local checkpoint %d has no copy on process %d yet (%s); a loss of this "
                        "host before the next save falls back further", step, self.keeper, err)

  def _copy_from_ward(self, step: int) -> None:
    peer = self.addresses[self.ward]
    target = os.path.join(self.replica_dir, str(step))
    if not self._replica_node.fetch_shard_from_peer(peer["ip"], peer["own_port"], step,
                                                    self.ward):
      raise OSError(f"could not fetch it from {peer['ip']}:{peer['own_port']}")
    fetched = os.path.join(self.replica_dir, p2p_constants.P2P_RESTORE_DIR_NAME, str(step))
    problem = step_problem(fetched)
    if problem:
      shutil.rmtree(fetched, ignore_errors=True)
      raise OSError(f"the copy is unusable ({problem})")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(fetched, target)

  def _prune_replicas(self) -> None:
    if self.replica_dir:
      for step in _steps_in(self.replica_dir)[:-self.cfg.local_keep]:
        shutil.rmtree(os.path.join(self.replica_dir, str(step)), ignore_errors=True)

  def wait(self) -> None:
    """Blocks until the last save is finished and copied to the keeper; raises its failure."""
    if self._thread is not None:
      self._thread.join()
      self._thread = None
    if self._error is not None:
      err, self._error = self._error, None
      raise OSError(f"the local checkpoint tier failed: {err}") from err

  def saving(self) -> bool:
    """Whether the last save's files, checksums or peer copy are still being written."""
    return self._thread is not None and self._thread.is_alive()

  def check(self) -> None:
    if self._thread is not None and not self.saving():
      self.wait()

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self._mngr.close()
      for node in (self._own_node, self._replica_node):
        if node is not None:
          node.stop()

  def step_path(self, step: int) -> str:
    return os.path.join(self.own_dir, str(step))

  def latest_step(self) -> int | None:
    """This process's newest complete own step (a running job's processes agree on it)."""
    steps = [s for s in _steps_in(self.own_dir)
             if os.path.isfile(os.path.join(self.step_path(s), CHECKSUMS))]
    return steps[-1] if steps else None

  # -- restoring --------------------------------------------------------------------------------

  def inventory(self) -> dict[str, Any]:
    """The steps this process holds complete (finalised, with CHECKSUMS; own ones saved by this
    topology): its own and its ward's copies. Their bytes are checked only when a restore is
    about to use them (`restore_step`), so listing costs no read of the arrays."""
    own = [s for s in _steps_in(self.own_dir) if self._listed(self.step_path(s), own=True)]
    replicas = {}
    if self.replica_dir:
      replicas[str(self.ward)] = [s for s in _steps_in(self.replica_dir)
                                  if self._listed(os.path.join(self.replica_dir, str(s)))]
    return {"process": self.process, "own": own, "replicas": replicas}

  def _listed(self, step_dir: str, own: bool = False) -> bool:
    if not (os.path.isfile(os.path.join(step_dir, COMMIT_MARKER)) and
            os.path.isfile(os.path.join(step_dir, CHECKSUMS))):
      logging.info("local step %s is unfinished (a save or copy was cut short); removing it",
                   step_dir)
      shutil.rmtree(step_dir, ignore_errors=True)
      return False
    if own and self._topology(step_dir) != self.topology:
      logging.info("local step %s was saved by another topology (%s); not used", step_dir,
                   self._topology(step_dir))
      return False
    return True

  @staticmethod
  def _topology(step_dir: str) -> Any:
    try:
      with open(os.path.join(step_dir, "_CHECKPOINT_METADATA")) as f:
        return json.load(f).get("custom_metadata", {}).get("topology")
    except (OSError, ValueError):
      return None

  def candidates(self) -> tuple[list[int], dict[int, dict[int, list]]]:
    """(steps complete across all processes newest first, their holders); a collective."""
    infos = exchange(self.inventory())
    holders = holders_by_step(infos, self.count)
    return sorted(holders, reverse=True), holders

  def restore_step(self, step: int, holders: dict[int, list], abstract_state: Any
                   ) -> tuple[Any, dict[str, Any], bool] | None:
    """(state, meta, whether a peer's copy was used) of `step`, or None if any process failed
    (all processes agree); a collective. First every copy the restore will use is checked
    against its CHECKSUMS by the process that holds it (a bad one is moved aside with a warning
    naming it, and None is returned: the caller lists again); then the processes without their
    own copy fetch theirs from its holder, and all read."""
    sources = {p: next(((h, kind) for h, kind in held if kind == "own"), held[0])
               for p, held in holders.items()}
    problem = None
    try:
      for owner, (holder, kind) in sources.items():
        if holder != self.process:
          continue
        step_dir = (self.step_path(step) if kind == "own" else
                    os.path.join(self.replica_dir, str(step)))
        bad = step_problem(step_dir)
        if bad:
          what = ("local checkpoint" if kind == "own" else
                  f"replica of process {owner}'s local checkpoint")
          _move_aside(step_dir, bad, what)
          problem = f"{what} {step_dir}: {bad}"
    except Exception as err:  # pylint: disable=broad-except
      problem = f"{type(err).__name__}: {err}"
    if self._verdicts(step, problem, "checked") is None:
      return None
    fetched, result = sources[self.process][1] == "replica", None
    try:
      if fetched:
        self._fetch_own(step, sources[self.process][0])
      result = self._read(step, abstract_state)
    except Exception as err:  # pylint: disable=broad-except
      problem = f"{type(err).__name__}: {err}"
    verdicts = self._verdicts(step, problem, "restored", fetched=fetched)
    if verdicts is None:
      return None
    return (*result, any(v["fetched"] for v in verdicts))

  def _verdicts(self, step: int, problem: str | None, what: str, **fields: Any
                ) -> list[dict[str, Any]] | None:
    """Every process's verdict (its `problem` and `fields`); None if any had a problem, each
    logged on every process."""
    verdicts = exchange({"process": self.process, "problem": problem, **fields})
    failed = [v for v in verdicts if v["problem"]]
    for v in failed:
      logging.warning("local checkpoint %d could not be %s on process %d (%s)", step, what,
                      v["process"], v["problem"])
    return None if failed else verdicts

  def _fetch_own(self, step: int, holder: int) -> None:
    """This process's shards of `step`, copied back from the peer that kept them and checked."""
    peer = self.addresses[holder]
    if not self._own_node.fetch_shard_from_peer(peer["ip"], peer["replica_port"], step,
                                                self.process):
      raise OSError(f"could not fetch local checkpoint {step} from process {holder} "
                    f"({peer['ip']}:{peer['replica_port']})")
    fetched = os.path.join(self.own_dir, p2p_constants.P2P_RESTORE_DIR_NAME, str(step))
    problem = step_problem(fetched)
    if problem:
      shutil.rmtree(fetched, ignore_errors=True)
      raise OSError(f"the copy of local checkpoint {step} from process {holder} arrived "
                    f"unusable ({problem})")
    shutil.rmtree(self.step_path(step), ignore_errors=True)
    os.replace(fetched, self.step_path(step))
    logging.info("local checkpoint %d of this process copied back from process %d", step, holder)

  def _read(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    self._mngr.reload()
    saved = self._mngr.item_metadata(step)
    saved_state = saved["state"] if saved is not None else None
    if saved_state is not None:
      mismatches = shape_mismatches(saved_state, abstract_state)
      if mismatches:
        raise ValueError(f"shapes differ from this model: {mismatches[:3]}")
    restored = self._mngr.restore(step, args=p2p_args.Composite(
        state=ocp.args.PyTreeRestore(abstract_state)))
    state = restored["state"]
    check_finite_arrays(state, step)
    meta = dict(self._mngr.metadata(step).custom_metadata or {})
    meta.pop("topology", None)
    return state, meta

  def drop_newer(self, step: int) -> None:
    """Removes own steps and replicas newer than `step`, the state just restored: they belong to
    the timeline being recomputed, and a process that kept its copy would skip a save its peers
    make (saves are collective)."""
    for d in (self.own_dir, self.replica_dir):
      for s in _steps_in(d) if d else ():
        if s > step:
          shutil.rmtree(os.path.join(d, str(s)), ignore_errors=True)
    self._mngr.reload()

  def clear(self) -> None:
    """Forgets this process's local checkpoints and replicas (a --restart)."""
    self.wait()
    for d in (self.own_dir, self.replica_dir):
      if d and os.path.isdir(d):
        for name in os.listdir(d):
          shutil.rmtree(os.path.join(d, name), ignore_errors=True)
    self._mngr.reload()


def _remove_unfinished(directory: str) -> None:
  """Orbax's temporary step directories left by a process killed mid-save: never restorable."""
  for name in os.listdir(directory):
    if ".orbax-checkpoint-tmp" in name or name == p2p_constants.P2P_RESTORE_DIR_NAME or (
        name.startswith("stage_")):
      logging.info("removing unfinished local checkpoint %s", os.path.join(directory, name))
      shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


class _OrbaxLocalNoise(py_logging.Filter):
  """Drops two warnings Orbax logs at every local save, which say nothing wrong: "Global object
  size logging disabled for `primary_host=None`" and "Local scan: No steps found" (a first save)."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    text = record.getMessage()
    return not ("Global object size logging disabled" in text or
                text.startswith("Local scan: No steps found"))


_NOISE = _OrbaxLocalNoise()


def _quiet_orbax_local_warnings() -> None:
  logger = py_logging.getLogger("absl")
  if _NOISE not in logger.filters:
    logger.addFilter(_NOISE)


def exchange(local: dict[str, Any]) -> list[dict[str, Any]]:
  """Every process's JSON `local`, in process order (a collective). Like Orbax's
  sync_global_data, but from host numpy arrays, so it also works inside a mesh context."""
  raw = np.frombuffer(json.dumps(local).encode(), np.uint8)
  lengths = np.asarray(multihost_utils.process_allgather(np.asarray([raw.size], np.int32)))
  lengths = lengths.reshape(-1)
  buf = np.zeros(int(lengths.max()), np.uint8)
  buf[:raw.size] = raw
  rows = np.asarray(multihost_utils.process_allgather(buf)).reshape(len(lengths), -1)
  return [json.loads(row[:n].tobytes()) for row, n in zip(rows, lengths)]


def _kv_client():
  """jax.distributed's key-value store client, or None in a single process."""
  if jax.process_count() == 1:
    return None
  from jax._src import distributed  # pylint: disable=import-outside-toplevel
  return distributed.global_state.client

