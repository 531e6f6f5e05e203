"""Conversion of a softmax-attention model into a linearized one (LoLCATs, before training).

`linearized_config` swaps the attention of every softmax layer, or of the chosen ones, for
'hybrid' (sliding-window softmax + linear attention with a learned Hedgehog feature map per head)
or 'linear'. `convert_params` carries every weight of the source over and initialises only what
the new attention adds (feature maps, window factors). So the converted model differs from the
source in its attention alone, and with a window that covers the sequence it computes the same
logits.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp

from pretrainx.model.attention import Attention
from pretrainx.config import LinearizeConfig, ModelConfig
from pretrainx.config.cpt import SOFTMAX_IMPLS

# Attention params that exist in the source model; anything else under a converted layer's
# attention is new (feature maps, window factor) and is what stage 1 trains.
SOURCE_ATTENTION_PARAMS = ("q_proj", "k_proj", "v_proj", "o_proj", "q_bias", "k_bias", "v_bias")


def layers_to_convert(src: ModelConfig, lin: LinearizeConfig) -> list[int]:
  """The softmax layers of `src` that `lin` converts; clear errors for what cannot be meant."""
  n, impls = src.num_layers, src.layer_impls
  chosen = list(range(n)) if lin.layers is None else list(lin.layers)
  bad = [i for i in chosen if not 0 <= i < n]
  if bad:
    raise ValueError(f"LinearizeConfig.layers has {bad} out of range: the model has {n} layers, "
                     f"numbered 0..{n - 1}.")
  if len(set(chosen)) != len(chosen):
    raise ValueError(f"LinearizeConfig.layers={lin.layers} names a layer twice.")
  convert = [i for i in chosen if impls[i] in SOFTMAX_IMPLS]
  if not convert:
    raise ValueError(f"no softmax attention layer to convert: layers {chosen} of the source use "
                     f"{[impls[i] for i in chosen]}; linearize a model with 'reference' or "
                     "'flash' attention, or name other LinearizeConfig.layers.")
  return convert


def linearized_config(src: ModelConfig, lin: LinearizeConfig) -> ModelConfig:
  """The source's ModelConfig with the converted layers' attention swapped."""
  if lin.window > src.max_seq_len:
    raise ValueError(f"LinearizeConfig.window={lin.window} exceeds the model's max_seq_len="
                     f"{src.max_seq_len}: no query would have keys outside the window, so nothing "
                     "would be linearized. Use a window below the sequence length.")
  convert = set(layers_to_convert(src, lin))
  impls = tuple(lin.attention_impl if i in convert else impl
                for i, impl in enumerate(src.layer_impls))
  if len(set(impls)) == 1:
    layout = {"attention_impl": impls[0], "layer_attention_impls": ()}
  else:  # a mixed stack: one block per layer (scanned blocks share one structure)
    layout = {"attention_impl": src.attention_impl, "layer_attention_impls": impls,
              "scan_layers": False}
  return dataclasses.replace(src, attention_window=lin.window, linear_feature="hedgehog",
                             linear_feature_dim=lin.feature_dim, linear_decay=False, **layout)


def teacher_config(dst: ModelConfig, src: ModelConfig) -> ModelConfig:
  """The source's attention in the converted model's layout (scanned or not): the teacher of
  stage 1, which runs on the converted model's params."""
  if dst.scan_layers:
    return dataclasses.replace(dst, attention_impl=src.attention_impl, layer_attention_impls=())
  return dataclasses.replace(dst, scan_layers=False, layer_attention_impls=src.layer_impls)


# ----------------------------------------------------------------------------- params


def unstack_layers(params: Any, num_layers: int) -> Any:
  """A scanned model's params ('layers' with a leading layer axis) as 'layers_<i>' blocks."""
  flat = traverse_util.flatten_dict(params)
  out = {}
  for path, leaf in flat.items():
    if path[0] == "layers":
      for i in range(num_layers):
        out[(f"layers_{i}",) + path[1:]] = leaf[i]
    else:
      out[path] = leaf
  return traverse_util.unflatten_dict(out)


def new_attention_params(cfg: ModelConfig, rng: jax.Array) -> dict[str, jax.Array]:
  """The params one layer of cfg.attention_impl adds to softmax attention, as initialised."""
  layer = dataclasses.replace(cfg, layer_attention_impls=(), scan_layers=False)
  x, positions = jnp.zeros((1, 1, cfg.embed_dim), cfg.compute_dtype), jnp.zeros((1, 1), jnp.int32)
  init = jax.jit(lambda r: nn.unbox(Attention(layer).init(r, x, positions, None)["params"]))
  return {k: v for k, v in init(rng).items() if k not in SOURCE_ATTENTION_PARAMS}


def _converted_layers(src: ModelConfig, dst: ModelConfig):
  """(layer index, attention path prefix) of each layer whose attention the conversion changes;
  a scanned model has one stacked prefix for all of them."""
  for i, impl in enumerate(dst.layer_impls):
    if src.layer_impls[i] == impl:
      continue
    if dst.scan_layers:
      yield i, ("layers", "attention")
      return
    yield i, (f"layers_{i}", "attention")


def convert_params(src_params: Any, src: ModelConfig, dst: ModelConfig, rng: jax.Array) -> Any:
  """The converted model's params: every source leaf carried over, the new attention leaves
  (feature maps, window factors) freshly initialised. Callers check the result against the
  converted model's abstract params (pretrainx.train.init.check_param_shapes)."""
  src_params = nn.unbox(src_params)
  if src.scan_layers and not dst.scan_layers:
    src_params = unstack_layers(src_params, src.num_layers)
  elif dst.scan_layers and not src.scan_layers:
    raise ValueError("cannot convert an unscanned source into a scanned model; keep "
                     "ModelConfig.scan_layers=False.")
  out = traverse_util.flatten_dict(src_params)
  for i, prefix in _converted_layers(src, dst):
    for name, value in new_attention_params(dst.for_layer(i), jax.random.fold_in(rng, i)).items():
      if dst.scan_layers:  # identical per layer at init: one stacked copy for all layers
        value = jnp.broadcast_to(value, (dst.num_layers, *value.shape))
      out[prefix + (name,)] = value
  return traverse_util.unflatten_dict(out)


def new_param_paths(src: ModelConfig, dst: ModelConfig) -> list[tuple[str, ...]]:
  """Paths of the leaves convert_params initialises (what stage 1 trains)."""
  paths = []
  for i, prefix in _converted_layers(src, dst):
    names = jax.eval_shape(lambda i=i: new_attention_params(dst.for_layer(i), jax.random.key(0)))
    paths += [prefix + (name,) for name in names]
  return paths
