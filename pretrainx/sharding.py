"""Meshes and logical-axis rules: the only place that maps model axis names to devices.

A mesh has axes ('data', 'fsdp', 'expert', 'tensor'). Parameters and activations carry logical names
('embed', 'mlp', 'heads', ..., 'activation_batch', ...); MeshConfig.rules maps each to mesh axes.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec
from pretrainx.config import MeshConfig
from pretrainx.config.mesh import BATCH_AXES, MESH_AXES


def make_mesh(cfg: MeshConfig, devices: list | None = None) -> Mesh:
  """A ('data', 'fsdp', 'expert', 'tensor') mesh with Auto axis types (what Linen's logical rules need)."""
  axis_types = (AxisType.Auto,) * len(MESH_AXES)
  if devices is None:
    return jax.make_mesh(cfg.resolved_shape(jax.device_count()), MESH_AXES, axis_types=axis_types)
  shape = cfg.resolved_shape(len(devices))
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=axis_types)


def data_parallel_size(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """[batch, seq] arrays: batch split over data x fsdp, seq replicated."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES, None))


def check_batch_divisible(global_batch_size: int, mesh: Mesh, microbatches: int = 1) -> None:
  """The global batch (and each microbatch) must split evenly over the data-parallel devices."""
  dp = data_parallel_size(mesh)
  if global_batch_size % microbatches:
    raise ValueError(f"global_batch_size={global_batch_size} is not divisible by "
                     f"microbatches={microbatches}.")
  micro = global_batch_size // microbatches
  if micro % dp:
    raise ValueError(
        f"global batch {global_batch_size} (microbatch {micro}) is not divisible by the "
        f"data-parallel size {dp} (mesh "
        f"{' x '.join(f'{a}={mesh.shape[a]}' for a in BATCH_AXES)}); "
        f"use a batch that is a multiple of {dp * microbatches} or change the mesh.")


def logical_to_shardings(abstract_tree: Any, mesh: Mesh, rules) -> Any:
  """NamedShardings for a tree of (boxed) abstract values with logical axis metadata."""
  specs = nn.get_partition_spec(abstract_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, list(rules))


@contextlib.contextmanager
def mesh_scope(mesh: Mesh, rules):
  """Inside it, jit uses `mesh` and Linen's logical constraints resolve through `rules`."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(list(rules)):
    yield


def current_mesh() -> jax.sharding.AbstractMesh | None:
  """The mesh jax.set_mesh installed (mesh_scope does) as seen while tracing, or None."""
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh is None or mesh.empty else mesh


def mesh_platform(mesh) -> str:
  """'cpu', 'gpu' or 'tpu': what a mesh's devices are (a TPU topology's, planning on a CPU)."""
  device = getattr(mesh, "abstract_device", None)
  return device.platform if device is not None else jax.default_backend()


def activation_axes(logical_name: str) -> Any:
  """The mesh axes (a name, a tuple of names, or None) that the active logical rules map an
  activation axis to; None outside nn.logical_axis_rules."""
  return nn.logical_to_mesh_axes((logical_name,))[0]


def axes_size(mesh: Mesh, axes: Any) -> int:
  if axes is None:
    return 1
  return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))
