"""The pure train step: (state, batch) -> (state, metrics). No I/O, no host sync, no logging.

Loss is token-weighted cross-entropy over `loss_mask` plus an optional z-loss (and, for a
mixture-of-experts model, its router's balance and z losses), optionally with per-token loss
weights (a batch's `loss_weight`, 'loss' example weighting); gradients may be accumulated over
microbatches with lax.scan (sums, then one division, so the result equals the full batch); the
update is the optax chain from pretrainx.optim. With an online teacher (knowledge distillation,
train/distill_loss.py) the loss is (1 - alpha) * CE + alpha * T^2 * KD, the teacher's frozen params
coming in as the step's third argument.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from pretrainx.config import EmaConfig, GuardConfig
from pretrainx.ema import ema_update
from pretrainx.model import kernels
from pretrainx.model.moe import sown_moe
from pretrainx.model.transformer import sown_kurtosis
from pretrainx.optim import apply_updates_stochastic
from pretrainx.train.distill_loss import (OnlineTeacher, alpha_at, cache_sums,
                                          distill_metrics, teacher_sums)
from pretrainx.train.guard import guard_update
from pretrainx.train.state import TrainState

Batch = dict[str, jax.Array]  # int32 [batch, seq] arrays (float32 `loss_weight`)


def example_weights(ce: jax.Array, mask: jax.Array, token_weight: jax.Array,
                    temperature: float | None = None) -> jax.Array:
  """Per-token loss weights [b, s], 0 off the loss mask, with no gradient through them.

  `token_weight` comes scaled to mean 1 over the whole batch's loss tokens (see loss_and_grads).
  With `temperature`, each row's tokens are multiplied by rows * softmax(row mean loss /
  temperature) over the rows that have loss tokens, then rescaled so that this (micro)batch
  keeps the weight total it had: the 'loss' weights are decided within each microbatch.
  """
  w = token_weight.astype(jnp.float32) * mask
  if temperature is None:
    return w
  row_tokens = jnp.sum(mask, axis=1)
  has = row_tokens > 0
  x = jax.lax.stop_gradient(jnp.sum(ce, axis=1) / jnp.maximum(row_tokens, 1.0)) / temperature
  e = jnp.where(has, jnp.exp(x - jnp.max(jnp.where(has, x, -jnp.inf))), 0.0)
  rows = jnp.sum(has.astype(jnp.float32))
  scored = w * (rows * e / jnp.maximum(jnp.sum(e), 1e-30))[:, None]
  return jax.lax.stop_gradient(scored * (jnp.sum(w) / jnp.maximum(jnp.sum(scored), 1e-30)))


def target_logits(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """logits[b, s, targets[b, s]] -> [b, s]; targets are ids in [0, vocab).

  The TPU/GPU graph sums the one matching entry over the vocabulary: exact (one non-zero term),
  and it fuses into the pass that produces the logits, as the logsumexp does. A gather
  (take_along_axis) needs its operand written out: on TPU the model's fp32 cast of its bf16
  logits became a [b, s, vocab] fp32 buffer beside the bf16 one at the step's peak (1000 MiB
  per device at llama_7b's 2 x 4096 tokens per device on v5p-256, issue 38.3). XLA:CPU holds
  the fp32 logits anyway and makes the sum one more pass over them, so the CPU-tuned graph
  (kernels.cpu_tuned_graph) gathers.
  """
  if kernels.cpu_tuned_graph():
    return jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  vocab = jnp.arange(logits.shape[-1], dtype=targets.dtype)  # [vocab]
  return jnp.sum(jnp.where(vocab == targets[..., None], logits, 0.0), axis=-1)


def position_bucket_width(seq_len: int, width: int = 0) -> int:
  """The width in positions of the loss-by-position buckets of rows of `seq_len`: `width`, or
  (0, auto) 1024, or a quarter of seq_len when seq_len <= 1024 (a few buckets either way)."""
  if width < 0:
    raise ValueError(f"RunConfig.eval_position_bucket={width} is negative; use 0 (auto) or a "
                     "bucket width in tokens.")
  return width or (1024 if seq_len > 1024 else max(1, seq_len // 4))


def position_sums(ce: jax.Array, mask: jax.Array, positions: jax.Array, width: int
                  ) -> tuple[jax.Array, jax.Array]:
  """Masked loss sums and token counts per bucket of `width` positions within the document:
  ([buckets], [buckets]) with buckets = ceil(seq / width); ce, mask, positions [b, s]."""
  count = -(-positions.shape[1] // width)
  bucket = jnp.minimum(positions // width, count - 1).ravel()  # [b * s]
  return (jax.ops.segment_sum(ce.ravel(), bucket, num_segments=count),
          jax.ops.segment_sum(mask.ravel().astype(ce.dtype), bucket, num_segments=count))


def cross_entropy_sums(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array,
                       z_loss: float = 0.0, domain: jax.Array | None = None,
                       num_domains: int = 0, token_weight: jax.Array | None = None,
                       example_temperature: float | None = None,
                       positions: jax.Array | None = None, position_width: int = 0
                       ) -> dict[str, jax.Array]:
  """Sums over masked tokens: {'ce', 'z', 'tokens'}; logits [b, s, vocab] fp32, targets [b, s].

  With `num_domains` and each row's `domain` [b], also 'domain_ce' and 'domain_tokens' [domains].
  With `token_weight` [b, s] (and `example_temperature`, see example_weights), also
  'weighted_ce' and the weights' 'weight', 'weight_sq', 'weight_min', 'weight_max'.
  With `position_width` and `positions` [b, s] (within each document), also 'position_ce' and
  'position_tokens' [ceil(s / position_width)] (position_sums).
  """
  log_z = jax.nn.logsumexp(logits, axis=-1)  # [b, s]
  target_logit = target_logits(logits, targets)
  mask = loss_mask.astype(jnp.float32)
  ce = (log_z - target_logit) * mask  # [b, s]
  sums = {"ce": jnp.sum(ce), "z": z_loss * jnp.sum(jnp.square(log_z) * mask),
          "tokens": jnp.sum(mask)}
  if num_domains:
    sums["domain_ce"] = jax.ops.segment_sum(jnp.sum(ce, 1), domain, num_domains)
    sums["domain_tokens"] = jax.ops.segment_sum(jnp.sum(mask, 1), domain, num_domains)
  if token_weight is not None:
    w = example_weights(ce, mask, token_weight, example_temperature)
    on = mask > 0
    sums.update(weighted_ce=jnp.sum(ce * w), weight=jnp.sum(w), weight_sq=jnp.sum(w * w),
                weight_min=jnp.min(jnp.where(on, w, jnp.inf)),
                weight_max=jnp.max(jnp.where(on, w, -jnp.inf)))
  if position_width:
    sums["position_ce"], sums["position_tokens"] = position_sums(ce, mask, positions,
                                                                 position_width)
  return sums


def model_logits(model: nn.Module, params: Any, batch: Batch, **kwargs):
  """The model applied to a batch (a bidirectional prefix when the batch has `prefix_mask`)."""
  extra = {"prefix_mask": batch["prefix_mask"]} if "prefix_mask" in batch else {}
  return model.apply({"params": params}, batch["inputs"], batch["positions"],
                     batch["segment_ids"], **extra, **kwargs)


def batch_loss_sums(model: nn.Module, params: Any, batch: Batch, z_loss: float,
                    kurtosis: bool = False, num_domains: int = 0, router: bool = False,
                    weighted: bool = False, example_temperature: float | None = None,
                    position_width: int = 0,
                    extra_sums: Callable[[jax.Array, Batch], dict[str, jax.Array]] | None = None
                    ) -> dict[str, jax.Array]:
  """Loss sums of one batch; with `kurtosis`, also the blocks' activation kurtosis [layers].
  With `extra_sums`, also extra_sums(logits, batch) (a teacher's KD terms).

  With `weighted`, the batch's (scaled) `loss_weight` weighs the tokens (cross_entropy_sums).
  With `position_width`, also the sums per bucket of the batch's `positions` (position_sums).

  With `router` (an MoE model), also 'moe_aux' (the router losses of all MoE layers) and each
  router statistic as 'moe/<name>' ([moe_layers], 'moe/load' [moe_layers, experts]), all
  multiplied by the batch's token count so that sums over microbatches stay token-weighted.
  """
  labels = (batch["targets"], batch["loss_mask"], z_loss, batch.get("domain"), num_domains,
            batch["loss_weight"] if weighted else None, example_temperature)
  by_position = {"positions": batch["positions"], "position_width": position_width}
  if not (kurtosis or router):
    logits = model_logits(model, params, batch)
    sums = cross_entropy_sums(logits, *labels, **by_position)
    return sums if extra_sums is None else {**sums, **extra_sums(logits, batch)}
  logits, variables = model_logits(model, params, batch, mutable=["intermediates"])
  sums = cross_entropy_sums(logits, *labels, **by_position)
  if extra_sums is not None:
    sums.update(extra_sums(logits, batch))
  if kurtosis:
    sums["kurtosis"] = sown_kurtosis(variables["intermediates"], model.cfg.num_layers)
  if router:
    stats = sown_moe(variables["intermediates"])
    sums["moe_aux"] = jnp.sum(stats.pop("aux_loss")) * sums["tokens"]
    sums.update({f"moe/{name}": value * sums["tokens"] for name, value in stats.items()})
  return sums


def _split_microbatches(batch: Batch, microbatches: int) -> Batch:
  """[B, S] -> [M, B/M, S], microbatch m taking rows m, m+M, ...: every data-parallel shard
  contributes equally to every microbatch, so no rows move between devices."""
  def split(x):
    b = x.shape[0]
    x = x.reshape(b // microbatches, microbatches, *x.shape[1:]).swapaxes(0, 1)
    return nn.with_logical_constraint(x, (None, "activation_batch") + (None,) * (x.ndim - 2))
  return jax.tree.map(split, batch)


def scaled_loss_weight(batch: Batch) -> jax.Array:
  """The batch's `loss_weight` (ones without one) scaled so that its mean over the batch's loss
  tokens is 1 [b, s]: the weighted loss keeps the scale of the plain one."""
  mask = batch["loss_mask"].astype(jnp.float32)
  weight = batch.get("loss_weight", jnp.ones(mask.shape, jnp.float32)).astype(jnp.float32)
  return weight * (jnp.sum(mask) / jnp.maximum(jnp.sum(weight * mask), 1e-30))


def _accumulate(acc: dict[str, jax.Array], sums: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Sums over microbatches add, except the weights' extremes ('*_min', '*_max')."""
  combine = lambda k: (jnp.minimum if k.endswith("_min") else
                       jnp.maximum if k.endswith("_max") else jnp.add)
  return {k: combine(k)(acc[k], v) for k, v in sums.items()}


def loss_and_grads(model: nn.Module, params: Any, batch: Batch, *, z_loss: float = 0.0,
                   microbatches: int = 1, num_domains: int = 0,
                   example_temperature: float | None = None,
                   teacher: OnlineTeacher | None = None, teacher_params: Any = None,
                   alpha: jax.Array | float = 0.0) -> tuple[dict[str, jax.Array], Any]:
  """(sums, grads of the mean loss) for the whole batch, accumulated over microbatches.

  With a `teacher`, its forward runs on each microbatch without gradient (a cached teacher's
  top-k comes in the batch instead), and the loss mixes (1 - alpha) * CE with alpha * T^2 * KD
  (distill_loss.distill_loss); the sums gain 'kd', 'teacher_ce' and 'top1_agree'. A batch's
  `loss_weight` weighs both terms; 'loss' example weighting (from each example's CE) weighs CE
  only.

  The loss is weighted when the batch has `loss_weight` (scaled over the whole batch first, so
  accumulation equals one batch) or with `example_temperature` ('loss' example weighting, whose
  softmax runs within each microbatch); 'ce' stays the unweighted sum either way.
  """

  kurtosis = bool(getattr(model.cfg, "sow_kurtosis", False))
  router = bool(getattr(getattr(model.cfg, "moe", None), "enabled", False))
  weighted = "loss_weight" in batch or example_temperature is not None
  if weighted:
    batch = dict(batch, loss_weight=scaled_loss_weight(batch))

  def kd_terms(logits, mb):
    if not teacher.online:  # a cache's top-k came with the batch
      return cache_sums(logits, mb, teacher.cfg)
    teacher_logits = jax.lax.stop_gradient(teacher.apply(teacher_params, mb))  # [b, s, vocab]
    return teacher_sums(logits, teacher_logits, mb, teacher.cfg)

  def objective(p, mb):
    sums = batch_loss_sums(model, p, mb, z_loss, kurtosis, num_domains, router, weighted,
                           example_temperature,
                           extra_sums=kd_terms if teacher is not None else None)
    ce = sums["weighted_ce"] if weighted else sums["ce"]
    if teacher is not None:  # sums over the same tokens: the mix of the sums is that of the means
      temp = teacher.cfg.temperature
      kd = sums.get("weighted_kd", sums["kd"])  # the data's loss_weight weighs KD as it does CE
      ce = (1.0 - alpha) * ce + alpha * (temp * temp) * kd
    return ce + sums["z"] + sums.get("moe_aux", 0.0), sums

  grad_fn = jax.grad(objective, has_aux=True)
  if microbatches == 1:
    grads, sums = grad_fn(params, batch)
  else:
    def body(carry, mb):
      g_acc, s_acc = carry
      g, s = grad_fn(params, mb)
      return (jax.tree.map(jnp.add, g_acc, g), _accumulate(s_acc, s)), None

    microbatched = _split_microbatches(batch, microbatches)
    zeros_g = jax.tree.map(jnp.zeros_like, params)
    shapes = jax.eval_shape(lambda mb: objective(params, mb)[1],
                            jax.tree.map(lambda x: x[0], microbatched))
    start = lambda k: jnp.inf if k.endswith("_min") else -jnp.inf if k.endswith("_max") else 0
    zeros_s = {k: jnp.full(s.shape, start(k), s.dtype) for k, s in shapes.items()}
    (grads, sums), _ = jax.lax.scan(body, (zeros_g, zeros_s), microbatched)
    if kurtosis:  # a mean over microbatches, not a sum
      sums["kurtosis"] = sums["kurtosis"] / microbatches
  denom = jnp.maximum(sums["tokens"], 1.0)
  return sums, jax.tree.map(lambda g: g / denom, grads)


def example_weight_metrics(sums: dict[str, jax.Array], denom: jax.Array
                           ) -> dict[str, jax.Array]:
  """'weighted_loss' and the token-weighted mean, std, min and max of the loss weights."""
  mean = sums["weight"] / denom
  return {"weighted_loss": sums["weighted_ce"] / denom, "example_weight/mean": mean,
          "example_weight/std": jnp.sqrt(jnp.maximum(sums["weight_sq"] / denom - mean**2, 0.0)),
          "example_weight/min": sums["weight_min"], "example_weight/max": sums["weight_max"]}


def router_metrics(cfg, sums: dict[str, jax.Array], denom: jax.Array) -> dict[str, jax.Array]:
  """Per-layer expert load, dropped fraction and router entropy, and their means, from sums.

  'moe/layer_{i}/load_max' is the busiest expert's share of the routed slots times the expert
  count (1.0: perfectly balanced, num_experts: one expert takes everything).
  """
  layers = [i for i in range(cfg.num_layers) if cfg.is_moe_layer(i)]
  mean = {name[len("moe/"):]: v / denom for name, v in sums.items() if name.startswith("moe/")}
  out = {"moe/aux_loss": sums["moe_aux"] / denom,
         "moe/load_max": jnp.max(mean["load"]) * cfg.moe.num_experts}
  out.update({f"moe/{name}": jnp.mean(v) for name, v in mean.items() if name != "load"})
  for row, layer in enumerate(layers):
    out[f"moe/layer_{layer}/load_max"] = jnp.max(mean["load"][row]) * cfg.moe.num_experts
    out[f"moe/layer_{layer}/dropped"] = mean["dropped"][row]
    out[f"moe/layer_{layer}/router_entropy"] = mean["router_entropy"][row]
    out.update({f"moe/layer_{layer}/load/expert_{e}": load
                for e, load in enumerate(mean["load"][row])})
  return out


def gnb_grads(logits_fn: Callable[[Any], jax.Array], params: Any, loss_mask: jax.Array,
              rng: jax.Array) -> tuple[Any, jax.Array]:
  """Gradient of the mean loss on labels sampled from the model's own predictions, and the token
  count B: B * grad**2 is the Gauss-Newton-Bartlett estimate of the Hessian diagonal (Sophia)."""

  def sampled_loss(p):
    logits = logits_fn(p)  # [..., vocab]
    labels = jax.random.categorical(rng, jax.lax.stop_gradient(logits), axis=-1)
    sums = cross_entropy_sums(logits, labels, loss_mask)
    return sums["ce"] / jnp.maximum(sums["tokens"], 1.0)

  return jax.grad(sampled_loss)(params), jnp.sum(loss_mask.astype(jnp.float32))


def make_train_step(model: nn.Module, optimizer: optax.GradientTransformation,
                    schedule: optax.Schedule, *, z_loss: float = 0.0, microbatches: int = 1,
                    guard: GuardConfig = GuardConfig(), hessian_estimate: bool = False,
                    seed: int = 0, stochastic_rounding: bool = False, num_domains: int = 0,
                    ema: EmaConfig = EmaConfig(), example_temperature: float | None = None,
                    teacher: OnlineTeacher | None = None
                    ) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
  """Returns the pure step function; the loop jits it with shardings and donates the state.

  A bad step (non-finite loss or gradient, or a loss spike) leaves params and optimizer state
  unchanged (the optimizer does not run; 'update_norm' is 0); the step counter still advances,
  so the next step reads the next batch. With `hessian_estimate` (Sophia) the optimizer gets a
  GNB Hessian-diagonal callable, whose labels are sampled with a key folded from (seed, step).
  With `num_domains`, batches carry each row's `domain` and the metrics include 'domain_loss'
  and 'domain_tokens' [domains]. With `ema` enabled, the state's EMA of the params is updated
  after every good step. With per-token loss weights (a batch's `loss_weight`, or
  `example_temperature` for 'loss' example weighting) the gradient is the weighted loss's;
  'loss' stays the unweighted mean cross-entropy (so runs compare) and 'weighted_loss' and
  'example_weight/{mean,std,min,max}' (over loss tokens) join.

  With a `teacher` (knowledge distillation), the step is train_step(state, batch, teacher_params)
  and the metrics gain 'distill/{kd,ce,teacher_ce,top1_agreement,alpha}'; alpha follows its
  schedule by step. A teacher whose DistillConfig.alpha is 0 is not run at all (plain training,
  bit for bit).
  """
  if teacher is not None and teacher.cfg.alpha == 0.0:
    teacher = None

  def train_step(state: TrainState, batch: Batch, teacher_params: Any = None):
    if teacher is not None and teacher.online and teacher_params is None:
      raise ValueError("this step distils from a teacher; pass its params as the third argument.")
    alpha = (alpha_at(teacher.cfg, state.step, teacher.total_steps) if teacher is not None
             else 0.0)
    sums, grads = loss_and_grads(model, state.params, batch, z_loss=z_loss,
                                 microbatches=microbatches, num_domains=num_domains,
                                 example_temperature=example_temperature, teacher=teacher,
                                 teacher_params=teacher_params, alpha=alpha)
    denom = jnp.maximum(sums["tokens"], 1.0)
    loss, grad_norm = sums["ce"] / denom, optax.tree.norm(grads)
    ok, zscore, guard_state = guard_update(state.guard, loss, grad_norm, guard)
    extra = {}
    if hessian_estimate:
      logits_fn = lambda p: model_logits(model, p, batch)
      rng = jax.random.fold_in(jax.random.key(seed), state.step)
      extra["gnb_grads"] = lambda p: gnb_grads(logits_fn, p, batch["loss_mask"], rng)
    def apply_update(operands):
      params, opt_state, ema_params = operands
      updates, opt_state = optimizer.update(grads, opt_state, params, **extra)
      if stochastic_rounding:
        rounding_key = jax.random.fold_in(jax.random.key(seed + 1), state.step)
        params = apply_updates_stochastic(params, updates, rounding_key)
      else:
        params = optax.apply_updates(params, updates)
      if ema.enabled:
        ema_params = ema_update(ema_params, params, state.step, ema)
      return params, opt_state, ema_params, optax.tree.norm(updates).astype(jnp.float32)

    def skip_update(operands):
      return (*operands, jnp.zeros((), jnp.float32))

    # A bad step leaves the state as it was. As a cond, the update runs on good steps only and
    # writes its buffers in place; a select between new and old state kept both alive, and XLA
    # copied most parameters and moments at each step's start (34 of 41 buffers in tiny's step).
    with jax.named_scope("optimizer"):  # names these ops in profiles (bench/profile_step)
      params, opt_state, new_ema, update_norm = jax.lax.cond(
          ok, apply_update, skip_update, (state.params, state.opt_state, state.ema))
    metrics = {
        "loss": loss,
        "z_loss": sums["z"] / denom,
        "grad_norm": grad_norm,
        "update_norm": update_norm,
        "param_norm": optax.tree.norm(params),
        "learning_rate": schedule(state.step),
        "loss_tokens": sums["tokens"],
        "loss_zscore": zscore,
        "bad_step": (~ok).astype(jnp.float32),
        "skipped_steps": guard_state.skipped,
        "consecutive_bad": guard_state.consecutive_bad,
    }
    if num_domains:
      metrics["domain_loss"] = sums["domain_ce"] / jnp.maximum(sums["domain_tokens"], 1.0)
      metrics["domain_tokens"] = sums["domain_tokens"]
    if "weighted_ce" in sums:
      metrics.update(example_weight_metrics(sums, denom))
    if "kurtosis" in sums:  # excess kurtosis of each block's output (outlier growth)
      metrics["kurtosis/max"] = jnp.max(sums["kurtosis"])
      metrics.update({f"kurtosis/layer_{i}": k for i, k in enumerate(sums["kurtosis"])})
    if "moe_aux" in sums:
      metrics.update(router_metrics(model.cfg, sums, denom))
    if teacher is not None:
      metrics.update(distill_metrics(sums, denom, alpha))
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                      guard=guard_state, ema=new_ema), metrics

  return train_step
