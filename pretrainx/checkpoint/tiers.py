"""A run's two checkpoint tiers behind one interface: the fast local tier (local.LocalTier: each
host's disk or RAM, copied to a peer, every CheckpointConfig.local_every_steps) and the persistent
tier (persistent.Checkpointer: the run directory, local or gs://, every every_steps/minutes).
Restore takes the newest state complete across both: every process's local shards (own or a
peer's copy), else the persistent tier's newest readable step."""

from __future__ import annotations

import time
from typing import Any

import jax
from absl import logging

from pretrainx.checkpoint.persistent import Checkpointer
from pretrainx.checkpoint.local import LocalTier
from pretrainx.config import CheckpointConfig

class TieredCheckpointer:
  """The loop's checkpointer: saves by both tiers' policies and restores the newest complete
  state. `last_blocking` holds the seconds each tier blocked the last save; `restored_tier` is
  'local', 'peer' (a peer's copy was used) or 'persistent' after a restore."""

  def __init__(self, persistent: Checkpointer, local: LocalTier | None = None):
    self.persistent, self.local = persistent, local
    self.cfg: CheckpointConfig = persistent.cfg
    self.directory = persistent.directory
    self.last_blocking: dict[str, float] = {}
    self.restored_tier: str | None = None
    self.restored_step: int | None = None
    self._restored_path = ""

  # -- saving -----------------------------------------------------------------------------------

  def due(self, step: int) -> bool:
    return self.persistent.due(step) or (self.local is not None and self.local.due(step))

  def save(self, step: int, state: Any, meta: dict[str, Any], block: bool = False) -> str:
    """Saves `step` to each tier whose policy asks for it; with `block` (end of training,
    preemption) to the persistent tier, finished before returning. Returns the durable path."""
    self.last_blocking = {}
    path = ""
    if self.local is not None and self.local.due(step) and not block:
      started = time.perf_counter()
      path = self.local.save(step, state, meta)
      self.last_blocking["local"] = time.perf_counter() - started
    if block or self.persistent.due(step):
      started = time.perf_counter()
      path = self.persistent.save(step, state, meta, block=block)
      self.last_blocking["persistent"] = time.perf_counter() - started
    return path

  def wait(self) -> None:
    if self.local is not None:
      self.local.wait()
    self.persistent.wait()

  def check(self) -> None:
    self.persistent.check()
    if self.local is not None:
      self.local.check()

  def close(self) -> None:
    try:
      if self.local is not None:
        self.local.close()
    finally:
      self.persistent.close()

  # -- reading ----------------------------------------------------------------------------------

  def step_path(self, step: int) -> str:
    if self._restored_path and self.restored_step == step:
      return self._restored_path
    return self.persistent.step_path(step)

  def latest_step(self) -> int | None:
    steps = [s for s in (self.persistent.latest_step(),
                         self.local.latest_step() if self.local else None) if s is not None]
    return max(steps) if steps else None

  def restore(self, abstract_state: Any, step: int | None = None
              ) -> tuple[Any, dict[str, Any], int] | None:
    """-> (state, meta, step): the newest state complete across both tiers (or `step`'s). A
    local step wins over an older or equal persistent one; if its restore fails on any process,
    all move on to the next complete step. Every process calls it. None when the local tier is
    on and neither tier holds any step (a run killed before its first save)."""
    newest_persistent = self.persistent.latest_step() if step is None else None
    if self.local is not None:
      tries: dict[int, int] = {}
      while True:
        # Listed anew after each failure: a copy found corrupt is gone from the lists, and its
        # step may still be complete through another copy.
        candidates, holders = self.local.candidates()
        usable = [s for s in candidates if (step is None or s == step) and tries.get(s, 0) < 2
                  and (newest_persistent is None or s >= newest_persistent)]
        if not usable:
          break
        s = usable[0]
        tries[s] = tries.get(s, 0) + 1
        started = time.perf_counter()
        restored = self.local.restore_step(s, holders[s], abstract_state)
        if restored is None:
          continue
        state, meta, from_peer = restored
        self.local.drop_newer(s)
        self.restored_tier = "peer" if from_peer else "local"
        self.restored_step, self._restored_path = s, self.local.step_path(s)
        logging.info("restored step %d from the local tier%s in %.1fs", s,
                     " (with a peer's copy)" if from_peer else "", time.perf_counter() - started)
        return state, meta, s
      if not candidates and step is None and newest_persistent is None:
        return None
      if candidates:
        logging.info("local tier: complete steps %s; persistent tier: newest step %s",
                     candidates, newest_persistent)
    state, meta, s = self.persistent.restore(abstract_state, step)
    if self.local is not None:
      self.local.drop_newer(s)
    self.restored_tier, self.restored_step, self._restored_path = "persistent", s, ""
    return state, meta, s

  def clear_local(self) -> None:
    if self.local is not None:
      self.local.clear()


def make_checkpointer(directory: str, cfg: CheckpointConfig, run_dir: str,
                      mesh: jax.sharding.Mesh | None, create: bool = True) -> TieredCheckpointer:
  """Both tiers of a run (the local one only if CheckpointConfig asks for it)."""
  persistent = Checkpointer(directory, cfg, create=create)
  local = LocalTier(cfg, run_dir, mesh) if cfg.local_tier and mesh is not None else None
  return TieredCheckpointer(persistent, local)
