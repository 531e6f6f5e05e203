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


def plot_losses(metrics_path: str, out_png: str, baseline: float | None = None) -> str:
  """Train and validation loss vs step from metrics.jsonl, as a PNG."""
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  rows = read_metrics(metrics_path)
  fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
  for key, label, style in (("train/loss", "train", "-"), ("eval/loss", "validation", "o-")):
    pts = [(r["step"], r[key]) for r in rows if key in r]
    if pts:
      ax.plot(*zip(*pts), style, label=label, markersize=4)
  if baseline is not None:
    ax.axhline(baseline, color="gray", linestyle="--", label="unigram entropy (validation)")
  ax.set_xlabel("step")
  ax.set_ylabel("loss (nats / token)")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(out_png)
  plt.close(fig)
  return out_png
