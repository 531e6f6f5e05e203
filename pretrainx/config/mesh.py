"""MeshConfig: the device mesh's shape and the logical-axis rule table that pretrainx.sharding
applies (logical parameter and activation names -> mesh axes)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

MESH_AXES = ("data", "fsdp", "expert", "tensor")


# The expert axis splits the batch too outside the MoE layers (as in MaxText), so expert
# parallelism costs no extra devices: inside an MoE layer tokens travel to their experts' devices.
BATCH_AXES = ("data", "fsdp", "expert")


# logical name -> mesh axis (or axes, or None for replicated). Parameters shard over fsdp (ZeRO-3
# style) and tensor (Megatron style), the routed experts over expert; activations shard their batch
# over data x fsdp x expert.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("experts", "expert"),
    ("activation_batch", ("data", "fsdp", "expert")),
    ("activation_mlp", "tensor"),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_vocab", "tensor"),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh shape and the logical-axis rules.

  Attributes:
    data, fsdp, expert, tensor: sizes of the mesh axes; one of them may be -1 to take all
      remaining devices. Their product must equal the number of devices. expert > 1 splits each
      MoE layer's routed experts over that many devices (expert parallelism; it must divide
      MoeConfig.num_experts) and, elsewhere, the batch like data.
    rules: (logical_name, mesh_axes) pairs; names not listed are replicated.
  """

  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  expert: int = 1
  rules: tuple[tuple[str, Any], ...] = DEFAULT_RULES

  def resolved_shape(self, num_devices: int) -> tuple[int, ...]:
    """The size of each of MESH_AXES, in that order."""
    shape = [getattr(self, axis) for axis in MESH_AXES]
    if shape.count(-1) > 1:
      raise ValueError(f"at most one mesh axis may be -1; got {dict(zip(MESH_AXES, shape))}.")
    if -1 in shape:
      known = math.prod(s for s in shape if s != -1)
      if num_devices % known:
        raise ValueError(
            f"mesh axes {dict(zip(MESH_AXES, shape))} cannot fill {num_devices} devices: "
            f"{num_devices} is not divisible by {known}.")
      shape[shape.index(-1)] = num_devices // known
    if math.prod(shape) != num_devices:
      sizes = " x ".join(f"{a}={n}" for a, n in zip(MESH_AXES, shape))
      raise ValueError(
          f"mesh axes {sizes} = {math.prod(shape)} "
          f"devices, but {num_devices} devices are available; make the product equal "
          f"{num_devices} (or set one axis to -1 to fill the rest).")
    return tuple(shape)  # type: ignore[return-value]
