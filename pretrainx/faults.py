"""Fault injection for chaos tests and drills: PRETRAINX_FAULT=POINT:STEP[:PROCESS] makes the
process (all, or the one numbered PROCESS) kill itself with SIGKILL when it reaches POINT at STEP,
the way a lost host dies: no handler, no flush. Points: 'after_step' (the step's update is done
and the checkpoints in flight are finished) and 'local_save' (a local checkpoint's files are being
written). Unset, it does nothing."""

from __future__ import annotations

import os
import signal

from absl import logging

ENV = "PRETRAINX_FAULT"
POINTS = ("after_step", "local_save")


def planned() -> tuple[str, int, int | None] | None:
  """(point, step, process or None) from PRETRAINX_FAULT; a malformed value is a ValueError."""
  value = os.environ.get(ENV, "").strip()
  if not value:
    return None
  parts = value.split(":")
  try:
    if len(parts) not in (2, 3) or parts[0] not in POINTS:
      raise ValueError
    return parts[0], int(parts[1]), int(parts[2]) if len(parts) == 3 else None
  except ValueError:
    raise ValueError(f"{ENV}={value!r}: use POINT:STEP[:PROCESS] with POINT one of "
                     f"{list(POINTS)}, or unset it.") from None


def due(point: str, step: int) -> bool:
  plan = planned()
  if plan is None or plan[:2] != (point, step):
    return False
  import jax  # pylint: disable=import-outside-toplevel
  return plan[2] is None or plan[2] == jax.process_index()


def maybe_kill(point: str, step: int) -> None:
  """SIGKILLs this process if PRETRAINX_FAULT names this point and step (and process)."""
  if due(point, step):
    logging.warning("%s: killing this process at %s of step %d", ENV, point, step)
    logging.flush()
    os.kill(os.getpid(), signal.SIGKILL)
