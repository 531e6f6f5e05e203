"""Parameter EMA: closed form for constant params, tracking before start_step, debiasing, jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pretrainx.config import EmaConfig
from pretrainx.ema import ema_as_params, ema_decay, ema_init, ema_update


def _params(value):
  return {"w": jnp.full((3, 2), value, jnp.float32), "b": jnp.full((2,), value, jnp.bfloat16)}


@pytest.mark.parametrize("k", [1, 5, 40])
def test_constant_params_close_the_gap_as_one_minus_d_to_the_k(k):
  d, target = 0.9, 3.0
  cfg = EmaConfig(decay=d)
  ema = ema_init(_params(0.0))
  for step in range(k):
    ema = ema_update(ema, _params(target), step, cfg)
  expected = (1 - d ** k) * target
  np.testing.assert_allclose(ema["w"], expected, rtol=1e-5)
  np.testing.assert_allclose(ema["b"], expected, rtol=1e-5)
  assert ema["b"].dtype == jnp.float32  # averaged in fp32 even for bf16 params


def test_tracks_the_params_before_start_step():
  cfg = EmaConfig(decay=0.5, start_step=3)
  ema = ema_init(_params(0.0))
  for step in range(3):
    ema = ema_update(ema, _params(float(step + 1)), step, cfg)
    np.testing.assert_array_equal(ema["w"], step + 1.0)  # a copy of the latest params
  ema = ema_update(ema, _params(7.0), 3, cfg)  # the first averaging update
  np.testing.assert_allclose(ema["w"], 0.5 * 3.0 + 0.5 * 7.0)
  assert [float(ema_decay(s, cfg)) for s in (0, 2, 3, 10)] == [0.0, 0.0, 0.5, 0.5]


def test_debias_is_the_normalised_weighted_average_since_start_step():
  d, start = 0.8, 2
  cfg = EmaConfig(decay=d, start_step=start, debias=True)
  values = [5.0, -1.0, 2.0, 4.0, 0.5, 3.0]
  ema = ema_init(_params(0.0))
  for step, v in enumerate(values):
    ema = ema_update(ema, _params(v), step, cfg)
  kept = values[start:]  # the params before start_step get no weight at all
  weights = np.array([d ** (len(kept) - 1 - i) for i in range(len(kept))])
  expected = float(np.dot(weights, kept) / weights.sum())
  np.testing.assert_allclose(ema["w"], expected, rtol=1e-5)
  # the first averaging update copies the params; the decay then grows towards d
  decays = [float(ema_decay(s, cfg)) for s in range(start, start + 30)]
  assert decays[0] == 0.0 and np.all(np.diff(decays) > 0)
  assert decays[1] == pytest.approx(1 - (1 - d) / (1 - d ** 2)) and d - 1e-3 < decays[-1] < d


def test_debias_stays_accurate_for_decays_near_one():
  cfg = EmaConfig(decay=0.9999, debias=True)
  assert abs(float(ema_decay(0, cfg))) < 1e-6
  assert float(ema_decay(1, cfg)) == pytest.approx(0.5, abs=1e-4)


def test_update_is_jittable_with_a_traced_step():
  cfg = EmaConfig(decay=0.9, start_step=2)
  update = jax.jit(lambda e, p, s: ema_update(e, p, s, cfg))
  ema = ema_init(_params(1.0))
  eager = ema
  for step in range(5):
    ema = update(ema, _params(step + 1.0), jnp.int32(step))
    eager = ema_update(eager, _params(step + 1.0), step, cfg)
  assert update._cache_size() == 1  # pylint: disable=protected-access  # one trace for all steps
  np.testing.assert_allclose(ema["w"], eager["w"], rtol=1e-6)
  by_hand = 2.0  # tracked until step 1, then averaged the params 3, 4, 5
  for value in (3.0, 4.0, 5.0):
    by_hand = 0.9 * by_hand + 0.1 * value
  np.testing.assert_allclose(ema["w"], by_hand, rtol=1e-6)
  out = ema_as_params(ema, _params(0.0))
  assert out["b"].dtype == jnp.bfloat16 and out["w"].dtype == jnp.float32


def test_off_and_bad_configs():
  cfg = EmaConfig()
  assert not cfg.enabled and EmaConfig(decay=0.99).enabled
  ema = ema_update(ema_init(_params(1.0)), _params(4.0), 10, cfg)
  np.testing.assert_array_equal(ema["w"], 4.0)  # decay 0: the EMA is the params
  with pytest.raises(ValueError, match=r"EmaConfig.decay=1.0 must be in \[0, 1\)"):
    EmaConfig(decay=1.0)
  with pytest.raises(ValueError, match=r"EmaConfig.start_step=-2 is negative"):
    EmaConfig(start_step=-2)
