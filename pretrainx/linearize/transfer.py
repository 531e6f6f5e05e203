"""Stage 1 of linearizing, attention transfer: train the converted layers' feature maps (and
window factors) so that each layer's output matches the softmax attention it replaces.

The teacher is the source's softmax attention, run on the converted model's own frozen params.
Each layer sees the teacher model's hidden state as its input, so the per-layer losses are
independent. Their sum trains every layer at once ('joint'); one layer's loss at a time trains
the layers one after another ('layerwise'). Everything but the new attention params stays
frozen by construction: only they are differentiated and updated.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from pretrainx.model.attention import Attention
from pretrainx.config import ModelConfig
from pretrainx.model.transformer import Transformer

Params = Any
Flat = dict[str, jax.Array]  # '/'-joined path -> leaf


def _flat(tree: Params) -> Flat:
  return traverse_util.flatten_dict(tree, sep="/")


def _nest(flat: Flat) -> Params:
  return traverse_util.unflatten_dict(flat, sep="/")


def split_params(params: Params, trainable_paths: Sequence[tuple[str, ...]]) -> tuple[Params, Flat]:
  """(params without the trainable leaves, {path: trainable leaf})."""
  names = {"/".join(p) for p in trainable_paths}
  flat = _flat(params)
  missing = sorted(names - set(flat))
  if missing:
    raise ValueError(f"stage 1 trains {missing}, which the converted params lack.")
  frozen = {k: v for k, v in flat.items() if k not in names}
  return _nest(frozen), {k: flat[k] for k in sorted(names)}


def merge_params(frozen: Params, trainable: Flat) -> Params:
  return _nest({**_flat(frozen), **trainable})


def attention_io(model: Transformer, params: Params, batch: dict) -> tuple[list, list]:
  """Per layer: (the attention's input [batch, seq, embed], its output [batch, seq, embed])."""
  _, state = model.apply(
      {"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"],
      capture_intermediates=lambda m, name: name == "__call__" and m.name in (
          "attention", "input_norm"), mutable=["intermediates"])
  inter = state["intermediates"]
  cfg = model.cfg
  if cfg.scan_layers:  # stacked over the leading layer axis
    x, y = inter["layers"]["input_norm"]["__call__"][0], inter["layers"]["attention"]["__call__"][0]
    return [x[i] for i in range(cfg.num_layers)], [y[i] for i in range(cfg.num_layers)]
  blocks = [inter[f"layers_{i}"] for i in range(cfg.num_layers)]
  return ([b["input_norm"]["__call__"][0] for b in blocks],
          [b["attention"]["__call__"][0] for b in blocks])


def layer_attention_params(params: Params, cfg: ModelConfig, layer: int) -> Params:
  if cfg.scan_layers:
    return jax.tree.map(lambda a: a[layer], params["layers"]["attention"])
  return params[f"layers_{layer}"]["attention"]


def layer_mse(frozen: Params, trainable: Flat, batch: dict, *, student: ModelConfig,
              teacher: ModelConfig, layers: Sequence[int]) -> jax.Array:
  """MSE [len(layers)] between each converted layer's attention and the teacher's softmax
  attention, both on the teacher's hidden states, averaged over real tokens and channels.

  frozen: every param but the new attention ones (the teacher runs on exactly these);
  trainable: the new ones, {path: leaf}.
  """
  xs, ys = attention_io(Transformer(teacher), jax.lax.stop_gradient(frozen), batch)
  params = merge_params(frozen, trainable)
  weight = batch["loss_mask"].astype(jnp.float32)[..., None]  # [batch, seq, 1]
  denom = jnp.maximum(weight.sum() * student.embed_dim, 1.0)
  out = []
  for i in layers:
    layer = Attention(student.for_layer(i))
    y = layer.apply({"params": layer_attention_params(params, student, i)}, xs[i],
                    batch["positions"], batch["segment_ids"])
    out.append(jnp.sum(weight * (y.astype(jnp.float32) - ys[i].astype(jnp.float32)) ** 2) / denom)
  return jnp.stack(out)


def make_transfer_step(student: ModelConfig, teacher: ModelConfig, layers: Sequence[int],
                       optimizer: optax.GradientTransformation) -> Callable:
  """Pure: (trainable, opt_state, frozen, batch, layer_weights [len(layers)]) ->
  (trainable, opt_state, per-layer MSE). Only `trainable` is differentiated."""

  def loss_fn(trainable, frozen, batch, layer_weights):
    mse = layer_mse(frozen, trainable, batch, student=student, teacher=teacher, layers=layers)
    return jnp.sum(mse * layer_weights), mse

  def step(trainable, opt_state, frozen, batch, layer_weights):
    (_, mse), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable, frozen, batch,
                                                                layer_weights)
    updates, opt_state = optimizer.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, mse

  return step


@dataclasses.dataclass
class TransferResult:
  params: Params  # the converted model's params with the trained feature maps
  history: list[dict[str, float]]  # {'step', 'mse/layer_<i>', 'mse/mean'} on the held-out batches
  layers: list[int]


def run_transfer(params: Params, *, student: ModelConfig, teacher: ModelConfig,
                 layers: Sequence[int], trainable_paths: Sequence[tuple[str, ...]],
                 train_batches: Callable[[int], dict], eval_batches: Iterable[dict], steps: int,
                 learning_rate: float, mode: str = "joint", eval_every: int = 10,
                 on_eval: Callable[[int, dict[str, float]], None] | None = None
                 ) -> TransferResult:
  """Trains the new attention params for `steps` steps; evaluates the per-layer MSE on
  `eval_batches` at step 0, every `eval_every` steps and at the end.

  train_batches(step) gives the device batch of a step (keys of pretrainx.data batches).
  """
  layers = list(layers)
  frozen, trainable = split_params(params, trainable_paths)
  trainable = jax.tree.map(jnp.copy, trainable)  # the step donates them; `params` stays intact
  optimizer = optax.adam(learning_rate)
  step_fn = jax.jit(make_transfer_step(student, teacher, layers, optimizer), donate_argnums=(0, 1))
  eval_fn = jax.jit(lambda t, f, b: layer_mse(f, t, b, student=student, teacher=teacher,
                                              layers=layers))
  eval_batches = list(eval_batches)
  history: list[dict[str, float]] = []

  def evaluate(step: int) -> None:
    mse = np.mean([np.asarray(jax.device_get(eval_fn(trainable, frozen, b)))
                   for b in eval_batches], axis=0)
    row = {"step": step, **{f"mse/layer_{i}": float(m) for i, m in zip(layers, mse)},
           "mse/mean": float(np.mean(mse))}
    history.append(row)
    if on_eval is not None:
      on_eval(step, row)

  phases = _phases(layers, steps, mode)
  evaluate(0)
  step = 0
  for weights, phase_steps in phases:
    opt_state = optimizer.init(trainable)  # a fresh optimizer per phase: no momentum carries over
    for _ in range(phase_steps):
      trainable, opt_state, _ = step_fn(trainable, opt_state, frozen, train_batches(step), weights)
      step += 1
      if step % eval_every == 0 and step < steps:
        evaluate(step)
  if steps:
    evaluate(steps)
  return TransferResult(merge_params(frozen, trainable), history, layers)


def _phases(layers: list[int], steps: int, mode: str) -> list[tuple[jax.Array, int]]:
  """(per-layer loss weights, steps) of each phase: one phase (joint) or one per layer."""
  if mode == "joint":
    return [(jnp.ones(len(layers), jnp.float32), steps)]
  if mode != "layerwise":
    raise ValueError(f"transfer mode {mode!r}; choose 'joint' or 'layerwise'.")
  per, extra = divmod(steps, len(layers))
  return [(jax.nn.one_hot(j, len(layers), dtype=jnp.float32), per + (j < extra))
          for j in range(len(layers))]

