"""Function-preserving width growth of a trained model as pure functions on params: a wider
embed_dim, more heads (and kv heads) and a wider MLP, such that the grown model computes exactly
the source's logits at step 0 (HyperCloning, Samragh et al. 2024; bert2BERT's FPI, Chen et al.).

The scheme. Every grown axis maps each new index to a source index (`WidthMaps`):
  embed    d -> k*d, tiled: new channel i is source channel i mod d, so every hidden vector is
           [x, x, ..., x]. Its mean square is x's, so every RMSNorm (per-channel gains tiled)
           gives the tiled output too. Matrices that write the residual stream (the embedding,
           o_proj, down_proj) are tiled; matrices that read it (q/k/v_proj, gate/up_proj) are
           tiled and divided by k. The final norm's gain is divided by k, so that the output
           head (tied embedding or lm_head, tiled) sums the k copies back to the source logits.
           Only an integer multiple keeps the mean square (non-multiples are refused).
  heads    each new query head copies a source head of the same kv group (head_dim fixed, so
           q.k is unchanged); kv heads are copied in contiguous blocks (GQA: new kv head m copies
           source kv head m * kv // kv'); o_proj rows are divided by how often their head was
           copied, so the copies' outputs sum to the source head's.
  mlp      each new neuron copies a source neuron (gate/up columns); down_proj rows are divided
           by the neuron's copy count.
'hypercloning' copies every head and neuron the same number of times (integer multiples only);
'bert2bert' (FPI) keeps the source's heads and neurons first and copies random ones (seeded)
into the extra slots, so any larger num_heads / num_kv_heads / mlp_dim works; both tile embed.

Symmetry breaking: copies that start equal get equal gradients and stay equal. With `noise` > 0,
every divided (reading) weight gets Gaussian noise that sums to zero over the copies of each
source entry; the inputs of those copies are equal at step 0, so the function is still exact
(up to fp32 rounding) while the copies' gradients differ from the first step.

Supported: tied or untied output heads, channel or scalar norm gains, qkv_bias, embed_projection,
scanned or unrolled layers, softmax/linear/hybrid attention (their per-head params are copied).
An MoE source is refused (grow the dense model, then upcycle: train/init.py does it in that order).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import flax.traverse_util as traverse

from pretrainx.config import ModelConfig

Params = Any  # a nested dict of arrays (unboxed), as TrainState.params holds
METHODS = ("hypercloning", "bert2bert")
WIDTH_FIELDS = ("embed_dim", "num_heads", "num_kv_heads", "mlp_dim")

# How each param's non-layer axes grow: (axis kind, mode) per axis, None for an axis that keeps
# its size. Modes: 'copy' gathers; 'split' gathers and divides by the copy count (and takes the
# zero-sum noise); 'read' gathers and takes the noise undivided (the output head: the final norm
# divides). Kinds: WidthMaps fields.
_C, _S, _R = "copy", "split", "read"
_AXES = {
    "embed/embedding": (None, ("embed", _C)),
    "embed_projection": (("embed", _S), ("embed", _C)),
    "final_norm/scale": (("embed", _C),),  # then divided by the embed factor (final_norm_gain)
    "lm_head": (("embed", _R), None),
    "input_norm/scale": (("embed", _C),),
    "post_attention_norm/scale": (("embed", _C),),
    "attention/q_proj": (("embed", _S), ("heads", _C), None),
    "attention/k_proj": (("embed", _S), ("kv_heads", _C), None),
    "attention/v_proj": (("embed", _S), ("kv_heads", _C), None),
    "attention/o_proj": (("heads", _S), None, ("embed", _C)),
    "attention/q_bias": (("heads", _C), None),
    "attention/k_bias": (("kv_heads", _C), None),
    "attention/v_bias": (("kv_heads", _C), None),
    "attention/feature_map": (("heads", _C), None, None),
    "attention/feature_map_k": (("kv_heads", _C), None, None),
    "attention/decay": (("heads", _C),),
    "attention/window_factor": (("heads", _C),),
    "mlp/gate_proj": (("embed", _S), ("mlp", _C)),
    "mlp/up_proj": (("embed", _S), ("mlp", _C)),
    "mlp/down_proj": (("mlp", _S), ("embed", _C)),
}


class WidthMaps(NamedTuple):
  """For each grown axis, the source index of every new index (int arrays [new size])."""
  embed: np.ndarray
  heads: np.ndarray
  kv_heads: np.ndarray
  mlp: np.ndarray


def grown_config(src: ModelConfig, target: ModelConfig) -> ModelConfig:
  """`src` at `target`'s widths (embed_dim, num_heads, num_kv_heads, mlp_dim, head_dim)."""
  return dataclasses.replace(src, **{f: getattr(target, f) for f in WIDTH_FIELDS},
                             head_dim=target.head_dim)


def needs_width_growth(src: ModelConfig, target: ModelConfig) -> bool:
  return any(getattr(src, f) != getattr(target, f) for f in WIDTH_FIELDS)


def _check(src: ModelConfig, cfg: ModelConfig, method: str) -> None:
  """One-line ValueErrors for growth this module cannot make exact."""
  if method not in METHODS:
    raise ValueError(f"InitConfig.grow_width={method!r}; choose '' (off) or one of {METHODS}.")
  for f in WIDTH_FIELDS:
    if getattr(cfg, f) < getattr(src, f):
      raise ValueError(f"InitConfig.grow_width: ModelConfig.{f}={getattr(cfg, f)} is smaller "
                       f"than the source's {getattr(src, f)}; width growth only grows (bind "
                       f"{f} >= {getattr(src, f)}).")
  if cfg.resolved_head_dim != src.resolved_head_dim:
    raise ValueError(f"InitConfig.grow_width keeps head_dim={src.resolved_head_dim} (the "
                     f"source's), but this run's is {cfg.resolved_head_dim}; set "
                     f"ModelConfig.head_dim={src.resolved_head_dim}.")
  if src.moe.enabled:
    raise ValueError("InitConfig.grow_width cannot grow an MoE source; grow the dense model's "
                     "width first, then upcycle it (MoeConfig on the grown run).")
  if cfg.embed_dim % src.embed_dim:
    raise ValueError(f"InitConfig.grow_width: embed_dim {src.embed_dim} -> {cfg.embed_dim} is "
                     "not an integer multiple, which RMSNorm cannot keep exact; use a multiple "
                     f"of {src.embed_dim}.")
  if method == "hypercloning":
    bad = [f"{f} {getattr(src, f)} -> {getattr(cfg, f)}" for f in WIDTH_FIELDS[1:]
           if getattr(cfg, f) % getattr(src, f)]
    if bad:
      raise ValueError(f"grow_width='hypercloning' copies by integer multiples, not {bad}; use "
                       "multiples or grow_width='bert2bert'.")


def _head_maps(src: ModelConfig, cfg: ModelConfig, method: str, rng: np.random.Generator
               ) -> tuple[np.ndarray, np.ndarray]:
  """(query head map [heads'], kv head map [kv_heads']) keeping every query head in its kv
  group: new kv head m copies source kv head m * kv // kv', and the query slots of the new kv
  heads that copy source kv head r hold r's query heads, each once first, then copies."""
  h, kv, h2, kv2 = src.num_heads, src.num_kv_heads, cfg.num_heads, cfg.num_kv_heads
  g, g2 = h // kv, h2 // kv2
  kv_map = np.arange(kv2) * kv // kv2
  heads = np.zeros((h2,), np.int64)
  for r in range(kv):
    slots = [m * g2 + s for m in np.flatnonzero(kv_map == r) for s in range(g2)]
    if len(slots) < g:
      raise ValueError(f"InitConfig.grow_width: num_heads {h} -> {h2} with num_kv_heads {kv} -> "
                       f"{kv2} leaves {len(slots)} query heads for a source kv group of {g}; "
                       "grow num_heads at least as much as num_kv_heads.")
    extra = (np.arange(len(slots) - g) % g if method == "hypercloning"
             else rng.integers(0, g, len(slots) - g))
    heads[slots] = r * g + np.concatenate([np.arange(g), extra])
  return heads, kv_map


def width_maps(src: ModelConfig, cfg: ModelConfig, method: str, seed: int = 0) -> WidthMaps:
  """The source index of every new embed channel, head, kv head and MLP neuron (checked)."""
  _check(src, cfg, method)
  rng = np.random.default_rng(seed)
  heads, kv_heads = _head_maps(src, cfg, method, rng)
  m, m2 = src.mlp_dim, cfg.mlp_dim
  mlp = (np.arange(m2) % m if method == "hypercloning"
         else np.concatenate([np.arange(m), rng.integers(0, m, m2 - m)]))
  return WidthMaps(np.arange(cfg.embed_dim) % src.embed_dim, heads, kv_heads, mlp)


def _axes_of(name: str, leaf) -> tuple[tuple, int]:
  """(per-axis growth spec, leading layer axes) of the param named `name`."""
  parts = name.split("/")
  stacked = 1 if parts[0] == "layers" else 0
  key = "/".join(parts[1:]) if parts[0].startswith("layers") else name
  if key not in _AXES:
    raise ValueError(f"InitConfig.grow_width does not know how to grow param {name!r}; width "
                     "growth supports the dense decoder's params only.")
  axes = _AXES[key]
  if np.ndim(leaf) == stacked:  # a scalar norm gain: nothing to tile
    axes = ()
  if np.ndim(leaf) != stacked + len(axes):
    raise ValueError(f"param {name!r} has shape {np.shape(leaf)}, not the {len(axes)} dims "
                     "(plus a layer axis when scanned) width growth expects.")
  return axes, stacked


def _zero_sum_noise(shape, axis: int, src: np.ndarray, key: jax.Array) -> jax.Array:
  """Standard normal noise whose sum over the copies of each source index (along `axis`) is 0."""
  n = jnp.moveaxis(jax.random.normal(key, shape, jnp.float32), axis, 0)
  count = np.bincount(src, minlength=src.max() + 1)
  mean = jax.ops.segment_sum(n, src, num_segments=len(count)) / count.reshape(
      (-1,) + (1,) * (n.ndim - 1))
  return jnp.moveaxis(n - jnp.take(mean, src, axis=0), 0, axis)


def _grow_leaf(w: jax.Array, axes: tuple, stacked: int, maps: WidthMaps, noise: float,
               key: jax.Array) -> jax.Array:
  dtype, out = w.dtype, w.astype(jnp.float32)
  scale = noise * float(jnp.std(out)) if noise else 0.0
  # copies first, so that each copy of a head or neuron takes its own noise on the split axis
  order = sorted((i for i, spec in enumerate(axes) if spec), key=lambda i: axes[i][1] != _C)
  for i in order:
    kind, mode = axes[i]
    src = getattr(maps, kind)
    axis = stacked + i
    if len(src) == w.shape[axis] and np.array_equal(src, np.arange(len(src))):
      continue  # this axis does not grow
    out = jnp.take(out, jnp.asarray(src), axis=axis)
    shape = [1] * out.ndim
    shape[axis] = len(src)
    if mode == _S:
      out = out / np.bincount(src)[src].reshape(shape).astype(np.float32)
    if mode in (_S, _R) and scale:
      out = out + scale * _zero_sum_noise(out.shape, axis, src, jax.random.fold_in(key, i))
  return out.astype(dtype)


def grow_width(params: Params, src: ModelConfig, target: ModelConfig, *,
               method: str = "hypercloning", noise: float = 0.0, seed: int = 0
               ) -> tuple[Params, ModelConfig]:
  """The source params grown to `target`'s widths, computing the source's logits exactly.

  Args:
    params: the source's params (built with `src`, scanned or unrolled).
    src: the source's ModelConfig.
    target: gives embed_dim, num_heads, num_kv_heads, mlp_dim and head_dim (which must resolve to
      the source's); every other field is the source's.
    method: 'hypercloning' (integer multiples) or 'bert2bert' (any larger heads / mlp_dim).
    noise: std of the zero-sum symmetry-breaking noise, as a fraction of each tensor's own std
      (0: exact copies).
    seed: picks bert2bert's copied heads and neurons and the noise.
  Returns (params, src at the target's widths).
  """
  cfg = grown_config(src, target)
  if noise < 0:
    raise ValueError(f"InitConfig.grow_width_noise={noise}; use a std >= 0 (0: exact copies).")
  maps = width_maps(src, cfg, method, seed)
  factor = cfg.embed_dim // src.embed_dim
  key = jax.random.key(seed)
  flat = traverse.flatten_dict(params, sep="/")
  out = {}
  for i, (name, w) in enumerate(sorted(flat.items())):
    axes, stacked = _axes_of(name, w)
    w = _grow_leaf(w, axes, stacked, maps, noise, jax.random.fold_in(key, i))
    if name == "final_norm/scale" and factor > 1:  # the output head sums the k copies
      w = (w.astype(jnp.float32) / factor).astype(w.dtype)
    out[name] = w
  return traverse.unflatten_dict(out, sep="/"), cfg


def new_width_mask(params: Params, src: ModelConfig, cfg: ModelConfig, method: str) -> Params:
  """Trainable mask for 'train only the new width': per param a bool array (broadcastable to
  it) that is True on the entries some grown axis holds a copy at (not the first occurrence of
  its source index), False on the source's own entries; False for params nothing grew.

  The source's own entries are the first occurrence of each source index on every grown axis
  (position i < source size for embed and mlp; for heads, the first slots of each kv group).
  """
  maps = width_maps(src, cfg, method)
  is_copy = {}
  for kind, src_idx in maps._asdict().items():
    first = np.zeros(len(src_idx), bool)
    first[np.unique(src_idx, return_index=True)[1]] = True
    is_copy[kind] = ~first

  def mark(name: str, leaf) -> Any:
    axes, stacked = _axes_of(name, leaf)
    new = np.zeros((1,) * stacked + tuple(np.shape(leaf)[stacked:]), bool)
    for i, spec in enumerate(axes):
      if spec is not None and len(is_copy[spec[0]]) == np.shape(leaf)[stacked + i]:
        shape = [1] * new.ndim
        shape[stacked + i] = -1
        new = new | is_copy[spec[0]].reshape(shape)
    return new if new.any() else False

  flat = traverse.flatten_dict(params, sep="/")
  return traverse.unflatten_dict({k: mark(k, v) for k, v in flat.items()}, sep="/")
