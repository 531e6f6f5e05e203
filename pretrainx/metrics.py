"""Where metrics go: a JSON-lines file, TensorBoard event files, and the loss and domain-weight
plots at the end.

The loop hands finished host-side dicts to `MetricWriter.write`; nothing here touches devices.
In a bucket (which cannot append) both are written locally, and at every write only their new
bytes are uploaded, as part objects (storage.StagedDir): metrics.jsonl.parts/ beside the run's
other files, event files' parts beside them in tensorboard/ (TensorBoard reads each). So a crash
loses at most one log interval and the bytes per upload stay O(interval); `read_metrics` joins
the parts.
"""

from __future__ import annotations

import io
import json
import math
import os
from typing import Any

from pretrainx import storage

METRICS_FILE = "metrics.jsonl"
DOMAIN_WEIGHTS_PLOT = "domain_weights.png"
TENSORBOARD_DIR = "tensorboard"
EVENT_FILE_BYTES = 4 << 20  # a new TensorBoard event file after this many bytes


class MetricWriter:
  """Appends {'step': k, name: value, ...} to DIRECTORY/metrics.jsonl and to TensorBoard scalars
  in DIRECTORY/tensorboard; `metrics_name` renames the JSON-lines file.

  `resumed_at`: the step a resumed run restarts from. Rows logged past it by the interrupted run
  are dropped from the JSON lines, and TensorBoard is told to purge its events past it, so each
  step appears once."""

  def __init__(self, directory: str, enabled: bool = True, metrics_name: str = METRICS_FILE,
               resumed_at: int | None = None):
    self.enabled = enabled
    if not enabled:
      return
    self._dir = storage.StagedDir(directory, pull=(metrics_name,), appended={
        metrics_name: storage.PARTS_DIR, f"{TENSORBOARD_DIR}/*tfevents*": storage.PARTS_BESIDE})
    if resumed_at is not None and _drop_rows_after(self._dir.path(metrics_name), resumed_at):
      self._dir.replaced(metrics_name)
    self._jsonl = open(self._dir.path(metrics_name), "a", encoding="utf-8")
    self._events = 0
    self._tb = self._new_event_writer(None if resumed_at is None else resumed_at + 1)

  def _new_event_writer(self, purge_step: int | None = None):
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel

    self._events += 1
    return SummaryWriter(self._dir.path(TENSORBOARD_DIR), filename_suffix=f".{self._events}",
                         purge_step=purge_step)

  def write(self, step: int, values: dict[str, Any]) -> None:
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in values.items()}
    self._jsonl.write(json.dumps({"step": int(step), **clean}) + "\n")
    self._jsonl.flush()
    for name, value in clean.items():
      if math.isfinite(value):
        self._tb.add_scalar(name, value, int(step))
    self._tb.flush()
    if self._dir.remote and self._event_file_bytes() > EVENT_FILE_BYTES:
      self._tb.close()
      self._tb = self._new_event_writer()
    self._dir.sync()

  def _event_file_bytes(self) -> int:
    """Bytes in the event file being written (the one named with this writer's suffix)."""
    local = self._dir.path(TENSORBOARD_DIR)
    return sum(os.path.getsize(os.path.join(local, f)) for f in os.listdir(local)
               if f.endswith(f".{self._events}"))

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()
      self._dir.close()


def _drop_rows_after(local_path: str, step: int) -> bool:
  """Rewrites a local metrics.jsonl without the rows of steps past `step` (and torn lines);
  True if it dropped any."""
  if not os.path.exists(local_path):
    return False
  with open(local_path, encoding="utf-8") as f:
    lines = f.read().splitlines()
  kept = []
  for line in lines:
    try:
      row = json.loads(line)
    except ValueError:  # a line torn by a crash mid-write
      continue
    if isinstance(row, dict) and row.get("step", 0) <= step:
      kept.append(line)
  if len(kept) == len(lines):
    return False
  with open(local_path, "w", encoding="utf-8") as f:
    f.write("".join(line + "\n" for line in kept))
  return True


def read_metrics_text(path: str) -> str:
  """A metrics.jsonl as text: the local file, or in a bucket its parts joined."""
  return storage.read_appended(path).decode("utf-8")


def read_metrics(path: str) -> list[dict[str, float]]:
  return [json.loads(line) for line in read_metrics_text(path).splitlines() if line.strip()]


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
  save_figure(fig, out_png)
  plt.close(fig)
  return out_png


def save_figure(fig, path: str, **kwargs) -> str:
  """Saves a matplotlib figure as PNG to a local or bucket path."""
  buf = io.BytesIO()
  fig.savefig(buf, format="png", **kwargs)
  return storage.write_bytes(path, buf.getvalue())


def plot_losses(metrics_path: str, out_png: str, baseline: float | None = None) -> str:
  """Train and validation loss vs step from metrics.jsonl, as a PNG."""
  rows = read_metrics(metrics_path)
  curves = [(label, [(r["step"], r[key]) for r in rows if key in r], style)
            for key, label, style in (("train/loss", "train", "-"),
                                      ("eval/loss", "validation", "o-"))]
  hline = (baseline, "unigram entropy (validation)") if baseline is not None else None
  return plot_curves(curves, out_png, hline=hline)


def plot_domain_weights(metrics_path: str, out_png: str) -> str:
  """Each domain's mixture weight (the 'data/<domain>/weight' metrics) vs step, as a PNG."""
  rows = read_metrics(metrics_path)
  names = sorted({k.split("/")[1] for r in rows for k in r
                  if k.startswith("data/") and k.endswith("/weight")})
  curves = [(name, [(r["step"], r[f"data/{name}/weight"]) for r in rows
                    if f"data/{name}/weight" in r], "-") for name in names]
  return plot_curves(curves, out_png, ylabel="domain weight")
