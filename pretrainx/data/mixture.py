"""Domain mixtures whose weights are a function of the training step.

A schedule is a list of `Stage`s, each starting at a step with its own {domain: weight}; end-of-
training upsampling, curricula and replay are then configuration only. Every global batch gets
exact per-domain row counts (systematic rounding, so each domain's expected share is its weight)
and the rows are shuffled by (seed, step); how many rows each domain gave before step k has a
closed form, so the batch at step k is a pure function of (seed, schedule, k). Online reweighting
(pretrainx.data.reweighting) adds a weight history, (from_step, weights) entries that act like
extra stages within the stage they start in; k's batch then depends on (seed, stages, history, k).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from pretrainx.config import Stage
from pretrainx.config.data import check_stages

_CHECKPOINT_EVERY = 4096  # steps between cached cumulative counts


def _splitmix64(x: np.ndarray) -> np.ndarray:
  """A counter-based hash: uint64 -> well-mixed uint64 (vectorised, no state)."""
  with np.errstate(over="ignore"):
    x = (x + np.uint64(0x9E3779B97F4A7C15)).astype(np.uint64)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def hash_uniform(seed: int, stream: int, counters: np.ndarray) -> np.ndarray:
  """Uniform [0, 1) floats that depend only on (seed, stream, counter)."""
  with np.errstate(over="ignore"):
    key = _splitmix64(_splitmix64(np.asarray([seed], np.uint64)) ^ np.uint64(stream))[0]
    x = _splitmix64(np.asarray(counters, np.uint64) ^ key)
  return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)


class _Plan:
  """The weights in effect from each change point on (stage starts and history entries), with
  the cumulative row counts computed so far; replaced whole, never edited, when the history
  changes (reader threads may still hold the old one)."""

  def __init__(self, steps: np.ndarray, table: np.ndarray, history: tuple, cum: dict):
    self.steps, self.table, self.history, self.cum = steps, table, history, cum


class MixtureSchedule:
  """Which domain each row of each global batch comes from, and each domain's row offsets."""

  def __init__(self, stages: Sequence[Stage], domains: Sequence[str], batch_size: int, seed: int,
               natural_weights: Mapping[str, float] | None = None,
               history: Sequence[tuple[int, Sequence[float]]] = (),
               stage_batch_sizes: Sequence[int] | None = None):
    """batch_size: rows per step; stage_batch_sizes: one per stage instead (a stage that
    changes the batch, pretrainx.config.phases)."""
    check_stages(stages, domains)
    self.stages, self.domains = tuple(stages), tuple(domains)
    self.batch_size, self.seed = int(batch_size), int(seed)
    self.starts = np.asarray([s.start_step for s in stages], np.int64)
    sizes = [batch_size] * len(self.stages) if stage_batch_sizes is None else stage_batch_sizes
    if len(sizes) != len(self.stages):
      raise ValueError(f"{len(sizes)} stage batch sizes for {len(self.stages)} stages.")
    self.batch_sizes = np.asarray(sizes, np.int64)  # [stages]
    natural = dict(natural_weights or {d: 1.0 for d in domains})
    table = []
    for s in stages:
      w = np.asarray([float((s.weights or natural).get(d, 0.0)) for d in domains])
      table.append(w / w.sum())
    self.weights = np.stack(table)  # [stages, domains], rows sum to 1
    self._plan = _Plan(self.starts, self.weights, (), {0: np.zeros(len(domains), np.int64)})
    if history:
      self.set_history(history)

  @property
  def history(self) -> tuple[tuple[int, np.ndarray], ...]:
    return self._plan.history

  def set_history(self, history: Sequence[tuple[int, Sequence[float]]]) -> None:
    """Domain weights from online reweighting: entry (from_step, weights [domains]) applies from
    that step until the next entry or the next stage start, whichever comes first (an entry at a
    stage's start step wins over the stage's own weights). Cached counts past the first step
    where the new history differs from the old one are dropped."""
    entries = []
    for step, w in history:
      w = np.asarray(w, np.float64)
      if w.shape != (len(self.domains),) or not np.all(np.isfinite(w)) or (w < 0).any() or \
          w.sum() <= 0:
        raise ValueError(f"weight history entry at step {step}: need {len(self.domains)} finite "
                         f"weights >= 0 with a positive sum, got {w.tolist()}.")
      entries.append((int(step), w / w.sum()))
    steps = [s for s, _ in entries]
    if steps != sorted(set(steps)) or (steps and steps[0] < 0):
      raise ValueError(f"weight history steps {steps} must be >= 0 and strictly increasing.")
    old = self._plan
    changed = _first_difference(old.history, entries)
    events = sorted([(int(s), 0, w) for s, w in zip(self.starts, self.weights)] +
                    [(s, 1, w) for s, w in entries], key=lambda e: (e[0], e[1]))
    last = {}
    for s, _, w in events:  # at a shared step the history entry (kind 1) comes last and wins
      last[s] = w
    cum = {a: c for a, c in old.cum.items() if changed is None or a <= changed}
    self._plan = _Plan(np.asarray(list(last), np.int64), np.stack(list(last.values())),
                       tuple(entries), cum)

  def stage_index(self, step: int) -> int:
    return int(np.searchsorted(self.starts, step, side="right") - 1)

  def stage(self, step: int) -> Stage:
    return self.stages[self.stage_index(step)]

  def batch_size_at(self, steps: np.ndarray | int) -> np.ndarray:
    """Rows in the global batch of each of `steps` -> int64 (the shape of `steps`)."""
    index = np.searchsorted(self.starts, np.asarray(steps, np.int64), side="right") - 1
    return self.batch_sizes[index]

  def stage_weights(self, step: int) -> np.ndarray:
    """The stage's own normalised weights at `step` -> float64 [domains]."""
    return self.weights[self.stage_index(step)]

  def weights_at(self, step: int, plan: _Plan | None = None) -> np.ndarray:
    """The weights the batch of `step` is drawn with (history included) -> float64 [domains]."""
    plan = plan or self._plan
    return plan.table[int(np.searchsorted(plan.steps, step, side="right") - 1)]

  def counts(self, steps: np.ndarray, plan: _Plan | None = None) -> np.ndarray:
    """Rows per domain in the batches of `steps` -> int64 [len(steps), domains].

    floor(w * B) each, and the remaining rows go to domains by systematic sampling over the
    fractional parts, so every domain's expected count is exactly w * B.
    """
    plan = plan or self._plan
    steps = np.asarray(steps, np.int64)
    w = plan.table[np.searchsorted(plan.steps, steps, side="right") - 1]  # [n, domains]
    batch = self.batch_size_at(steps)  # [n]
    exact = w * batch[:, None]
    base = np.floor(exact).astype(np.int64)
    frac_cum = np.cumsum(exact - base, axis=1)
    remainder = batch - base.sum(axis=1)
    frac_cum[:, -1] = remainder  # exact, whatever the float rounding of the cumsum
    u = hash_uniform(self.seed, 1, steps)[:, None]
    upper = np.ceil(frac_cum - u)
    lower = np.concatenate([np.zeros_like(upper[:, :1]), upper[:, :-1]], axis=1)
    return base + (upper - lower).astype(np.int64)

  def offsets(self, step: int, plan: _Plan | None = None) -> np.ndarray:
    """Rows each domain contributed to the batches of steps [0, step) -> int64 [domains]."""
    plan = plan or self._plan
    cum = plan.cum
    anchor = (int(step) // _CHECKPOINT_EVERY) * _CHECKPOINT_EVERY
    if anchor not in cum:
      known = max(k for k in cum if k <= anchor)
      for a in range(known, anchor, _CHECKPOINT_EVERY):
        cum[a + _CHECKPOINT_EVERY] = cum[a] + self.counts(
            np.arange(a, a + _CHECKPOINT_EVERY), plan).sum(axis=0)
    return cum[anchor] + self.counts(np.arange(anchor, int(step)), plan).sum(axis=0)

  def assignment(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    """(domain [B], row index within that domain [B]) for the rows of the batch of `step` (B:
    the rows of that step's stage)."""
    plan = self._plan  # one plan throughout, whatever another thread sets meanwhile
    counts = self.counts(np.asarray([step]), plan)[0]
    batch = int(self.batch_size_at(step))
    domain = np.repeat(np.arange(len(self.domains)), counts)
    slots = int(step) * batch + np.arange(batch, dtype=np.int64)
    order = np.argsort(hash_uniform(self.seed, 2, slots), kind="stable")
    domain = domain[order]
    rank = np.empty(batch, np.int64)
    for d in range(len(self.domains)):
      where = np.flatnonzero(domain == d)
      rank[where] = np.arange(len(where))
    return domain, self.offsets(step, plan)[domain] + rank


def _first_difference(old: Sequence[tuple[int, np.ndarray]],
                      new: Sequence[tuple[int, np.ndarray]]) -> int | None:
  """The first step from which two weight histories may give different weights (None: equal)."""
  for (s_old, w_old), (s_new, w_new) in zip(old, new):
    if s_old != s_new or not np.array_equal(w_old, w_new):
      return min(s_old, s_new)
  if len(old) == len(new):
    return None
  return (old[len(new)] if len(old) > len(new) else new[len(old)])[0]
