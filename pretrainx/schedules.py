"""Learning-rate schedules from a ScheduleConfig and a peak learning rate, as optax schedules.

Linear warmup then cosine, warmup-stable-decay, constant, rewarm (continual pretraining),
infinite (Ibrahim et al. 2024) or inverse-sqrt; `schedule_phases` names each phase's first step.
Every schedule is jittable: the train step evaluates it at the step counter.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from pretrainx.config import ScheduleConfig

def make_schedule(cfg: ScheduleConfig, peak: float, total_steps: int) -> optax.Schedule:
  """Learning rate as a function of the step (jittable; see ScheduleConfig.name)."""
  if cfg.name in _PLANS:
    phases = _PLANS[cfg.name](cfg, peak, total_steps)
    return optax.join_schedules([fn for _, _, fn in phases], [start for _, start, _ in phases[1:]])
  warmup = min(cfg.warmup_steps, total_steps)
  end = peak * cfg.end_lr_ratio
  if cfg.name == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(total_steps, warmup + 1), end)
  warm = optax.linear_schedule(0.0, peak, max(warmup, 1))
  if cfg.name == "constant":
    return optax.join_schedules([warm, optax.constant_schedule(peak)], [warmup])
  stable_steps, decay_steps = _stable_and_decay_steps(cfg, total_steps, warmup)
  if cfg.decay_shape == "linear":
    decay = optax.linear_schedule(peak, end, decay_steps)
  else:
    decay = lambda step: end + (peak - end) * (1.0 - jax.numpy.sqrt(
        jax.numpy.minimum(step / decay_steps, 1.0)))
  return optax.join_schedules([warm, optax.constant_schedule(peak), decay],
                              [warmup, warmup + stable_steps])


def schedule_phases(cfg: ScheduleConfig, peak: float, total_steps: int) -> list[tuple[str, int]]:
  """(phase name, first step) of each non-empty phase of the schedule, in order."""
  if cfg.name in _PLANS:
    phases = [(name, start) for name, start, _ in _PLANS[cfg.name](cfg, peak, total_steps)]
  else:
    warmup = min(cfg.warmup_steps, total_steps)
    if cfg.name == "wsd":
      stable, _ = _stable_and_decay_steps(cfg, total_steps, warmup)
      phases = [("warmup", 0), ("stable", warmup), ("decay", warmup + stable)]
    else:
      phases = [("warmup", 0), ({"cosine": "cosine decay"}.get(cfg.name, cfg.name), warmup)]
  # a phase is empty when the next one starts at the same step
  return [p for p, nxt in zip(phases, phases[1:] + [("end", total_steps + 1)]) if nxt[1] > p[1]]


def _stable_and_decay_steps(cfg: ScheduleConfig, span: int, warmup: int) -> tuple[int, int]:
  """WSD's phase lengths over `span` steps: the decay is decay_fraction of them (at least 1)."""
  decay_steps = max(int(round(cfg.decay_fraction * span)), 1)
  return max(span - warmup - decay_steps, 0), decay_steps


# A plan is [(phase name, first step, schedule of the steps since that first step)].
_Plan = list[tuple[str, int, Callable[[Any], Any]]]


def _ramp(start: float, stop: float, steps: int, shape: str = "linear") -> optax.Schedule:
  """From `start` at step 0 to `stop` at `steps`, then held; shaped 'linear', '1-sqrt', 'cosine'."""

  def schedule(step):
    frac = jnp.clip(jnp.asarray(step, jnp.float32) / max(steps, 1), 0.0, 1.0)
    if shape == "linear":
      left = 1.0 - frac
    elif shape == "1-sqrt":
      left = 1.0 - jnp.sqrt(frac)
    else:
      left = 0.5 * (1.0 + jnp.cos(math.pi * frac))
    return stop + (start - stop) * left

  return schedule


def _constant(value: float) -> optax.Schedule:
  return lambda step: jnp.full(jnp.shape(step), value, jnp.float32)


def _rewarm_plan(cfg: ScheduleConfig, peak: float, total_steps: int) -> _Plan:
  begin = cfg.rewarm_start_step
  if begin >= total_steps:
    raise ValueError(f"ScheduleConfig.rewarm_start_step={begin} is not before the run's last "
                     f"step ({total_steps}); lower it or raise RunConfig.steps.")
  span = total_steps - begin
  low, end, warmup = cfg.rewarm_start_lr_ratio * peak, cfg.end_lr_ratio * peak, min(
      cfg.warmup_steps, span)
  plan = [("before rewarm", 0, _constant(low)), ("rewarm", begin, _ramp(low, peak, warmup))]
  if cfg.rewarm_decay == "cosine":
    return plan + [("cosine decay", begin + warmup, _ramp(peak, end, span - warmup, "cosine"))]
  stable, decay = _stable_and_decay_steps(cfg, span, warmup)
  return plan + [("stable", begin + warmup, _constant(peak)),
                 ("decay", begin + warmup + stable, _ramp(peak, end, decay, cfg.decay_shape))]


def _infinite_plan(cfg: ScheduleConfig, peak: float, total_steps: int) -> _Plan:
  warmup = min(cfg.warmup_steps, total_steps)
  level, end = cfg.infinite_constant_ratio * peak, cfg.end_lr_ratio * peak
  decay = max(int(round(cfg.decay_fraction * total_steps)), 1)
  flat, anneal = warmup + cfg.cooldown_steps, total_steps - decay
  if flat > anneal:
    raise ValueError(
        f"schedule 'infinite' needs warmup_steps + cooldown_steps + decay_fraction * steps <= "
        f"steps, got {warmup} + {cfg.cooldown_steps} + {decay} > {total_steps}; shorten "
        "cooldown_steps or decay_fraction, or raise RunConfig.steps.")
  return [("warmup", 0, _ramp(0.0, peak, warmup)),
          ("cooldown", warmup, _ramp(peak, level, cfg.cooldown_steps, "cosine")),
          ("constant", flat, _constant(level)),
          ("anneal", anneal, _ramp(level, end, decay, cfg.decay_shape))]


def _inverse_sqrt_plan(cfg: ScheduleConfig, peak: float, total_steps: int) -> _Plan:
  warmup = max(min(cfg.warmup_steps, total_steps), 1)
  # steps since the end of warmup: lr = peak * sqrt(warmup / (warmup + t))
  decay = lambda t: peak * jnp.sqrt(warmup / (warmup + jnp.asarray(t, jnp.float32)))
  return [("warmup", 0, _ramp(0.0, peak, warmup)), ("inverse sqrt", warmup, decay)]


_PLANS = {"rewarm": _rewarm_plan, "infinite": _infinite_plan, "inverse_sqrt": _inverse_sqrt_plan}
