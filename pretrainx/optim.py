"""Optimizers and learning-rate schedules, built from optax pieces.

`make_optimizer(cfg, total_steps)` returns (optax transformation, schedule): AdamW, Adafactor, Lion,
Muon (Newton-Schulz orthogonalised momentum on hidden matrices, AdamW on the rest) or Sophia (with a
Gauss-Newton-Bartlett Hessian estimate the train step supplies), each after global-norm clipping
and with a weight-decay mask; schedules: linear warmup + cosine, warmup-stable-decay, constant.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import optax

SCHEDULES = ("cosine", "wsd", "constant")
OPTIMIZERS = ("adamw", "adafactor", "lion", "muon", "sophia")
_STATE_DTYPES = {"float32": jax.numpy.float32, "bfloat16": jax.numpy.bfloat16}


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """The optimizer and its schedule.

  Attributes:
    name: 'adamw', 'adafactor', 'lion', 'muon' or 'sophia'.
    learning_rate: peak learning rate.
    warmup_steps: linear warmup from 0 to the peak.
    schedule: 'cosine' (decay to end_lr_ratio * peak by the last step), 'wsd' (warmup, constant,
      then a decay over the last decay_fraction of the steps), or 'constant' after warmup.
    decay_fraction / decay_shape: WSD's decay phase length and shape ('linear' or '1-sqrt').
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

  def __post_init__(self):
    if self.name not in OPTIMIZERS:
      raise ValueError(f"unknown optimizer OptimizerConfig.name={self.name!r}; choose one of "
                       f"{OPTIMIZERS}.")
    if self.state_dtype not in _STATE_DTYPES:
      raise ValueError(f"OptimizerConfig.state_dtype={self.state_dtype!r}; choose one of "
                       f"{sorted(_STATE_DTYPES)}.")
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
