"""Where metrics go: a JSON-lines file, TensorBoard event files, and the loss plot at the end.

The loop hands finished host-side dicts to `MetricWriter.write`; nothing here touches devices.
"""

from __future__ import annotations

import json
import math
from typing import Any


class MetricWriter:
  """Appends {'step': k, name: value, ...} to metrics.jsonl and to TensorBoard scalars."""

  def __init__(self, jsonl_path: str, tensorboard_dir: str, enabled: bool = True):
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel

    self.enabled = enabled
    if enabled:
      self._jsonl = open(jsonl_path, "a", encoding="utf-8")
      self._tb = SummaryWriter(tensorboard_dir)

  def write(self, step: int, values: dict[str, Any]) -> None:
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in values.items()}
    self._jsonl.write(json.dumps({"step": int(step), **clean}) + "\n")
    self._jsonl.flush()
    for name, value in clean.items():
      if math.isfinite(value):
        self._tb.add_scalar(name, value, int(step))

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


def read_metrics(path: str) -> list[dict[str, float]]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def plot_curves(curves: list[tuple[str, list[tuple[float, float]], str]], out_png: str, *,
                ylabel: str = "loss (nats / token)",
                hline: tuple[float, str] | None = None) -> str:
  """Line plot of (label, [(step, value)], matplotlib style) curves vs step, as a PNG.

  Consecutive curves whose label starts with '_' reuse the previous curve's colour."""
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
  color = None
  for label, points, style in curves:
    if points:
      same = label.startswith("_") and color is not None
      line, = ax.plot(*zip(*points), style, label=label, markersize=4,
                      color=color if same else None)
      color = line.get_color()
  if hline is not None:
    ax.axhline(hline[0], color="gray", linestyle="--", label=hline[1])
  ax.set_xlabel("step")
  ax.set_ylabel(ylabel)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(out_png)
  plt.close(fig)
  return out_png


def plot_losses(metrics_path: str, out_png: str, baseline: float | None = None) -> str:
  """Train and validation loss vs step from metrics.jsonl, as a PNG."""
  rows = read_metrics(metrics_path)
  curves = [(label, [(r["step"], r[key]) for r in rows if key in r], style)
            for key, label, style in (("train/loss", "train", "-"),
                                      ("eval/loss", "validation", "o-"))]
  hline = (baseline, "unigram entropy (validation)") if baseline is not None else None
  return plot_curves(curves, out_png, hline=hline)
