"""Exponential moving average (EMA) of the parameters, for evaluation and export.

Pure and jittable: the train state holds the EMA (a params-shaped pytree, sharded like the params)
and the step maps it forward with `ema_update`; the loop evaluates or exports `ema_as_params`.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from pretrainx.config import EmaConfig


def _is_float(x: Any) -> bool:
  return jnp.issubdtype(jnp.result_type(x), jnp.floating)


def ema_init(params: Any) -> Any:
  """The EMA at the start: a copy of the params, floating leaves in float32 (so that updates of
  (1 - d) * (params - ema) are not lost to bf16 rounding); other leaves are copied as they are."""
  return jax.tree.map(lambda p: jnp.asarray(p, jnp.float32) if _is_float(p) else jnp.array(p),
                      params)


def ema_decay(step: jax.Array | int, cfg: EmaConfig) -> jax.Array:
  """The weight the old EMA keeps in the update made with the params of optimizer step `step`.

  0 before start_step (the EMA copies the params); from then on cfg.decay, or with debias
  1 - (1 - d) / (1 - d^k) at the k-th update (k = step - start_step + 1), which is 0 at k = 1.
  """
  count = jnp.asarray(step, jnp.float32) - cfg.start_step + 1.0  # updates so far, this one included
  if cfg.debias and cfg.enabled:
    # 1 - d^k as -expm1(k log d): exact enough in float32 even for d = 0.9999 and k = 1
    left = -jnp.expm1(jnp.maximum(count, 1.0) * math.log(cfg.decay))
    decay = 1.0 - (1.0 - cfg.decay) / left
  else:
    decay = jnp.float32(cfg.decay)
  return jnp.where(count >= 1.0, decay, 0.0).astype(jnp.float32)


def ema_update(ema: Any, params: Any, step: jax.Array | int, cfg: EmaConfig) -> Any:
  """ema <- b * ema + (1 - b) * params with b = ema_decay(step, cfg); pure and jittable.

  `step` is the index of the optimizer step that produced `params` (the step counter before it
  is incremented: 0 for the first update); it may be traced. Non-floating leaves follow the params.
  """
  beta = ema_decay(step, cfg)

  def mix(e, p):
    if not _is_float(e):
      return p
    return (beta * e + (1.0 - beta) * p.astype(jnp.float32)).astype(e.dtype)

  return jax.tree.map(mix, ema, params)


def ema_as_params(ema: Any, params: Any) -> Any:
  """The EMA cast to the params' dtypes, ready to evaluate or export in their place."""
  return jax.tree.map(lambda e, p: e.astype(p.dtype), ema, params)
