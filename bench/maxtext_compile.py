"""MaxText's ahead-of-time train-step compile, as one JSON line: the driver that
bench/maxtext_memory.py runs inside MaxText's own virtual environment (it imports maxtext, never
pretrainx).

It runs MaxText's `train_compile.main` unchanged (MaxText picks the TPU topology, mesh, model,
optimizer and shardings) and records what that main compiles: per-device bytes of the parameters
and the optimizer state (from the shaped state's shardings), XLA's memory_analysis of the compiled
train step, MaxText's own FLOPs-per-step estimate, and the seconds from the start of main to the
end of the compile. The last line of stdout is `MAXTEXT_JSON {...}`. With `--hlo_out=PATH` as the
first argument it also writes the compiled train step's HLO text to PATH and adds the slice of
each mesh device (in the mesh's order, the program's logical ids) to the JSON as
`device_slices`, for pretrainx/hlo_collectives.py to read in pretrainx's environment.

Run (in the MaxText venv; see bench/maxtext_memory.py for how to make one):
  /tmp/mt312/bin/python bench/maxtext_compile.py compile_topology=v5p-256 \
      compile_topology_num_slices=1 model_name=llama2-7b per_device_batch_size=2 \
      max_target_length=4096 dataset_type=synthetic attention=flash
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import sys
import tempfile
import time

MARKER = "MAXTEXT_JSON "


def _version(dist: str) -> str | None:
  try:
    return importlib.metadata.version(dist)
  except importlib.metadata.PackageNotFoundError:
    return None


def per_device_bytes(tree) -> tuple[dict[str, int], dict[str, int]]:
  """(bytes one device holds, floating-point element count) of each top-level part of MaxText's
  shaped state ({'model': parameters, 'optimizer': Adam moments and step})."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  def itemsize(dtype) -> int:  # PRNG keys (MaxText's model holds its rngs) have extended dtypes
    return dtype.itemsize if jax.dtypes.issubdtype(dtype, jax.dtypes.extended) else np.dtype(
        dtype).itemsize

  per_dev: dict[str, int] = {}
  count: dict[str, int] = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
      continue
    key = getattr(path[0], "key", getattr(path[0], "name", str(path[0]))) if path else "?"
    sharding = getattr(leaf, "sharding", None)
    shape = sharding.shard_shape(leaf.shape) if sharding is not None else leaf.shape
    per_dev[str(key)] = per_dev.get(str(key), 0) + math.prod(shape) * itemsize(leaf.dtype)
    if jax.dtypes.issubdtype(leaf.dtype, np.floating):  # weights and moments, not rngs or steps
      count[str(key)] = count.get(str(key), 0) + math.prod(leaf.shape)
  return per_dev, count


def main(overrides: list[str]) -> int:
  hlo_out = None
  if overrides and overrides[0].startswith("--hlo_out="):
    hlo_out, overrides = overrides[0].split("=", 1)[1], overrides[1:]
  from maxtext.configs import pyconfig  # pylint: disable=import-outside-toplevel
  from maxtext.trainers.pre_train import train_compile as tc  # pylint: disable=import-outside-toplevel
  from maxtext.utils import maxtext_utils  # pylint: disable=import-outside-toplevel

  seen: dict = {}
  shaped_inputs, jit_and_compile = tc.get_shaped_inputs, tc.jit_and_compile

  def recording_shaped_inputs(mesh, config):
    out = shaped_inputs(mesh, config)
    seen["state"], seen["config"], seen["mesh"] = out[0][0], config, mesh
    return out

  def recording_compile(*args, **kwargs):
    compiled = jit_and_compile(*args, **kwargs)
    seen["compiled"], seen["compiled_at"] = compiled, time.perf_counter()
    return compiled

  tc.get_shaped_inputs, tc.jit_and_compile = recording_shaped_inputs, recording_compile
  base = os.path.join(os.path.dirname(pyconfig.__file__), "base.yml")
  out_dir = tempfile.mkdtemp(prefix="maxtext_compile_")
  argv = ["train_compile", base, f"base_output_directory={out_dir}", "run_name=memory",
          "enable_checkpointing=false", *overrides]
  start = time.perf_counter()
  tc.main(argv)
  compiled, config, mesh = seen["compiled"], seen["config"], seen["mesh"]
  mem = compiled.memory_analysis()
  per_dev, count = per_device_bytes(seen["state"])
  args, outs = mem.argument_size_in_bytes, mem.output_size_in_bytes
  alias, temp = mem.alias_size_in_bytes, mem.temp_size_in_bytes
  devices = int(mesh.devices.size)
  tflops_per_device = maxtext_utils.calculate_tflops_training_per_device(config, log=False)[0]
  report = {
      "system": "maxtext", "maxtext": _version("maxtext"), "jax": _version("jax"),
      "libtpu": _version("libtpu"), "devices": devices,
      "mesh": {k: int(v) for k, v in mesh.shape.items() if v > 1},
      "device_kind": mesh.devices.flat[0].device_kind,
      "attention": config.attention, "remat_policy": config.remat_policy,
      "dtype": str(config.dtype), "weight_dtype": str(config.weight_dtype),
      "opt_type": str(config.opt_type),
      "context_parallel": {k: getattr(config, k, None) for k in (
          "context_parallel_strategy", "context_parallel_load_balance")},
      "tokens_per_step": int(config.global_batch_size_to_train_on * config.max_target_length),
      "param_count": count.get("model", 0), "param_bytes": per_dev.get("model", 0),
      "optimizer_bytes": per_dev.get("optimizer", 0),
      "state_parts": sorted(per_dev), "argument_bytes": args, "output_bytes": outs,
      "alias_bytes": alias, "temp_bytes": temp, "total_bytes": args + outs - alias + temp,
      "flops_per_step": tflops_per_device * 1e12 * devices,
      "compile_seconds": seen["compiled_at"] - start,
  }
  if hlo_out:
    with open(hlo_out, "w", encoding="utf-8") as f:
      f.write(compiled.as_text())
    report["hlo_path"] = hlo_out
    report["device_slices"] = [int(getattr(d, "slice_index", 0) or 0) for d in mesh.devices.flat]
  sys.stdout.write(MARKER + json.dumps(report) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
