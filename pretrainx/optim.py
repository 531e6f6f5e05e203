"""Optimizers and learning-rate schedules, built from optax pieces.

`make_optimizer(cfg, total_steps)` returns (optax transformation, schedule): AdamW, Adafactor, Lion,
Muon (Newton-Schulz orthogonalised momentum on hidden matrices, AdamW on the rest) or Sophia (with a
Gauss-Newton-Bartlett Hessian estimate the train step supplies), each after global-norm clipping
and with a weight-decay mask; schedules (see `OptimizerConfig.schedule`): linear warmup + cosine,
warmup-stable-decay, constant, rewarm (continual pretraining), infinite, inverse-sqrt.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("cosine", "wsd", "constant", "rewarm", "infinite", "inverse_sqrt")
DECAY_SHAPES = ("linear", "1-sqrt")
REWARM_DECAYS = ("cosine", "wsd")
OPTIMIZERS = ("adamw", "adafactor", "lion", "muon", "sophia")
_STATE_DTYPES = {"float32": jax.numpy.float32, "bfloat16": jax.numpy.bfloat16}


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """The optimizer and its schedule.

  Attributes:
    name: 'adamw', 'adafactor', 'lion', 'muon' or 'sophia'.
    learning_rate: peak learning rate.
    warmup_steps: linear warmup from 0 to the peak (capped at the run's steps).
    schedule: the learning rate over the run's `steps` (peak = learning_rate,
      end = end_lr_ratio * peak), always starting with the linear warmup:
      'cosine': cosine decay from the peak to `end` at the last step.
      'wsd': warmup, stable at the peak, then a decay to `end` over the last decay_fraction of
        the steps, shaped by decay_shape.
      'constant': the peak after warmup.
      'rewarm': continual pretraining from a trained checkpoint: before rewarm_start_step the LR
        is rewarm_start_lr_ratio * peak; from there a linear warmup over warmup_steps goes from
        rewarm_start_lr_ratio * peak to the (new) peak, then rewarm_decay picks 'cosine' (to
        `end` at the last step) or 'wsd' (stable, then decay over the last decay_fraction of the
        steps after rewarm_start_step). With rewarm_start_lr_ratio = 0 and rewarm_start_step = 0,
        'rewarm' with 'cosine' equals 'cosine'.
      'infinite': the infinite schedule of Ibrahim et al. 2024 ("Simple and Scalable Strategies
        to Continually Pre-train LLMs"): warmup, a cosine cooldown over cooldown_steps from the
        peak to infinite_constant_ratio * peak, a long constant phase at that LR, and a final
        annealing over the last decay_fraction of the steps to `end`, shaped by decay_shape.
        Before the annealing the LR does not depend on the run's length, so a checkpoint from the
        constant phase can be continued with more steps without a jump in the LR.
      'inverse_sqrt': warmup, then peak * sqrt(warmup_steps / step) (peak / 2 at 4 * warmup);
        needs warmup_steps >= 1.
    end_lr_ratio: the final LR of 'cosine', 'wsd', 'rewarm' and 'infinite', as a fraction of the
      peak.
    decay_fraction / decay_shape: the length (fraction of the steps) and shape ('linear' or
      '1-sqrt') of the final decay of 'wsd', 'rewarm' with 'wsd', and 'infinite'.
    rewarm_start_lr_ratio: where the rewarm starts, as a fraction of the peak (in [0, 1]).
    rewarm_decay: what follows the rewarm: 'cosine' or 'wsd'.
    rewarm_start_step: the step the rewarm begins at; set it to the restored step counter when a
      continued run keeps the counter of its checkpoint (0 when the counter is reset).
    cooldown_steps: 'infinite': steps of the cosine cooldown from the peak to the constant LR.
    infinite_constant_ratio: 'infinite': the constant phase's LR as a fraction of the peak.
    weight_decay: decoupled weight decay; not applied to params whose '/'-joined path matches any
      of no_decay_patterns (regexes), nor to 1-D params when decay_vectors is False.
    clip_grad_norm: global-norm clipping threshold; None disables it.
    state_dtype: dtype of the first moment ('float32' or 'bfloat16').
    muon_exclude: regexes of params Muon leaves to AdamW (embeddings, output layer, norms).
    muon_fallback: 'adamw' handles excluded and non-matrix params; None makes any non-matrix
      param that Muon would get an error.
    muon_consistent_rms: scale Muon updates by this * sqrt(max(fan_in, fan_out)) so their RMS
      matches AdamW's (Moonlight's shape-aware scaling); None leaves them unscaled.
    sophia_gamma / sophia_interval: Sophia's Hessian scale and the steps between estimates.
    adafactor_min_dim: Adafactor factors the second moment of dims at least this large.
    stochastic_rounding: add updates to bf16 params in fp32 and round stochastically, so updates
      smaller than half a bf16 ulp still move the params in expectation.
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
  name: str = "adamw"
  state_dtype: str = "float32"
  muon_exclude: tuple[str, ...] = ("embed", "lm_head", "norm")
  muon_fallback: str | None = "adamw"
  muon_consistent_rms: float | None = 0.2
  sophia_gamma: float = 0.01
  sophia_interval: int = 10
  adafactor_min_dim: int = 128
  stochastic_rounding: bool = False
  rewarm_start_lr_ratio: float = 0.0
  rewarm_decay: str = "cosine"
  rewarm_start_step: int = 0
  cooldown_steps: int = 0
  infinite_constant_ratio: float = 0.5

  def __post_init__(self):
    if self.name not in OPTIMIZERS:
      raise ValueError(f"unknown optimizer OptimizerConfig.name={self.name!r}; choose one of "
                       f"{OPTIMIZERS}.")
    if self.state_dtype not in _STATE_DTYPES:
      raise ValueError(f"OptimizerConfig.state_dtype={self.state_dtype!r}; choose one of "
                       f"{sorted(_STATE_DTYPES)}.")
    self._check_schedule()

  def _check_schedule(self):
    """Clear errors for schedule fields that cannot be meant."""
    if self.schedule not in SCHEDULES:
      raise ValueError(f"OptimizerConfig.schedule={self.schedule!r}; choose one of {SCHEDULES}.")
    if self.decay_shape not in DECAY_SHAPES:
      raise ValueError(f"OptimizerConfig.decay_shape={self.decay_shape!r}; use 'linear' or '1-sqrt'.")
    if self.warmup_steps < 0:
      raise ValueError(f"OptimizerConfig.warmup_steps={self.warmup_steps} is negative; use >= 0.")
    if not 0.0 <= self.decay_fraction <= 1.0:
      raise ValueError(f"OptimizerConfig.decay_fraction={self.decay_fraction} is the fraction of "
                       "the steps spent in the final decay; use a value in [0, 1].")
    if self.end_lr_ratio < 0:
      raise ValueError(f"OptimizerConfig.end_lr_ratio={self.end_lr_ratio} is negative; use >= 0.")
    if self.rewarm_decay not in REWARM_DECAYS:
      raise ValueError(f"OptimizerConfig.rewarm_decay={self.rewarm_decay!r}; choose one of "
                       f"{REWARM_DECAYS}.")
    if not 0.0 <= self.rewarm_start_lr_ratio <= 1.0:
      raise ValueError(f"OptimizerConfig.rewarm_start_lr_ratio={self.rewarm_start_lr_ratio} is "
                       "a fraction of the peak learning rate; use a value in [0, 1].")
    if self.rewarm_start_step < 0:
      raise ValueError(f"OptimizerConfig.rewarm_start_step={self.rewarm_start_step} is negative; "
                       "use 0 or the step counter the continued run starts from.")
    if self.cooldown_steps < 0:
      raise ValueError(f"OptimizerConfig.cooldown_steps={self.cooldown_steps} is negative; "
                       "use >= 0.")
    if not 0.0 < self.infinite_constant_ratio <= 1.0:
      raise ValueError(f"OptimizerConfig.infinite_constant_ratio={self.infinite_constant_ratio} is "
                       "a fraction of the peak learning rate; use a value in (0, 1].")
    if self.schedule == "infinite" and self.end_lr_ratio > self.infinite_constant_ratio:
      raise ValueError(f"schedule='infinite' anneals from infinite_constant_ratio="
                       f"{self.infinite_constant_ratio} down to end_lr_ratio={self.end_lr_ratio}; "
                       "set end_lr_ratio <= infinite_constant_ratio.")
    if self.schedule == "inverse_sqrt" and self.warmup_steps < 1:
      raise ValueError("schedule='inverse_sqrt' decays as peak * sqrt(warmup_steps / step) and "
                       f"needs warmup_steps >= 1 (got {self.warmup_steps}).")


def make_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
  """Learning rate as a function of the step (jittable; see OptimizerConfig.schedule)."""
  if cfg.schedule in _PLANS:
    phases = _PLANS[cfg.schedule](cfg, total_steps)
    return optax.join_schedules([fn for _, _, fn in phases], [start for _, start, _ in phases[1:]])
  peak, warmup = cfg.learning_rate, min(cfg.warmup_steps, total_steps)
  end = peak * cfg.end_lr_ratio
  if cfg.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(total_steps, warmup + 1), end)
  warm = optax.linear_schedule(0.0, peak, max(warmup, 1))
  if cfg.schedule == "constant":
    return optax.join_schedules([warm, optax.constant_schedule(peak)], [warmup])
  stable_steps, decay_steps = _stable_and_decay_steps(cfg, total_steps, warmup)
  if cfg.decay_shape == "linear":
    decay = optax.linear_schedule(peak, end, decay_steps)
  else:
    decay = lambda step: end + (peak - end) * (1.0 - jax.numpy.sqrt(
        jax.numpy.minimum(step / decay_steps, 1.0)))
  return optax.join_schedules([warm, optax.constant_schedule(peak), decay],
                              [warmup, warmup + stable_steps])


def schedule_phases(cfg: OptimizerConfig, total_steps: int) -> list[tuple[str, int]]:
  """(phase name, first step) of each non-empty phase of the schedule, in order."""
  if cfg.schedule in _PLANS:
    phases = [(name, start) for name, start, _ in _PLANS[cfg.schedule](cfg, total_steps)]
  else:
    warmup = min(cfg.warmup_steps, total_steps)
    if cfg.schedule == "wsd":
      stable, _ = _stable_and_decay_steps(cfg, total_steps, warmup)
      phases = [("warmup", 0), ("stable", warmup), ("decay", warmup + stable)]
    else:
      phases = [("warmup", 0), ({"cosine": "cosine decay"}.get(cfg.schedule, cfg.schedule), warmup)]
  # a phase is empty when the next one starts at the same step
  return [p for p, nxt in zip(phases, phases[1:] + [("end", total_steps + 1)]) if nxt[1] > p[1]]


def _stable_and_decay_steps(cfg: OptimizerConfig, span: int, warmup: int) -> tuple[int, int]:
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


def _rewarm_plan(cfg: OptimizerConfig, total_steps: int) -> _Plan:
  begin = cfg.rewarm_start_step
  if begin >= total_steps:
    raise ValueError(f"OptimizerConfig.rewarm_start_step={begin} is not before the run's last "
                     f"step ({total_steps}); lower it or raise RunConfig.steps.")
  peak, span = cfg.learning_rate, total_steps - begin
  low, end, warmup = cfg.rewarm_start_lr_ratio * peak, cfg.end_lr_ratio * peak, min(
      cfg.warmup_steps, span)
  plan = [("before rewarm", 0, _constant(low)), ("rewarm", begin, _ramp(low, peak, warmup))]
  if cfg.rewarm_decay == "cosine":
    return plan + [("cosine decay", begin + warmup, _ramp(peak, end, span - warmup, "cosine"))]
  stable, decay = _stable_and_decay_steps(cfg, span, warmup)
  return plan + [("stable", begin + warmup, _constant(peak)),
                 ("decay", begin + warmup + stable, _ramp(peak, end, decay, cfg.decay_shape))]


def _infinite_plan(cfg: OptimizerConfig, total_steps: int) -> _Plan:
  peak, warmup = cfg.learning_rate, min(cfg.warmup_steps, total_steps)
  level, end = cfg.infinite_constant_ratio * peak, cfg.end_lr_ratio * peak
  decay = max(int(round(cfg.decay_fraction * total_steps)), 1)
  flat, anneal = warmup + cfg.cooldown_steps, total_steps - decay
  if flat > anneal:
    raise ValueError(
        f"schedule='infinite' needs warmup_steps + cooldown_steps + decay_fraction * steps <= "
        f"steps, got {warmup} + {cfg.cooldown_steps} + {decay} > {total_steps}; shorten "
        "cooldown_steps or decay_fraction, or raise RunConfig.steps.")
  return [("warmup", 0, _ramp(0.0, peak, warmup)),
          ("cooldown", warmup, _ramp(peak, level, cfg.cooldown_steps, "cosine")),
          ("constant", flat, _constant(level)),
          ("anneal", anneal, _ramp(level, end, decay, cfg.decay_shape))]


def _inverse_sqrt_plan(cfg: OptimizerConfig, total_steps: int) -> _Plan:
  peak, warmup = cfg.learning_rate, max(min(cfg.warmup_steps, total_steps), 1)
  # steps since the end of warmup: lr = peak * sqrt(warmup / (warmup + t))
  decay = lambda t: peak * jnp.sqrt(warmup / (warmup + jnp.asarray(t, jnp.float32)))
  return [("warmup", 0, _ramp(0.0, peak, warmup)), ("inverse sqrt", warmup, decay)]


_PLANS = {"rewarm": _rewarm_plan, "infinite": _infinite_plan, "inverse_sqrt": _inverse_sqrt_plan}


def decay_mask(params: Any, cfg: OptimizerConfig) -> Any:
  """Pytree of bools: True where weight decay applies."""
  patterns = [re.compile(p) for p in cfg.no_decay_patterns]

  def wants_decay(path, leaf) -> bool:
    name = _path_name(path)
    if any(p.search(name) for p in patterns):
      return False
    return cfg.decay_vectors or leaf.ndim >= 2 + _layer_axes(name)

  return jax.tree_util.tree_map_with_path(wants_decay, params)


def _layer_axes(name: str) -> int:
  """Scanned blocks stack a leading 'layers' axis; a stacked vector has ndim 2, not 1."""
  return 1 if name.startswith("layers/") else 0


def _path_name(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def muon_dimension_numbers(params: Any, cfg: OptimizerConfig) -> Any:
  """Per param: MuonDimensionNumbers for hidden matrices, None for what AdamW handles.

  The leading 'layers' axis of scanned blocks is a batch axis. For o_proj [heads, head_dim,
  embed] the reduction axes are all but the last; for every other projection the reduction axis
  is the first and the output axes are the rest.
  """
  excluded = [re.compile(p) for p in cfg.muon_exclude]

  def dims(path, leaf):
    name = _path_name(path)
    lead = _layer_axes(name)
    if any(p.search(name) for p in excluded):
      return None
    if leaf.ndim - lead < 2:
      if cfg.muon_fallback is None:
        raise ValueError(
            f"Muon cannot orthogonalise parameter {name} of shape {tuple(leaf.shape)}: it has no "
            "2-D matrix shape. Exclude it (OptimizerConfig.muon_exclude) or set "
            "OptimizerConfig.muon_fallback = 'adamw'.")
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
    return optax.adafactor(schedule, min_dim_size_to_factor=cfg.adafactor_min_dim,
                           weight_decay_rate=cfg.weight_decay or None,
                           weight_decay_mask=mask, multiply_by_parameter_scale=False,
                           clipping_threshold=None, dtype_momentum=state_dtype)
  if cfg.name == "muon":
    if cfg.muon_fallback not in (None, "adamw"):
      raise ValueError(f"OptimizerConfig.muon_fallback={cfg.muon_fallback!r}; use 'adamw' or None.")
    return optax.contrib.muon(
        schedule, beta=cfg.b1 if cfg.b1 >= 0.9 else 0.95, weight_decay=cfg.weight_decay,
        weight_decay_mask=mask, mu_dtype=state_dtype, adam_b1=cfg.b1, adam_b2=cfg.b2,
        adam_weight_decay=cfg.weight_decay,
        muon_weight_dimension_numbers=lambda p: muon_dimension_numbers(p, cfg),
        consistent_rms=cfg.muon_consistent_rms)
  return optax.contrib.sophia(
      schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
      weight_decay_mask=mask, gamma=cfg.sophia_gamma, update_interval=cfg.sophia_interval,
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


def make_optimizer(cfg: OptimizerConfig, total_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  schedule = make_schedule(cfg, total_steps)
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
