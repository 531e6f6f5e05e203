"""Evaluation: mean next-token loss of the params over fixed batches, overall and per domain."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import flax.linen as nn
import jax

from pretrainx.train.step import batch_loss_sums


def make_eval_step(model: nn.Module) -> Callable[[Any, dict], dict[str, jax.Array]]:
  """Pure: (params, batch) -> {'ce', 'z', 'tokens'} sums (no z-loss)."""
  return lambda params, batch: batch_loss_sums(model, params, batch, z_loss=0.0)


def evaluate(eval_step: Callable, params: Any, device_batches: Iterable[dict]) -> dict[str, float]:
  """{'loss': mean cross-entropy in nats/token, 'tokens': count}.

  Waits for each batch before dispatching the next: independent programs with cross-device
  reductions in flight at once can deadlock XLA's CPU collectives, and eval is not the hot path.
  """
  ce = tokens = 0.0
  for batch in device_batches:
    sums = jax.device_get(eval_step(params, batch))
    ce, tokens = ce + float(sums["ce"]), tokens + float(sums["tokens"])
  return {"loss": ce / max(tokens, 1.0), "tokens": tokens}


def evaluate_domains(eval_step: Callable, params: Any,
                     domain_batches: Mapping[str, Iterable[dict]]) -> dict[str, float]:
  """{'loss': token-weighted over all domains, 'tokens', '<domain>/loss' for each domain}."""
  out, ce, tokens = {}, 0.0, 0.0
  for domain, batches in domain_batches.items():
    r = evaluate(eval_step, params, batches)
    out[f"{domain}/loss"] = r["loss"]
    ce, tokens = ce + r["loss"] * r["tokens"], tokens + r["tokens"]
  out.update(loss=ce / max(tokens, 1.0), tokens=tokens)
  return out
