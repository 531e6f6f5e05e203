"""Vocabulary extension on the model side: the embedding rows (and untied output-head columns) of
the ids an extended tokenizer adds, made from the old rows, and the mask that trains only them.

Old rows are copied unchanged, so the logits of the old ids on text with no new token are the
source's exactly. A new token t with old-tokenizer pieces D(t) (its string under the old BPE) and
overlapping old tokens C(t) (old tokens whose string occurs inside t's) gets, per METHODS:
  'mean'   (FVT, Gee et al. 2022; OFA, Liu et al. 2024):  e_t = 1/|D(t)| sum_{j in D(t)} e_j
  'focus'  (FOCUS, Dobler & de Melo 2023, with the source's own embedding space standing in for
           FOCUS's auxiliary fastText space): with the anchor a_t = the 'mean' row,
           w_t = sparsemax_j(cos(a_t, e_j) for j in C(t)),  e_t = sum_{j in C(t)} w_tj e_j
  'random' the model's own init (embedding: normal(init_std); lm_head: fan-in truncated normal).
An untied head's new columns use the same pieces and weights over the old columns. A token with
no pieces (and, for 'focus', no overlapping tokens) gets the mean of all old rows.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn

from pretrainx.config import ModelConfig
from pretrainx.config.cpt import NEW_EMBEDDINGS
from pretrainx.model.layers import dense_init

METHODS = NEW_EMBEDDINGS  # InitConfig.new_embeddings
Params = Any


@dataclasses.dataclass(frozen=True)
class NewTokens:
  """The ids [start, stop) an extended tokenizer adds and what each is made of (old ids)."""

  start: int
  stop: int
  pieces: tuple[tuple[int, ...], ...]      # D(t): the old tokenizer's pieces, with repeats
  overlapping: tuple[tuple[int, ...], ...]  # C(t): old tokens inside t's string, distinct

  def __post_init__(self):
    if len(self.pieces) != self.stop - self.start or len(self.overlapping) != len(self.pieces):
      raise ValueError(f"NewTokens: {len(self.pieces)} pieces for ids {self.start}..{self.stop}.")


def _padded(lists: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
  """(ids [n, width] padded with 0, valid [n, width] bool)."""
  width = max([len(x) for x in lists] + [1])
  ids, valid = np.zeros((len(lists), width), np.int32), np.zeros((len(lists), width), bool)
  for i, x in enumerate(lists):
    ids[i, :len(x)], valid[i, :len(x)] = x, True
  return ids, valid


def sparsemax(z: jax.Array, valid: jax.Array) -> jax.Array:
  """Sparsemax over the last axis (Martins & Astudillo 2016) of z where valid; 0 elsewhere.

  p = max(z - tau, 0) with tau = (sum_{j<=k} z_(j) - 1) / k, k the largest with
  1 + k z_(k) > sum_{j<=k} z_(j) (z_(j) sorted descending). All-invalid rows give 0."""
  z = jnp.where(valid, z, -jnp.inf)
  z_sorted = -jnp.sort(-z, axis=-1)
  cumsum = jnp.cumsum(z_sorted, axis=-1)
  k = jnp.arange(1, z.shape[-1] + 1, dtype=z.dtype)
  support = (1 + k * z_sorted > cumsum) & jnp.isfinite(z_sorted)
  k_z = jnp.maximum(jnp.sum(support, axis=-1, keepdims=True), 1)
  tau = (jnp.take_along_axis(cumsum, k_z - 1, axis=-1) - 1) / k_z.astype(z.dtype)
  return jnp.where(valid, jnp.maximum(z - tau, 0), 0)


def new_row_weights(table: jax.Array, new: NewTokens, method: str
                    ) -> tuple[np.ndarray, jax.Array]:
  """(old ids [n, K], weights [n, K]) that make each new row from the old rows of `table`
  [vocab, embed] (the input embedding); a row whose weights are all 0 takes the old mean."""
  pieces, valid = _padded(new.pieces)
  counts = np.maximum(valid.sum(-1, keepdims=True), 1)
  mean_w = jnp.asarray(valid / counts, jnp.float32)  # [n, P]
  if method == "mean":
    return pieces, mean_w
  if method != "focus":
    raise ValueError(f"unknown new-embedding method {method!r}; choose one of {METHODS}.")
  table = table.astype(jnp.float32)
  anchor = jnp.einsum("np,npe->ne", mean_w, table[pieces])  # [n, embed]
  cands, c_valid = _padded(new.overlapping)
  rows = table[cands]  # [n, C, embed]
  unit = lambda x: x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
  cos = jnp.einsum("ne,nce->nc", unit(anchor), unit(rows))  # [n, C]
  weights = sparsemax(cos, jnp.asarray(c_valid))
  no_cands = ~c_valid.any(-1)  # none overlapping: the mean of the pieces
  width = max(cands.shape[1], pieces.shape[1])
  pad = lambda x: np.pad(x, ((0, 0), (0, width - x.shape[1])))
  ids = np.where(no_cands[:, None], pad(pieces), pad(cands))
  weights = jnp.where(no_cands[:, None], pad(np.asarray(valid / counts, np.float32)),
                      jnp.pad(weights, ((0, 0), (0, width - weights.shape[1]))))
  return ids, weights


def _made_rows(table: jax.Array, ids: np.ndarray, weights: jax.Array, start: int) -> jax.Array:
  """sum_k weights[n, k] table[ids[n, k]] -> [n, embed]; all-zero weights: mean of rows < start."""
  table = table.astype(jnp.float32)
  rows = jnp.einsum("nk,nke->ne", weights, table[ids])
  empty = jnp.sum(weights, -1, keepdims=True) == 0
  return jnp.where(empty, jnp.mean(table[:start], axis=0), rows)


def _extended(old: jax.Array, fresh: jax.Array, new: NewTokens, made: jax.Array | None
              ) -> jax.Array:
  """A [new_vocab, embed] table: old rows copied (all of the source's rows, padding included),
  rows the source lacks from `fresh`, rows [start, stop) from `made` (None: `fresh`'s)."""
  keep = min(old.shape[0], fresh.shape[0])
  out = fresh.at[:keep].set(old[:keep].astype(fresh.dtype))
  rows = fresh[new.start:new.stop] if made is None else made.astype(fresh.dtype)
  return out.at[new.start:new.stop].set(rows)


def extend_vocabulary(params: Params, src: ModelConfig, cfg: ModelConfig, new: NewTokens,
                      method: str, rng: jax.Array) -> Params:
  """params of Transformer(src) -> params of Transformer(cfg), cfg differing in vocab_size only:
  the embedding (and an untied lm_head) resized, new rows made by `method` (module docstring)."""
  if method not in METHODS:
    raise ValueError(f"unknown new-embedding method {method!r}; choose one of {METHODS}.")
  if new.start > src.vocab_size or new.stop > cfg.vocab_size:
    raise ValueError(f"the new ids {new.start}..{new.stop - 1} do not fit the source's vocab_size "
                     f"{src.vocab_size} and the run's {cfg.vocab_size}; check the tokenizers.")
  # One program (not an op at a time: each would compile on its own for the params' shardings).
  return jax.jit(_extend, static_argnums=(1, 2, 3))(params, cfg, new, method, rng)


def _extend(params: Params, cfg: ModelConfig, new: NewTokens, method: str, rng: jax.Array
            ) -> Params:
  k_embed, k_head = jax.random.split(rng)
  table = params["embed"]["embedding"]  # [src padded vocab, embed]
  dtype, size = table.dtype, (cfg.padded_vocab_size, cfg.embed_dim)
  fresh = nn.initializers.normal(cfg.init_std)(k_embed, size, dtype)
  ids = weights = None
  if method != "random":
    ids, weights = new_row_weights(table, new, method)
  made = lambda t: None if ids is None else _made_rows(t, ids, weights, new.start)
  out = {**params, "embed": {**params["embed"], "embedding": _extended(table, fresh, new,
                                                                       made(table))}}
  if not cfg.tie_embeddings:
    head = params["lm_head"].T  # [src padded vocab, embed]
    fresh = dense_init((0,), (1,))(k_head, size[::-1], head.dtype).T
    out["lm_head"] = _extended(head, fresh, new, made(head)).T  # [embed, padded vocab]
  return out


def new_row_mask(params: Params, start: int, stop: int) -> Params:
  """A trainable mask (tuning.masked_optimizer's leaves) marking only rows [start, stop) of the
  embedding and columns [start, stop) of an untied lm_head."""
  def leaf(path, x):
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    if name not in ("embed/embedding", "lm_head"):
      return False
    ids = np.arange(np.shape(x)[0 if name == "embed/embedding" else -1])
    rows = (ids >= start) & (ids < stop)
    return rows[:, None] if name == "embed/embedding" else rows[None, :]  # [vocab, 1] | [1, vocab]
  return jax.tree_util.tree_map_with_path(leaf, params)
