"""Optimizers and learning-rate schedules, built from optax pieces.

`make_optimizer(cfg, total_steps)` returns (optax transformation, schedule). AdamW with a weight
decay mask, global-norm clipping, and a schedule: linear warmup + cosine, or warmup-stable-decay.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import optax

SCHEDULES = ("cosine", "wsd", "constant")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """AdamW and its schedule.

  Attributes:
    learning_rate: peak learning rate.
    warmup_steps: linear warmup from 0 to the peak.
    schedule: 'cosine' (decay to end_lr_ratio * peak by the last step), 'wsd' (warmup, constant,
      then a decay over the last decay_fraction of the steps), or 'constant' after warmup.
    decay_fraction / decay_shape: WSD's decay phase length and shape ('linear' or '1-sqrt').
    weight_decay: decoupled weight decay; not applied to params whose '/'-joined path matches any
      of no_decay_patterns (regexes), nor to 1-D params when decay_vectors is False.
    clip_grad_norm: global-norm clipping threshold; None disables it.
  """

  learning_rate: float = 3e-3
  warmup_steps: int = 20
  schedule: str = "cosine"
  end_lr_ratio: float = 0.1
  decay_fraction: float = 0.2
  decay_shape: str = "linear"
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  no_decay_patterns: tuple[str, ...] = ("norm", "embed")
  decay_vectors: bool = False
  clip_grad_norm: float | None = 1.0

  def __post_init__(self):
    if self.schedule not in SCHEDULES:
      raise ValueError(f"OptimizerConfig.schedule={self.schedule!r}; choose one of {SCHEDULES}.")
    if self.decay_shape not in ("linear", "1-sqrt"):
      raise ValueError(f"OptimizerConfig.decay_shape={self.decay_shape!r}; use 'linear' or '1-sqrt'.")


def make_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
  """Learning rate as a function of the step."""
  peak, warmup = cfg.learning_rate, min(cfg.warmup_steps, total_steps)
  end = peak * cfg.end_lr_ratio
  if cfg.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(total_steps, warmup + 1), end)
  warm = optax.linear_schedule(0.0, peak, max(warmup, 1))
  if cfg.schedule == "constant":
    return optax.join_schedules([warm, optax.constant_schedule(peak)], [warmup])
  decay_steps = max(int(round(cfg.decay_fraction * total_steps)), 1)
  stable_steps = max(total_steps - warmup - decay_steps, 0)
  if cfg.decay_shape == "linear":
    decay = optax.linear_schedule(peak, end, decay_steps)
  else:
    decay = lambda step: end + (peak - end) * (1.0 - jax.numpy.sqrt(
        jax.numpy.minimum(step / decay_steps, 1.0)))
  return optax.join_schedules([warm, optax.constant_schedule(peak), decay],
                              [warmup, warmup + stable_steps])


def decay_mask(params: Any, cfg: OptimizerConfig) -> Any:
  """Pytree of bools: True where weight decay applies."""
  patterns = [re.compile(p) for p in cfg.no_decay_patterns]

  def wants_decay(path, leaf) -> bool:
    name = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
    if any(p.search(name) for p in patterns):
      return False
    return cfg.decay_vectors or leaf.ndim >= 2 + _layer_axes(name)

  return jax.tree_util.tree_map_with_path(wants_decay, params)


def _layer_axes(name: str) -> int:
  """Scanned blocks stack a leading 'layers' axis; a stacked vector has ndim 2, not 1."""
  return 1 if name.startswith("layers/") else 0


def make_optimizer(cfg: OptimizerConfig, total_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  schedule = make_schedule(cfg, total_steps)
  parts = []
  if cfg.clip_grad_norm is not None:
    parts.append(optax.clip_by_global_norm(cfg.clip_grad_norm))
  parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay, mask=lambda p: decay_mask(p, cfg)))
  return optax.chain(*parts), schedule
