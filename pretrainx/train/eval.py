"""Evaluation: mean next-token loss of the params over fixed batches, overall and per domain, and
by position within the document (buckets of RunConfig.eval_position_bucket tokens)."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pretrainx.train.step import batch_loss_sums, position_bucket_width

BY_POSITION = "loss_by_position"


def make_eval_step(model: nn.Module, position_bucket: int = 0
                   ) -> Callable[[Any, dict], dict[str, jax.Array]]:
  """Pure: (params, batch) -> {'ce', 'z', 'tokens'} sums (no z-loss), plus the loss by position:
  'position_ce' and 'position_tokens' [buckets] and the buckets' edges 'position_edges'
  [buckets + 1]. The bucket width (position_bucket_width; 0: auto) follows each batch's seq_len,
  so one step serves every row length it is called with."""
  position_bucket_width(1, position_bucket)  # a bad width fails here, not at the first eval

  def eval_step(params, batch):
    seq_len = batch["positions"].shape[1]
    width = position_bucket_width(seq_len, position_bucket)
    sums = batch_loss_sums(model, params, batch, z_loss=0.0, position_width=width)
    count = sums["position_ce"].shape[0]
    sums["position_edges"] = jnp.minimum(jnp.arange(count + 1, dtype=jnp.int32) * width,
                                         seq_len)
    return sums

  return eval_step


def _sums(eval_step: Callable, params: Any, device_batches: Iterable[dict]) -> dict[str, Any]:
  """Host-side sums over the batches: 'ce', 'tokens' (floats) and, when the step reports them,
  'position_ce', 'position_tokens' (float64 [buckets]) and 'position_edges'.

  Waits for each batch before dispatching the next: independent programs with cross-device
  reductions in flight at once can deadlock XLA's CPU collectives, and eval is not the hot path.
  """
  ce = tokens = 0.0
  out: dict[str, Any] = {}
  for batch in device_batches:
    sums = jax.device_get(eval_step(params, batch))
    ce, tokens = ce + float(sums["ce"]), tokens + float(sums["tokens"])
    if "position_ce" in sums:
      _add_positions(out, sums)
  return {**out, "ce": ce, "tokens": tokens}


def _add_positions(acc: dict[str, Any], sums: Mapping[str, Any]) -> None:
  edges = np.asarray(sums["position_edges"])
  if "position_edges" in acc and not np.array_equal(acc["position_edges"], edges):
    raise ValueError("evaluation batches of different seq_len met in one pass; evaluate each "
                     "row length on its own.")
  acc["position_edges"] = edges
  for key in ("position_ce", "position_tokens"):
    acc[key] = acc.get(key, 0.0) + np.asarray(sums[key], np.float64)


def by_position(sums: Mapping[str, Any]) -> dict[str, float]:
  """{'loss_by_position/<lo>-<hi>': mean loss of the tokens at positions lo..hi-1 within their
  document} for each bucket that holds loss tokens."""
  if "position_edges" not in sums:
    return {}
  edges, ce, tokens = sums["position_edges"], sums["position_ce"], sums["position_tokens"]
  return {f"{BY_POSITION}/{int(edges[i])}-{int(edges[i + 1])}": float(ce[i] / tokens[i])
          for i in range(len(ce)) if tokens[i] > 0}


def evaluate(eval_step: Callable, params: Any, device_batches: Iterable[dict]) -> dict[str, float]:
  """{'loss': mean cross-entropy in nats/token, 'tokens': count, 'loss_by_position/<lo>-<hi>'}."""
  sums = _sums(eval_step, params, device_batches)
  return {"loss": sums["ce"] / max(sums["tokens"], 1.0), "tokens": sums["tokens"],
          **by_position(sums)}


def evaluate_domains(eval_step: Callable, params: Any,
                     domain_batches: Mapping[str, Iterable[dict]]) -> dict[str, float]:
  """{'loss': token-weighted over all domains, 'tokens', '<domain>/loss' for each domain,
  'loss_by_position/<lo>-<hi>' over all domains}."""
  out, ce, tokens = {}, 0.0, 0.0
  positions: dict[str, Any] = {}
  for domain, batches in domain_batches.items():
    s = _sums(eval_step, params, batches)
    r = {"loss": s["ce"] / max(s["tokens"], 1.0), "tokens": s["tokens"]}
    if "position_edges" in s:
      _add_positions(positions, s)
    out[f"{domain}/loss"] = r["loss"]
    ce, tokens = ce + r["loss"] * r["tokens"], tokens + r["tokens"]
  out.update(loss=ce / max(tokens, 1.0), tokens=tokens)
  out.update(by_position(positions))
  return out
