"""Preemption: SIGTERM/SIGINT ask the loop to stop after the current step and save.

In a multi-process run every process must stop at the same step; the processes agree through a
tiny all-gather of their flags every `sync_every` steps (one host round trip, not a device sync).
"""

from __future__ import annotations

import signal

import jax
import numpy as np
from absl import logging


class PreemptionWatcher:
  """Context manager: while inside, SIGTERM and SIGINT set a flag instead of killing the process."""

  def __init__(self, sync_every: int = 1):
    self.sync_every = max(sync_every, 1)
    self.signal_name: str | None = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread: signals cannot be caught here
        pass
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    self.signal_name = signal.Signals(signum).name
    logging.warning("received %s: stopping after this step and saving a checkpoint",
                    self.signal_name)

  def should_stop(self, step: int) -> bool:
    """True on every process at the same step once any process was signalled."""
    if jax.process_count() == 1:
      return self.signal_name is not None
    if step % self.sync_every:
      return False
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

    flags = multihost_utils.process_allgather(np.array([self.signal_name is not None]))
    return bool(np.any(flags))
