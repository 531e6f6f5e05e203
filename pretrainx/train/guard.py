"""Bad-step detection inside the jitted step: NaN/inf loss or gradient, and loss spikes.

GuardState keeps running loss statistics on device; `guard_update` says whether this step's update
may be applied. The step applies it or keeps the old state; what to do next (go on, roll back, stop)
is the loop's decision by GuardConfig.policy.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp

POLICIES = ("skip", "rollback", "raise")


@dataclasses.dataclass(frozen=True)
class GuardConfig:
  """What counts as a bad step and what happens then.

  Attributes:
    policy: 'skip' (drop the update, go on), 'rollback' (restore the last checkpoint and skip the
      batches since), or 'raise' (stop at the first bad step). The state is never updated with a
      bad step's update under any policy.
    spike_zscore: a loss more than this many standard deviations above its running mean is bad
      (None: only non-finite values are bad).
    spike_warmup: steps of statistics gathered before spikes are judged.
    ema_decay: decay of the running loss mean and variance.
    max_consecutive: this many bad steps in a row stop the run with an error.
  """

  policy: str = "skip"
  spike_zscore: float | None = 6.0
  spike_warmup: int = 50
  ema_decay: float = 0.98
  max_consecutive: int = 5

  def __post_init__(self):
    if self.policy not in POLICIES:
      raise ValueError(f"GuardConfig.policy={self.policy!r}; choose one of {POLICIES}.")


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
