"""The knowledge-distillation loss as pure functions: the teacher's distribution at temperature T
(dense, or its top-k / top-p tokens), its divergence from the student's, per-token sums over the
loss mask, alpha's schedule, and the mix (1 - alpha) * CE + alpha * T^2 * KD.

A teacher enters as TeacherTargets, ids and log-probs, whether it ran online (teacher_targets of
its logits) or a cache holds its top-k tokens, so both feed the same kd_sums. No I/O: the train
step calls these under jit.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from pretrainx.config.distill import DistillConfig


class TeacherTargets(NamedTuple):
  """The teacher's distribution at temperature T over the tokens it keeps.

  ids: [b, s, k] int32 token ids, most likely first; None: dense (logprobs cover the vocabulary).
  logprobs: [b, s, k] (dense: [b, s, vocab]) fp32 log softmax(teacher_logits / T), -inf where a
    kept-set rule (top_p) dropped the token; not renormalised over the kept set.
  other: [b, s] log of the teacher's mass outside the kept tokens (-inf: none); None means
    log(1 - sum(exp(logprobs))), what a cache of top-k log-probs can give.
  """

  ids: jax.Array | None
  logprobs: jax.Array
  other: jax.Array | None = None


def teacher_targets(teacher_logits: jax.Array, temperature: float, top_k: int = 0,
                    top_p: float = 1.0) -> TeacherTargets:
  """TeacherTargets of teacher_logits [b, s, vocab]: dense, or its top_k tokens (0: all) further
  cut to the smallest most-likely set with mass >= top_p (the first token always stays)."""
  logp = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
  vocab = logp.shape[-1]
  if top_k <= 0 and top_p >= 1.0:
    return TeacherTargets(None, logp)
  values, ids = jax.lax.top_k(logp, min(top_k or vocab, vocab))  # [b, s, k], sorted
  if top_p < 1.0:
    probs = jnp.exp(values)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the more likely tokens
    values = jnp.where(before < top_p, values, -jnp.inf)
  return TeacherTargets(ids, values, _outside_logmass(logp, ids, values > -jnp.inf))


def _outside_logmass(logp: jax.Array, ids: jax.Array, kept: jax.Array) -> jax.Array:
  """log of the mass of logp [b, s, vocab] outside the kept ids [b, s, k] -> [b, s]; exactly
  -inf (with zero gradients, never NaN) where nothing is outside."""
  b, s, _ = ids.shape
  inside = jnp.zeros(logp.shape, bool).at[
      jnp.arange(b)[:, None, None], jnp.arange(s)[None, :, None], ids].set(kept)  # [b, s, V]
  has = ~jnp.all(inside, axis=-1)  # [b, s]
  x = jnp.where(inside, -jnp.inf, logp)
  lse = jax.nn.logsumexp(jnp.where(has[..., None], x, 0.0), axis=-1)
  return jnp.where(has, lse, -jnp.inf)


def _other_from_kept(logprobs: jax.Array) -> jax.Array:
  """log(1 - sum(exp(logprobs))) over the last axis, -inf where the kept mass reaches 1."""
  rest = 1.0 - jnp.sum(jnp.exp(logprobs), axis=-1)
  on = rest > 0
  return jnp.where(on, jnp.log(jnp.where(on, rest, 1.0)), -jnp.inf)


def shared_support(student_logits: jax.Array, teacher: TeacherTargets, temperature: float,
                   truncation: str = "renormalize") -> tuple[jax.Array, jax.Array]:
  """(student, teacher) log-probs [b, s, n], each a normalised distribution over the same n
  outcomes: the vocabulary (dense), the kept tokens ('renormalize'), or the kept tokens plus one
  'other' bucket ('other'). student_logits [b, s, vocab]."""
  s_logp = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
  if teacher.ids is None:
    return s_logp, teacher.logprobs
  kept = teacher.logprobs > -jnp.inf  # [b, s, k]
  # A gather of k ids per token; the where-sum of target_logits would be [b, s, k, vocab].
  s_kept = jnp.where(kept, jnp.take_along_axis(s_logp, teacher.ids, axis=-1), -jnp.inf)
  if truncation == "renormalize":
    return (s_kept - jax.nn.logsumexp(s_kept, axis=-1, keepdims=True),
            teacher.logprobs - jax.nn.logsumexp(teacher.logprobs, axis=-1, keepdims=True))
  if truncation != "other":
    raise ValueError(f"truncation={truncation!r}; choose 'renormalize' or 'other'.")
  t_other = teacher.other if teacher.other is not None else _other_from_kept(teacher.logprobs)
  s_other = _outside_logmass(s_logp, teacher.ids, kept)
  return (jnp.concatenate([s_kept, s_other[..., None]], axis=-1),
          jnp.concatenate([teacher.logprobs, t_other[..., None]], axis=-1))


def kl(logp: jax.Array, logq: jax.Array) -> jax.Array:
  """KL(p || q) over the last axis -> [...]; terms where p is 0 count 0 (and give no NaN
  gradients)."""
  on = logp > -jnp.inf
  safe_p = jnp.where(on, logp, 0.0)
  return jnp.sum(jnp.where(on, jnp.exp(safe_p) * (safe_p - jnp.where(on, logq, 0.0)), 0.0),
                 axis=-1)


def divergence(student_logp: jax.Array, teacher_logp: jax.Array, kind: str,
               jsd_beta: float = 0.5) -> jax.Array:
  """Per-token divergence [b, s] between two distributions over the same outcomes [b, s, n]:
  'forward_kl' KL(t || s), 'reverse_kl' KL(s || t), 'jsd' beta KL(t || m) + (1 - beta) KL(s || m)
  with m = beta t + (1 - beta) s."""
  if kind == "forward_kl":
    return kl(teacher_logp, student_logp)
  if kind == "reverse_kl":
    return kl(student_logp, teacher_logp)
  if kind == "jsd":
    log_m = jnp.logaddexp(jnp.log(jsd_beta) + teacher_logp,
                          jnp.log1p(-jsd_beta) + student_logp)
    return jsd_beta * kl(teacher_logp, log_m) + (1.0 - jsd_beta) * kl(student_logp, log_m)
  raise ValueError(f"divergence={kind!r}; choose 'forward_kl', 'reverse_kl' or 'jsd'.")


def kd_sums(student_logits: jax.Array, teacher: TeacherTargets, loss_mask: jax.Array,
            cfg: DistillConfig, weights: jax.Array | None = None) -> dict[str, jax.Array]:
  """Sums over the loss tokens: {'kd': the divergence at cfg.temperature, 'top1_agree': tokens
  whose student argmax is the teacher's most likely token}; student_logits [b, s, vocab],
  loss_mask [b, s]. With per-token `weights` [b, s] (a batch's scaled loss_weight), also
  'weighted_kd'. The teacher enters without gradient."""
  teacher = jax.tree.map(jax.lax.stop_gradient, teacher)
  s_logp, t_logp = shared_support(student_logits, teacher, cfg.temperature, cfg.truncation)
  mask = loss_mask.astype(jnp.float32)
  kd = divergence(s_logp, t_logp, cfg.divergence, cfg.jsd_beta) * mask  # [b, s]
  t_top1 = (jnp.argmax(teacher.logprobs, axis=-1) if teacher.ids is None
            else teacher.ids[..., 0])
  agree = (jnp.argmax(student_logits, axis=-1) == t_top1).astype(jnp.float32) * mask
  out = {"kd": jnp.sum(kd), "top1_agree": jnp.sum(agree)}
  if weights is not None:
    out["weighted_kd"] = jnp.sum(kd * weights)
  return out


def alpha_at(cfg: DistillConfig, step: jax.Array, total_steps: int) -> jax.Array:
  """alpha at `step` (0-based, may be traced): constant; 'linear' down to 0 at the end step;
  'until' the end step, then 0 (SALT)."""
  step = jnp.asarray(step, jnp.float32)
  end = float(cfg.end_step(total_steps))
  if cfg.alpha_schedule == "constant":
    return jnp.float32(cfg.alpha)
  if cfg.alpha_schedule == "linear":
    return cfg.alpha * jnp.clip(1.0 - step / end, 0.0, 1.0)
  return jnp.where(step < end, jnp.float32(cfg.alpha), 0.0)


def distill_loss(ce: jax.Array, kd: jax.Array, alpha: jax.Array, temperature: float
                 ) -> jax.Array:
  """(1 - alpha) * ce + alpha * T^2 * kd, ce and kd being means over the loss tokens. T^2 keeps
  the KD gradients' size independent of T (softened logits shrink them by 1/T^2; Hinton et al.
  2015), so one alpha means the same balance at any temperature."""
  return (1.0 - alpha) * ce + alpha * (temperature * temperature) * kd


class OnlineTeacher(NamedTuple):
  """The teacher of a train step. apply(teacher_params, batch) -> its logits [b, s, vocab], its
  params being the step's extra argument, never part of the TrainState; `abstract`: its params'
  shapes with their logical axes (to shard them). apply None: a cached teacher, whose top-k
  targets come in the batch (CACHE_KEYS), the step taking no extra argument."""

  apply: Callable[[Any, dict[str, jax.Array]], jax.Array] | None
  cfg: DistillConfig
  total_steps: int
  abstract: Any = None

  @property
  def online(self) -> bool:
    return self.apply is not None


# A cached teacher's arrays in a batch: ids int32 [b, s, k], log-probs fp32 [b, s, k] at T = 1
# (most likely first), and the log-prob of each position's target fp32 [b, s].
CACHE_KEYS = ("teacher_ids", "teacher_logprobs", "teacher_target_logprob")


def teacher_sums(student_logits: jax.Array, teacher_logits: jax.Array,
                 batch: dict[str, jax.Array], cfg: DistillConfig) -> dict[str, jax.Array]:
  """kd_sums of an online teacher's logits [b, s, vocab], plus 'teacher_ce': the teacher's own
  next-token loss (T = 1) summed over the same loss tokens."""
  teacher_logits = jax.lax.stop_gradient(teacher_logits).astype(jnp.float32)
  targets = teacher_targets(teacher_logits, cfg.temperature, cfg.top_k, cfg.top_p)
  sums = kd_sums(student_logits, targets, batch["loss_mask"], cfg, batch.get("loss_weight"))
  picked = jnp.take_along_axis(teacher_logits, batch["targets"][..., None], axis=-1)[..., 0]
  ce = jax.nn.logsumexp(teacher_logits, axis=-1) - picked  # [b, s]
  sums["teacher_ce"] = jnp.sum(ce * batch["loss_mask"].astype(jnp.float32))
  return sums


def cached_targets(ids: jax.Array, logprobs: jax.Array, cfg: DistillConfig) -> TeacherTargets:
  """TeacherTargets of a cache's top-k ids and T = 1 log-probs [b, s, k]: its first top_k
  (0: all), at temperature T (exact over the kept set once renormalised; config.distill allows
  'other' and top_p only at T = 1, where the log-probs are the full distribution's)."""
  if 0 < cfg.top_k < ids.shape[-1]:
    ids, logprobs = ids[..., :cfg.top_k], logprobs[..., :cfg.top_k]
  logprobs = logprobs.astype(jnp.float32)
  if cfg.temperature != 1.0:
    logprobs = logprobs / cfg.temperature
  if cfg.top_p < 1.0:
    probs = jnp.exp(logprobs)
    before = jnp.cumsum(probs, axis=-1) - probs
    logprobs = jnp.where(before < cfg.top_p, logprobs, -jnp.inf)
  return TeacherTargets(ids, logprobs, None)


def cache_sums(student_logits: jax.Array, batch: dict[str, jax.Array], cfg: DistillConfig
               ) -> dict[str, jax.Array]:
  """teacher_sums of a cached teacher: its targets and target log-probs come in the batch."""
  targets = cached_targets(batch["teacher_ids"], batch["teacher_logprobs"], cfg)
  sums = kd_sums(student_logits, targets, batch["loss_mask"], cfg, batch.get("loss_weight"))
  mask = batch["loss_mask"].astype(jnp.float32)
  sums["teacher_ce"] = -jnp.sum(batch["teacher_target_logprob"].astype(jnp.float32) * mask)
  return sums


def distill_metrics(sums: dict[str, jax.Array], denom: jax.Array, alpha: jax.Array
                    ) -> dict[str, jax.Array]:
  """The step's 'distill/*' metrics from its summed KD terms (means over the loss tokens)."""
  return {"distill/kd": sums["kd"] / denom, "distill/ce": sums["ce"] / denom,
          "distill/teacher_ce": sums["teacher_ce"] / denom,
          "distill/top1_agreement": sums["top1_agree"] / denom, "distill/alpha": alpha}
