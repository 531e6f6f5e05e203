"""Optimizers built from optax pieces, following a learning-rate schedule (pretrainx.schedules).

`make_optimizer(cfg, total_steps, schedule)` returns (optax transformation, LR schedule): AdamW,
Adafactor, Lion, Muon (Newton-Schulz orthogonalised momentum on hidden matrices, AdamW on the
rest) or Sophia (with a Gauss-Newton-Bartlett Hessian estimate the train step supplies), each after
global-norm clipping and with a weight-decay mask.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import optax

from pretrainx.config import OptimizerConfig, ScheduleConfig
from pretrainx.schedules import make_schedule
from pretrainx.tree import layer_axes, path_name, stacked_axes

_STATE_DTYPES = {"float32": jax.numpy.float32, "bfloat16": jax.numpy.bfloat16}


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

  The leading 'layers' axis of scanned blocks and the 'experts' axis of routed experts are batch
  axes. For o_proj [heads, head_dim,
  embed] the reduction axes are all but the last; for every other projection the reduction axis
  is the first and the output axes are the rest.
  """
  excluded = [re.compile(p) for p in cfg.muon.exclude]

  def dims(path, leaf):
    name = path_name(path)
    lead = stacked_axes(name)  # scanned layers and routed experts: each matrix on its own
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
