"""Evaluation: mean next-token loss of the params over a fixed list of batches."""

from __future__ import annotations

from typing import Any, Callable, Iterable

import flax.linen as nn
import jax
import numpy as np

from pretrainx.train.step import batch_loss_sums


def make_eval_step(model: nn.Module) -> Callable[[Any, dict], dict[str, jax.Array]]:
  """Pure: (params, batch) -> {'ce', 'z', 'tokens'} sums (no z-loss)."""
  return lambda params, batch: batch_loss_sums(model, params, batch, z_loss=0.0)


def evaluate(eval_step: Callable, params: Any, device_batches: Iterable[dict]) -> dict[str, float]:
  """{'loss': mean cross-entropy in nats/token, 'tokens': count}. Syncs once at the end."""
  sums = [eval_step(params, b) for b in device_batches]
  ce = float(np.sum([jax.device_get(s["ce"]) for s in sums]))
  tokens = float(np.sum([jax.device_get(s["tokens"]) for s in sums]))
  return {"loss": ce / max(tokens, 1.0), "tokens": tokens}
