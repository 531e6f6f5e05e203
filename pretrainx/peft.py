"""Parameter-efficient and growth methods as pure functions on Flax `params` trees: LoRA (init,
merge, count), freezing by regex (a trainable mask and an optimizer that skips frozen params),
Llama-Pro block expansion and G_stack depth growth. No gin, no I/O; the train step wires them in.

Paths are '/'-joined dict keys ('layers/attention/q_proj'). Scanned models (ModelConfig.scan_layers)
stack the blocks under 'layers' with a leading layer axis; unrolled ones name them 'layers_<i>'.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Iterable, Sequence

import flax.linen as nn
import flax.traverse_util as traverse
import jax
import jax.numpy as jnp
import numpy as np
import optax

from pretrainx.config import ModelConfig
from pretrainx.config import LoraConfig

Params = Any  # a nested dict of arrays (unboxed), as TrainState.params holds
LORA_A, LORA_B = "lora_a", "lora_b"
# Block outputs that expansion zero-initialises (DecoderBlock: attention then SwiGLU).
OUTPUT_PROJECTIONS = ("attention/o_proj", "mlp/down_proj")
# Params whose input (contracted) dims are all but the last; every other param contracts its first.
_INPUT_ALL_BUT_LAST = re.compile(r"(^|/)o_proj$")
_BIAS = re.compile(r"(^|/|_)bias$")


# ----------------------------------------------------------------------------- paths


def _key_name(k) -> str:
  return str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))


def path_name(path) -> str:
  """A jax key path (or a tuple of dict keys) as the '/'-joined string the regexes match."""
  return "/".join(_key_name(k) for k in path)


def _is_box(x) -> bool:
  return isinstance(x, nn.Partitioned)


def _flat(params: Params) -> dict[str, Any]:
  """{'/'-joined path: leaf}; nn.Partitioned boxes count as leaves."""
  leaves = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_box)[0]
  return {path_name(p): leaf for p, leaf in leaves}


def _layer_axes(path: str) -> int:
  """Scanned blocks carry one leading 'layers' axis, a batch axis for everything here."""
  return 1 if path.startswith("layers/") else 0


def _available(paths: Iterable[str], limit: int = 12) -> str:
  """A few distinct paths (layer numbers collapsed) for error messages."""
  shown = list(dict.fromkeys(re.sub(r"^layers_\d+/", "layers_<i>/", p) for p in paths))
  more = f", ... ({len(shown) - limit} more)" if len(shown) > limit else ""
  return ", ".join(shown[:limit]) + more


def _match_all(patterns: Sequence[str], paths: Sequence[str], what: str) -> dict[str, set[str]]:
  """{pattern: matching paths}; a pattern that matches nothing is a ValueError."""
  out = {}
  for pattern in patterns:
    rx = re.compile(pattern)
    out[pattern] = {p for p in paths if rx.search(p)}
    if not out[pattern]:
      raise ValueError(f"{what} regex {pattern!r} matches no parameter path; fix the regex "
                       f"(re.search over '/'-joined paths). Available: {_available(paths)}.")
  return out


# ----------------------------------------------------------------------------- LoRA


def _split_dims(path: str, shape: tuple[int, ...]) -> tuple[tuple, tuple, tuple]:
  """(layer dims, input dims, output dims) of a kernel, by the LoraConfig convention."""
  lead = _layer_axes(path)
  core = tuple(shape[lead:])
  n_in = len(core) - 1 if _INPUT_ALL_BUT_LAST.search(path) else 1
  return tuple(shape[:lead]), core[:n_in], core[n_in:]


def _lora_candidates(flat: dict[str, Any]) -> list[str]:
  """Kernels LoRA can adapt: 2+ non-layer dims and not a bias (Qwen2's q_bias is [heads, hd])."""
  return [p for p, x in flat.items()
          if len(np.shape(_unbox(x))) - _layer_axes(p) >= 2 and not _BIAS.search(p)]


def _unbox(x):
  return x.value if _is_box(x) else x


def lora_targets(params: Params, cfg: LoraConfig) -> list[str]:
  """The sorted paths LoRA adapts; a target regex matching no adaptable param is a ValueError."""
  candidates = sorted(_lora_candidates(_flat(params)))
  matched = _match_all(cfg.targets, candidates, "LoraConfig.targets")
  return sorted(set().union(*matched.values()))


def _rebox(leaf, value, names):
  """`value` boxed like `leaf` (logical axis names for sharding) when `leaf` is boxed."""
  return leaf.replace(value=value, names=names) if _is_box(leaf) else value


def init_lora(params: Params, cfg: LoraConfig, rng: jax.Array) -> Params:
  """Adapters for every target: a tree mirroring `params` with {lora_a, lora_b} at each target.

  Works on plain arrays, abstract values (jax.eval_shape) and nn.Partitioned boxes; boxed params
  give boxed factors whose logical names are (layers?, *input names, None) for A and
  (layers?, None, *output names) for B, ready for pretrainx.sharding.logical_to_shardings.
  """
  flat = _flat(params)
  lora = {}
  for i, path in enumerate(lora_targets(params, cfg)):
    leaf = flat[path]
    base = _unbox(leaf)
    lead, d_in, d_out = _split_dims(path, tuple(base.shape))
    std = cfg.init_std if cfg.init_std is not None else 1.0 / math.sqrt(math.prod(d_in))
    a = std * jax.random.normal(jax.random.fold_in(rng, i), lead + d_in + (cfg.rank,), jnp.float32)
    b = jnp.zeros(lead + (cfg.rank,) + d_out, jnp.float32)
    names = tuple(leaf.names) if _is_box(leaf) else None
    nl, ni = len(lead), len(d_in)
    a_names = names and names[:nl + ni] + (None,)
    b_names = names and names[:nl] + (None,) + names[nl + ni:]
    key = tuple(path.split("/"))
    lora[key + (LORA_A,)] = _rebox(leaf, a.astype(base.dtype), a_names)
    lora[key + (LORA_B,)] = _rebox(leaf, b.astype(base.dtype), b_names)
  return traverse.unflatten_dict(lora)


def lora_delta(a: jax.Array, b: jax.Array, base_shape: tuple[int, ...], scale: float) -> jax.Array:
  """scale * A @ B in fp32, shaped like the base kernel.

  a: [*lead, *in, r], b: [*lead, r, *out] -> [*lead, *in, *out]; the number of lead (layer) dims
  follows from the three ranks.
  """
  n_lead = a.ndim + b.ndim - 2 - len(base_shape)
  lead, r = a.shape[:n_lead], a.shape[-1]
  a2 = a.astype(jnp.float32).reshape(lead + (-1, r))  # [*lead, fan_in, r]
  b2 = b.astype(jnp.float32).reshape(lead + (r, -1))  # [*lead, r, fan_out]
  return (scale * jnp.matmul(a2, b2)).reshape(base_shape)


def lora_merge(params: Params, lora: Params, cfg: LoraConfig) -> Params:
  """base + (alpha / rank) * A @ B for every adapted param; others pass through unchanged.

  Pure jnp: use it inside the jitted forward (grads flow to A and B) and for export. Arrays only
  (nn.unbox boxed trees first). The sum is formed in fp32 and cast to the base dtype.
  """
  flat_lora = traverse.flatten_dict(lora, sep="/")
  factors = {}
  for key, x in flat_lora.items():
    parent, _, leaf = key.rpartition("/")
    if leaf not in (LORA_A, LORA_B):
      raise ValueError(f"LoRA tree entry {key!r} is neither {LORA_A} nor {LORA_B}; pass the "
                       "tree init_lora returned.")
    factors.setdefault(parent, {})[leaf] = x
  flat_params = _flat(params)
  missing = sorted(set(factors) - set(flat_params))
  if missing:
    raise ValueError(f"LoRA adapters for {missing[:4]} have no base param; were they made for "
                     f"another model? Available: {_available(flat_params)}.")

  def merge(path, w):
    ab = factors.get(path_name(path))
    if ab is None:
      return w
    delta = lora_delta(ab[LORA_A], ab[LORA_B], tuple(w.shape), cfg.scale)
    return (w.astype(jnp.float32) + delta).astype(w.dtype)

  return jax.tree_util.tree_map_with_path(merge, params)


def lora_param_count(lora: Params) -> int:
  """Number of adapter parameters (what the optimizer trains under LoRA)."""
  return int(sum(math.prod(np.shape(_unbox(x))) for x in jax.tree.leaves(lora, is_leaf=_is_box)))


# ----------------------------------------------------------------------------- freezing


def trainable_mask(params: Params, *, train: Sequence[str] = (),
                   freeze: Sequence[str] = ()) -> Params:
  """Pytree of bools shaped like `params`: True where the optimizer may update.

  A param is trainable when it matches some `train` regex (every param when `train` is empty)
  and no `freeze` regex. Each regex must match some path; a mask that trains nothing is an error.
  """
  train, freeze = _as_patterns(train, "train"), _as_patterns(freeze, "freeze")
  paths = list(_flat(params))
  trained = set().union(*_match_all(train, paths, "trainable_mask train").values()) \
      if train else set(paths)
  frozen = set().union(*_match_all(freeze, paths, "trainable_mask freeze").values()) \
      if freeze else set()
  keep = trained - frozen
  if not keep:
    raise ValueError(f"trainable_mask(train={train}, freeze={freeze}) leaves no trainable param; "
                     "loosen `freeze` or widen `train`.")
  return jax.tree_util.tree_map_with_path(lambda p, _: path_name(p) in keep, params,
                                          is_leaf=_is_box)


def _as_patterns(patterns, what: str) -> tuple[str, ...]:
  if isinstance(patterns, str):
    raise ValueError(f"trainable_mask {what}={patterns!r} is a string; pass a tuple of regexes, "
                     f"e.g. {what}=({patterns!r},).")
  return tuple(patterns)


def _zero_frozen_slices(mask: Params) -> optax.GradientTransformation:
  """Stateless: zeroes the entries where a (broadcastable) bool-array mask leaf is False."""

  def update(updates, state, params=None):
    del params
    keep = lambda u, m: u if np.ndim(m) == 0 else jnp.where(m, u, jnp.zeros_like(u))
    return jax.tree.map(keep, updates, mask), state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def masked_optimizer(optimizer: optax.GradientTransformation,
                     mask: Params) -> optax.GradientTransformation:
  """`optimizer` on the params the mask marks trainable; zero updates and no state for the rest.

  Mask leaves are bools (trainable_mask) or, for one stacked leaf of a scanned model of which
  only some layers train (new_block_mask), bool arrays broadcastable to the leaf. Such leaves
  keep optimizer state for the whole stack, but their frozen slices get zero gradients going in
  (so global-norm clipping ignores them) and zero updates coming out (so weight decay cannot move
  them).
  """
  leaves = jax.tree.leaves(mask)
  if not any(np.any(m) for m in leaves):
    raise ValueError("masked_optimizer: the mask marks no param trainable; check the regexes or "
                     "block indices that built it.")
  labels = jax.tree.map(lambda m: "train" if np.any(m) else "freeze", mask)
  inner = optax.multi_transform({"train": optimizer, "freeze": optax.set_to_zero()}, labels)
  if all(np.all(m) or not np.any(m) for m in leaves):
    return inner
  zero = _zero_frozen_slices(mask)
  return optax.chain(zero, inner, zero)


# ----------------------------------------------------------------------------- growth


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
    top = _key_name(path[0])
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
