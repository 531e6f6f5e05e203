"""The run directory layout, and the Experiment a run directory was trained with."""

from __future__ import annotations

import dataclasses

from pretrainx import storage
from pretrainx.config.experiment import Experiment
from pretrainx.config.load import parse_gin


@dataclasses.dataclass(frozen=True)
class RunPaths:
  """Where a run directory keeps each output."""

  root: str  # a local directory or a gs:// / s3:// prefix
  config: str  # the operative gin config
  metrics: str  # metrics.jsonl
  tensorboard: str  # event files
  loss_plot: str  # loss.png
  checkpoints: str  # Orbax step directories

  @classmethod
  def under(cls, run_dir: str) -> "RunPaths":
    root = storage.resolve(run_dir)
    join = lambda name: storage.join(root, name)
    return cls(root, join("config.gin"), join("metrics.jsonl"), join("tensorboard"),
               join("loss.png"), join("checkpoints"))


def load_run_experiment(run_dir: str, gin_params: tuple[str, ...] = ()) -> Experiment:
  """The Experiment a run directory was trained with (its config.gin), with optional overrides.

  The directory named here is the run's: its config.gin may hold a relative RunConfig.run_dir
  (say 'runs/cpt'), which must not resolve against the current directory, where another run may
  live under the same name."""
  paths = RunPaths.under(run_dir)
  storage.check_bucket(paths.root, "read")
  if not storage.exists(paths.config):
    raise FileNotFoundError(
        f"{paths.config} does not exist: {run_dir} is not a pretrainx run directory "
        "(train first, or pass --gin_file to describe the model).")
  return parse_gin([paths.config], (*gin_params, f"RunConfig.run_dir = {run_dir!r}"))
