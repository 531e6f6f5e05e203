"""Pallas kernels on meshes: GSPMD cannot partition a Mosaic (TPU) or Triton (GPU) call, so each
kernel runs under `jax.shard_map`, split over the mesh axes that the logical rules give the
activations' batch, heads and sequence (sharding.py's table); head_dim stays whole per shard, and
a split sequence (context parallelism) gathers its keys and values.
The same model code then compiles on one device and on any mesh, TPU topologies included.

Also the one switch between the two graphs of the same math: the CPU-tuned one (cpu_tuned_graph)
and the one TPUs and GPUs run, which `graph('accelerator')` or PRETRAINX_GRAPH=accelerator
trace on CPU too, so that tests there execute it.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Any, Callable, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from pretrainx.sharding import activation_axes, axes_size, current_mesh, mesh_platform


def platform() -> str:
  """The platform the code is being compiled for: the mesh's devices (a TPU topology when
  planning from a CPU host), else jax's default backend."""
  mesh = current_mesh()
  return mesh_platform(mesh) if mesh is not None else jax.default_backend()


GRAPH_ENV = "PRETRAINX_GRAPH"
GRAPHS = ("auto", "cpu", "accelerator")
_graph = contextvars.ContextVar("pretrainx_graph", default=None)  # the innermost graph(kind)


def cpu_tuned_graph() -> bool:
  """Whether the model traces its CPU-tuned graph: project()'s written-out gradient, RoPE's
  tables computed once, 'reference' attention's hand-written backward (softmax_vjp), and the
  loss's target logits gathered (train.step.target_logits). The other graph, plain dot_generals,
  reference_attention under autodiff and a one-hot sum, is what TPUs and GPUs run; both compute
  the same math.

  Decided, first to last, by the innermost `graph(kind)` around the tracing, the environment
  variable PRETRAINX_GRAPH ('auto', 'cpu' or 'accelerator'; e.g. PRETRAINX_GRAPH=accelerator
  runs a whole program with the TPU/GPU graph on CPU), and else (`auto`) by platform() == 'cpu'.
  """
  kind = _graph.get() or os.environ.get(GRAPH_ENV) or "auto"
  if kind not in GRAPHS:
    raise ValueError(f"{GRAPH_ENV}={kind!r}; choose one of {GRAPHS}.")
  return platform() == "cpu" if kind == "auto" else kind == "cpu"


@contextlib.contextmanager
def graph(kind: str) -> Iterator[None]:
  """Traces the model's 'cpu' (tuned) or 'accelerator' (TPU/GPU) graph on any platform, or
  'auto' (by platform) within the block, whatever PRETRAINX_GRAPH says (see cpu_tuned_graph).

  The choice is made while tracing: a function that jax has already traced and cached keeps its
  graph, so jit a fresh function inside the block.
  """
  if kind not in GRAPHS:
    raise ValueError(f"graph kind {kind!r}; choose one of {GRAPHS}.")
  token = _graph.set(kind)
  try:
    yield
  finally:
    _graph.reset(token)


class SplitSequence(NamedTuple):
  """What a kernel needs when its queries are one device's part of a split sequence: the keys'
  segment ids (the kernel's k and v are the whole sequence's, gathered), and each query's and
  key's index in the natural order (causality and windows follow it)."""
  kv_segment_ids: jax.Array | None  # [batch, seq]
  q_positions: jax.Array  # [batch, seq / context]
  kv_positions: jax.Array  # [batch, seq]


def shard_attention(kernel: Callable, q: jax.Array, k: jax.Array, v: jax.Array,
                    segment_ids: jax.Array | None = None,
                    prefix_mask: jax.Array | None = None, *,
                    head_params: Any = None, kv_head_params: Any = None,
                    layout: np.ndarray | None = None) -> jax.Array:
  """kernel(q, k, v, segment_ids, prefix_mask, head_params, kv_head_params, split) -> out, run
  on each device's shard.

  q, out: [batch, seq, heads, head_dim]; k, v: [batch, seq, kv_heads, head_dim];
  segment_ids, prefix_mask: [batch, seq] or None; head_params / kv_head_params: pytrees (or None)
  of per-head arrays whose first axis is the query / key-value heads (a decay per head, feature
  maps), split with the heads. Outside a mesh (or on one device) the kernel is called directly.
  The kernel sees whole GQA groups. Where the rules split 'activation_length' (context
  parallelism), each device keeps its queries and gathers the keys, values, their segment ids
  and the prefix mask of the whole sequence (Llama 3's all-gather; its gradient is a
  reduce-scatter), and `split` (a SplitSequence) gives every token's natural-order index from
  `layout` ([seq]: the natural index of each position, context_parallel.layout); otherwise the
  kernel sees whole sequences and split is None.
  """
  mesh = current_mesh()
  if mesh is None or mesh.size == 1:
    return kernel(q, k, v, segment_ids, prefix_mask, head_params, kv_head_params, None)
  batch, heads = activation_axes("activation_batch"), activation_axes("activation_heads")
  kv_heads, length = activation_axes("activation_kv_heads"), activation_axes("activation_length")
  if axes_size(mesh, length) == 1:
    length = None
  elif layout is None or q.shape[1] % axes_size(mesh, length):
    raise ValueError(f"a sequence of {q.shape[1]} tokens split over {length} needs its layout "
                     "and a length that the split divides (context_parallel.check_split).")
  # A dimension that does not split over its axes is kept whole on every device (the init's
  # one-row batch, say); heads split only if query and key/value heads both do, so that each
  # shard keeps whole GQA groups.
  if q.shape[0] % axes_size(mesh, batch):
    batch = None
  if q.shape[2] % axes_size(mesh, heads) or k.shape[2] % axes_size(mesh, kv_heads):
    heads = kv_heads = None
  q_spec, kv_spec = P(batch, length, heads, None), P(batch, length, kv_heads, None)
  rows = [x for x in (segment_ids, prefix_mask) if x is not None]
  leading = lambda axes: (lambda x: P(axes, *([None] * (x.ndim - 1))))

  def per_shard(q, k, v, hp, kvp, *rows_in):
    it = iter(rows_in)
    seg = next(it) if segment_ids is not None else None
    prefix = next(it) if prefix_mask is not None else None
    if length is None:
      return kernel(q, k, v, seg, prefix, hp, kvp, None)
    whole = lambda x: None if x is None else jax.lax.all_gather(x, length, axis=1, tiled=True)
    order = jnp.asarray(layout, jnp.int32)  # [seq]
    local = q.shape[1]
    q_pos = jax.lax.dynamic_slice_in_dim(order, jax.lax.axis_index(length) * local, local)
    split = SplitSequence(whole(seg), jnp.broadcast_to(q_pos, q.shape[:2]),
                          jnp.broadcast_to(order, (q.shape[0], order.shape[0])))
    return kernel(q, whole(k), whole(v), seg, whole(prefix), hp, kvp, split)

  in_specs = (q_spec, kv_spec, kv_spec, jax.tree.map(leading(heads), head_params),
              jax.tree.map(leading(kv_heads), kv_head_params), *([P(batch, length)] * len(rows)))
  return jax.shard_map(per_shard, mesh=mesh, in_specs=in_specs, out_specs=q_spec,
                       check_vma=False)(q, k, v, head_params, kv_head_params, *rows)
