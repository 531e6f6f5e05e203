"""Depth growth of a trained model as pure functions on params: Llama-Pro block expansion (copies
with zeroed output projections, so the grown model computes the same function) and G_stack layer
stacking. Each returns the grown params and the grown ModelConfig.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

import flax.traverse_util as traverse
import jax
import jax.numpy as jnp
import numpy as np

from pretrainx.config import ModelConfig
from pretrainx.tree import key_name

Params = Any  # a nested dict of arrays (unboxed), as TrainState.params holds
# Block outputs that expansion zero-initialises (DecoderBlock: attention then SwiGLU).
OUTPUT_PROJECTIONS = ("attention/o_proj", "mlp/down_proj")


def _block_layout(params: Params, cfg: ModelConfig) -> None:
  """Checks that params hold cfg.num_layers blocks in cfg's layout (scanned or unrolled)."""
  if cfg.scan_layers:
    if "layers" not in params:
      raise ValueError("ModelConfig.scan_layers=True but params have no 'layers' stack (keys "
                       f"{sorted(params)[:6]}); pass the config the params were built with.")
    depth = {x.shape[0] for x in jax.tree.leaves(params["layers"])}
  else:
    depth = {sum(1 for k in params if re.fullmatch(r"layers_\d+", k))}
  if depth != {cfg.num_layers}:
    raise ValueError(f"params hold {sorted(depth)} blocks (scan_layers={cfg.scan_layers}) but "
                     f"ModelConfig.num_layers={cfg.num_layers}; pass the matching config.")


def _gather_blocks(params: Params, cfg: ModelConfig, src: Sequence[int]) -> Params:
  """A model whose block j is a copy of block src[j]; non-block params are shared."""
  _block_layout(params, cfg)
  out = {k: v for k, v in params.items() if not re.fullmatch(r"layers(_\d+)?", k)}
  if cfg.scan_layers:
    idx = jnp.asarray(src, jnp.int32)
    out["layers"] = jax.tree.map(lambda x: jnp.take(x, idx, axis=0), params["layers"])
  else:
    for j, i in enumerate(src):
      out[f"layers_{j}"] = jax.tree.map(lambda x: x, params[f"layers_{i}"])
  return out


def _expansion_positions(num_layers: int, every, positions) -> list[int]:
  if (every is None) == (positions is None):
    raise ValueError("expand_blocks takes exactly one of every=<int> (a copy after every k-th "
                     "block) or positions=<block indices>.")
  if every is not None:
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
      raise ValueError(f"expand_blocks every={every!r}; use a positive int (blocks per group).")
    return list(range(every - 1, num_layers, every))
  positions = [int(p) for p in positions]
  bad = [p for p in positions if not 0 <= p < num_layers]
  if bad or not positions or len(set(positions)) != len(positions):
    raise ValueError(f"expand_blocks positions={positions} must be distinct block indices in "
                     f"[0, {num_layers - 1}] (a copy of block i goes right after it); "
                     f"out of range: {bad}.")
  return sorted(positions)


def _zero_outputs(block: Params, index) -> Params:
  """Zeroes the output projections of one block (index None) or of stacked slice `index`."""
  flat = traverse.flatten_dict(block, sep="/")
  for name in OUTPUT_PROJECTIONS:
    if name not in flat:
      raise ValueError(f"block has no {name!r} (params {sorted(flat)[:8]}); expand_blocks needs "
                       f"the DecoderBlock outputs {OUTPUT_PROJECTIONS}.")
    w = flat[name]
    flat[name] = jnp.zeros_like(w) if index is None else w.at[index].set(0)
  return traverse.unflatten_dict(flat, sep="/")


def expand_blocks(params: Params, cfg: ModelConfig, *, every: int | None = None,
                  positions: Sequence[int] | None = None
                  ) -> tuple[Params, ModelConfig, list[int]]:
  """Llama-Pro block expansion: a copy of block i right after it, for i in the positions.

  `every=k` picks i = k-1, 2k-1, ... (a copy after each group of k blocks, as Llama-Pro);
  `positions` names the blocks directly. Each copy has its attention o_proj and mlp down_proj set
  to zero, so it adds nothing to the residual stream and the expanded model computes exactly the
  original function. Returns (params, cfg with the new depth, indices of the copies in the new
  stack), e.g. 4 blocks with every=2 -> order [0, 1, 1', 2, 3, 3'], new indices [2, 5].
  """
  where = _expansion_positions(cfg.num_layers, every, positions)
  src, new = [], []
  for i in range(cfg.num_layers):
    src.append(i)
    if i in where:
      new.append(len(src))
      src.append(i)
  out = _gather_blocks(params, cfg, src)
  if cfg.scan_layers:
    out["layers"] = _zero_outputs(out["layers"], jnp.asarray(new, jnp.int32))
  else:
    for j in new:
      out[f"layers_{j}"] = _zero_outputs(out[f"layers_{j}"], None)
  return out, dataclasses.replace(cfg, num_layers=len(src)), new


def new_block_mask(params: Params, new_block_indices: Sequence[int], cfg: ModelConfig) -> Params:
  """Trainable mask for 'train only the new blocks' (cfg: the expanded config).

  Unrolled: a bool per leaf. Scanned: each 'layers' leaf gets a bool array [layers, 1, ...] that
  is True on the new blocks (masked_optimizer zeroes the other slices); everything else False.
  """
  _block_layout(params, cfg)
  idx = sorted(int(i) for i in new_block_indices)
  if not idx or not all(0 <= i < cfg.num_layers for i in idx):
    raise ValueError(f"new_block_indices={list(new_block_indices)} must be non-empty block "
                     f"indices in [0, {cfg.num_layers - 1}] (as expand_blocks returns).")
  is_new = np.zeros((cfg.num_layers,), bool)
  is_new[idx] = True

  def mark(path, leaf):
    top = key_name(path[0])
    if cfg.scan_layers and top == "layers":
      return is_new.reshape((-1,) + (1,) * (np.ndim(leaf) - 1))
    m = re.fullmatch(r"layers_(\d+)", top)
    return bool(m and is_new[int(m.group(1))])

  return jax.tree_util.tree_map_with_path(mark, params)


def stack_layers(params: Params, cfg: ModelConfig, *, factor: int) -> tuple[Params, ModelConfig]:
  """G_stack depth growth: the trained stack repeated `factor` times.

  Block order: [L0 .. Ln-1, L0 .. Ln-1, ...] (new block j = old block j mod n); embeddings, final
  norm and output head are shared unchanged. Returns (params, cfg with num_layers * factor).
  """
  if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
    raise ValueError(f"stack_layers factor={factor!r}; use an int >= 1 (the depth multiplier).")
  src = list(range(cfg.num_layers)) * factor
  return (_gather_blocks(params, cfg, src),
          dataclasses.replace(cfg, num_layers=cfg.num_layers * factor))
