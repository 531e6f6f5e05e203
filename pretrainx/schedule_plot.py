"""Previewing a learning-rate schedule before training: a PNG plot and a plain-text table.

Both evaluate `schedules.make_schedule` exactly as the train step will, and mark the phases named
by `schedules.schedule_phases`; `python -m pretrainx schedule` is the command-line front end.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from pretrainx.metrics import save_figure
from pretrainx.config import ScheduleConfig
from pretrainx.schedules import make_schedule, schedule_phases

_MAX_PLOT_POINTS = 4000  # longer runs are sampled evenly (phase boundaries always included)


def schedule_values(cfg: ScheduleConfig, peak: float, total_steps: int,
                    steps: Sequence[int] | np.ndarray) -> np.ndarray:
  """The learning rate at each of `steps` (float64 numpy array)."""
  if total_steps < 1:
    raise ValueError(f"total_steps={total_steps}; a schedule needs at least one step.")
  schedule = make_schedule(cfg, peak, total_steps)
  return np.asarray(schedule(np.asarray(steps, np.int32)), np.float64)


def _plot_steps(cfg: ScheduleConfig, peak: float, total_steps: int) -> np.ndarray:
  # steps: [n] sorted unique ints in [0, total_steps]
  steps = np.linspace(0, total_steps, min(total_steps + 1, _MAX_PLOT_POINTS)).round()
  edges = [start for _, start in schedule_phases(cfg, peak, total_steps)]
  around = [s + d for s in edges for d in (-1, 0)]  # keep each corner sharp
  return np.unique(np.clip(np.concatenate([steps, around]), 0, total_steps).astype(np.int64))


def plot_schedule(cfg: ScheduleConfig, peak: float, total_steps: int, path: str) -> str:
  """Writes learning rate vs step over `total_steps` as a PNG at `path`; returns `path`."""
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  steps = _plot_steps(cfg, peak, total_steps)
  values = schedule_values(cfg, peak, total_steps, steps)
  fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
  ax.plot(steps, values, "-", label="learning rate")
  for name, start in schedule_phases(cfg, peak, total_steps)[1:]:
    ax.axvline(start, color="gray", linestyle=":", linewidth=1)
    ax.annotate(name, (start, values.max()), rotation=90, va="top", ha="right", fontsize=8,
                color="gray")
  ax.set_title(f"schedule '{cfg.name}': peak {peak:g}, {total_steps} steps")
  ax.set_xlabel("step")
  ax.set_ylabel("learning rate")
  ax.set_xlim(0, total_steps)
  ax.set_ylim(bottom=0)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  save_figure(fig, path)
  plt.close(fig)
  return path


def _table_steps(cfg: ScheduleConfig, peak: float, total_steps: int, points: int | Sequence[int]) -> list[int]:
  if isinstance(points, int):
    if points < 2:
      raise ValueError(f"points={points}; ask for at least 2 evenly spaced steps, or pass a list "
                       "of steps.")
    even = np.linspace(0, total_steps, points).round().astype(int).tolist()
    return sorted(set(even) | {start for _, start in schedule_phases(cfg, peak, total_steps)})
  bad = [s for s in points if not 0 <= s <= total_steps]
  if bad:
    raise ValueError(f"steps {bad} are outside the schedule [0, {total_steps}]; pick steps in it.")
  return sorted(set(int(s) for s in points))


def schedule_table(cfg: ScheduleConfig, peak: float, total_steps: int,
                   points: int | Sequence[int] = 9) -> str:
  """A text table of step, learning rate and phase.

  points: how many evenly spaced steps from 0 to total_steps (each phase's first step is always
    added), or the exact steps to show.
  """
  steps = _table_steps(cfg, peak, total_steps, points)
  values = schedule_values(cfg, peak, total_steps, steps)
  phases = schedule_phases(cfg, peak, total_steps)
  width = max(len("step"), len(str(total_steps)))
  lines = [f"schedule '{cfg.name}', peak {peak:g}, {total_steps} steps",
           f"{'step':>{width}}  {'learning rate':>13}  phase"]
  for step, value in zip(steps, values):
    phase = [name for name, start in phases if start <= step][-1]
    lines.append(f"{step:>{width}}  {value:>13.6g}  {phase}")
  return "\n".join(lines)
