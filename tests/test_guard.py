"""Bad-step detection on device: non-finite values and loss spikes by running z-score."""

import jax.numpy as jnp
import numpy as np
import pytest

from pretrainx.config import GuardConfig
from pretrainx.train.guard import GuardState, guard_update


def _run(losses, cfg):
  g, oks = GuardState.create(), []
  for loss in losses:
    ok, _, g = guard_update(g, jnp.float32(loss), jnp.float32(1.0), cfg)
    oks.append(bool(ok))
  return oks, g


def test_spike_is_flagged_after_warmup_and_statistics_ignore_it():
  rng = np.random.default_rng(0)
  normal = list(3.0 + 0.05 * rng.standard_normal(60))
  cfg = GuardConfig(spike_zscore=6.0, spike_warmup=50)
  oks, g = _run(normal + [4.5] + normal[:5], cfg)
  assert all(oks[:60]) and not oks[60] and all(oks[61:])
  assert int(g.skipped) == 1 and int(g.consecutive_bad) == 0
  assert float(g.loss_mean) == pytest.approx(3.0, abs=0.05)  # the spike did not move the mean
  # the same jump inside the warmup is not judged
  oks, _ = _run(normal[:10] + [4.5], cfg)
  assert all(oks)
  # and with spike detection off only non-finite values are bad
  oks, g = _run(normal + [4.5, float("nan"), float("inf")], GuardConfig(spike_zscore=None))
  assert oks[-3:] == [True, False, False] and int(g.consecutive_bad) == 2


def test_non_finite_gradient_is_bad():
  g = GuardState.create()
  ok, _, g = guard_update(g, jnp.float32(2.0), jnp.float32(jnp.nan), GuardConfig())
  assert not bool(ok) and int(g.skipped) == 1


def test_unknown_policy_is_refused():
  with pytest.raises(ValueError, match="GuardConfig.policy='retry'"):
    GuardConfig(policy="retry")
