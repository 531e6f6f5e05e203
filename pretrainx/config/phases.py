"""Run phases: the sequence length, batch size and RoPE settings each mixture stage trains with.

A Stage may change seq_len, the batch (rows or tokens per step) and ModelConfig's rope_* fields;
each change holds until the next stage that changes it. `run_phases` resolves them once per
stage, so the data pipeline, the runtime (a step compiled per shape) and the loop all read the
same answer. Pure functions of the configuration.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from pretrainx.config.data import Stage
from pretrainx.config.model import ModelConfig
from pretrainx.config.run import RunConfig


@dataclasses.dataclass(frozen=True)
class Phase:
  """What the steps from `start_step` (a stage's start) train with."""

  start_step: int
  seq_len: int
  global_batch_size: int
  rope: tuple[tuple[str, Any], ...] = ()  # ModelConfig rope_* overrides, sorted by name

  @property
  def tokens_per_step(self) -> int:
    return self.seq_len * self.global_batch_size

  @property
  def shape(self) -> tuple[int, int]:
    """(global_batch_size, seq_len): what the compiled step depends on besides the model."""
    return self.global_batch_size, self.seq_len

  def model(self, base: ModelConfig) -> ModelConfig:
    """`base` with this phase's rope_* overrides (ValueError for a bad value)."""
    return dataclasses.replace(base, **dict(self.rope)) if self.rope else base


def run_phases(run: RunConfig, stages: Sequence[Stage], model: ModelConfig | None = None
               ) -> tuple[Phase, ...]:
  """One Phase per stage (the first from RunConfig.seq_len / global_batch_size); with `model`,
  each phase's settings are checked against it (one-line ValueErrors)."""
  first = (stages or (Stage(),))[0]
  if first.seq_len or first.global_batch_size or first.tokens_per_step or first.rope:
    raise ValueError("the first stage trains with RunConfig.seq_len / global_batch_size and "
                     "ModelConfig's rope settings; set those instead of its seq_len, "
                     "global_batch_size, tokens_per_step or rope (later stages change them).")
  seq_len, batch, rope = run.seq_len, run.global_batch_size, {}
  tokens = None  # a tokens_per_step held since the stage that set it (later lengths keep it)
  out = []
  for stage in stages or (Stage(),):
    seq_len = stage.seq_len or seq_len
    if stage.global_batch_size is not None:
      batch, tokens = stage.global_batch_size, None
    tokens = stage.tokens_per_step or tokens
    if tokens is not None:
      if tokens % seq_len:
        raise ValueError(f"the stage at step {stage.start_step} has tokens_per_step={tokens}, "
                         f"not a multiple of its seq_len={seq_len}; use a multiple such as "
                         f"{max(tokens // seq_len, 1) * seq_len}.")
      batch = tokens // seq_len
    rope = {**rope, **stage.rope}
    phase = Phase(stage.start_step, seq_len, batch, tuple(sorted(rope.items())))
    if model is not None:
      _check(phase, model)
    out.append(phase)
  return tuple(out)


def _check(phase: Phase, model: ModelConfig) -> None:
  where = f"the stage at step {phase.start_step}"
  unknown = sorted(k for k, _ in phase.rope if not hasattr(model, k))
  if unknown:
    known = sorted(f.name for f in dataclasses.fields(model) if f.name.startswith("rope_"))
    raise ValueError(f"{where} sets rope field(s) {unknown} that ModelConfig does not have; "
                     f"choose from {known}.")
  if phase.seq_len > model.max_seq_len:
    raise ValueError(f"{where} trains at seq_len={phase.seq_len}, above ModelConfig.max_seq_len="
                     f"{model.max_seq_len}; raise max_seq_len to the longest stage's length.")
  try:
    phase.model(model)
  except ValueError as err:
    raise ValueError(f"{where}: {err}") from None


def phase_index(phases: Sequence[Phase], step: int) -> int:
  """Index of the phase the (0-based) `step`'s batch belongs to."""
  starts = np.asarray([p.start_step for p in phases])
  return max(int(np.searchsorted(starts, step, side="right")) - 1, 0)


def shape_changes(phases: Sequence[Phase]) -> tuple[int, ...]:
  """Indices of the phases that start a new packing (the first, and every seq_len change)."""
  return tuple(i for i, p in enumerate(phases) if i == 0 or p.seq_len != phases[i - 1].seq_len)
