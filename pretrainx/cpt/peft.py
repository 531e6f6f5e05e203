"""Parameter-efficient training as pure functions on Flax `params` trees: LoRA (init, merge,
count) and freezing by regex (a trainable mask and an optimizer that skips frozen params). No gin,
no I/O; the train step wires them in.

Paths are '/'-joined dict keys ('layers/attention/q_proj'). Scanned models (ModelConfig.scan_layers)
stack the blocks under 'layers' with a leading layer axis; unrolled ones name them 'layers_<i>'.
"""

from __future__ import annotations

import math
import re
from typing import Any, Iterable, Sequence

import flax.traverse_util as traverse
import jax
import jax.numpy as jnp
import numpy as np
import optax

from pretrainx.config import LoraConfig
from pretrainx.tree import flat, is_box, layer_axes, path_name, unbox

Params = Any  # a nested dict of arrays (unboxed), as TrainState.params holds
LORA_A, LORA_B = "lora_a", "lora_b"
# Params whose input (contracted) dims are all but the last; every other param contracts its first.
_INPUT_ALL_BUT_LAST = re.compile(r"(^|/)o_proj$")
_BIAS = re.compile(r"(^|/|_)bias$")


# ----------------------------------------------------------------------------- paths


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
  lead = layer_axes(path)
  core = tuple(shape[lead:])
  n_in = len(core) - 1 if _INPUT_ALL_BUT_LAST.search(path) else 1
  return tuple(shape[:lead]), core[:n_in], core[n_in:]


def _lora_candidates(flat: dict[str, Any]) -> list[str]:
  """Kernels LoRA can adapt: 2+ non-layer dims and not a bias (Qwen2's q_bias is [heads, hd])."""
  return [p for p, x in flat.items()
          if len(np.shape(unbox(x))) - layer_axes(p) >= 2 and not _BIAS.search(p)]


def lora_targets(params: Params, cfg: LoraConfig) -> list[str]:
  """The sorted paths LoRA adapts; a target regex matching no adaptable param is a ValueError."""
  candidates = sorted(_lora_candidates(flat(params)))
  matched = _match_all(cfg.targets, candidates, "LoraConfig.targets")
  return sorted(set().union(*matched.values()))


def _rebox(leaf, value, names):
  """`value` boxed like `leaf` (logical axis names for sharding) when `leaf` is boxed."""
  return leaf.replace(value=value, names=names) if is_box(leaf) else value


def init_lora(params: Params, cfg: LoraConfig, rng: jax.Array) -> Params:
  """Adapters for every target: a tree mirroring `params` with {lora_a, lora_b} at each target.

  Works on plain arrays, abstract values (jax.eval_shape) and nn.Partitioned boxes; boxed params
  give boxed factors whose logical names are (layers?, *input names, None) for A and
  (layers?, None, *output names) for B, ready for pretrainx.sharding.logical_to_shardings.
  """
  leaves = flat(params)
  lora = {}
  for i, path in enumerate(lora_targets(params, cfg)):
    leaf = leaves[path]
    base = unbox(leaf)
    lead, d_in, d_out = _split_dims(path, tuple(base.shape))
    std = cfg.init_std if cfg.init_std is not None else 1.0 / math.sqrt(math.prod(d_in))
    a = std * jax.random.normal(jax.random.fold_in(rng, i), lead + d_in + (cfg.rank,), jnp.float32)
    b = jnp.zeros(lead + (cfg.rank,) + d_out, jnp.float32)
    names = tuple(leaf.names) if is_box(leaf) else None
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
  flat_params = flat(params)
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
  return int(sum(math.prod(np.shape(unbox(x))) for x in jax.tree.leaves(lora, is_leaf=is_box)))


# ----------------------------------------------------------------------------- freezing


def trainable_mask(params: Params, *, train: Sequence[str] = (),
                   freeze: Sequence[str] = ()) -> Params:
  """Pytree of bools shaped like `params`: True where the optimizer may update.

  A param is trainable when it matches some `train` regex (every param when `train` is empty)
  and no `freeze` regex. Each regex must match some path; a mask that trains nothing is an error.
  """
  train, freeze = _as_patterns(train, "train"), _as_patterns(freeze, "freeze")
  paths = list(flat(params))
  trained = set().union(*_match_all(train, paths, "trainable_mask train").values()) \
      if train else set(paths)
  frozen = set().union(*_match_all(freeze, paths, "trainable_mask freeze").values()) \
      if freeze else set()
  keep = trained - frozen
  if not keep:
    raise ValueError(f"trainable_mask(train={train}, freeze={freeze}) leaves no trainable param; "
                     "loosen `freeze` or widen `train`.")
  return jax.tree_util.tree_map_with_path(lambda p, _: path_name(p) in keep, params,
                                          is_leaf=is_box)


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
