"""Which parameters a run trains: all of them, a regex selection, LoRA adapters, new blocks, all
but the old experts (Lifelong-MoE), or for a run's first steps only an extended vocabulary's rows.

With LoRA the state's params are {'base': model params, 'lora': adapters}; the model sees
`lora_merge(base, lora)` (the base under stop_gradient), and the optimizer holds state for the
adapters only. Freezing, "train only the blocks block expansion added" and "train only the
copies width growth made" mask the optimizer.
Evaluation, sampling and export see the merged params, so an exported model needs no adapters.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

import numpy as np

from pretrainx.cpt import growth, peft, width
from pretrainx.cpt.vocab import new_row_mask
from pretrainx.cpt.upcycle import frozen_expert_mask
from pretrainx.tree import path_name
from pretrainx.config import InitConfig, TuneConfig
from pretrainx.vocab_extend import source_tokenizer


class ViewedModel:
  """A model whose `apply` first maps the state's params to the model's (e.g. merges LoRA)."""

  def __init__(self, model, view: Callable[[Any], Any]):
    self.model, self.view, self.cfg = model, view, model.cfg

  def apply(self, variables, *args, **kwargs):
    return self.model.apply({**variables, "params": self.view(variables["params"])}, *args,
                            **kwargs)


def with_adapters(params: Any, tune: TuneConfig, rng: jax.Array) -> Any:
  """The state's params around model params: {'base', 'lora'} with LoRA, else unchanged."""
  if tune.lora is None:
    return params
  return {"base": params, "lora": peft.init_lora(params, tune.lora, rng)}


def params_view(tune: TuneConfig) -> Callable[[Any], Any]:
  """State params -> model params."""
  if tune.lora is None:
    return lambda params: params
  return lambda p: peft.lora_merge(jax.lax.stop_gradient(p["base"]), p["lora"], tune.lora)


def _new_block_indices(num_layers: int, every: int) -> list[int]:
  """Indices of the blocks expand_blocks(every=k) inserted into a model now num_layers deep."""
  source = next((n for n in range(1, num_layers + 1) if n + n // every == num_layers), None)
  if source is None:
    raise ValueError(f"ModelConfig.num_layers={num_layers} is not a depth that expanding by "
                     f"InitConfig.expand_every={every} can give.")
  return [(i + 1) * (every + 1) - 1 for i in range(source // every)]


def trainable(params: Any, tune: TuneConfig, model_cfg, expand_every: int = 0,
              grown_from: tuple[Any, str] | None = None) -> Any | None:
  """A mask of what the optimizer updates (None: everything). grown_from: (the source's
  ModelConfig, InitConfig.grow_width) for TuneConfig.new_width_only."""
  if tune.lora is not None:
    return jax.tree_util.tree_map_with_path(
        lambda path, _: path_name(path).startswith("lora/"), params)
  if tune.new_blocks_only:
    if not expand_every:
      raise ValueError("TuneConfig.new_blocks_only needs InitConfig.expand_every (the blocks "
                       "to train are the ones expansion inserts).")
    return growth.new_block_mask(params, _new_block_indices(model_cfg.num_layers, expand_every),
                               model_cfg)
  if tune.new_width_only:
    if grown_from is None or not grown_from[1]:
      raise ValueError("TuneConfig.new_width_only needs InitConfig.grow_width (the entries to "
                       "train are the copies width growth makes).")
    return width.new_width_mask(params, grown_from[0], model_cfg, grown_from[1])
  mask = None
  if tune.train or tune.freeze:
    mask = peft.trainable_mask(params, train=tune.train, freeze=tune.freeze)
  if tune.frozen_experts:  # Lifelong-MoE: the old experts stay as they were
    experts = frozen_expert_mask(params, tune.frozen_experts)
    mask = experts if mask is None else jax.tree.map(np.logical_and, mask, experts)
  return mask


def tuned_optimizer(optimizer: optax.GradientTransformation, mask: Any | None
                    ) -> optax.GradientTransformation:
  return optimizer if mask is None else peft.masked_optimizer(optimizer, mask)


class NewRowsState(NamedTuple):
  count: jax.Array  # [] int32: updates made so far


def _only_rows_at_first(mask: Any, steps: int) -> optax.GradientTransformation:
  """Stateless but for a count: zeroes the updates the mask does not mark while count < steps."""

  def update(updates, state, params=None):
    del params
    opened = state.count >= steps
    keep = lambda u, m: (u if np.ndim(m) == 0 and m else
                         jnp.where(jnp.logical_or(opened, m), u, jnp.zeros_like(u)))
    return jax.tree.map(keep, updates, mask), NewRowsState(optax.safe_int32_increment(state.count))

  return optax.GradientTransformation(lambda _: NewRowsState(jnp.zeros([], jnp.int32)), update)


def new_rows_first(optimizer: optax.GradientTransformation, params: Any, init: InitConfig,
                   tune: TuneConfig, vocab) -> optax.GradientTransformation:
  """`optimizer` whose first InitConfig.new_rows_only_steps updates move only the rows of the ids
  the run's tokenizer `vocab` adds to the source's (the embedding's and an untied head's). The
  other params still feed the optimizer their gradients (moments warm up, clipping sees them);
  only their updates, weight decay included, are zeroed. Reads the source's tokenizer."""
  if not init.new_rows_only_steps:
    return optimizer
  if tune.lora is not None:
    raise ValueError("InitConfig.new_rows_only_steps cannot be combined with TuneConfig.lora "
                     "(LoRA trains adapters only); unset one of them.")
  mask = new_row_mask(params, source_tokenizer(init).vocab_size, vocab.vocab_size)
  return optax.chain(optimizer, _only_rows_at_first(mask, init.new_rows_only_steps))
