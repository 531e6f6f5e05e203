"""Optimizers and learning-rate schedules, built from optax pieces.

`make_optimizer(cfg, total_steps, schedule)` returns (optax transformation, LR schedule): AdamW,
Adafactor, Lion,
Muon (Newton-Schulz orthogonalised momentum on hidden matrices, AdamW on the rest) or Sophia (with a
Gauss-Newton-Bartlett Hessian estimate the train step supplies), each after global-norm clipping
and with a weight-decay mask; schedules (see `ScheduleConfig.name`): linear warmup + cosine,
warmup-stable-decay, constant, rewarm (continual pretraining), infinite, inverse-sqrt.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from pretrainx.config import OptimizerConfig, ScheduleConfig
from pretrainx.tree import layer_axes, path_name

_STATE_DTYPES = {"float32": jax.numpy.float32, "bfloat16": jax.numpy.bfloat16}


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


def decay_mask(params: Any, cfg: OptimizerConfig) -> Any:
  """Pytree of bools: True where weight decay applies."""
  patterns = [re.compile(p) for p in cfg.no_decay_patterns]

  def wants_decay(path, leaf) -> bool:
    name = path_name(path)
    if any(p.search(name) for p in patterns):
      return False
    return cfg.decay_vectors or leaf.ndim >= 2 + layer_axes(name)

  return jax.tree_util.tree_map_with_path(wants_decay, params)


def muon_dimension_numbers(params: Any, cfg: OptimizerConfig) -> Any:
  """Per param: MuonDimensionNumbers for hidden matrices, None for what AdamW handles.

  The leading 'layers' axis of scanned blocks is a batch axis. For o_proj [heads, head_dim,
  embed] the reduction axes are all but the last; for every other projection the reduction axis
  is the first and the output axes are the rest.
  """
  excluded = [re.compile(p) for p in cfg.muon.exclude]

  def dims(path, leaf):
    name = path_name(path)
    lead = layer_axes(name)
    if any(p.search(name) for p in excluded):
      return None
    if leaf.ndim - lead < 2:
      if cfg.muon.fallback is None:
        raise ValueError(
            f"Muon cannot orthogonalise parameter {name} of shape {tuple(leaf.shape)}: it has no "
            "2-D matrix shape. Exclude it (MuonConfig.exclude) or set "
            "MuonConfig.fallback = 'adamw'.")
      return None
    axes = tuple(range(lead, leaf.ndim))
    if name.endswith("o_proj"):
      return optax.contrib.MuonDimensionNumbers(reduction_axis=axes[:-1], output_axis=axes[-1:])
    return optax.contrib.MuonDimensionNumbers(reduction_axis=axes[:1], output_axis=axes[1:])

  return jax.tree_util.tree_map_with_path(dims, params)


def _base_optimizer(cfg: OptimizerConfig, schedule: optax.Schedule):
  mask = lambda p: decay_mask(p, cfg)
  state_dtype = _STATE_DTYPES[cfg.state_dtype]
  if cfg.name == "adamw":
    return optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                       mask=mask, mu_dtype=state_dtype)
  if cfg.name == "lion":
    return optax.lion(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=mask,
                      mu_dtype=state_dtype)
  if cfg.name == "adafactor":
    return optax.adafactor(schedule, min_dim_size_to_factor=cfg.adafactor.min_dim,
                           weight_decay_rate=cfg.weight_decay or None,
                           weight_decay_mask=mask, multiply_by_parameter_scale=False,
                           clipping_threshold=None, dtype_momentum=state_dtype)
  if cfg.name == "muon":
    return optax.contrib.muon(
        schedule, beta=cfg.b1 if cfg.b1 >= 0.9 else 0.95, weight_decay=cfg.weight_decay,
        weight_decay_mask=mask, mu_dtype=state_dtype, adam_b1=cfg.b1, adam_b2=cfg.b2,
        adam_weight_decay=cfg.weight_decay,
        muon_weight_dimension_numbers=lambda p: muon_dimension_numbers(p, cfg),
        consistent_rms=cfg.muon.consistent_rms)
  return optax.contrib.sophia(
      schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
      weight_decay_mask=mask, gamma=cfg.sophia.gamma, update_interval=cfg.sophia.interval,
      hessian_diagonal_fn=gnb_diag_hessian(), mu_dtype=state_dtype)


def gnb_diag_hessian() -> optax.GradientTransformationExtraArgs:
  """Sophia's Gauss-Newton-Bartlett estimator: B * grad(loss on labels sampled from the model)^2.

  The train step passes `gnb_grads=(grads of the mean loss on sampled labels, B)` as a callable
  of the params, so the extra forward/backward runs only on the steps Sophia updates its estimate.
  """

  def init(params):
    del params
    return optax.EmptyState()

  def update(updates, state, params=None, gnb_grads=None, **extra):
    del updates, extra
    if gnb_grads is None:
      raise ValueError("Sophia needs the train step to pass gnb_grads (its Hessian estimate).")
    grads, count = gnb_grads(params)
    return jax.tree.map(lambda g: count * jax.numpy.square(g), grads), state

  return optax.GradientTransformationExtraArgs(init, update)


def make_optimizer(cfg: OptimizerConfig, total_steps: int,
                   schedule_cfg: ScheduleConfig = ScheduleConfig()
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optimizer (clipping, then `cfg.name`) and the LR schedule it follows, peak
  cfg.learning_rate."""
  schedule = make_schedule(schedule_cfg, cfg.learning_rate, total_steps)
  parts = []
  if cfg.clip_grad_norm is not None:
    parts.append(optax.clip_by_global_norm(cfg.clip_grad_norm))
  parts.append(_base_optimizer(cfg, schedule))
  return optax.chain(*parts), schedule


def stochastic_round_to_bf16(x: jax.Array, rng: jax.Array) -> jax.Array:
  """fp32 -> bf16 rounding up or down with probability proportional to the distance (unbiased)."""
  bits = jax.lax.bitcast_convert_type(x.astype(jax.numpy.float32), jax.numpy.uint32)
  noise = jax.random.bits(rng, x.shape, jax.numpy.uint32) & jax.numpy.uint32(0xFFFF)
  rounded = (bits + noise) & jax.numpy.uint32(0xFFFF0000)
  return jax.lax.bitcast_convert_type(rounded, jax.numpy.float32).astype(jax.numpy.bfloat16)


def apply_updates_stochastic(params: Any, updates: Any, rng: jax.Array) -> Any:
  """params + updates, computed in fp32; bf16 params are stochastically rounded, others exact."""
  leaves, treedef = jax.tree.flatten(params)
  keys = list(jax.random.split(rng, len(leaves)))
  keys = jax.tree.unflatten(treedef, keys)

  def add(p, u, key):
    total = p.astype(jax.numpy.float32) + u.astype(jax.numpy.float32)
    return stochastic_round_to_bf16(total, key) if p.dtype == jax.numpy.bfloat16 else \
        total.astype(p.dtype)

  return jax.tree.map(add, params, updates, keys)
