"""Meshes and logical-axis rules: the only place that maps model axis names to devices.

A mesh has axes ('data', 'fsdp', 'context', 'expert', 'tensor'). Parameters and activations carry
logical names ('embed', 'mlp', 'heads', ..., 'activation_batch', ...); MeshConfig.rules maps each to
mesh axes. Over several slices (TPU slices joined by the data-centre network, GPU hosts, or
simulated slices on a CPU host), each axis is slice-major: its DCN part outside its ICI part.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec
from pretrainx.config import MeshConfig
from pretrainx.config.mesh import BATCH_AXES, LENGTH_AXES, MESH_AXES


def device_slices(devices: list) -> tuple[list[int], str]:
  """(slice of each device, what a slice is): TPU devices carry their slice_index; devices of
  several processes (GPU hosts, loopback processes) are grouped by process; else one slice."""
  if all(getattr(d, "slice_index", None) is not None for d in devices):
    return [int(d.slice_index) for d in devices], "slice"
  if devices and devices[0].platform == "tpu":  # one slice's hosts (libtpu's topology devices
    return [0] * len(devices), "slice"          # of a single slice carry no slice_index)
  processes = sorted({d.process_index for d in devices})
  if len(processes) > 1:
    return [processes.index(d.process_index) for d in devices], "process"
  return [0] * len(devices), "slice"


def simulated_slices(devices: list, num_slices: int) -> list[int]:
  """One process's devices cut into `num_slices` runs of consecutive ids: slice of each device."""
  order = sorted(range(len(devices)), key=lambda i: devices[i].id)
  per = len(devices) // num_slices
  slices = [0] * len(devices)
  for rank, i in enumerate(order):
    slices[i] = rank // per
  return slices


def _hybrid(devices: list, slices: list[int], ici: tuple[int, ...], dcn: tuple[int, ...]
            ) -> np.ndarray:
  """Devices laid out [dcn_0 * ici_0, dcn_1 * ici_1, ...]: each slice an ICI block, slice-major
  (what mesh_utils.create_hybrid_device_mesh builds, for devices it cannot group)."""
  groups = [[d for d, s in sorted(zip(devices, slices), key=lambda p: p[0].id) if s == k]
            for k in range(math.prod(dcn))]
  blocks = np.asarray(groups, dtype=object).reshape(*dcn, *ici)  # [*dcn, *ici]
  n = len(ici)
  blocks = blocks.transpose([j for i in range(n) for j in (i, n + i)])  # dcn_0, ici_0, dcn_1, ...
  return blocks.reshape([d * i for d, i in zip(dcn, ici)])


def make_mesh(cfg: MeshConfig, devices: list | None = None) -> Mesh:
  """A mesh over MESH_AXES with Auto axis types (what Linen's logical rules need).

  On one slice: jax.make_mesh's device order (or `devices` reshaped). Over several: the slices
  of TPU devices (or the processes of GPU hosts) are joined by mesh_utils.create_hybrid_device_mesh
  along the DCN axes; on a single CPU process the devices are cut into simulated slices of
  consecutive devices, laid out the same way. ValueErrors say what does not fit.
  """
  axis_types = (AxisType.Auto,) * len(MESH_AXES)
  all_devices = list(jax.devices() if devices is None else devices)
  slices, granule = device_slices(all_devices)
  found = len(set(slices))
  wanted = cfg.num_slices(found)
  if wanted == 1 and found == 1:
    shape = cfg.resolved_shape(len(all_devices))
    if devices is None:
      return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types)
    return Mesh(np.asarray(all_devices).reshape(shape), MESH_AXES, axis_types=axis_types)
  simulated = found == 1 and all_devices[0].platform == "cpu"
  if found != wanted and not simulated:
    raise ValueError(
        f"the devices span {found} {granule}{'s' * (found != 1)} but MeshConfig.dcn_data x "
        f"dcn_fsdp = {wanted}; set them so that their product is {found}"
        + (" (a DCN axis needs a multi-slice topology)" if found == 1 else "") + ".")
  dcn = cfg.dcn_shape(found)
  if len(all_devices) % wanted:
    raise ValueError(f"{len(all_devices)} devices cannot form {wanted} slices of equal size; "
                     "make MeshConfig.dcn_data x dcn_fsdp divide the number of devices.")
  ici = cfg.ici_shape(len(all_devices) // wanted, wanted)
  if simulated:
    grid = _hybrid(all_devices, simulated_slices(all_devices, wanted), ici, dcn)
  elif granule == "slice" and all_devices[0].platform == "tpu":
    grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, all_devices,
                                                allow_split_physical_axes=True)
  else:
    grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, all_devices, process_is_granule=True,
                                                allow_split_physical_axes=True)
  return Mesh(grid, MESH_AXES, axis_types=axis_types)


def mesh_slices(mesh: Mesh, num_slices: int = 1) -> dict[int, int]:
  """Device id -> its slice, as make_mesh grouped them: the devices' own slices (or processes),
  or on one CPU process the `num_slices` simulated slices of consecutive ids."""
  devices = list(mesh.devices.flat)
  slices, _ = device_slices(devices)
  if len(set(slices)) == 1 and num_slices > 1:
    slices = simulated_slices(devices, num_slices)
  return {d.id: s for d, s in zip(devices, slices)}


def data_parallel_size(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """[batch, seq] arrays: batch split over data x fsdp x expert, seq over context."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES, LENGTH_AXES))


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


def sharded_shapes(boxed: Any, mesh: Mesh, rules) -> Any:
  """A tree of boxed abstract values (logical axes) as plain ShapeDtypeStructs, each carrying
  its NamedSharding on `mesh` (what `.lower` and a partial restore take)."""
  shardings = logical_to_shardings(boxed, mesh, rules)
  values = jax.tree.map(lambda x: x.value if isinstance(x, nn.Partitioned) else x, boxed,
                        is_leaf=lambda x: isinstance(x, nn.Partitioned))
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), values,
                      shardings)


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
