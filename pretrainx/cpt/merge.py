"""Model merging over param pytrees: linear soups, task arithmetic, TIES, DARE, SLERP.

Pure jnp functions (whole trees, or one tensor with `merge_leaf`) that run under jit on sharded
arrays; settings may differ per parameter by (regex, overrides) rules, first match wins, as
mergekit's per-tensor parameters. Loading, streaming and saving: pretrainx/train/merge_sources.py.

mergekit's numbers (tests/test_merge_mergekit.py): its defaults (linear and ties normalize,
task_arithmetic, dare_linear = our `dare` and dare_ties do not), its per-tensor steps per Hugging
Face tensor (TIES' top-k and SLERP's angle per layer of a scanned stack and per expert, never over
the vocabulary's padding: `tensor_layout`). DARE rescales the kept entries by 1/density as the
paper does, where mergekit 0.1.5 rescales each tensor to its L1 norm before the drop.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import zlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

METHODS = ("linear", "task_arithmetic", "ties", "dare", "dare_ties", "slerp")
NEEDS_BASE = ("task_arithmetic", "ties", "dare", "dare_ties")
# mergekit's defaults: a soup and TIES divide by the weights' sum (dare_ties does not).
_NORMALIZED = ("linear", "ties")
_EXPERT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
_OVERRIDES = ("weights", "density", "t", "normalize")
SLERP_COLINEAR = 0.9995  # |cos| above which SLERP is a plain interpolation (mergekit's threshold)
_EPS = 1e-8


@dataclasses.dataclass(frozen=True)
class LeafSettings:
  """How one tensor is merged (hashable: a static argument of the jitted merge)."""

  method: str = "linear"
  weights: tuple[float, ...] = ()  # one per model (the base excluded); () means all 1
  density: float = 1.0  # TIES: the fraction of each task vector kept; DARE: the survival prob.
  t: float = 0.5  # SLERP: 0 gives the first model, 1 the second
  normalize: bool | None = None  # divide by the weights' sum; None: the method's default
  stacked: int = 0  # leading axes of stacked tensors (scanned layers, experts): each slice alone
  vocab: tuple[int, int] | None = None  # (axis, size): entries at index >= size are padding


@dataclasses.dataclass(frozen=True)
class MergeSettings:
  """A merge: its method, defaults, seed and per-parameter-name rules.

  rules: (regex, {weights|density|t|normalize: value}) pairs searched (re.search) in a
  parameter's '/'-joined name, e.g. ('attention/', {'t': 0.3}); the first match overrides the
  defaults for that parameter.
  """

  method: str = "linear"
  weights: tuple[float, ...] = ()
  density: float = 1.0
  t: float = 0.5
  normalize: bool | None = None
  seed: int = 0
  rules: tuple[tuple[str, Any], ...] = ()

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"unknown merge method {self.method!r}; choose one of {', '.join(METHODS)}.")
    rules = []
    for rule in self.rules:
      pattern, overrides = rule
      re.compile(pattern)
      unknown = sorted(set(overrides) - set(_OVERRIDES))
      if unknown:
        raise ValueError(f"merge rule {pattern!r} sets {unknown}; a rule may set only "
                         f"{', '.join(_OVERRIDES)}.")
      items = {k: tuple(v) if k == "weights" else v for k, v in dict(overrides).items()}
      rules.append((pattern, tuple(sorted(items.items()))))
    object.__setattr__(self, "rules", tuple(rules))
    object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))
    for value in [self.density] + [dict(r).get("density", 1.0) for _, r in self.rules]:
      if not 0.0 < value <= 1.0:
        raise ValueError(f"density={value} must be in (0, 1]: the fraction of entries kept.")

  def for_param(self, name: str, cfg: Any = None) -> LeafSettings:
    """The settings of the parameter `name` ('/'-joined path): the first matching rule's; with
    the model's ModelConfig `cfg`, its `tensor_layout` too."""
    fields = {f: getattr(self, f) for f in _OVERRIDES}
    for pattern, overrides in self.rules:
      if re.search(pattern, name):
        fields.update(dict(overrides))
        break
    layout = tensor_layout(cfg, name) if cfg is not None else {}
    return LeafSettings(method=self.method, **fields, **layout)


def tensor_layout(cfg: Any, name: str) -> dict[str, Any]:
  """How the param `name` of a model of ModelConfig `cfg` splits into Hugging Face tensors, for
  the steps that look at a whole tensor (TIES' trim, SLERP's angle), as mergekit merges each HF
  tensor: stacked, its leading axes of one tensor each (scan_layers' 'layers/...', routed experts'
  'moe/{gate,up,down}_proj'); vocab, (axis, vocab_size) of the embedding and lm_head, whose rows
  past the vocabulary are padding that no HF tensor holds."""
  parts = name.split("/")
  stacked = int(parts[0] == "layers") + int(
      len(parts) >= 2 and parts[-2] == "moe" and parts[-1] in _EXPERT_PROJECTIONS)
  vocab = {"embed/embedding": (0, cfg.vocab_size), "lm_head": (1, cfg.vocab_size)}.get(name)
  return {"stacked": stacked, "vocab": vocab}


def param_key(seed: int, name: str) -> jax.Array:
  """DARE's key of one parameter: from the seed and its name only, never from its sharding."""
  return jax.random.fold_in(jax.random.key(seed), zlib.crc32(name.encode()) & 0x7FFFFFFF)


# -- one tensor ----------------------------------------------------------------------------------

def _weights(s: LeafSettings, n: int) -> jax.Array:
  if s.weights and len(s.weights) != n:
    raise ValueError(f"{len(s.weights)} weights for {n} models; pass one weight per model "
                     "(the base excluded).")
  return jnp.asarray(s.weights or (1.0,) * n, jnp.float32)


def _normalized(s: LeafSettings) -> bool:
  return s.method in _NORMALIZED if s.normalize is None else s.normalize


def _bcast(w: jax.Array, x: jax.Array) -> jax.Array:
  return w.reshape(w.shape + (1,) * (x.ndim - 1))  # [n] -> [n, 1, ...]


def _valid(s: LeafSettings, shape: tuple[int, ...]) -> np.ndarray | None:
  """The entries of one model's tensor that are not vocabulary padding (None: all are); a
  constant of the trace."""
  if s.vocab is None or s.vocab[1] >= shape[s.vocab[0]]:
    return None
  axis, size = s.vocab
  rows = np.arange(shape[axis]) < size
  return np.broadcast_to(rows.reshape((-1,) + (1,) * (len(shape) - axis - 1)), shape)


def _slices(x: jax.Array, stacked: int) -> jax.Array:
  return x.reshape(x.shape[:stacked] + (-1,))  # [*stack, entries of one HF tensor]


def _trim(delta: jax.Array, density: float, stacked: int = 0,
          valid: np.ndarray | None = None) -> jax.Array:
  """TIES' trim, per slice of the `stacked` leading axes: the k = max(1, int(density * size))
  entries of largest magnitude kept (mergekit keeps at least one), the rest 0; size counts the
  `valid` entries only, and the others are 0 (ties at the k-th magnitude are all kept)."""
  if density >= 1.0:
    return delta
  flat = _slices(delta, stacked)
  mag = jnp.abs(flat)
  size = flat.shape[-1]
  if valid is not None:
    mag = jnp.where(valid.reshape(flat.shape), mag, -1.0)
    size = int(valid.sum()) * flat.shape[-1] // valid.size
  k = max(1, int(density * size))
  threshold = jnp.sort(mag, axis=-1)[..., flat.shape[-1] - k, None]  # the k-th largest
  return jnp.where(mag >= threshold, flat, 0.0).reshape(delta.shape)


def _drop(delta: jax.Array, density: float, key: jax.Array) -> jax.Array:
  """DARE: each entry kept with probability `density` and rescaled by 1/density."""
  if density >= 1.0:
    return delta
  keep = jax.random.bernoulli(key, density, delta.shape)
  return jnp.where(keep, delta / density, 0.0)


def _sign_mixed(weighted: jax.Array, w: jax.Array, normalize: bool) -> jax.Array:
  """TIES' elect + disjoint merge of weighted task vectors [n, ...]: the sign of their sum per
  entry (ties count as +), then the sum of the agreeing ones over their weights' sum."""
  elected = jnp.where(weighted.sum(0) >= 0, 1.0, -1.0)
  agree = jnp.sign(weighted) == elected
  mixed = jnp.where(agree, weighted, 0.0).sum(0)
  if not normalize:
    return mixed
  divisor = jnp.where(agree, _bcast(w, weighted), 0.0).sum(0)
  return mixed / jnp.where(divisor == 0, 1.0, divisor)


def _slerp(a: jax.Array, b: jax.Array, t: float, stacked: int = 0,
           valid: np.ndarray | None = None) -> jax.Array:
  """Spherical interpolation of the flattened tensors (each slice of the `stacked` leading axes
  alone), linear when nearly colinear; the angle is the `valid` entries' only."""
  shape = a.shape
  a, b = _slices(a, stacked), _slices(b, stacked)
  mask = None if valid is None else valid.reshape(a.shape)
  masked = lambda x: x if mask is None else jnp.where(mask, x, 0.0)

  def norm(x):
    n = jnp.linalg.norm(masked(x), axis=-1, keepdims=True)
    return masked(x) / jnp.where(n > _EPS, n, 1.0)

  dot = jnp.sum(norm(a) * norm(b), axis=-1, keepdims=True)
  colinear = jnp.abs(dot) > SLERP_COLINEAR
  theta = jnp.arccos(jnp.clip(dot, -1.0, 1.0))
  sin = jnp.where(colinear, 1.0, jnp.sin(theta))
  s0, s1 = jnp.sin((1 - t) * theta) / sin, jnp.sin(t * theta) / sin
  return jnp.where(colinear, (1 - t) * a + t * b, s0 * a + s1 * b).reshape(shape)


@functools.partial(jax.jit, static_argnums=0)
def merge_leaf(s: LeafSettings, xs: Sequence[jax.Array], base: jax.Array | None = None,
               key: jax.Array | None = None) -> jax.Array:
  """One tensor merged from the models' `xs` (and `base`), in fp32, returned in the dtype of the
  base (or of the first model). key: DARE's (param_key)."""
  dtype = (base if base is not None else xs[0]).dtype
  x = jnp.stack([v.astype(jnp.float32) for v in xs])  # [n, ...]
  w = _weights(s, len(xs))
  if s.method == "slerp":
    if len(xs) != 2:
      raise ValueError(f"SLERP merges exactly two models, not {len(xs)}.")
    return _slerp(x[0], x[1], s.t, s.stacked, _valid(s, x.shape[1:])).astype(dtype)
  if s.method == "linear":
    total = (_bcast(w, x) * x).sum(0)
    return (total / jnp.where(jnp.abs(w.sum()) < _EPS, 1.0, w.sum()) if _normalized(s)
            else total).astype(dtype)
  if base is None:
    raise ValueError(f"the {s.method} merge needs a base model; pass --base.")
  b = base.astype(jnp.float32)
  delta = x - b  # [n, ...] task vectors
  if s.method == "ties":
    valid = _valid(s, b.shape)
    delta = jnp.stack([_trim(d, s.density, s.stacked, valid) for d in delta])
  elif s.method in ("dare", "dare_ties"):
    delta = jnp.stack([_drop(d, s.density, jax.random.fold_in(key, i))
                       for i, d in enumerate(delta)])
  weighted = _bcast(w, delta) * delta
  if s.method in ("ties", "dare_ties"):
    mixed = _sign_mixed(weighted, w, _normalized(s))
  else:
    mixed = weighted.sum(0)
    if _normalized(s):
      mixed = mixed / jnp.where(jnp.abs(w.sum()) < _EPS, 1.0, w.sum())
  return (b + mixed).astype(dtype)


# -- whole trees ---------------------------------------------------------------------------------

def param_name(path: tuple) -> str:
  """'/'-joined name of a tree path (dict keys, attribute names or indices)."""
  parts = [getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path]
  return "/".join(str(p) for p in parts)


def merge(settings: MergeSettings, trees: Sequence[Any], base: Any = None, cfg: Any = None) -> Any:
  """The merge of `trees` (same structure; and `base` for the task-vector methods), leaf by
  leaf with each parameter's settings; jit it to merge on a mesh. cfg: the models' ModelConfig,
  for pretrainx params (stacked layers and experts, vocabulary padding: `tensor_layout`); None
  merges each leaf as one tensor."""
  if settings.method in NEEDS_BASE and base is None:
    raise ValueError(f"the {settings.method} merge needs a base model; pass --base.")
  if settings.method == "slerp" and len(trees) != 2:
    raise ValueError(f"SLERP merges exactly two models, not {len(trees)}; pass two sources.")

  def one(path, *leaves):
    name = param_name(path)
    xs, b = (leaves[1:], leaves[0]) if base is not None else (leaves, None)
    s = settings.for_param(name, cfg)
    key = param_key(settings.seed, name) if s.method.startswith("dare") else None
    return merge_leaf(s, tuple(xs), b, key)

  inputs = tuple(trees) if base is None else (base, *trees)
  return jax.tree_util.tree_map_with_path(one, *inputs)


def linear(trees: Sequence[Any], weights: Sequence[float] = (), normalize: bool = True,
           rules: Sequence = ()) -> Any:
  """sum_i w_i t_i (divided by sum_i w_i unless normalize=False): an average or a weighted soup."""
  return merge(MergeSettings("linear", tuple(weights), normalize=normalize, rules=tuple(rules)),
               trees)


def task_arithmetic(base: Any, trees: Sequence[Any], weights: Sequence[float] = (),
                    normalize: bool = False, rules: Sequence = ()) -> Any:
  """base + sum_i w_i (t_i - base), signed weights (a chat vector: cpt + (instruct - base))."""
  return merge(MergeSettings("task_arithmetic", tuple(weights), normalize=normalize,
                             rules=tuple(rules)), trees, base)


def ties(base: Any, trees: Sequence[Any], weights: Sequence[float] = (), density: float = 1.0,
         normalize: bool = True, rules: Sequence = ()) -> Any:
  """TIES-Merging (Yadav et al. 2023): trim each task vector to its top-density magnitudes,
  elect each entry's sign from the sum, average the agreeing entries (disjoint mean)."""
  return merge(MergeSettings("ties", tuple(weights), density, normalize=normalize,
                             rules=tuple(rules)), trees, base)


def dare(base: Any, trees: Sequence[Any], weights: Sequence[float] = (), density: float = 1.0,
         seed: int = 0, sign_election: bool = False, normalize: bool | None = None,
         rules: Sequence = ()) -> Any:
  """DARE (Yu et al. 2023): drop each task-vector entry with probability 1 - density, rescale
  the survivors by 1/density (seeded per parameter name), then add them up, or with
  sign_election=True
  elect signs and take the disjoint mean as TIES does ('dare_ties')."""
  return merge(MergeSettings("dare_ties" if sign_election else "dare", tuple(weights), density,
                             normalize=normalize, seed=seed, rules=tuple(rules)), trees, base)


def slerp(a: Any, b: Any, t: float = 0.5, rules: Sequence = ()) -> Any:
  """Spherical interpolation of each tensor from a (t=0) to b (t=1)."""
  return merge(MergeSettings("slerp", t=t, rules=tuple(rules)), (a, b))
