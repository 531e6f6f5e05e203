"""Bytes uploaded per log point when a run directory is in a bucket (fake-gcs-server on 127.0.0.1).

MetricWriter writes one row of 17 scalars (a tiny run's train metrics over 4 domains) at each log
point, to metrics.jsonl and TensorBoard; every upload goes through storage.write_bytes, which is
counted. Measured for this tree's writer (metrics.jsonl and event files uploaded as parts) and
for the writer of commit 2325e43 (`git show 2325e43:...`, loaded as a separate module: whole files
re-uploaded at every log point). The old writer at 10,000 log points would push gigabytes through
the emulator, so it is measured up to --old_max and computed beyond from the measured row and
event sizes (the formula is checked against the measured points).
Run: .venv/bin/python bench/metric_uploads.py [--points 10 10000] [--old_max 1000]
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import time
import types

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "tests"))
from servers import free_port, gcs_env, start_gcs  # noqa: E402  pylint: disable=wrong-import-position

PORT = free_port()
os.environ.update(gcs_env(PORT))

from pretrainx import metrics, storage  # noqa: E402  pylint: disable=wrong-import-position

DOMAINS = ("web", "code", "prose", "math")
KEYS = (["train/loss", "train/grad_norm", "train/lr", "train/param_norm", "train/tokens_per_s",
         "train/mfu", "train/step_time_s", "train/tokens", "train/update_norm"]
        + [f"train/loss/{d}" for d in DOMAINS] + [f"data/{d}/weight" for d in DOMAINS])


# The last commit whose writer re-uploaded whole files at every log point.
BEFORE = "2325e43"


def _head_module(name: str, path: str, **globals_) -> types.ModuleType:
  """A module made from BEFORE's text of `path`, with `globals_` set in it."""
  source = subprocess.run(["git", "show", f"{BEFORE}:{path}"], cwd=REPO, check=True,
                          capture_output=True, text=True).stdout
  module = types.ModuleType(name)
  module.__file__ = f"{BEFORE}:{path}"
  sys.modules[name] = module
  exec(compile(source, module.__file__, "exec"), module.__dict__)  # pylint: disable=exec-used
  module.__dict__.update(globals_)
  return module


def measure(metrics_mod, storage_mod, directory: str, points: int) -> dict[str, float]:
  """Writes `points` log points; bytes uploaded (jsonl, events) in all and at the last one."""
  sent = {"jsonl": 0, "events": 0}
  write = storage_mod.write_bytes

  def counted(path, data):
    sent["events" if "/tensorboard/" in str(path) else "jsonl"] += len(data)
    return write(path, data)

  storage_mod.write_bytes = counted
  rng = random.Random(0)
  writer = metrics_mod.MetricWriter(directory)
  t0 = time.perf_counter()
  try:
    for step in range(1, points + 1):
      before = dict(sent)
      writer.write(step * 10, {k: rng.random() * 10 for k in KEYS})
      last = {k: sent[k] - before[k] for k in sent}
    writer.close()
  finally:
    storage_mod.write_bytes = write
  seconds = time.perf_counter() - t0
  total = sent["jsonl"] + sent["events"]
  return {"points": points, "per_point": total / points, "jsonl_per_point": sent["jsonl"] / points,
          "events_per_point": sent["events"] / points, "last_point": last["jsonl"] + last["events"],
          "seconds": seconds, "rows_bytes": sent["jsonl"], "events_bytes": sent["events"]}


def old_formula(points: int, row: float, event: float, header: float, roll: int) -> dict:
  """The old writer's uploads: at log point k the whole metrics.jsonl (k rows) and the whole
  current event file (its header and the events since it rolled over at `roll` bytes)."""
  total, last, size = 0.0, 0.0, header
  for k in range(1, points + 1):
    size += event
    last = k * row + size
    total += last
    if size > roll:
      size = header
  return {"points": points, "per_point": total / points, "last_point": last}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--points", type=int, nargs="+", default=[10, 10000])
  parser.add_argument("--old_max", type=int, default=1000)
  args = parser.parse_args()
  server = start_gcs(PORT, ("bench",))
  try:
    old_storage = _head_module("old_storage", "pretrainx/storage.py")
    old_metrics = _head_module("old_metrics", "pretrainx/metrics.py", storage=old_storage)
    rows = []
    for n in args.points:
      rows.append(("this tree", measure(metrics, storage, f"gs://bench/new-{n}", n)))
    measured_old = {}
    for n in sorted({min(n, args.old_max) for n in args.points} | {10}):
      measured_old[n] = measure(old_metrics, old_storage, f"gs://bench/old-{n}", n)
    # The formula's sizes, from the old writer at 1 and 10 points: it uploads k rows and an
    # event file of header + k events at point k, so 10 points send 55 rows and 10 headers +
    # 55 events, 1 point one of each.
    one, ten = measure(old_metrics, old_storage, "gs://bench/old-1", 1), measured_old[10]
    row = ten["rows_bytes"] / 55
    event = (ten["events_bytes"] - 10 * one["events_bytes"]) / 45
    header = one["events_bytes"] - event
    for n in args.points:
      if n in measured_old:
        rows.append(("2325e43 (measured)", measured_old[n]))
      computed = old_formula(n, row, event, header, old_metrics.EVENT_FILE_BYTES)
      rows.append(("2325e43 (computed)", computed))
    print(f"row {row:.0f} B, event {event:.0f} B, event file header {header:.0f} B")
    print("| writer | log points | bytes uploaded per log point (mean) | at the last log point "
          "| jsonl / events per point | wall s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in rows:
      split = (f"{r['jsonl_per_point']:,.0f} / {r['events_per_point']:,.0f}"
               if "jsonl_per_point" in r else "")
      wall = f"{r['seconds']:.1f}" if "seconds" in r else ""
      print(f"| {name} | {r['points']:,} | {r['per_point']:,.0f} | {r['last_point']:,.0f} | "
            f"{split} | {wall} |")
  finally:
    server.terminate()
    server.wait(timeout=30)


if __name__ == "__main__":
  main()
