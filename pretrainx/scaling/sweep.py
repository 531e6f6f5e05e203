"""Sweeps: a grid of gin bindings expanded into runs, each adding one row to a results table.

A sweep file binds `SweepConfig`: the base gin files, model-size presets, token or compute budgets
and a grid of other bindings (learning rates, mixture weights, ...). Every grid point is parsed and
validated before anything runs, so a typo in a binding fails at once. Runs go one after another in
this process, or as tasks on a Ray cluster (`ray_sweep.py`). Finished runs (by config hash, in the
results table) are skipped and a crashed one resumes from its checkpoint, so running a sweep
again continues it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import re
import sys
import time
from typing import Any, Callable, Mapping, Sequence

from absl import logging

from pretrainx import storage
from pretrainx.config import (RENAMED, Experiment, experiment_to_gin, parse_gin,
                              register_gin_readers)
from pretrainx.flops import count_params, flops_per_token
from pretrainx.topology import parse as parse_topology
from pretrainx.train.loop import train as train_loop
from pretrainx.scaling.results import append_result, load_results

# Statuses a run's row can have: only 'done' rows are fitted; 'diverged' (NaN loss, a result of
# its settings) is not retried either, 'failed' (any other error) is retried by the next sweep.
FINAL_STATUSES = ("done", "diverged")


@dataclasses.dataclass(frozen=True)
class SweepConfig:
  """A grid of runs.

  Attributes:
    name: the sweep's name (prefix of run names).
    gin_files: the base configuration every run starts from.
    bindings: gin bindings applied to every run, after gin_files.
    models: model-size presets {preset name: {binding: value}} (width, depth, heads, ...): one
      grid axis; empty means the base model only.
    tokens: token budgets, one grid axis: RunConfig.steps = round(tokens / (batch * seq_len)).
    flops: compute budgets (training FLOPs), one grid axis for IsoFLOP profiles: each model's
      steps are chosen so that its tokens * FLOPs per token meets the budget. At most one of
      tokens and flops; with neither, RunConfig.steps is as configured.
    grid: {gin binding: [values]} for every other axis; the sweep runs the cartesian product of
      all axes.
    token_range: (low, high): grid points whose training tokens fall outside are left out, e.g.
      to keep an IsoFLOP sweep from runs of a few steps or of many epochs; None keeps all.
    ratio_domain: a domain whose mixture weight (in the last stage, normalised) is recorded as the
      row's `ratio`, the r of the D-CPT law; None records none.
    run_root: run directories go to run_root/<run name> (local, gs://...).
    results: the results table every finished run adds a row to: a directory (local or in a
      bucket) that gets one small row file per run, so hosts write it at once without locks
      (a local `.sqlite` path keeps the older single-file table).
    cpus_per_run: with `--ray`, the CPUs each run's task asks for.
    tpu: with `--ray` on a TPU cluster, each run takes one whole slice of this type ('v5p-16',
      'v6e-64'), one process per host; None: runs ask for CPUs.
    max_retries: with `--ray`, how often a run that crashed or was preempted is started again
      (it resumes from its checkpoint).
  """

  name: str = "sweep"
  gin_files: tuple[str, ...] = ()
  bindings: tuple[str, ...] = ()
  models: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
  tokens: tuple[float, ...] = ()
  flops: tuple[float, ...] = ()
  grid: Mapping[str, Sequence[Any]] = dataclasses.field(default_factory=dict)
  token_range: tuple[float, float] | None = None
  ratio_domain: str | None = None
  run_root: str = "runs/sweep"
  results: str = "runs/sweep/results"
  cpus_per_run: float = 1.0
  tpu: str | None = None
  max_retries: int = 2

  def __post_init__(self):
    for name in ("gin_files", "bindings", "tokens", "flops"):
      object.__setattr__(self, name, tuple(getattr(self, name)))
    object.__setattr__(self, "models", {k: dict(v) for k, v in dict(self.models).items()})
    object.__setattr__(self, "grid", {k: list(v) if isinstance(v, (list, tuple)) else v
                                      for k, v in dict(self.grid).items()})
    if self.tokens and self.flops:
      raise ValueError("SweepConfig sets both tokens and flops budgets; choose one axis.")
    for key, values in self.grid.items():
      if "." not in key or "=" in key:
        raise ValueError(f"SweepConfig.grid key {key!r} is not a binding name like "
                         "'OptimizerConfig.learning_rate'.")
      if not isinstance(values, list) or not values:
        raise ValueError(f"SweepConfig.grid[{key!r}] = {values!r}; give a non-empty list of "
                         "values.")
    if self.token_range is not None:
      object.__setattr__(self, "token_range", tuple(float(t) for t in self.token_range))
      if len(self.token_range) != 2 or not 0 <= self.token_range[0] < self.token_range[1]:
        raise ValueError(f"SweepConfig.token_range={self.token_range}; give (low, high) with "
                         "0 <= low < high.")
    for budget in self.tokens + self.flops:
      if not budget > 0:
        raise ValueError(f"sweep budget {budget} must be positive.")
    if not self.cpus_per_run > 0 or self.max_retries < 0:
      raise ValueError(f"SweepConfig.cpus_per_run={self.cpus_per_run} must be positive and "
                       f"max_retries={self.max_retries} at least 0.")
    if self.tpu is not None:

      parse_topology(self.tpu)  # a clear error for a slice type that does not exist


@dataclasses.dataclass(frozen=True)
class SweepRun:
  """One grid point: its name, the bindings that make it, its validated Experiment."""

  name: str
  bindings: tuple[str, ...]  # 'Section.field = value' gin lines, in the order applied
  experiment: Any
  config_hash: str


_GIN_SWEEP: list[Any] = []  # the gin-wrapped SweepConfig, registered once


def parse_sweep(path: str) -> SweepConfig:
  """The SweepConfig a sweep gin file binds (a clear ValueError for a bad file)."""
  import gin  # pylint: disable=import-outside-toplevel

  if not storage.exists(path):
    raise FileNotFoundError(f"sweep file {path} not found.")

  register_gin_readers()
  if not _GIN_SWEEP:
    _GIN_SWEEP.append(gin.external_configurable(SweepConfig, name="SweepConfig",
                                                module="pretrainx"))
  gin.clear_config()
  try:
    gin.parse_config_file(path)
    return _GIN_SWEEP[0]()
  except (ValueError, TypeError, SyntaxError) as err:
    raise ValueError(f"bad sweep file {path}: {str(err).splitlines()[0]} (SweepConfig fields: "
                     f"{[f.name for f in dataclasses.fields(SweepConfig)]})") from err
  finally:
    gin.clear_config()


_OLD_NAMES = {new: old for old, new in RENAMED.items()}
_OLD_BINDING = re.compile(r"^(\w+\.\w+)(?= = )")


def config_hash(exp) -> str:
  """What makes two runs the same experiment: the settings that differ from Experiment()'s
  defaults (where and how a run is shown left out). A field added to pretrainx later, at its
  default, leaves the hashes of finished runs, and so their skipping, as they were; so do the
  sections split out of RunConfig and OptimizerConfig (bindings are hashed by their old names)."""
  run = dataclasses.replace(exp.run, run_dir=Experiment().run.run_dir,
                            progress_bar=Experiment().run.progress_bar)
  lines = set(experiment_to_gin(dataclasses.replace(exp, run=run)).splitlines())
  changed = sorted(_OLD_BINDING.sub(lambda m: _OLD_NAMES.get(m.group(1), m.group(1)), line)
                   for line in lines - set(experiment_to_gin(Experiment()).splitlines()))
  return hashlib.sha256("\n".join(changed).encode()).hexdigest()[:12]


def _budget_steps(exp, tokens: float | None, flops: float | None) -> int | None:
  """RunConfig.steps meeting a token or FLOP budget (None: no budget axis)."""

  per_step = exp.run.global_batch_size * exp.run.seq_len
  if flops is not None:
    tokens = flops / flops_per_token(exp.model, exp.run.seq_len)
  return None if tokens is None else max(1, round(tokens / per_step))


def _label(prefix: str, value: float) -> str:
  return prefix + f"{value:.3g}".replace("+", "")


def _axes(sweep: SweepConfig) -> list[list[tuple[str, tuple[str, ...], dict]]]:
  """Each axis as [(name part, bindings, budget)] choices."""
  axes = []
  if sweep.models:
    axes.append([(name, tuple(f"{k} = {v!r}" for k, v in b.items()), {})
                 for name, b in sweep.models.items()])
  if sweep.tokens:
    axes.append([(_label("D", t), (), {"tokens": t}) for t in sweep.tokens])
  if sweep.flops:
    axes.append([(_label("C", c), (), {"flops": c}) for c in sweep.flops])
  for key, values in sweep.grid.items():
    axes.append([("", (f"{key} = {v!r}",), {}) for v in values])
  return axes


def expand(sweep: SweepConfig) -> list[SweepRun]:
  """Every grid point as a validated experiment; raises on the first bad binding."""

  axes = _axes(sweep)
  if not axes:
    raise ValueError("the sweep has no axes: set SweepConfig.models, tokens, flops or grid.")
  runs, seen = [], {}
  for point in itertools.product(*axes):
    parts = [p for p, _, _ in point if p]
    bindings = sweep.bindings + tuple(b for _, bs, _ in point for b in bs)
    budget = {k: v for _, _, bud in point for k, v in bud.items()}
    try:
      exp = parse_gin(list(sweep.gin_files), list(bindings))
      steps = _budget_steps(exp, budget.get("tokens"), budget.get("flops"))
      if steps is not None:
        bindings += (f"RunConfig.steps = {steps}",)
        exp = parse_gin(list(sweep.gin_files), list(bindings))
    except (ValueError, FileNotFoundError) as err:
      raise ValueError(f"sweep {sweep.name!r}, grid point {list(bindings)}: {err}") from err
    tokens = exp.run.steps * exp.run.global_batch_size * exp.run.seq_len
    if sweep.token_range and not sweep.token_range[0] <= tokens <= sweep.token_range[1]:
      logging.info("sweep %s: %s left out, %d tokens outside token_range", sweep.name, parts,
                   tokens)
      continue
    h = config_hash(exp)
    if h in seen:
      raise ValueError(f"sweep {sweep.name!r}: grid points {seen[h]} and {list(bindings)} are the "
                       "same experiment (a binding overridden by another axis?); drop one.")
    seen[h] = list(bindings)
    name = "-".join([sweep.name, *parts, h[:8]])
    exp = exp.replace(run={"run_dir": storage.join(sweep.run_root, name), "progress_bar": False})
    runs.append(SweepRun(name, bindings, exp, h))
  if not runs:
    raise ValueError(f"sweep {sweep.name!r}: SweepConfig.token_range={sweep.token_range} leaves "
                     "no grid point; widen it.")
  return runs


def _mixture_ratio(exp, domain: str | None) -> float | None:
  if domain is None:
    return None
  if domain not in exp.data.domains:
    raise ValueError(f"SweepConfig.ratio_domain={domain!r} is not one of DataConfig.domains "
                     f"{exp.data.domains}.")
  weights = dict(exp.data.schedule_stages[-1].weights)
  total = sum(weights.values())
  return weights.get(domain, 0.0) / total if total > 0 else None


def result_row(run: SweepRun, result, seconds: float, ratio_domain: str | None = None,
               status: str = "done") -> dict[str, Any]:
  """The results-table row of a run (result: its TrainResult, or None if it failed)."""

  exp = run.experiment
  tokens = exp.run.steps * exp.run.global_batch_size * exp.run.seq_len
  nan = float("nan")
  return {"run": run.name, "config_hash": run.config_hash,
          "N": count_params(exp.model)["non_embedding"], "D": tokens,
          "C": flops_per_token(exp.model, exp.run.seq_len) * tokens,
          "train_loss": result.train_loss if result else nan,
          "eval_loss": result.eval_loss if result else None,
          "domain_losses": dict(result.eval_domain_losses) if result else {},
          "ratio": _mixture_ratio(exp, ratio_domain), "bindings": list(run.bindings),
          "seconds": seconds, "status": status}


def finished(results_path: str) -> dict[str, str]:
  """{config hash: status} of the runs the table records as done or diverged."""
  try:
    rows = load_results(results_path, allow_empty=True)
  except FileNotFoundError:  # no run finished yet
    return {}
  return {r["config_hash"]: r["status"] for r in rows if r["status"] in FINAL_STATUSES}


def select(runs: list[SweepRun], only: Sequence[str] | None) -> list[SweepRun]:
  """The runs named in `only` (run names or config-hash prefixes); all runs if None."""
  if not only:
    return runs
  picked = []
  for key in only:
    match = [r for r in runs if key in (r.name, r.config_hash) or
             (len(key) >= 6 and r.config_hash.startswith(key))]
    if not match:
      raise ValueError(f"--only {key}: no run of this sweep has that name or config hash; "
                       f"list them with --dry_run (names: {[r.name for r in runs][:5]}...).")
    picked += [r for r in match if r not in picked]
  return picked


def _append(path: str, row: dict) -> None:
  """Adds the row from process 0 only (every host of a multi-host run trains it)."""
  if "jax" not in sys.modules or sys.modules["jax"].process_index() == 0:
    append_result(path, row)


def run_one(sweep: SweepConfig, run: SweepRun, train_fn: Callable | None = None) -> dict:
  """Trains one grid point (resuming its checkpoint) and appends its row; returns the row.

  A NaN loss records the run as 'diverged'; another error records 'failed' and is raised again.
  A preempted run records nothing (its checkpoint lets the next sweep resume it).
  """
  if train_fn is None:
    train_fn = train_loop
  logging.info("sweep run %s: %s", run.name, run.bindings)
  start = time.time()
  try:
    result = train_fn(run.experiment)
  except FloatingPointError as err:
    logging.warning("sweep run %s diverged: %s", run.name, err)
    row = result_row(run, None, time.time() - start, sweep.ratio_domain, status="diverged")
    _append(sweep.results, row)
    return row
  except Exception:
    _append(sweep.results, result_row(run, None, time.time() - start, sweep.ratio_domain,
                                            status="failed"))
    raise
  if result.preempted:
    return {"run": run.name, "status": "preempted"}
  row = result_row(run, result, time.time() - start, sweep.ratio_domain)
  _append(sweep.results, row)
  return row


def _line(i: int, n: int, row: dict) -> str:
  text = f"[{i}/{n}] {row['run']}: {row['status']}"
  if row["status"] == "done":
    text += f", N={row['N']:,} D={row['D']:,} C={row['C']:.3g} eval loss {row['eval_loss']:.4f}"
  return text


@dataclasses.dataclass
class SweepReport:
  lines: list[str]  # one per run
  failed: list[str]  # names of runs that raised (retried by the next sweep)
  preempted: bool = False


def run_sweep(sweep: SweepConfig, only: Sequence[str] | None = None,
              train_fn: Callable | None = None) -> SweepReport:
  """Runs every unfinished grid point here, one after another.

  A run that fails is recorded and the sweep goes on; a preempted run stops the sweep.
  """
  runs = select(expand(sweep), only)
  report = SweepReport([], [])
  lines = report.lines
  for i, run in enumerate(runs, 1):
    status = finished(sweep.results).get(run.config_hash)
    if status:
      lines.append(f"[{i}/{len(runs)}] {run.name}: {status} before, skipped")
      continue
    try:
      row = run_one(sweep, run, train_fn)
    except Exception as err:  # pylint: disable=broad-except
      logging.error("sweep run %s failed: %s", run.name, err)
      lines.append(f"[{i}/{len(runs)}] {run.name}: failed ({type(err).__name__}: {err}); "
                   "the next sweep retries it")
      report.failed.append(run.name)
      continue
    if row["status"] == "preempted":
      lines.append(f"[{i}/{len(runs)}] {run.name}: preempted; run the sweep again to resume")
      report.preempted = True
      break
    lines.append(_line(i, len(runs), row))
  return report


def describe(sweep: SweepConfig, runs: list[SweepRun]) -> list[str]:
  """One line per grid point: status, name, steps and bindings (what --dry_run prints)."""
  done = finished(sweep.results)
  lines = [f"sweep {sweep.name}: {len(runs)} runs, results in {sweep.results}"]
  for i, run in enumerate(runs, 1):
    status = done.get(run.config_hash, "pending")
    lines.append(f"[{i}/{len(runs)}] {status:8s} {run.name}  steps={run.experiment.run.steps}  "
                 + "; ".join(run.bindings))
  return lines

