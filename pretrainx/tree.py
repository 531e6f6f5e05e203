"""Small helpers for parameter pytrees, used everywhere params are inspected: '/'-joined path
names, Flax `nn.Partitioned` boxes, the leading layer axis of scanned blocks, and a readable
report of where two trees' shapes differ."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax


def key_name(key) -> str:
  """One jax path key (dict key, attribute, sequence index) as a string."""
  return str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key))))


def path_name(path) -> str:
  """A jax key path (or a tuple of dict keys) as the '/'-joined string regexes match."""
  return "/".join(key_name(k) for k in path)


def is_box(x) -> bool:
  return isinstance(x, nn.Partitioned)


def unbox(x):
  """A leaf's value without its logical-axis box (any tree: nn.unbox)."""
  return x.value if is_box(x) else x


def unbox_tree(tree: Any) -> Any:
  """Every boxed leaf of `tree` replaced by its value. Unlike nn.unbox, no logical sharding
  constraint is applied, so it is safe inside a mesh context."""
  return jax.tree.map(unbox, tree, is_leaf=is_box)


def flat(tree: Any) -> dict[str, Any]:
  """{'/'-joined path: leaf}; nn.Partitioned boxes count as leaves."""
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_box)[0]
  return {path_name(p): leaf for p, leaf in leaves}


def layer_axes(path: str) -> int:
  """Scanned blocks stack a leading 'layers' axis on every param under 'layers/'."""
  return 1 if path.startswith("layers/") else 0


def stacked_axes(path: str) -> int:
  """Leading axes that stack independent matrices: the 'layers' axis of scanned blocks, then the
  'experts' axis of routed experts (moe/gate_proj, up_proj, down_proj: [layers?, experts, in,
  out])."""
  return layer_axes(path) + (1 if path.rsplit("/", 2)[-2:-1] == ["moe"] and path.endswith(
      ("/gate_proj", "/up_proj", "/down_proj")) else 0)


def _shape(x) -> tuple[int, ...]:
  return tuple(getattr(unbox(x), "shape", ()))


def shape_differences(got: Any, want: Any, got_name: str = "source", want_name: str = "model",
                      order: Callable[[str], Any] | None = None) -> list[str]:
  """'path: got shape -> want shape' for every leaf whose shape differs or that one tree lacks."""
  a, b = ({k: _shape(v) for k, v in flat(t).items()} for t in (got, want))
  out = []
  for key in sorted(set(a) | set(b), key=order):
    if a.get(key) != b.get(key):
      out.append(f"{key}: {got_name} {a.get(key, 'missing')} -> {want_name} "
                 f"{b.get(key, 'missing')}")
  return out


def consecutive_groups(sizes: Sequence[int], limit: int) -> list[list[int]]:
  """Indices of `sizes` in order, cut into consecutive groups of total size at most `limit` (an
  item bigger than the limit alone): the files of a sharded save, the params merged at a time."""
  groups, total = [[]], 0
  for i, size in enumerate(sizes):
    if groups[-1] and total + size > limit:
      groups.append([])
      total = 0
    groups[-1].append(i)
    total += size
  return groups
