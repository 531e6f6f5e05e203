"""Bad-step detection inside the jitted step: NaN/inf loss or gradient, and loss spikes.

GuardState keeps running loss statistics on device; `guard_update` says whether this step's update
may be applied. The step applies it or keeps the old state; what to do next (go on, roll back, stop)
is the loop's decision by GuardConfig.policy.
"""

from __future__ import annotations


import flax.struct
import jax
import jax.numpy as jnp
from pretrainx.config import GuardConfig


@flax.struct.dataclass
class GuardState:
  loss_mean: jax.Array  # f32 running mean of good losses
  loss_var: jax.Array  # f32 running variance of good losses
  good_steps: jax.Array  # i32 steps that fed the statistics
  consecutive_bad: jax.Array  # i32
  skipped: jax.Array  # i32 bad steps so far

  @classmethod
  def create(cls) -> "GuardState":
    f, i = jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32)
    return cls(loss_mean=f, loss_var=f, good_steps=i, consecutive_bad=i, skipped=i)


def guard_update(guard: GuardState, loss: jax.Array, grad_norm: jax.Array, cfg: GuardConfig
                 ) -> tuple[jax.Array, jax.Array, GuardState]:
  """-> (ok, zscore, new guard state). `ok` is a bool scalar: apply this step's update."""
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  std = jnp.sqrt(jnp.maximum(guard.loss_var, 1e-12))
  zscore = jnp.where(guard.good_steps > 0, (loss - guard.loss_mean) / std, 0.0)
  spike = jnp.zeros((), bool)
  if cfg.spike_zscore is not None:
    spike = (guard.good_steps >= cfg.spike_warmup) & (zscore > cfg.spike_zscore)
  ok = finite & ~spike
  # EMA with bias-free start: the first good loss sets the mean.
  decay = jnp.where(guard.good_steps == 0, 0.0, cfg.ema_decay)
  delta = loss - guard.loss_mean
  mean = guard.loss_mean + (1 - decay) * delta
  var = decay * (guard.loss_var + (1 - decay) * delta * delta)
  keep = lambda new, old: jnp.where(ok, new, old)
  new = GuardState(
      loss_mean=keep(mean, guard.loss_mean), loss_var=keep(var, guard.loss_var),
      good_steps=guard.good_steps + ok.astype(jnp.int32),
      consecutive_bad=jnp.where(ok, 0, guard.consecutive_bad + 1),
      skipped=guard.skipped + (~ok).astype(jnp.int32))
  return ok, jnp.where(jnp.isfinite(zscore), zscore, 0.0), new
