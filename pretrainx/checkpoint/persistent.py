"""The persistent tier: Orbax checkpoints of a run, async saves by a step/time policy, retention,
validated restore.

Layout: RUN_DIR/checkpoints/<step>/{state, meta}; `meta` is JSON (config, data position, metrics).
A restore takes the newest finalised checkpoint that reads back; a newer one that is unfinalised
or unreadable is moved aside as `corrupt-<step>-<time>` with a warning naming it, never deleted.
Directories may be local or on gs:// (Orbax's commit marker finalises a step there, since a
bucket has no atomic rename); s3:// is refused up front, as Orbax cannot write it.

A save that fails (a bucket that goes away, a full disk) stops the run with one
CheckpointWriteError naming the step and the storage error, raised by the next call into the
Checkpointer (check, save, wait); the previous checkpoint is untouched and the failed step never
gets its commit marker. Orbax's and gcsfs's own tracebacks of that failure are logged only at
debug verbosity.
"""

from __future__ import annotations

import logging as py_logging
import os
import re
import sys
import threading
import time
import traceback
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

from pretrainx import storage
from pretrainx.config import CheckpointConfig
from pretrainx.tree import shape_differences

COMMIT_MARKER = "commit_success.txt"


class CheckpointError(ValueError):
  """A checkpoint that exists but cannot be used as asked (shapes differ, not a checkpoint)."""


class CheckpointWriteError(CheckpointError):
  """A checkpoint that could not be written: the storage failed during the save."""


def describe_error(err: BaseException) -> str:
  """'Type: first line of the message' (its start and end if long), readable: some tensorstore
  errors carry the repr of a bound pybind11 method (`<bound method
  pybind11_detail_function_record_v1_...>`) where their text should be, and most end with the
  whole JSON spec of the store (`[tensorstore_spec='{...}']`), which would push the OS error out
  of the shortened line; both are left out."""
  texts = [a for a in err.args if isinstance(a, str)] or [str(err)]
  text = " ".join(_TENSORSTORE_SPEC.sub("", _BOUND_METHOD.sub("", t)).strip() for t in texts)
  text = text.strip()
  first = text.splitlines()[0].strip() if text else "no message"
  if len(first) > 200:  # a storage error's cause ("File too large", "No space left") is its end
    first = f"{first[:80].rstrip()} ... {first[-115:].lstrip()}"
  return f"{type(err).__name__}: {first}"


_BOUND_METHOD = re.compile(r"<bound method [^<>]*(<[^<>]*>[^<>]*)*>")
_TENSORSTORE_SPEC = re.compile(r"\s*\[tensorstore_spec='.*?'\]", re.DOTALL)


def shape_mismatches(saved: Any, abstract: Any) -> list[str]:
  """'path: saved shape -> expected shape' for every leaf that differs or exists on one side only."""
  return shape_differences(saved, abstract, "checkpoint", "model",
                           order=lambda k: (not k.startswith("params"), k))


def check_directory(directory: str, action: str = "checkpoint to") -> str:
  """The resolved directory, if Orbax can use it; a StorageError with the fix if not."""
  path = storage.resolve(directory)
  if storage.scheme(path) == "s3":
    raise storage.StorageError(
        f"cannot {action} {path}: orbax-checkpoint cannot write s3:// paths (it collapses "
        "'s3://' to 's3:/'). Put the run directory or export on gs:// or a local/shared disk; "
        "token stores and data files may stay on s3://.")
  storage.check_bucket(path, action)
  return path


class Checkpointer:
  """Saves and restores the checkpoints of one directory by a CheckpointConfig policy."""

  def __init__(self, directory: str, cfg: CheckpointConfig = CheckpointConfig(),
               create: bool = True):
    self.directory, self.cfg = check_directory(directory), cfg
    if not create and not storage.isdir(self.directory):
      raise FileNotFoundError(
          f"checkpoint directory {self.directory} does not exist; train first "
          "(python -m pretrainx train ...) or pass the --run_dir of a run that saved a checkpoint.")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=cfg.keep_last, keep_period=cfg.keep_every, create=create,
        enable_async_checkpointing=cfg.async_save, cleanup_tmp_directories=create)
    self._mngr = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})
    self._last_save = time.monotonic()
    self._in_flight: int | None = None  # the step being written in the background
    self._complete: int | None = None  # the newest step this process saved or restored
    self._failed: CheckpointWriteError | None = None
    _quiet_storage_tracebacks()

  # -- saving ----------------------------------------------------------------------------------

  def due(self, step: int) -> bool:
    """Whether the policy asks for a checkpoint after `step`."""
    cfg = self.cfg
    by_steps = cfg.every_steps > 0 and step % cfg.every_steps == 0
    by_time = cfg.every_minutes > 0 and time.monotonic() - self._last_save >= 60 * cfg.every_minutes
    return by_steps or by_time

  def save(self, step: int, state: Any, meta: dict[str, Any], block: bool = False) -> str:
    """Starts writing `state` and JSON `meta` as `step` (all processes call it); returns its path.

    With async_save the call returns once the arrays are copied off the devices; `block` waits
    for the files to be finalised (preemption, end of training)."""
    self.wait()  # the previous save: its failure is raised here, naming its step
    if step in self._mngr.all_steps():
      return self.step_path(step)
    try:
      self._mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    meta=ocp.args.JsonSave(meta)))
    except Exception as err:  # pylint: disable=broad-except
      raise self._write_failed(step, err) from None
    self._in_flight, self._last_save = step, time.monotonic()
    if block:
      self.wait()
    return self.step_path(step)

  def wait(self) -> None:
    """Blocks until the save in flight is finalised; CheckpointWriteError if it failed."""
    if self._failed is not None:
      raise self._failed
    try:
      self._mngr.wait_until_finished()
    except Exception as err:  # pylint: disable=broad-except
      raise self._write_failed(self._in_flight, err) from None
    if self._in_flight is not None:
      self._complete, self._in_flight = self._in_flight, None

  def saving(self) -> bool:
    """Whether a save is still being written in the background."""
    return self._mngr.is_saving_in_progress()

  def check(self) -> None:
    """Without blocking: CheckpointWriteError if the save in flight has already failed."""
    if self._failed is not None or (self._in_flight is not None and
                                    not self._mngr.is_saving_in_progress()):
      self.wait()

  def close(self) -> None:
    """Waits for the save in flight and closes; a failure already raised is not raised again."""
    if self._failed is None:
      self.wait()
      self._mngr.close()
      return
    try:
      self._mngr.close()
    except Exception:  # pylint: disable=broad-except
      logging.debug("closing after a failed save", exc_info=True)

  def _write_failed(self, step: int | None, err: BaseException) -> CheckpointWriteError:
    """The one-line error of a failed save; Orbax's threads still waiting on it are released."""
    logging.debug("checkpoint save of step %s failed", step, exc_info=err)
    _release_waiting_threads()
    self._in_flight = None
    last = (f"the last complete checkpoint is step {self._complete}"
            if self._complete is not None else "no checkpoint was completed before it")
    self._failed = CheckpointWriteError(
        f"checkpoint step {step} could not be written to {self.directory} "
        f"({describe_error(err)}); it is not marked finalised and {last}. Fix the storage (space, "
        "permissions, the bucket), then run the same command again to resume.")
    return self._failed

  def step_path(self, step: int) -> str:
    return storage.join(self.directory, str(step))

  # -- reading ---------------------------------------------------------------------------------

  def finalised_steps(self) -> list[int]:
    """Steps whose directory carries Orbax's commit marker, oldest first."""
    self._mngr.reload()
    return sorted(s for s in self._mngr.all_steps()
                  if storage.exists(storage.join(self.step_path(s), COMMIT_MARKER)))

  def latest_step(self) -> int | None:
    steps = self.finalised_steps()
    return steps[-1] if steps else None

  def read_meta(self, step: int | None = None) -> dict[str, Any]:
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"{self.directory} holds no finished checkpoint.")
    restored = self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(restored["meta"])

  def restore(self, abstract_state: Any, step: int | None = None
              ) -> tuple[Any, dict[str, Any], int]:
    """-> (state placed by abstract_state's shardings, meta, step).

    Without `step`, the newest checkpoint that reads back; unreadable newer ones are moved aside.
    A checkpoint whose shapes differ from `abstract_state` raises CheckpointError listing them.
    """
    self._move_aside_unfinalised()
    steps = self.finalised_steps()
    if step is not None:
      if step not in steps:
        raise FileNotFoundError(f"no finished checkpoint for step {step} in {self.directory}; "
                                f"it has {steps}.")
      restored = self._restore_step(step, abstract_state)
      self._complete = max(step, self._complete or step)
      return (*restored, step)
    if not steps:
      raise FileNotFoundError(
          f"{self.directory} holds no finished checkpoint; train first or pass another --run_dir.")
    for candidate in reversed(steps):
      try:
        restored = self._restore_step(candidate, abstract_state)
        self._complete = candidate
        return (*restored, candidate)
      except CheckpointError:
        raise
      except Exception as err:  # pylint: disable=broad-except
        moved = self._move_aside(candidate)
        logging.warning("checkpoint step %d in %s is unreadable (%s); moved it to %s and "
                        "trying an older one", candidate, self.directory, describe_error(err),
                        moved)
    raise FileNotFoundError(f"no readable checkpoint in {self.directory}: every step was corrupt "
                            "(moved aside as corrupt-*); restart with --restart.")

  def _restore_step(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    saved = self._mngr.item_metadata(step)
    saved_state = saved["state"] if saved is not None else None
    if saved_state is None:
      raise OSError(f"step {step} has no readable state metadata")
    mismatches = shape_mismatches(saved_state, abstract_state)
    if mismatches:
      listing = "\n  ".join(mismatches[:20]) + ("\n  ..." if len(mismatches) > 20 else "")
      raise CheckpointError(
          f"checkpoint {self.step_path(step)} does not fit this model ({len(mismatches)} "
          f"parameter(s) differ):\n  {listing}\nUse the config it was trained with (its "
          "config.gin), or start a new run with --restart or another --run_dir.")
    restored = self._mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    check_finite_arrays(restored["state"], step)
    return restored["state"], dict(restored["meta"])

  def _move_aside_unfinalised(self) -> None:
    if jax.process_index() != 0:
      return
    for name in storage.listdir(self.directory):
      path = storage.join(self.directory, name)
      if name.isdigit() and storage.isdir(path) and not storage.exists(
          storage.join(path, COMMIT_MARKER)):
        moved = self._move_aside(int(name))
        logging.warning("checkpoint step %s in %s was never finalised; moved it to %s",
                        name, self.directory, moved)

  def _move_aside(self, step: int) -> str:
    """Renames the step directory corrupt-<step>-<time>; in a bucket it is copied whole before
    its commit marker and then the rest are deleted, so the bytes are kept for inspection and a
    crash half-way leaves nothing that looks finalised."""
    target = storage.join(self.directory, f"corrupt-{step}-{int(time.time())}")
    if jax.process_index() == 0:
      storage.move_tree(self.step_path(step), target, delete_first=(COMMIT_MARKER,))
    self._mngr.reload()
    return target


def _release_waiting_threads() -> None:
  """After a failed async save, Orbax (0.12) leaves the save's other threads waiting up to
  300 s for a signal (the step directory's creation) that never comes, and the process cannot
  exit until they give up. Each is cancelled and sent its signal, so it returns at once."""
  # pylint: disable=protected-access,import-outside-toplevel
  try:
    from orbax.checkpoint._src.futures import future as ocp_future
    waiting = ocp_future._SignalingThread
  except (ImportError, AttributeError):
    return
  for thread in threading.enumerate():
    if isinstance(thread, waiting) and thread.is_alive():
      thread.cancel()
      try:
        ocp_future.set_signals(thread._receive_signals, operation_id=thread._operation_id)
      except Exception:  # pylint: disable=broad-except
        logging.debug("could not release %s", thread.name, exc_info=True)


class _StorageTracebacks(py_logging.Filter):
  """Drops the ERROR tracebacks logged from background threads when a checkpoint write fails
  (Orbax's own, gcsfs's retries, asyncio's "Future exception was never retrieved" for each
  array a full disk refused: dozens per failed save); the failure reaches the caller as one
  CheckpointWriteError. At debug verbosity (PRETRAINX_VERBOSE=2) they are kept."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    if record.levelno < py_logging.ERROR or not record.exc_info:
      return True
    tb = record.exc_info[2] if isinstance(record.exc_info, tuple) else None
    ours = (record.name.startswith("gcsfs") or _ORBAX_DIR in record.pathname or
            (tb is not None and any(_ORBAX_DIR in f.filename for f in traceback.extract_tb(tb))))
    return not ours or py_logging.getLogger("absl").isEnabledFor(py_logging.DEBUG)


_ORBAX_DIR = f"{os.sep}orbax{os.sep}checkpoint{os.sep}"
_TRACEBACK_FILTER = _StorageTracebacks()


def _quiet_storage_tracebacks() -> None:
  for name in ("absl", "gcsfs", "asyncio"):
    logger = py_logging.getLogger(name)
    if _TRACEBACK_FILTER not in logger.filters:
      logger.addFilter(_TRACEBACK_FILTER)
  if not getattr(sys.unraisablehook, "drops_closed_loop_callbacks", False):
    sys.unraisablehook = _closed_loop_callbacks_dropped(sys.unraisablehook)


def _closed_loop_callbacks_dropped(previous):
  """An unraisable-exception hook without 'RuntimeError: Event loop is closed': after a failed
  write, the TensorStore writes still running finish once Orbax's event loop has closed, and
  each one's callback printed that traceback (20 for a tiny model on a full disk)."""

  def hook(unraisable):
    err = unraisable.exc_value
    if isinstance(err, RuntimeError) and str(err) == "Event loop is closed":
      logging.debug("a storage callback after its event loop closed: %s", err)
      return
    previous(unraisable)

  hook.drops_closed_loop_callbacks = True
  return hook


@jax.jit
def _all_finite(leaves: list) -> jax.Array:
  return jax.numpy.all(jax.numpy.stack([jax.numpy.isfinite(x).all() for x in leaves]))


def check_finite_arrays(state: Any, step: int) -> None:
  """Garbled bytes can decode to NaN/inf rather than fail; a saved state is always finite.

  One jitted program for the whole state: a single host sync, and no interleaving of many small
  cross-device programs (which can deadlock XLA's CPU collectives)."""
  floats = [leaf for leaf in jax.tree.leaves(state)
            if jax.numpy.issubdtype(leaf.dtype, jax.numpy.floating)]
  if floats and not bool(_all_finite(floats)):
    raise OSError(f"step {step} holds non-finite values")


def save_params(directory: str, params: Any, meta: dict[str, Any]) -> str:
  """Writes params only (no optimizer state), for inference and conversion."""
  path = check_directory(directory, "export to")
  ckptr = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
  ckptr.save(path, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                           meta=ocp.args.JsonSave(meta)), force=True)
  return path


def load_params(directory: str, abstract_params: Any) -> tuple[Any, dict[str, Any]]:
  """Reads what save_params wrote."""
  path = check_directory(directory, "read")
  if not storage.isdir(path):
    raise FileNotFoundError(f"exported params directory {path} does not exist.")
  ckptr = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
  restored = ckptr.restore(path, args=ocp.args.Composite(
      params=ocp.args.StandardRestore(abstract_params), meta=ocp.args.JsonRestore()))
  return restored["params"], dict(restored["meta"])


def restore_subtree(directory: str, item: str, abstract: Any) -> Any:
  """Only the leaves of `abstract` (a nested dict of ShapeDtypeStructs with shardings, a subset of
  what the Orbax item `item` of `directory` holds: 'params' of an export, 'state' of a checkpoint
  step), each read straight into its sharding; the rest is never read."""
  path = check_directory(directory, "read")
  args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, dtype=a.dtype), abstract)
  ckptr = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
  restored = ckptr.restore(path, args=ocp.args.Composite(**{item: ocp.args.PyTreeRestore(
      abstract, restore_args=args, partial_restore=True)}))
  return restored[item]
