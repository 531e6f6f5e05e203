"""What a run checks before it writes anything, and its run directory's first write.

`preflight` runs on the host alone, before JAX starts a backend, compiles or reads data: the
config, the run directory and its bucket, the source to continue from and the token stores, so a
wrong binding or path is reported in about a second. The loop then builds the runtime, the data
and the starting state, and only once all of that has passed does `prepare_run_dir` write: a
start that fails leaves the run directory as it was.
"""

from __future__ import annotations

from pretrainx import faults, storage
from pretrainx.checkpoint import check_directory
from pretrainx.config import (Experiment, RunPaths, check_trainable, config_differences,
                              experiment_to_gin, parse_gin, validate)
from pretrainx.config.sources import newest_step, source_kind
from pretrainx.data.pipeline import open_task_stores
from pretrainx.metrics import DOMAIN_WEIGHTS_PLOT
from pretrainx.train.goodput import GOODPUT_FILE
from pretrainx.vocab_extend import check_extension


def check_run_dir(exp: Experiment, paths: RunPaths, restart: bool) -> None:
  """A run directory that holds another experiment is refused unless restart is asked for."""
  if restart or not storage.exists(paths.config):
    return
  try:
    old = parse_gin([paths.config])
  except (ValueError, OSError) as err:
    raise ValueError(f"{paths.config} cannot be read ({err}); pass --restart to start over "
                     "in this directory, or use another --run_dir.") from err
  diffs = config_differences(old, exp)
  if diffs:
    raise ValueError(
        f"run directory {paths.root} holds a run of another configuration:\n  " +
        "\n  ".join(diffs) + "\nPass --restart to discard it, or use another --run_dir.")


def saved_step(paths: RunPaths) -> int | None:
  """The newest finalised checkpoint step of the run directory, read from the listing alone."""
  if not storage.isdir(paths.checkpoints):
    return None
  try:
    return newest_step(paths.checkpoints)
  except FileNotFoundError:  # no finalised step
    return None


def preflight(exp: Experiment, restart: bool) -> tuple[RunPaths, bool]:
  """(the run's paths, whether it resumes from its own checkpoint) once every host-side check of
  the experiment has passed; the first failure raises with what to do. Starts no JAX backend."""
  paths = RunPaths.under(exp.run.run_dir)
  faults.planned()  # a malformed PRETRAINX_FAULT fails here, not at the step it names
  check_directory(paths.checkpoints, "write the run directory")
  check_run_dir(exp, paths, restart)
  # With a local tier, a run that wrote its config may hold local checkpoints only (killed before
  # its first persistent save); the restore then looks in both tiers, and starts fresh if neither
  # holds a step.
  resumes = not restart and (saved_step(paths) is not None or (
      exp.checkpoint.local_tier and storage.exists(paths.config)))
  if exp.init.source and not resumes:
    # Before the config checks: an unreadable source leaves the architecture unset, and the
    # defaults it leaves would be reported instead (a vocabulary mismatch, say).
    source_kind(exp.init.source)
  if exp.distill.online:  # the teacher is read at every start, resumes included
    source_kind(exp.distill.teacher, field="DistillConfig.teacher")
  validate(exp)
  check_trainable(exp)
  if exp.init.extend_vocab_from and not resumes:  # the tokenizers, before any weight is read
    check_extension(exp)
  storage.check_bucket(exp.data.store_root, "read the token stores in")
  open_task_stores(exp.data)
  return paths, resumes


def prepare_run_dir(exp: Experiment, paths: RunPaths, restart: bool, is_main: bool) -> None:
  """The first write: wipes a previous run's outputs if restart, then writes config.gin."""
  if not is_main:
    return
  if restart:
    for p in (paths.checkpoints, paths.tensorboard):
      storage.rmtree(p)
    for p in (paths.metrics, paths.loss_plot, storage.join(paths.root, DOMAIN_WEIGHTS_PLOT),
              storage.join(paths.root, GOODPUT_FILE)):
      storage.remove(p)
  storage.makedirs(paths.root)
  storage.write_text(paths.config, experiment_to_gin(exp))
