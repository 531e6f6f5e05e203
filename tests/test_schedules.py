"""Learning-rate schedules: values at steps computed by hand, shapes, previews, bad fields."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pretrainx.config.optim import SCHEDULES
from pretrainx.config import ScheduleConfig
from pretrainx.schedules import make_schedule, schedule_phases
from pretrainx.schedule_plot import plot_schedule, schedule_table, schedule_values

PEAK = 2.0


def _cfg(schedule: str = "cosine", **fields) -> ScheduleConfig:
  return ScheduleConfig(name=schedule, **fields)


def _lr(total_steps, **fields):
  schedule = make_schedule(_cfg(**fields), PEAK, total_steps)
  return lambda step: float(schedule(step))


def _values(total_steps, **fields):
  return schedule_values(_cfg(**fields), PEAK, total_steps,
                         np.arange(total_steps + 1))


def test_inverse_sqrt_by_hand():
  lr = _lr(200, schedule="inverse_sqrt", warmup_steps=10)
  assert lr(0) == 0.0 and lr(5) == pytest.approx(PEAK / 2) and lr(10) == pytest.approx(PEAK)
  assert lr(40) == pytest.approx(PEAK / 2)  # 4x warmup
  assert lr(90) == pytest.approx(PEAK / 3)  # 9x warmup
  assert lr(160) == pytest.approx(PEAK * math.sqrt(10 / 160))
  v = _values(200, schedule="inverse_sqrt", warmup_steps=10)
  assert np.all(np.diff(v[:11]) > 0) and np.all(np.diff(v[10:]) < 0)


def test_rewarm_starts_at_its_ratio_then_cosine():
  lr = _lr(110, schedule="rewarm", warmup_steps=10, rewarm_start_lr_ratio=0.25, end_lr_ratio=0.1)
  assert lr(0) == pytest.approx(0.25 * PEAK)
  assert lr(5) == pytest.approx((0.25 + 0.75 / 2) * PEAK)  # halfway up the warmup
  assert lr(10) == pytest.approx(PEAK)
  assert lr(60) == pytest.approx(0.1 * PEAK + 0.9 * PEAK * 0.5)  # cosine midpoint
  assert lr(110) == pytest.approx(0.1 * PEAK, abs=1e-6)
  v = _values(110, schedule="rewarm", warmup_steps=10, rewarm_start_lr_ratio=0.25)
  assert np.all(np.diff(v[:11]) > 0) and np.all(np.diff(v[10:]) < 0)


def test_rewarm_with_zero_start_equals_cosine():
  rewarm = _values(100, schedule="rewarm", warmup_steps=10, end_lr_ratio=0.1)
  cosine = _values(100, schedule="cosine", warmup_steps=10, end_lr_ratio=0.1)
  np.testing.assert_allclose(rewarm, cosine, rtol=1e-5, atol=1e-6)


def test_rewarm_wsd_from_a_kept_step_counter():
  fields = dict(schedule="rewarm", rewarm_decay="wsd", warmup_steps=10, rewarm_start_step=100,
                rewarm_start_lr_ratio=0.1, decay_fraction=0.2, end_lr_ratio=0.0)
  lr = _lr(200, **fields)
  # before the rewarm: held at the start; 100 steps of rewarm run: 10 warmup, 70 stable, 20 decay
  assert lr(0) == pytest.approx(0.1 * PEAK) and lr(99) == pytest.approx(0.1 * PEAK)
  assert lr(100) == pytest.approx(0.1 * PEAK) and lr(110) == pytest.approx(PEAK)
  assert lr(150) == pytest.approx(PEAK) and lr(180) == pytest.approx(PEAK)
  assert lr(190) == pytest.approx(PEAK / 2) and lr(200) == pytest.approx(0.0, abs=1e-6)
  phases = schedule_phases(_cfg(**fields), PEAK, 200)
  assert phases == [("before rewarm", 0), ("rewarm", 100), ("stable", 110), ("decay", 180)]


def test_infinite_phases_by_hand():
  fields = dict(schedule="infinite", warmup_steps=10, cooldown_steps=20,
                infinite_constant_ratio=0.5, decay_fraction=0.1, end_lr_ratio=0.0)
  lr = _lr(200, **fields)
  assert lr(0) == 0.0 and lr(10) == pytest.approx(PEAK)
  assert lr(20) == pytest.approx(0.75 * PEAK)  # cosine cooldown halfway: mean of peak and level
  assert lr(30) == pytest.approx(0.5 * PEAK)
  assert lr(100) == pytest.approx(0.5 * PEAK) and lr(180) == pytest.approx(0.5 * PEAK)
  assert lr(190) == pytest.approx(0.25 * PEAK)  # linear anneal halfway
  assert lr(200) == pytest.approx(0.0, abs=1e-6)
  v = _values(200, **fields)
  assert np.all(np.diff(v[10:]) <= 1e-7)  # never rises after warmup
  assert schedule_phases(_cfg(**fields), PEAK, 200) == [
      ("warmup", 0), ("cooldown", 10), ("constant", 30), ("anneal", 180)]


def test_infinite_does_not_depend_on_the_run_length_before_its_anneal():
  fields = dict(schedule="infinite", warmup_steps=10, cooldown_steps=20, decay_fraction=0.1)
  short, long = _values(200, **fields), _values(400, **fields)
  np.testing.assert_array_equal(short[:180], long[:180])
  assert long[300] == pytest.approx(0.5 * PEAK) and short[200] < 0.5 * PEAK


def test_infinite_1_sqrt_anneal():
  lr = _lr(100, schedule="infinite", warmup_steps=0, decay_fraction=0.5, decay_shape="1-sqrt",
           infinite_constant_ratio=0.8, end_lr_ratio=0.0)
  assert lr(0) == pytest.approx(0.8 * PEAK)  # no warmup, no cooldown: the constant at once
  assert lr(50 + 12.5) == pytest.approx(0.8 * PEAK * (1 - math.sqrt(0.25)))


def test_existing_schedules_unchanged():
  lr = _lr(100, schedule="wsd", warmup_steps=10, decay_fraction=0.2, end_lr_ratio=0.0,
           decay_shape="1-sqrt")
  assert lr(80) == pytest.approx(PEAK) and lr(85) == pytest.approx(PEAK * (1 - math.sqrt(0.25)))
  const = _values(50, schedule="constant", warmup_steps=10)
  assert const[5] == pytest.approx(PEAK / 2) and np.all(const[10:] == pytest.approx(PEAK))


@pytest.mark.parametrize("name", SCHEDULES)
def test_every_schedule_is_jittable_and_previewable(tmp_path, name):
  cfg = _cfg(schedule=name, warmup_steps=10, cooldown_steps=10)
  schedule = make_schedule(cfg, PEAK, 100)
  jitted = jax.jit(schedule)(jnp.arange(101))
  np.testing.assert_allclose(jitted, schedule_values(cfg, PEAK, 100, range(101)), rtol=1e-6)
  assert float(jnp.max(jitted)) == pytest.approx(PEAK) and np.all(np.asarray(jitted) >= 0)
  path = plot_schedule(cfg, PEAK, 100, str(tmp_path / f"{name}.png"))
  with open(path, "rb") as f:
    head = f.read(8)
  assert head == b"\x89PNG\r\n\x1a\n" and (tmp_path / f"{name}.png").stat().st_size > 5000


def test_schedule_table_lists_steps_rates_and_phases():
  cfg = _cfg(schedule="infinite", warmup_steps=10, cooldown_steps=20, decay_fraction=0.1,
             end_lr_ratio=0.0)
  rows = schedule_table(cfg, PEAK, 200, points=3).splitlines()
  assert "'infinite'" in rows[0]
  body = {int(r.split()[0]): (float(r.split()[1]), r.split()[2]) for r in rows[2:]}
  assert sorted(body) == [0, 10, 30, 100, 180, 200]  # 3 evenly spaced + each phase start
  assert body[100] == (pytest.approx(PEAK / 2), "constant") and body[180][1] == "anneal"
  picked = schedule_table(cfg, PEAK, 200, points=[40, 5]).splitlines()[2:]
  assert [int(r.split()[0]) for r in picked] == [5, 40]
  with pytest.raises(ValueError, match=r"steps \[300\] are outside the schedule \[0, 200\]"):
    schedule_table(cfg, PEAK, 200, points=[300])


@pytest.mark.parametrize("fields, message", [
    ({"schedule": "step"}, r"ScheduleConfig.name='step'; choose one of \('cosine', 'wsd', 'constant', "
                           r"'rewarm', 'infinite', 'inverse_sqrt'\)"),
    ({"rewarm_decay": "linear"}, r"rewarm_decay='linear'; choose one of \('cosine', 'wsd'\)"),
    ({"rewarm_start_lr_ratio": 1.5}, r"rewarm_start_lr_ratio=1.5 .* in \[0, 1\]"),
    ({"rewarm_start_step": -1}, r"rewarm_start_step=-1 is negative"),
    ({"cooldown_steps": -5}, r"cooldown_steps=-5 is negative"),
    ({"infinite_constant_ratio": 0.0}, r"infinite_constant_ratio=0.0 .* in \(0, 1\]"),
    ({"schedule": "infinite", "infinite_constant_ratio": 0.1, "end_lr_ratio": 0.2},
     r"set end_lr_ratio <= infinite_constant_ratio"),
    ({"schedule": "inverse_sqrt", "warmup_steps": 0}, r"needs warmup_steps >= 1 \(got 0\)"),
    ({"decay_fraction": 1.5}, r"decay_fraction=1.5 .* in \[0, 1\]"),
    ({"warmup_steps": -1}, r"warmup_steps=-1 is negative"),
])
def test_bad_fields_give_clear_errors(fields, message):
  with pytest.raises(ValueError, match=message):
    _cfg(**fields)


def test_phases_that_do_not_fit_the_run_give_clear_errors():
  cfg = _cfg(schedule="infinite", warmup_steps=10, cooldown_steps=80, decay_fraction=0.2)
  with pytest.raises(ValueError, match=r"10 \+ 80 \+ 20 > 100; shorten cooldown_steps"):
    make_schedule(cfg, PEAK, 100)
  with pytest.raises(ValueError, match=r"rewarm_start_step=100 is not before the run's last step"):
    make_schedule(_cfg(schedule="rewarm", rewarm_start_step=100), PEAK, 100)
  with pytest.raises(ValueError, match=r"total_steps=0"):
    schedule_values(_cfg(), PEAK, 0, [0])
