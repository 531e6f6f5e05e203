"""MeshConfig: the device mesh's shape and the logical-axis rule table that pretrainx.sharding
applies (logical parameter and activation names -> mesh axes)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

# Outer to inner: axes further right get the nearest devices (tensor the nearest).
MESH_AXES = ("data", "fsdp", "context", "expert", "tensor")


# The expert axis splits the batch too outside the MoE layers (as in MaxText), so expert
# parallelism costs no extra devices: inside an MoE layer tokens travel to their experts' devices.
BATCH_AXES = ("data", "fsdp", "expert")

# The axis that splits activations' sequence dimension (context parallelism).
LENGTH_AXES = ("context",)

# The axes that may span slices: only their gradient reductions and FSDP gathers cross the
# data-centre network (DCN) between slices.
DCN_AXES = ("data", "fsdp")


# logical name -> mesh axis (or axes, or None for replicated). Parameters shard over fsdp (ZeRO-3
# style, and over context, whose devices would otherwise hold replicas) and tensor (Megatron
# style), the routed experts over expert; activations shard their batch over data x fsdp x
# expert and their sequence over context.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("embed", ("fsdp", "context")),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("experts", "expert"),
    ("activation_batch", ("data", "fsdp", "expert")),
    ("activation_length", "context"),
    ("activation_mlp", "tensor"),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_vocab", "tensor"),
)


def _sizes(shape) -> str:
  return " x ".join(f"{a}={n}" for a, n in zip(MESH_AXES, shape))


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh shape and the logical-axis rules.

  Attributes:
    data, fsdp, context, expert, tensor: sizes of the mesh axes within one slice (over its ICI);
      one of them may be -1 to take all remaining devices of the slice. Their product must equal
      the devices per slice. context > 1 splits every sequence over that many devices (context
      parallelism; attention all-gathers keys and values). expert > 1 splits each MoE layer's
      routed experts over that many devices (expert parallelism; it must divide
      MoeConfig.num_experts) and, elsewhere, the batch like data.
    dcn_data, dcn_fsdp: how many slices the data and fsdp axes span (over the data-centre
      network, as MaxText's dcn_*_parallelism); one may be -1 to take all slices. Their product
      is the number of slices; each mesh axis is then dcn x ici devices long, slice-major. Only
      these two axes may cross slices: their traffic (gradient reduction, FSDP gathers) is what
      DCN can carry. On a CPU host with one process, the devices are cut into that many
      simulated slices of consecutive devices.
    rules: (logical_name, mesh_axes) pairs; names not listed are replicated.
  """

  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  expert: int = 1
  context: int = 1
  dcn_data: int = 1
  dcn_fsdp: int = 1
  rules: tuple[tuple[str, Any], ...] = DEFAULT_RULES

  def dcn_shape(self, num_slices: int | None = None) -> tuple[int, ...]:
    """Slices along each of MESH_AXES (1 for those that stay within a slice). With -1 in a DCN
    axis, `num_slices` (the slices the devices span) resolves it."""
    dcn = {axis: getattr(self, f"dcn_{axis}") for axis in DCN_AXES}
    for axis, n in dcn.items():
      if n == 0 or n < -1:
        raise ValueError(f"MeshConfig.dcn_{axis}={n}: a slice count is a positive integer, "
                         "or -1 to take all slices.")
    if list(dcn.values()).count(-1) > 1:
      raise ValueError("at most one of MeshConfig.dcn_data and dcn_fsdp may be -1.")
    if -1 in dcn.values():
      known = math.prod(n for n in dcn.values() if n != -1)
      if num_slices is None or num_slices % known:
        raise ValueError(f"MeshConfig.dcn_* = {dcn} cannot fill {num_slices} slices; set them "
                         "to sizes whose product is the number of slices.")
      dcn = {a: (num_slices // known if n == -1 else n) for a, n in dcn.items()}
    return tuple(dcn.get(axis, 1) for axis in MESH_AXES)

  def num_slices(self, num_slices: int | None = None) -> int:
    """The slices this mesh spans: the product of its DCN axes."""
    return math.prod(self.dcn_shape(num_slices))

  def ici_shape(self, devices_per_slice: int, num_slices: int = 1) -> tuple[int, ...]:
    """The size of each of MESH_AXES within one slice (of `num_slices`), in that order."""
    shape = [getattr(self, axis) for axis in MESH_AXES]
    if shape.count(-1) > 1:
      raise ValueError(f"at most one mesh axis may be -1; got {dict(zip(MESH_AXES, shape))}.")
    if any(n == 0 or n < -1 for n in shape):
      raise ValueError(f"mesh axes {dict(zip(MESH_AXES, shape))}: each size is a positive "
                       "integer, or -1 for one of them to take the remaining devices.")
    if -1 in shape:
      known = math.prod(s for s in shape if s != -1)
      if devices_per_slice % known:
        raise ValueError(
            f"mesh axes {dict(zip(MESH_AXES, shape))} cannot fill {devices_per_slice} devices: "
            f"{devices_per_slice} is not divisible by {known}.")
      shape[shape.index(-1)] = devices_per_slice // known
    if math.prod(shape) != devices_per_slice:
      raise ValueError(
          f"mesh axes {_sizes(shape)} = {math.prod(shape)} "
          f"devices, but {devices_per_slice} devices are available"
          f"{f' in each of {num_slices} slices' if num_slices > 1 else ''}; make the product "
          f"equal {devices_per_slice} (or set one axis to -1 to fill the rest).")
    return tuple(shape)  # type: ignore[return-value]

  def resolved_shape(self, num_devices: int, num_slices: int | None = None) -> tuple[int, ...]:
    """The size of each of MESH_AXES over all slices (dcn x ici), in that order."""
    dcn = self.dcn_shape(num_slices)
    slices = math.prod(dcn)
    if num_devices % slices:
      raise ValueError(f"{num_devices} devices cannot form {slices} slices of equal size "
                       f"(MeshConfig.dcn_data={self.dcn_data}, dcn_fsdp={self.dcn_fsdp}).")
    ici = self.ici_shape(num_devices // slices, slices)
    return tuple(d * i for d, i in zip(dcn, ici))
