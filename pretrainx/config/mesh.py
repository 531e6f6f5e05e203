"""MeshConfig: the device mesh's shape and the logical-axis rule table that pretrainx.sharding
applies (logical parameter and activation names -> mesh axes)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

MESH_AXES = ("data", "fsdp", "tensor")


BATCH_AXES = ("data", "fsdp")


# logical name -> mesh axis (or axes, or None for replicated). Parameters shard over fsdp (ZeRO-3
# style) and tensor (Megatron style); activations shard their batch over data x fsdp.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("activation_batch", ("data", "fsdp")),
    ("activation_mlp", "tensor"),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_vocab", "tensor"),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh shape and the logical-axis rules.

  Attributes:
    data, fsdp, tensor: sizes of the mesh axes; one of them may be -1 to take all remaining
      devices. Their product must equal the number of devices.
    rules: (logical_name, mesh_axes) pairs; names not listed are replicated.
  """

  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  rules: tuple[tuple[str, Any], ...] = DEFAULT_RULES

  def resolved_shape(self, num_devices: int) -> tuple[int, int, int]:
    shape = [self.data, self.fsdp, self.tensor]
    if shape.count(-1) > 1:
      raise ValueError(f"at most one mesh axis may be -1; got data, fsdp, tensor = {tuple(shape)}.")
    if -1 in shape:
      known = math.prod(s for s in shape if s != -1)
      if num_devices % known:
        raise ValueError(
            f"mesh axes {dict(zip(MESH_AXES, shape))} cannot fill {num_devices} devices: "
            f"{num_devices} is not divisible by {known}.")
      shape[shape.index(-1)] = num_devices // known
    if math.prod(shape) != num_devices:
      raise ValueError(
          f"mesh axes data={shape[0]} x fsdp={shape[1]} x tensor={shape[2]} = {math.prod(shape)} "
          f"devices, but {num_devices} devices are available; make the product equal "
          f"{num_devices} (or set one axis to -1 to fill the rest).")
    return tuple(shape)  # type: ignore[return-value]
