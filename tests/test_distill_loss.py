"""The knowledge-distillation loss (pretrainx/train/distill_loss.py) against numpy references, and
DistillConfig's checks: zero KD at teacher == student, k = vocab equals no truncation, alpha = 0
equals plain CE."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pretrainx.config import DistillConfig, Experiment, validate
from pretrainx.train import distill_loss as dl
from pretrainx.train.step import cross_entropy_sums

B, S, V = 2, 5, 11
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


def _logits(seed, scale=2.0):
  return scale * jax.random.normal(jax.random.PRNGKey(seed), (B, S, V), jnp.float32)


def _mask():
  return jnp.array([[1, 1, 1, 1, 0], [1, 1, 0, 1, 1]], jnp.int32)


def _cfg(**kw):
  return DistillConfig(teacher="t", **kw)


def _kd(student, teacher_logits, cfg):
  teacher = dl.teacher_targets(teacher_logits, cfg.temperature, cfg.top_k, cfg.top_p)
  return dl.kd_sums(student, teacher, _mask(), cfg)["kd"]


def _np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _np_kl(logp, logq):
  return (np.exp(logp) * (logp - logq)).sum(-1)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("top_k,truncation", [(0, "renormalize"), (4, "renormalize"),
                                              (4, "other")])
def test_teacher_equal_to_student_gives_zero_kd_and_ce_gradients(divergence, top_k, truncation):
  cfg = _cfg(divergence=divergence, top_k=top_k, truncation=truncation, temperature=2.0,
             alpha=0.3)
  logits = _logits(0)
  targets = jnp.argmax(_logits(1), -1)

  def total(x, alpha):
    ce = cross_entropy_sums(x, targets, _mask())
    tokens = ce["tokens"]
    return dl.distill_loss(ce["ce"] / tokens, _kd(x, logits, cfg) / tokens, alpha,
                           cfg.temperature)

  assert abs(float(_kd(logits, logits, cfg))) < 1e-6
  g = jax.grad(total)(logits, cfg.alpha)
  g_ce = jax.grad(total)(logits, 0.0)
  np.testing.assert_allclose(g, (1 - cfg.alpha) * g_ce, atol=1e-6)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("truncation", ["renormalize", "other"])
def test_top_k_of_the_whole_vocabulary_equals_no_truncation(divergence, truncation):
  student, teacher = _logits(2), _logits(3)
  dense = _cfg(divergence=divergence, temperature=1.5)
  full = dataclasses.replace(dense, top_k=V, truncation=truncation)
  np.testing.assert_allclose(_kd(student, teacher, full), _kd(student, teacher, dense),
                             rtol=1e-5)
  grad = lambda c: jax.grad(lambda x: _kd(x, teacher, c))(student)
  np.testing.assert_allclose(grad(full), grad(dense), atol=1e-6)


def test_alpha_zero_equals_plain_cross_entropy_bit_exact():
  student, teacher, targets = _logits(4), _logits(5), jnp.argmax(_logits(6), -1)
  cfg = _cfg(alpha=0.0, temperature=2.0)

  def plain(x):
    sums = cross_entropy_sums(x, targets, _mask())
    return sums["ce"] / sums["tokens"]

  def mixed(x):
    sums = cross_entropy_sums(x, targets, _mask())
    return dl.distill_loss(sums["ce"] / sums["tokens"], _kd(x, teacher, cfg) / sums["tokens"],
                           dl.alpha_at(cfg, 0, 10), cfg.temperature)

  assert jax.jit(plain)(student) == jax.jit(mixed)(student)
  np.testing.assert_array_equal(jax.jit(jax.grad(plain))(student),
                                jax.jit(jax.grad(mixed))(student))


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
def test_kl_matches_numpy_dense_and_truncated(divergence):
  student, teacher, t = np.asarray(_logits(7)), np.asarray(_logits(8)), 1.7
  mask = np.asarray(_mask(), np.float64)
  s_logp = _np_log_softmax(student.astype(np.float64) / t)
  t_logp = _np_log_softmax(teacher.astype(np.float64) / t)
  pick = (lambda s, q: _np_kl(q, s)) if divergence == "forward_kl" else _np_kl
  want_dense = (pick(s_logp, t_logp) * mask).sum()

  k = 3
  ids = np.argsort(-t_logp, axis=-1)[..., :k]
  s_k, t_k = np.take_along_axis(s_logp, ids, -1), np.take_along_axis(t_logp, ids, -1)
  want_renorm = (pick(_np_log_softmax(s_k), _np_log_softmax(t_k)) * mask).sum()
  s_other = np.log1p(-np.exp(s_k).sum(-1, keepdims=True))
  t_other = np.log1p(-np.exp(t_k).sum(-1, keepdims=True))
  want_other = (pick(np.concatenate([s_k, s_other], -1), np.concatenate([t_k, t_other], -1))
                * mask).sum()

  cfg = _cfg(divergence=divergence, temperature=t)
  got = [_kd(jnp.asarray(student), jnp.asarray(teacher), c) for c in (
      cfg, dataclasses.replace(cfg, top_k=k),
      dataclasses.replace(cfg, top_k=k, truncation="other"))]
  np.testing.assert_allclose(got, [want_dense, want_renorm, want_other], rtol=1e-5)


def test_jsd_is_symmetric_and_bounded():
  a, b = _logits(9), _logits(10)
  cfg = _cfg(divergence="jsd", jsd_beta=0.5)
  ab, ba = _kd(a, b, cfg), _kd(b, a, cfg)
  np.testing.assert_allclose(ab, ba, rtol=1e-6)
  assert 0 < float(ab) <= float(jnp.sum(_mask())) * np.log(2)


def test_cached_top_k_without_other_mass_matches_online():
  """A cache holds only ids and log-probs (other=None): the 'other' bucket comes from their sum."""
  student, teacher = _logits(11), _logits(12)
  cfg = _cfg(top_k=4, truncation="other", divergence="reverse_kl")
  online = dl.teacher_targets(teacher, cfg.temperature, cfg.top_k)
  cached = dl.TeacherTargets(online.ids, online.logprobs)
  np.testing.assert_allclose(dl.kd_sums(student, cached, _mask(), cfg)["kd"],
                             dl.kd_sums(student, online, _mask(), cfg)["kd"], rtol=1e-5)


def test_top_p_keeps_the_smallest_set_reaching_p():
  logits = jnp.log(jnp.array([[[0.5, 0.3, 0.15, 0.05]]]))
  got = dl.teacher_targets(logits, 1.0, top_p=0.75)
  np.testing.assert_array_equal(got.ids[0, 0], [0, 1, 2, 3])
  np.testing.assert_array_equal(np.isfinite(got.logprobs[0, 0]), [True, True, False, False])
  np.testing.assert_allclose(jnp.exp(got.other), [[0.2]], rtol=1e-5)
  first = dl.teacher_targets(logits, 1.0, top_p=0.1)
  np.testing.assert_array_equal(np.isfinite(first.logprobs[0, 0]), [True, False, False, False])


def test_top1_agreement_counts_loss_tokens():
  logits = _logits(13)
  sums = dl.kd_sums(logits, dl.teacher_targets(logits, 1.0, top_k=2), _mask(), _cfg())
  assert float(sums["top1_agree"]) == float(jnp.sum(_mask()))


def test_alpha_schedules():
  steps = 100
  const = _cfg(alpha=0.4)
  linear = _cfg(alpha=0.4, alpha_schedule="linear")
  linear_to_50 = dataclasses.replace(linear, alpha_end_step=50)
  until = _cfg(alpha=0.4, alpha_schedule="until", alpha_end_step=30)
  at = lambda c, s: float(dl.alpha_at(c, s, steps))
  assert at(const, 0) == at(const, 99) == pytest.approx(0.4)
  assert [at(linear, s) for s in (0, 50, 100)] == pytest.approx([0.4, 0.2, 0.0])
  assert [at(linear_to_50, s) for s in (25, 50, 80)] == pytest.approx([0.2, 0.0, 0.0])
  assert [at(until, s) for s in (0, 29, 30, 99)] == pytest.approx([0.4, 0.4, 0.0, 0.0])


@pytest.mark.parametrize("fields,message", [
    ({"alpha": 1.5}, "alpha=1.5 is outside [0, 1]"),
    ({"alpha": -0.1}, "outside [0, 1]"),
    ({"temperature": 0.0}, "positive temperature"),
    ({"divergence": "kl"}, "choose one of 'forward_kl'"),
    ({"alpha_schedule": "until"}, "needs alpha_end_step"),
    ({"top_p": 0.0}, "top_p=0.0 is outside (0, 1]"),
    ({"truncation": "drop"}, "'renormalize', 'other'"),
    ({"jsd_beta": 1.0}, "jsd_beta=1.0"),
])
def test_bad_distill_config_is_one_line(fields, message):
  with pytest.raises(ValueError, match=None) as err:
    DistillConfig(**fields)
  assert message in str(err.value) and "\n" not in str(err.value)


def test_alpha_end_step_past_the_run_is_refused():
  exp = Experiment().replace(run={"steps": 10},
                             distill={"alpha_schedule": "linear", "alpha_end_step": 20})
  with pytest.raises(ValueError, match="past the run's last step"):
    validate(exp)
