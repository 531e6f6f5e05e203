"""Pallas kernels on meshes: GSPMD cannot partition a Mosaic (TPU) or Triton (GPU) call, so each
kernel runs under `jax.shard_map`, split over the mesh axes that the logical rules give the
activations' batch and heads (sharding.py's table); sequence and head_dim stay whole per shard.
The same model code then compiles on one device and on any mesh, TPU topologies included.

Also the one switch between the two graphs of the same math: the CPU-tuned one (cpu_tuned_graph)
and the one TPUs and GPUs run, which `graph('accelerator')` or PRETRAINX_GRAPH=accelerator
trace on CPU too, so that tests there execute it.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Any, Callable, Iterator

import jax
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


def shard_attention(kernel: Callable, q: jax.Array, k: jax.Array, v: jax.Array,
                    segment_ids: jax.Array | None = None,
                    prefix_mask: jax.Array | None = None, *,
                    head_params: Any = None, kv_head_params: Any = None) -> jax.Array:
  """kernel(q, k, v, segment_ids, prefix_mask, head_params, kv_head_params) -> out, run on each
  device's shard.

  q, out: [batch, seq, heads, head_dim]; k, v: [batch, seq, kv_heads, head_dim];
  segment_ids, prefix_mask: [batch, seq] or None; head_params / kv_head_params: pytrees (or None)
  of per-head arrays whose first axis is the query / key-value heads (a decay per head, feature
  maps), split with the heads. Outside a mesh (or on one device) the kernel is called directly.
  The kernel sees whole sequences and whole GQA groups.
  """
  mesh = current_mesh()
  if mesh is None or mesh.size == 1:
    return kernel(q, k, v, segment_ids, prefix_mask, head_params, kv_head_params)
  batch, heads = activation_axes("activation_batch"), activation_axes("activation_heads")
  kv_heads, length = activation_axes("activation_kv_heads"), activation_axes("activation_length")
  if length is not None:
    raise ValueError(f"the attention kernels need whole sequences per device, but the rules shard "
                     f"activation_length over {length}; map it to None in MeshConfig.rules, or "
                     "use attention_impl='reference'.")
  # A dimension that does not split over its axes is kept whole on every device (the init's
  # one-row batch, say); heads split only if query and key/value heads both do, so that each
  # shard keeps whole GQA groups.
  if q.shape[0] % axes_size(mesh, batch):
    batch = None
  if q.shape[2] % axes_size(mesh, heads) or k.shape[2] % axes_size(mesh, kv_heads):
    heads = kv_heads = None
  q_spec, kv_spec = P(batch, None, heads, None), P(batch, None, kv_heads, None)
  rows = [x for x in (segment_ids, prefix_mask) if x is not None]
  leading = lambda axes: (lambda x: P(axes, *([None] * (x.ndim - 1))))

  def per_shard(q, k, v, hp, kvp, *rows_in):
    it = iter(rows_in)
    seg = next(it) if segment_ids is not None else None
    prefix = next(it) if prefix_mask is not None else None
    return kernel(q, k, v, seg, prefix, hp, kvp)

  in_specs = (q_spec, kv_spec, kv_spec, jax.tree.map(leading(heads), head_params),
              jax.tree.map(leading(kv_heads), kv_head_params), *([P(batch, None)] * len(rows)))
  return jax.shard_map(per_shard, mesh=mesh, in_specs=in_specs, out_specs=q_spec,
                       check_vma=False)(q, k, v, head_params, kv_head_params, *rows)
