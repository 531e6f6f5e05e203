"""Goodput: the share of a run's wall time (all attempts and the gaps between them) that became
kept training progress, with the rest (badput) broken down by cause, as ml-goodput-measurement
reports it. The loop records events to RUN_DIR/goodput.jsonl; `summarize` reads them back.

Each line is one event {"event", "attempt", "t" (time.time()), ...}; an attempt is one process
start. In a bucket the file is staged locally and appended as part objects (storage.StagedDir),
like metrics.jsonl, at most SYNC_EVERY_S apart. A line torn by a crash mid-write is skipped.
"""

from __future__ import annotations

import json
import os
import re
import time
from typing import Any, Callable

from absl import logging

from pretrainx import storage

GOODPUT_FILE = "goodput.jsonl"
TIERS = (None, "local", "peer", "persistent", "init")
HOWS = ("finished", "preempted", "failed")
SYNC_EVERY_S = 10.0  # in a bucket, uploads wait this long between events (never at start/end)
_KIND = re.compile(r"[a-z][a-z0-9_]*$")
_OWN = ("startup", "restore", "compile", "restart_gap", "recomputed", "other")  # not blocked kinds
# Badput categories in the order they are shown, with the labels of the table.
LABELS = {
    "startup": "startup (process start -> run state ready, less restore)",
    "restore": "restore from checkpoint",
    "compile": "compile (first step of each shape)",
    "checkpoint_local": "checkpoint blocking, local tier",
    "checkpoint_persistent": "checkpoint blocking, persistent tier",
    "eval": "eval",
    "harness": "harness (downstream eval)",
    "data": "data loading",
    "restart_gap": "restarts (last event -> next process start)",
    "recomputed": "wasted (recomputed after restore)",
}


class GoodputRecorder:
  """Appends this attempt's events to RUN_DIR/goodput.jsonl (when `enabled`: process 0).

  `job_start`: time.time() when the process started, before JAX initialised. Step windows passed
  to `steps` must not include time also passed to `blocked`, `compiled` or `restored`. `clock`
  stamps the events (tests pass their own)."""

  def __init__(self, run_dir: str, enabled: bool, job_start: float,
               clock: Callable[[], float] = time.time):
    self.enabled = enabled
    self._clock = clock
    self.events: list[dict[str, Any]] = []
    self.attempt = 0
    if not enabled:
      return
    self._dir = storage.StagedDir(run_dir, pull=(GOODPUT_FILE,),
                                  appended={GOODPUT_FILE: storage.PARTS_DIR})
    local = self._dir.path(GOODPUT_FILE)
    text = ""
    if os.path.exists(local):
      with open(local, encoding="utf-8") as f:
        text = f.read()
    self.events, _ = parse_events(text)
    self.attempt = max((e["attempt"] for e in self.events), default=0) + 1
    self._file = open(local, "a", encoding="utf-8")
    if text and not text.endswith("\n"):  # a torn last line stays a line of its own
      self._file.write("\n")
    self._synced = 0.0
    self._write("attempt", sync=True, job_start=float(job_start))

  def _write(self, event: str, sync: bool = False, **fields: Any) -> None:
    if not self.enabled or self._file.closed:  # after close() (a `finally`), events are dropped
      return
    row = {"event": event, "attempt": self.attempt, "t": self._clock(), **fields}
    self.events.append(row)
    self._file.write(json.dumps(row) + "\n")
    self._file.flush()
    if sync or row["t"] - self._synced >= SYNC_EVERY_S:
      self._dir.sync()
      self._synced = row["t"]

  def started(self, step: int, resumed_from_tier: str | None) -> None:
    """The run state is ready at `step` (after init or restore); again after a rollback."""
    if resumed_from_tier not in TIERS:
      raise ValueError(f"resumed_from_tier={resumed_from_tier!r}: use one of {TIERS}.")
    self._write("started", sync=True, step=int(step), tier=resumed_from_tier)

  def restored(self, step: int, tier: str, seconds: float) -> None:
    if tier not in TIERS[1:]:
      raise ValueError(f"tier={tier!r}: use one of {TIERS[1:]}.")
    self._write("restored", step=int(step), tier=tier, seconds=float(seconds))

  def compiled(self, seconds: float, step: int) -> None:
    """The first step of a shape (its compile and that step) ended at `step`."""
    self._write("compiled", step=int(step), seconds=float(seconds))

  def steps(self, first: int, last: int, seconds: float) -> None:
    """Steps first+1..last took `seconds` of productive time."""
    if last < first:
      raise ValueError(f"steps({first}, {last}): the window ends before it starts.")
    self._write("steps", first=int(first), last=int(last), seconds=float(seconds))

  def blocked(self, kind: str, seconds: float, step: int) -> None:
    """Training waited `seconds` at `step` for `kind` (checkpoint_local, eval, data, ...)."""
    if not _KIND.match(kind) or kind in _OWN:
      raise ValueError(f"blocked kind {kind!r}: use lower-case letters, digits and '_', and "
                       f"none of {_OWN}.")
    self._write("blocked", kind=kind, step=int(step), seconds=float(seconds))

  def ended(self, step: int, how: str) -> None:
    if how not in HOWS:
      raise ValueError(f"how={how!r}: use one of {HOWS}.")
    self._write("ended", sync=True, step=int(step), how=how)

  def metrics(self) -> dict[str, float]:
    """This attempt's and the earlier ones' running goodput, as 'goodput/...' metrics."""
    if not self.enabled:
      return {}
    d = summarize_events(self.events, now=self._clock())
    out = {"goodput/percent": d["goodput_percent"], "goodput/total_s": d["total_s"],
           "goodput/productive_s": d["productive_s"],
           "goodput/recomputed_steps": float(d["recomputed_steps"])}
    out.update({f"goodput/badput/{k}_s": v for k, v in d["badput_s"].items()})
    return out

  def close(self) -> None:
    if self.enabled and not self._file.closed:
      self._file.close()
      self._dir.close()


# -- reading ----------------------------------------------------------------------------------


def parse_events(text: str) -> tuple[list[dict[str, Any]], int]:
  """The events of goodput.jsonl text, and how many lines were torn or not events."""
  events, torn = [], 0
  for line in text.splitlines():
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except ValueError:
      torn += 1
      continue
    if isinstance(row, dict) and "event" in row and "attempt" in row and "t" in row:
      events.append(row)
    else:
      torn += 1
  return events, torn


def read_events(run_dir: str) -> tuple[list[dict[str, Any]], int]:
  """RUN_DIR/goodput.jsonl's events (local or in a bucket); ValueError if it has none."""
  path = storage.join(run_dir, GOODPUT_FILE)
  try:
    text = storage.read_appended(path).decode("utf-8", errors="replace")
  except FileNotFoundError:
    text = None
  if text is None or not text.strip():
    raise ValueError(f"{path} does not exist or is empty: no goodput was recorded there (is "
                     "--run_dir a training run's directory?).")
  return parse_events(text)


def summarize(run_dir: str) -> dict[str, Any]:
  """Goodput and badput of a run from its goodput.jsonl (see `summarize_events`)."""
  events, torn = read_events(run_dir)
  if not any(e["event"] == "attempt" for e in events):
    raise ValueError(f"{storage.join(run_dir, GOODPUT_FILE)} holds no attempt: not a goodput "
                     "record.")
  d = summarize_events(events)
  d["run_dir"] = run_dir
  d["torn_lines"] = torn
  if torn:
    logging.warning("goodput: skipped %d torn or foreign line(s) in %s", torn, run_dir)
  return d


class _Tally:
  """Running sums while the events are replayed in order."""

  def __init__(self):
    self.badput = {k: 0.0 for k in LABELS}
    self.restore_by_tier: dict[str, float] = {}
    self.live: list[list[float]] = []  # kept step windows: [first, last, seconds]
    self.reached = 0  # the highest step of the kept timeline (windows, compiles, pauses, end)
    self.recomputed_steps = 0

  def rewind(self, step: int) -> None:
    """The run state went back to `step`: the kept work past it is wasted."""
    if step < self.reached:
      self.recomputed_steps += self.reached - step
    kept = []
    for first, last, seconds in self.live:
      if last <= step:
        kept.append([first, last, seconds])
        continue
      lost = (last - max(first, step)) / (last - first) if last > first else 1.0
      self.badput["recomputed"] += seconds * lost
      if first < step:
        kept.append([first, step, seconds * (1 - lost)])
    self.live = kept
    self.reached = min(self.reached, step)


def _attempts(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Per attempt, in order: its job start, first and last event times, steps and outcome."""
  out: dict[int, dict[str, Any]] = {}
  for e in events:
    a = out.setdefault(e["attempt"], {"attempt": e["attempt"], "job_start": None,
                                      "ready": None, "first_t": e["t"], "end": e["t"],
                                      "started_step": None, "resumed_from": None,
                                      "last_step": None, "how": None})
    a["end"] = max(a["end"], e["t"])
    if e["event"] == "attempt":
      a["job_start"] = e["job_start"]
    elif e["event"] == "started" and a["ready"] is None:
      a.update(ready=e["t"], started_step=e["step"], resumed_from=e["tier"])
    elif e["event"] == "ended":
      a["how"] = e["how"]
    step = e.get("last", e.get("step"))
    if step is not None and e["event"] != "restored":
      a["last_step"] = step
  for a in out.values():
    if a["job_start"] is None:  # the attempt line was torn: start at its first event
      a["job_start"] = a["first_t"]
  return [out[k] for k in sorted(out)]


def _replay(events: list[dict[str, Any]], tally: _Tally) -> None:
  for e in events:
    kind = e["event"]
    if kind == "started":
      tally.rewind(e["step"])
    elif kind == "restored":
      tally.badput["restore"] += e["seconds"]
      tally.restore_by_tier[e["tier"]] = tally.restore_by_tier.get(e["tier"], 0.0) + e["seconds"]
    elif kind == "compiled":
      tally.badput["compile"] += e["seconds"]
      tally.reached = max(tally.reached, e["step"])
    elif kind == "steps":
      tally.live.append([e["first"], e["last"], e["seconds"]])
      tally.reached = max(tally.reached, e["last"])
    elif kind == "blocked":
      tally.badput[e["kind"]] = tally.badput.get(e["kind"], 0.0) + e["seconds"]
      tally.reached = max(tally.reached, e["step"])
    elif kind == "ended":  # steps run after the last window read (a failure) count as reached
      tally.reached = max(tally.reached, e["step"])


def summarize_events(events: list[dict[str, Any]], now: float | None = None) -> dict[str, Any]:
  """Goodput of a timeline of events: total wall time from the first attempt's job start to the
  last event (or `now`), productive = kept step time, badput by cause, other = the rest."""
  events = sorted(events, key=lambda e: (e["attempt"], e["t"]))
  attempts = _attempts(events)
  tally = _Tally()
  _replay(events, tally)
  by_number = {a["attempt"]: a for a in attempts}
  for e in events:  # a restore before the run state is ready is part of the startup's time
    a = by_number[e["attempt"]]
    if e["event"] == "restored" and (a["ready"] is None or e["t"] <= a["ready"]):
      a["restoring"] = a.get("restoring", 0.0) + e["seconds"]
  for i, a in enumerate(attempts):
    ready = a["ready"] if a["ready"] is not None else a["end"]
    tally.badput["startup"] += max(0.0, ready - a["job_start"] - a.get("restoring", 0.0))
    if i:
      tally.badput["restart_gap"] += max(0.0, a["job_start"] - attempts[i - 1]["end"])
  end = max(now or 0.0, attempts[-1]["end"]) if attempts else 0.0
  total = end - attempts[0]["job_start"] if attempts else 0.0
  productive = sum(s for _, _, s in tally.live)
  badput = dict(tally.badput)
  badput["other"] = total - productive - sum(badput.values())
  last = attempts[-1] if attempts else {}
  return {
      "status": last.get("how") or "running",
      "total_s": total, "productive_s": productive,
      "goodput_percent": 100.0 * productive / total if total > 0 else 0.0,
      "productive_steps": int(sum(b - a for a, b, _ in tally.live)),
      "recomputed_steps": tally.recomputed_steps,
      "badput_s": badput, "restore_by_tier_s": tally.restore_by_tier,
      "attempts": [{k: a[k] for k in ("attempt", "job_start", "end", "started_step",
                                      "resumed_from", "last_step", "how")} for a in attempts],
  }


def format_summary(d: dict[str, Any]) -> str:
  """The summary as a table: seconds and share of the total per line."""
  total = d["total_s"]

  def row(label: str, seconds: float) -> str:
    share = 100.0 * seconds / total if total > 0 else 0.0
    return f"  {label:<58} {seconds:>11.1f} s {share:>6.1f}%"

  n = len(d["attempts"])
  lines = [f"goodput {d['goodput_percent']:.1f}% of {d.get('run_dir', 'the run')} "
           f"({d['status']}{', up to its last event' if d['status'] == 'running' else ''}; "
           f"{n} attempt{'s' if n != 1 else ''})",
           row("total wall time", total),
           row(f"productive step time ({d['productive_steps']} steps kept)", d["productive_s"]),
           "  badput:"]
  badput = d["badput_s"]
  for key, seconds in badput.items():
    if key == "other" or (seconds == 0 and key not in ("startup", "recomputed")):
      continue
    label = LABELS.get(key, key.replace("_", " "))
    if key == "recomputed":
      label = f"{label}: {d['recomputed_steps']} steps"
    elif key == "restore" and d["restore_by_tier_s"]:
      label += " (" + ", ".join(f"{t} {s:.1f} s" for t, s in d["restore_by_tier_s"].items()) + ")"
    lines.append(row("  " + label, seconds))
  lines.append(row("  other (not accounted for)", badput["other"]))
  lines.append("  attempts:")
  for i, a in enumerate(d["attempts"]):
    how = a["how"] or ("running" if i == n - 1 else "killed (no end recorded)")
    lines.append(f"    {a['attempt']}: from step {_dash(a['started_step'])}"
                 f" ({a['resumed_from'] or 'fresh'}) to {_dash(a['last_step'])}, {how}, "
                 f"{a['end'] - a['job_start']:.1f} s")
  if d.get("torn_lines"):
    lines.append(f"  ({d['torn_lines']} torn line(s) skipped)")
  return "\n".join(lines)


def _dash(value: Any) -> str:
  return "-" if value is None else str(value)
