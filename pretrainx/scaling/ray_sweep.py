"""Sweeps on a Ray cluster: every unfinished grid point is a task with declared resources.

A task runs `python -m pretrainx sweep FILE --only HASH` on its worker, a process of its own, so a
crash or a preemption costs that run only. It trains (resuming the run's checkpoint) and writes
the row. A task whose run leaves no final row in the results table is retried, up to
SweepConfig.max_retries times. On a TPU cluster (SweepConfig.tpu) a run takes one whole slice,
with one process per host of it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import Sequence

from absl import logging

from pretrainx import cluster as cluster_lib
from pretrainx import storage
from pretrainx.scaling.sweep import SweepConfig, SweepReport, SweepRun, expand, finished, select

LOG_TAIL_CHARS = 2000
# Grid points often share shapes (a learning-rate axis): a persistent XLA cache on each worker
# lets every run after the first skip most of its compile.
# $PRETRAINX_JAX_CACHE_DIR moves it; JAX_COMPILATION_CACHE_DIR, if set, wins.
DEFAULT_JAX_CACHE_DIR = "~/.cache/pretrainx/jax"
TERMINATE_GRACE_S = 60.0  # a cancelled run's time to write its checkpoint


@dataclasses.dataclass(frozen=True)
class GridJob:
  """One grid point as a task: what the worker runs, and where its row and log go."""

  sweep_file: str
  name: str
  config_hash: str
  results: str
  log_dir: str
  workdir: str
  tpu: str | None = None  # one whole slice of this type ('v5p-16'); None: CPUs

  def command(self) -> list[str]:
    return [sys.executable, "-m", "pretrainx", "sweep", self.sweep_file, "--only",
            self.config_hash]


def _die_with_parent() -> None:
  """In the child: SIGTERM (a checkpoint, then exit) when the worker running it dies."""
  with contextlib.suppress(Exception):
    import ctypes  # pylint: disable=import-outside-toplevel

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def run_child(job: GridJob) -> int:
  """Runs the grid point's command here; its output goes to LOG_DIR/NAME.TIME.log. A cancel
  (KeyboardInterrupt) stops the run with SIGTERM, which checkpoints it first."""
  workdir = job.workdir if os.path.isdir(job.workdir) else os.path.expanduser("~")
  env = dict(os.environ, PRETRAINX_VERBOSE=os.environ.get("PRETRAINX_VERBOSE", "1"))
  cache = os.environ.get("PRETRAINX_JAX_CACHE_DIR", DEFAULT_JAX_CACHE_DIR)
  env.setdefault("JAX_COMPILATION_CACHE_DIR", storage.resolve(cache))
  env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  with tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False) as log:
    local_log = log.name
  try:
    with open(local_log, "w", encoding="utf-8") as out:
      proc = subprocess.Popen(job.command(), cwd=workdir, env=env, stdout=out,
                              stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
      try:
        code = proc.wait()
      finally:
        if proc.poll() is None:  # cancelled: let the run write its checkpoint
          proc.terminate()
          try:
            proc.wait(TERMINATE_GRACE_S)
          except subprocess.TimeoutExpired:
            proc.kill()
    with open(local_log, encoding="utf-8", errors="replace") as f:
      text = f.read()
    with contextlib.suppress(Exception):  # the log is for people; never fail the run over it
      storage.write_text(storage.join(job.log_dir, f"{job.name}.{time.strftime('%Y%m%d-%H%M%S')}"
                                      f".{os.getpid()}.log"), text)
    if code:
      logging.warning("sweep run %s exited %d:\n%s", job.name, code, text[-LOG_TAIL_CHARS:])
    return code
  finally:
    os.unlink(local_log)


def run_grid_point(job: GridJob) -> dict:
  """The task: trains one grid point (skipped if its row exists); raises if no row results, so
  Ray retries it (the retry resumes from the run's checkpoint)."""
  status = finished(job.results).get(job.config_hash)
  if status:
    return {"run": job.name, "status": status, "skipped": True}
  if job.tpu:
    code = _run_on_slice(job)
  else:
    code = run_child(job)
  status = finished(job.results).get(job.config_hash)
  if status is None:
    raise RuntimeError(f"sweep run {job.name} ended (exit {code}) without a result row; its log "
                       f"is in {job.log_dir}")
  return {"run": job.name, "status": status, "skipped": False}


def _run_on_slice(job: GridJob) -> int:
  """Reserves one whole TPU slice of job.tpu and runs the grid point on each of its hosts."""
  import ray  # pylint: disable=import-outside-toplevel
  from ray.util import tpu as ray_tpu  # pylint: disable=import-outside-toplevel

  generation, grid = slice_shape(job.tpu)
  refs = ray_tpu.run_on_slice(ray.remote(run_child), job, topology="x".join(map(str, grid)),
                              accelerator_version=generation)
  try:
    codes = ray.get(refs)
  except BaseException:
    cluster_lib.cancel(refs)
    raise
  return max(codes, key=abs)


def slice_shape(tpu: str) -> tuple[str, tuple[int, ...]]:
  """Ray's accelerator version ('v5p', 'v5litepod', ...) and chip grid of a slice type."""
  from pretrainx import topology  # pylint: disable=import-outside-toplevel

  generation, grid = topology.parse(tpu)
  return {"v5e": "v5litepod"}.get(generation, generation), grid


def resources(sweep: SweepConfig) -> tuple[cluster_lib.Resources, str]:
  """What each run's task asks for, and the same in words."""
  if sweep.tpu:
    generation, grid = slice_shape(sweep.tpu)
    chips = 1
    for g in grid:
      chips *= g
    return (cluster_lib.Resources(num_cpus=0),
            f"one whole {sweep.tpu} slice ({generation} {'x'.join(map(str, grid))}, {chips} "
            "chips, a process per host)")
  return cluster_lib.Resources(num_cpus=sweep.cpus_per_run), f"{sweep.cpus_per_run:g} CPU"


def jobs(sweep: SweepConfig, sweep_file: str, runs: Sequence[SweepRun],
         workdir: str | None = None) -> list[GridJob]:
  local = not storage.is_remote(sweep_file) and os.path.exists(sweep_file)
  return [GridJob(os.path.abspath(sweep_file) if local else sweep_file, r.name, r.config_hash,
                  storage.resolve(sweep.results), storage.join(sweep.run_root, "logs"),
                  workdir or os.getcwd(), sweep.tpu) for r in runs]


def describe(sweep: SweepConfig, sweep_file: str, runs: list[SweepRun],
             workdir: str | None = None) -> list[str]:
  """What `sweep --ray --dry_run` prints: each run's status, resources and task command."""
  done = finished(sweep.results)
  _, words = resources(sweep)
  todo = [r for r in runs if r.config_hash not in done]
  lines = [f"sweep {sweep.name}: {len(runs)} runs on Ray, {len(todo)} to run, each with {words}, "
           f"retried up to {sweep.max_retries} times; results in {sweep.results}, logs in "
           f"{storage.join(sweep.run_root, 'logs')}"]
  for i, (run, job) in enumerate(zip(runs, jobs(sweep, sweep_file, runs, workdir)), 1):
    status = done.get(run.config_hash, "pending")
    lines.append(f"[{i}/{len(runs)}] {status:8s} {run.name}  steps={run.experiment.run.steps}  "
                 f"task: {' '.join(job.command()[1:])}")
  return lines


def run_sweep_on(cluster: cluster_lib.Cluster, sweep: SweepConfig, sweep_file: str,
                 only: Sequence[str] | None = None, workdir: str | None = None) -> SweepReport:
  """Runs every unfinished grid point as a task on the cluster; returns one line per run."""
  runs = select(expand(sweep), only)
  done = finished(sweep.results)
  todo = [r for r in runs if r.config_hash not in done]
  report = SweepReport([f"{r.name}: {done[r.config_hash]} before, skipped"
                        for r in runs if r.config_hash in done], [])
  need, words = resources(sweep)
  logging.warning("sweep %s: %d runs to go on %s, each with %s", sweep.name, len(todo),
                  cluster.describe(), words)
  grid_jobs = jobs(sweep, sweep_file, todo, workdir)
  for i, result in cluster_lib.run_tasks(
      cluster, run_grid_point, grid_jobs, resources=need, max_retries=sweep.max_retries,
      max_in_flight=len(grid_jobs) if sweep.tpu else None):
    name = grid_jobs[i].name
    if isinstance(result, BaseException):
      report.failed.append(name)
      report.lines.append(f"{name}: failed after {sweep.max_retries} retries "
                          f"({type(result).__name__}: {str(result).splitlines()[0]}); the next "
                          "sweep retries it")
    else:
      report.lines.append(f"{name}: {result['status']}")
  return report
