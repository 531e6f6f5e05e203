"""Ahead-of-time planning: compile the train step for a mesh from abstract shapes and report, per
device, the memory of parameters, optimizer state and activations, the FLOPs per step, and whether
it fits a given HBM size. Nothing is allocated. `--topology=v5p-256` compiles the train and eval
steps with the real TPU compiler (libtpu) from any host, and counts the Pallas (Mosaic) kernel
calls in the compiled train step; without it, a mesh larger than this host uses fake CPU devices.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import time
from typing import Any

import jax
import numpy as np

from pretrainx.config import Experiment, experiment_of, parse_gin, phases
from pretrainx.data.pipeline import BATCH_KEYS
from pretrainx.flops import flops_per_token
from pretrainx import hlo_collectives
from pretrainx import topology as tpu_topology
from pretrainx.config.mesh import MESH_AXES
from pretrainx.sharding import batch_sharding, make_mesh, mesh_slices, sharded_shapes
from pretrainx.train.runtime import build_runtime
from pretrainx.train.teacher import teacher_for, teacher_model_config

GIB = 2**30
_CHILD_ENV = "PRETRAINX_PLAN_CHILD"  # set in a re-executed planner, so it never re-executes again
CPU_NOTE = ("note: compiled for fake CPU devices; XLA's memory_analysis describes the CPU compile "
            "(TPU/GPU fusion, layouts and rematerialisation differ), so treat the activation and "
            "total figures as estimates; parameter and optimizer bytes are exact.")


class CompilerOutOfMemory(Exception):
  """The compiler refused the step: its temporaries alone exceed the device's memory."""


@dataclasses.dataclass(frozen=True)
class PlanReport:
  """What one ahead-of-time compile of the train step says. Byte counts are per device.

  total_bytes = argument + output - alias + temp (XLA's peak estimate for the step);
  activation_bytes is XLA's temp size (activations, gradients, and other temporaries).
  flops_per_step covers the whole job; flops_source says whether it is XLA's count ('xla') or
  pretrainx.flops' analytic estimate ('analytic', used when XLA cannot count: layers or
  microbatches in a loop, whose body XLA's cost analysis counts once).
  """

  devices: int
  mesh: dict[str, int]
  backend: str
  tokens_per_step: int
  param_bytes: int
  optimizer_bytes: int
  other_state_bytes: int  # step counter, guard statistics, EMA
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  total_bytes: int
  flops_per_step: float
  flops_source: str
  xla_flops_per_device: float | None
  analytic_flops_per_step: float
  compile_seconds: float
  hbm_gib: float | None = None
  fits: bool | None = None
  # the TPU slice compiled for, e.g. 'v5p-256 (v5p:4x4x8 megacore, hosts 2x2x1, wrap xyz)'
  topology: str | None = None
  eval_temp_bytes: int | None = None  # the eval step's temporaries (TPU plans)
  attention_impl: str | None = None  # the layers' attention implementations, e.g. 'flash'
  mosaic_kernels: int | None = None  # Pallas (Mosaic) calls in the compiled train step (TPU plans)
  # what libtpu was told of the slice (TPU plans): topology_name, grid, chip_config,
  # host_bounds (chips per host) and wrap (torus wraparound per dimension)
  tpu_slice: dict[str, Any] | None = None
  num_slices: int = 1  # slices joined over the data-centre network (DCN)
  # collectives of the compiled train step per step, per device (pretrainx.hlo_collectives):
  # {'dcn': {kind: {'count': executions, 'bytes': bytes}}, 'ici': {...}}; 'dcn' holds those
  # whose groups span two slices
  collectives: dict[str, dict[str, dict[str, int]]] | None = None
  # knowledge distillation: the frozen teacher's params on each device (an online teacher; its
  # forward's temporaries are in temp_bytes and its FLOPs in flops_per_step), and a cached
  # teacher's top-k arrays in each batch
  teacher_bytes: int = 0
  teacher_flops_per_step: float = 0.0

  @property
  def activation_bytes(self) -> int:
    return self.temp_bytes

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def per_device_bytes(tree: Any) -> int:
  """Bytes one device holds of a tree of ShapeDtypeStructs carrying shardings (the largest shard;
  uneven splits are padded)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
  return total


def abstract_batch(exp: Experiment, mesh: jax.sharding.Mesh) -> dict[str, jax.ShapeDtypeStruct]:
  """The global batch the loop feeds the step, as sharded ShapeDtypeStructs (as put_batch makes).
  With a teacher cache, its top-k arrays too, at DistillConfig.top_k (32 when 0: the cache's k
  is not read here)."""
  rows = batch_sharding(mesh)  # [batch, seq]
  per_row = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(rows.spec[0]))  # [batch]
  shape = (exp.run.global_batch_size, exp.run.seq_len)
  keys = BATCH_KEYS + (("prefix_mask",) if exp.data.uses_prefix_lm else ())
  batch = {k: jax.ShapeDtypeStruct(shape, np.int32, sharding=rows) for k in keys}
  batch["domain"] = jax.ShapeDtypeStruct(shape[:1], np.int32, sharding=per_row)
  if exp.distill.enabled and exp.distill.cache:
    top = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*rows.spec, None))
    k = exp.distill.top_k or 32
    batch["teacher_ids"] = jax.ShapeDtypeStruct(shape + (k,), np.int32, sharding=top)
    batch["teacher_logprobs"] = jax.ShapeDtypeStruct(shape + (k,), np.float32, sharding=top)
    batch["teacher_target_logprob"] = jax.ShapeDtypeStruct(shape, np.float32, sharding=rows)
  return batch


def _xla_flops(compiled) -> float | None:
  """XLA's FLOP count of the per-device program, or None where the backend gives none."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except  # some backends do not implement it
    return None
  if isinstance(cost, (list, tuple)):  # older jax: one dict per program
    cost = cost[0] if cost else None
  flops = (cost or {}).get("flops")
  return float(flops) if flops and flops > 0 else None


# How a Pallas TPU kernel appears in compiled HLO text: a custom call to Mosaic.
_MOSAIC_CALL = re.compile(r'custom_call_target="tpu_custom_call"')


def mosaic_kernel_count(compiled) -> int:
  """Pallas (Mosaic) kernel calls in a compiled TPU program's HLO text. Call sites are counted:
  a kernel inside a rolled layer scan counts once, not once per layer; unrolled layers each."""
  return len(_MOSAIC_CALL.findall(compiled.as_text()))


def _xla_counts_every_flop(exp: Experiment) -> bool:
  """XLA's cost analysis counts a loop body once: trust it only for loop-free steps."""
  model = exp.model
  unrolled = not model.scan_layers or model.scan_unroll >= model.num_layers
  return (unrolled and exp.accumulation.microbatches == 1
          and set(model.layer_impls) == {"reference"})


def with_slices(exp: Experiment, num_slices: int) -> Experiment:
  """`exp` planned over `num_slices` slices: with neither MeshConfig.dcn_data nor dcn_fsdp set,
  the slices go to dcn_data (as MaxText's default dcn_data_parallelism=-1 does); a DCN product
  that is not `num_slices` is a ValueError."""
  if num_slices < 1:
    raise ValueError(f"--num_slices={num_slices}: a slice count is a positive integer.")
  mesh = exp.mesh
  if num_slices > 1 and mesh.dcn_data == 1 and mesh.dcn_fsdp == 1:
    exp = dataclasses.replace(exp, mesh=dataclasses.replace(mesh, dcn_data=num_slices))
  product = exp.mesh.num_slices(num_slices)
  if product != num_slices:
    raise ValueError(
        f"MeshConfig.dcn_data x dcn_fsdp = {mesh.dcn_data} x {mesh.dcn_fsdp} = {product} slices, "
        f"but the plan is for {num_slices} (--num_slices); make their product {num_slices}, or "
        "leave both at 1 to put the slices on dcn_data.")
  return exp


def plan(exp: Experiment, *, devices: int | None = None, hbm_gib: float | None = None,
         topology: tpu_topology.Topology | None = None, num_slices: int = 1) -> PlanReport:
  """Compiles `exp`'s train step ahead of time on this process's devices and reports per device.

  `devices` (default: all) must equal jax.device_count(); plan_main re-executes with that many
  fake CPU devices when it does not. With `topology`, the train and eval steps compile for that
  TPU slice (or slices) with the TPU compiler, and hbm_gib defaults to its HBM per device.
  Without it, `num_slices` > 1 cuts this process's devices into simulated slices. Either way the
  mesh's DCN axes must span the slices (with_slices).
  """
  if topology is not None:
    report = _plan_compiled(with_slices(exp, topology.num_slices), topology.devices,
                            hbm_gib or topology.hbm_gib_per_device,
                            f"{topology.name} ({topology.describe()})", topology.num_slices)
    return dataclasses.replace(report, tpu_slice=_slice(topology))
  available = jax.device_count()
  if devices is not None and devices != available:
    raise ValueError(
        f"plan(devices={devices}) needs a process with {devices} devices, but this one has "
        f"{available}; call plan_main(['--devices={devices}', ...]) (it re-executes with "
        f"XLA_FLAGS=--xla_force_host_platform_device_count={devices}) or set that flag before "
        "jax is imported.")
  return _plan_compiled(with_slices(exp, num_slices), None, hbm_gib, None, num_slices)


def _plan_compiled(exp: Experiment, devices, hbm_gib: float | None, topology: str | None,
                   num_slices: int = 1) -> PlanReport:
  start = time.perf_counter()
  teacher = teacher_for(exp)
  if devices is None:
    rt = build_runtime(exp, devices, teacher=teacher)
  else:  # the shape-only setup (parameter shapes) traces for the target's platform too, so that
    # a kernel the target lowers is not announced as falling back to pure JAX on this host
    with jax.sharding.use_abstract_mesh(make_mesh(exp.mesh, list(devices)).abstract_mesh):
      rt = build_runtime(exp, devices, teacher=teacher)
  exp = rt.exp
  eval_temp = mosaic = None
  teacher_args, teacher_flops = (), 0.0
  if teacher is not None and teacher.online:  # the frozen params, in their dtype and shardings
    teacher_args = (sharded_shapes(teacher.abstract, rt.mesh, exp.mesh.rules),)
    teacher_flops = (flops_per_token(teacher_model_config(exp), exp.run.seq_len) / 3.0 *
                     exp.run.global_batch_size * exp.run.seq_len)  # a forward: 1/3 of training
  with rt.scope():
    batch = abstract_batch(exp, rt.mesh)
    try:
      compiled = rt.train_step.lower(rt.abstract_state, batch, *teacher_args).compile()
    except jax.errors.JaxRuntimeError as err:  # the TPU compiler refuses what exceeds HBM
      if "RESOURCE_EXHAUSTED" not in str(err):
        raise
      line = next((l for l in str(err).splitlines() if "RESOURCE_EXHAUSTED" in l), str(err))
      where = topology or "these devices"
      raise CompilerOutOfMemory(
          f"{line.split('RESOURCE_EXHAUSTED: ')[-1].strip()} (compiling for {where}); shard more "
          "(fsdp, context, tensor), lower the batch, or rematerialise more.") from None
    if topology is not None:  # the eval step must compile for the slice too
      eval_compiled = rt.eval_step.lower(rt.abstract_state.params, batch).compile()
      eval_temp = eval_compiled.memory_analysis().temp_size_in_bytes
      mosaic = mosaic_kernel_count(compiled)
  seconds = time.perf_counter() - start
  # logical device i of the SPMD program is the i-th device of its assignment: the mesh's order
  traffic = hlo_collectives.traffic(compiled.as_text(), list(rt.mesh.devices.flat),
                                    mesh_slices(rt.mesh, num_slices))
  available = rt.mesh.devices.size
  backend = rt.mesh.devices.flat[0].platform
  mem = compiled.memory_analysis()
  state = rt.abstract_state
  params, opt = per_device_bytes(state.params), per_device_bytes(state.opt_state)
  other = per_device_bytes(state) - params - opt
  args, outs = mem.argument_size_in_bytes, mem.output_size_in_bytes
  alias, temp = mem.alias_size_in_bytes, mem.temp_size_in_bytes
  total = args + outs - alias + temp
  tokens = exp.run.global_batch_size * exp.run.seq_len
  analytic = flops_per_token(exp.model, exp.run.seq_len) * tokens + teacher_flops
  xla = _xla_flops(compiled)
  use_xla = xla is not None and _xla_counts_every_flop(exp)
  return PlanReport(
      devices=available, mesh=dict(rt.mesh.shape), backend=backend,
      tokens_per_step=tokens, param_bytes=params, optimizer_bytes=opt, other_state_bytes=other,
      argument_bytes=args, output_bytes=outs, alias_bytes=alias, temp_bytes=temp,
      total_bytes=total, flops_per_step=xla * available if use_xla else analytic,
      flops_source="xla" if use_xla else "analytic", xla_flops_per_device=xla,
      analytic_flops_per_step=analytic, compile_seconds=seconds, hbm_gib=hbm_gib,
      fits=None if hbm_gib is None else total <= hbm_gib * GIB, topology=topology,
      eval_temp_bytes=eval_temp, attention_impl=_impls(exp), mosaic_kernels=mosaic,
      num_slices=num_slices, collectives=traffic,
      teacher_bytes=per_device_bytes(teacher_args), teacher_flops_per_step=teacher_flops)


def _slice(topo: tpu_topology.Topology) -> dict[str, Any]:
  return {"name": topo.name, "topology_name": topo.topology_name, "grid": list(topo.grid),
          "chips": topo.chips, "chip_config": topo.chip_config,
          "host_bounds": list(topo.host_bounds), "wrap": list(topo.wrap)}


def _impls(exp: Experiment) -> str:
  """'flash', or the per-layer implementations in order of first use ('reference+hybrid')."""
  return "+".join(dict.fromkeys(exp.model.layer_impls))


def _size(n: float) -> str:
  for unit, scale in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
    if n >= scale:
      return f"{n / scale:.2f} {unit}"
  return f"{int(n)} B"


def dcn_text(report: PlanReport) -> str:
  """'DCN per step, per device: 1.20 GiB crosses between 4 slices: all-reduce 1.20 GiB (3
  runs), ...', or that no collective crosses DCN."""
  dcn = (report.collectives or {}).get("dcn") or {}
  slices = f"{report.num_slices} slice{'s' * (report.num_slices != 1)}"
  if not dcn:
    return f"DCN: no collective crosses DCN ({slices})"
  kinds = sorted(dcn.items(), key=lambda kv: -kv[1]["bytes"])
  total = sum(v["bytes"] for _, v in kinds)
  return (f"DCN per step, per device: {_size(total)} crosses between {slices}: "
          + ", ".join(f"{k} {_size(v['bytes'])} ({v['count']} runs)" for k, v in kinds))


def plan_text(report: PlanReport) -> str:
  """The report as the table `pretrainx plan` prints."""
  r = report
  mesh = " x ".join(f"{k}={v}" for k, v in r.mesh.items())
  target = f"TPU {r.topology}, TPU compiler" if r.topology else r.backend
  lines = [
      f"AOT plan: {r.devices} devices, mesh {mesh}, {r.tokens_per_step} tokens per step "
      f"(compiled for {target} in {r.compile_seconds:.1f} s)",
      "per device:",
      f"  parameters           {_size(r.param_bytes):>12}",
      f"  optimizer state      {_size(r.optimizer_bytes):>12}",
      f"  other state          {_size(r.other_state_bytes):>12}  (step, guard, EMA)",
  ] + ([f"  teacher (frozen)     {_size(r.teacher_bytes):>12}  (online distillation; its "
        "forward is in the temp)"] if r.teacher_bytes else []) + [
      f"  activations/temp     {_size(r.temp_bytes):>12}  (XLA temp size)",
      f"  arguments            {_size(r.argument_bytes):>12}",
      f"  outputs              {_size(r.output_bytes):>12}",
      f"  aliased (donated)    {_size(r.alias_bytes):>12}",
      f"  total                {_size(r.total_bytes):>12}  (arguments + outputs - aliased + temp)",
      f"FLOPs per step: {r.flops_per_step:.3e} ({r.flops_source}); per device "
      f"{r.flops_per_step / r.devices:.3e}",
  ]
  if r.teacher_flops_per_step:
    lines.append(f"  of which the teacher's forward {r.teacher_flops_per_step:.3e} (analytic)")
  if r.flops_source == "xla":
    lines.append(f"  analytic estimate {r.analytic_flops_per_step:.3e}")
  elif r.xla_flops_per_device is not None:
    lines.append(f"  (XLA counted {r.xla_flops_per_device:.3e} per device, loop bodies once)")
  if r.mosaic_kernels is not None:
    lines.append(f"attention ({r.attention_impl}): {r.mosaic_kernels} Pallas (Mosaic) kernel "
                 "calls in the compiled train step"
                 + (" (plain XLA)" if r.mosaic_kernels == 0 else ""))
  if r.eval_temp_bytes is not None:
    lines.append(f"eval step: compiles, {_size(r.eval_temp_bytes)} temporaries per device")
  if r.collectives is not None:
    lines.append(dcn_text(r))
  if r.hbm_gib is not None:
    used = r.total_bytes / (r.hbm_gib * GIB)
    verdict = ("fits" if r.fits else
               f"does not fit by {_size(r.total_bytes - r.hbm_gib * GIB)}")
    lines.append(f"HBM {r.hbm_gib:.4g} GiB per device: {verdict} ({_size(r.total_bytes)}, "
                 f"{100 * used:.1f}% of it)")
  if r.backend == "cpu":
    lines.append(CPU_NOTE)
  return "\n".join(lines)


def parse_mesh(text: str) -> dict[str, int]:
  """'data=1,fsdp=64,tensor=4' -> {'data': 1, 'fsdp': 64, 'tensor': 4} (one size may be -1)."""
  out: dict[str, int] = {}
  for part in filter(None, (p.strip() for p in text.split(","))):
    m = re.fullmatch(r"(\w+)=(-1|\d+)", part)
    if not m or m.group(1) not in MESH_AXES or int(m.group(2)) == 0 or m.group(1) in out:
      raise ValueError(
          f"bad --mesh entry {part!r} in {text!r}: write comma-separated AXIS=SIZE with AXIS one "
          f"of {', '.join(MESH_AXES)} (each at most once) and SIZE a positive integer or -1, "
          "e.g. --mesh=data=1,fsdp=64,tensor=4.")
    out[m.group(1)] = int(m.group(2))
  if not out:
    raise ValueError(f"--mesh={text!r} names no axis; e.g. --mesh=data=1,fsdp=64,tensor=4.")
  return out


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="pretrainx plan", description=__doc__)
  p.add_argument("--gin_file", action="append", default=[], help="gin config file (repeatable)")
  p.add_argument("--gin_param", action="append", default=[], help="gin binding (repeatable)")
  p.add_argument("--devices", type=int, default=None,
                 help="devices to plan for (default: this process's); fake CPU devices if more")
  p.add_argument("--mesh", default=None, help="AXIS=SIZE,... overriding MeshConfig")
  p.add_argument("--hbm_gib", type=float, default=None,
                 help="HBM per device, e.g. 95 for v5p (default with --topology: the chip's)")
  p.add_argument("--topology", default=None,
                 help="compile for a TPU slice with the TPU compiler (needs libtpu; no TPU): "
                      "v4-N, v5p-N, v5e-N, v6e-N or GEN:AxBxC, e.g. v5p-256")
  p.add_argument("--num_slices", type=int, default=None,
                 help="slices joined over DCN (with --topology: that many of its slices, as "
                      "MaxText's compile_topology_num_slices; default 1); the slices go to "
                      "MeshConfig.dcn_data unless dcn_data or dcn_fsdp is set")
  p.add_argument("--context", type=int, default=None,
                 help="context-parallel mesh axis size (shorthand for "
                      "--gin_param=MeshConfig.context=N)")
  p.add_argument("--stages", action="store_true",
                 help="plan every stage that changes the sequence length, batch or rope "
                      "settings (Stage.seq_len, ...), each compiled at its own shape")
  p.add_argument("--json", action="store_true", help="print the report as JSON")
  return p


def stage_experiments(exp: Experiment) -> list[tuple[int, Experiment]]:
  """(start step, the run as that stage trains it) for each stage whose shape or rope settings
  differ from the stage before (config.phases)."""
  out, seen = [], None
  for phase in phases(exp):
    if (phase.shape, phase.rope) != seen:
      out.append((phase.start_step, experiment_of(exp, phase)))
      seen = (phase.shape, phase.rope)
  return out


def _plan_stages(exp: Experiment, as_json: bool, **kw) -> int:
  """Plans and prints each stage of `exp`; 1 when any does not fit its HBM."""
  reports = []
  for start, stage_exp in stage_experiments(exp):
    report = plan(stage_exp, **kw)
    reports.append((start, stage_exp.run, report))
    if not as_json:
      sys.stdout.write(f"== stage from step {start}: seq_len {stage_exp.run.seq_len}, "
                       f"{stage_exp.run.global_batch_size} rows per step ==\n"
                       f"{plan_text(report)}\n")
  if as_json:
    sys.stdout.write(json.dumps([{"start_step": s, "seq_len": r.seq_len,
                                  "global_batch_size": r.global_batch_size, **rep.to_dict()}
                                 for s, r, rep in reports], indent=1) + "\n")
  return 1 if any(rep.fits is False for _, _, rep in reports) else 0


def _reexecute(argv: list[str], devices: int) -> int:
  """Runs the planner again in a child process that has `devices` fake CPU devices."""
  flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "",
                 os.environ.get("XLA_FLAGS", ""))
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS="cpu", **{_CHILD_ENV: "1"},
             XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={devices}".strip(),
             PYTHONPATH=os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])))
  child = subprocess.run([sys.executable, "-m", "pretrainx.plan", *argv], env=env,
                         capture_output=True, text=True, check=False)
  sys.stdout.write(child.stdout)
  sys.stderr.write(child.stderr)
  return child.returncode


def plan_main(argv: list[str] | None = None) -> int:
  """`pretrainx plan` command line: 0 on success, 2 with a message on stderr for bad input."""
  argv = list(sys.argv[1:] if argv is None else argv)
  args = build_parser().parse_args(argv)
  try:
    if args.context is not None and args.context < 1:
      raise ValueError(f"--context={args.context}: the context axis is a positive integer.")
    context = [] if args.context is None else [f"MeshConfig.context = {args.context}"]
    exp = parse_gin(args.gin_file, args.gin_param + context)
    if args.mesh is not None:
      exp = exp.replace(mesh=parse_mesh(args.mesh))
    if args.topology is not None:
      slices = 1 if args.num_slices is None else args.num_slices
      topo = tpu_topology.load(args.topology, slices)
      exp = with_slices(exp, slices)
      try:
        exp.mesh.resolved_shape(len(topo.devices), slices)
      except ValueError as err:
        hint = "" if args.mesh is not None else (
            " (pass --mesh, e.g. --mesh=data=1,fsdp=-1,tensor=1)")
        raise ValueError(f"topology {args.topology} has {len(topo.devices)} devices: {err}"
                         f"{hint}") from err
      if args.stages:
        return _plan_stages(exp, args.json, hbm_gib=args.hbm_gib, topology=topo)
      report = plan(exp, hbm_gib=args.hbm_gib, topology=topo)
      return _print(report, args.json)
    devices = args.devices or jax.device_count()
    if devices < 1:
      raise ValueError(f"--devices={args.devices} must be a positive integer.")
    slices = exp.mesh.num_slices() if args.num_slices is None else args.num_slices
    exp = with_slices(exp, slices)
    exp.mesh.resolved_shape(devices, slices)  # a mesh that cannot fill the devices fails here
    if devices != jax.device_count():
      if os.environ.get(_CHILD_ENV):
        raise ValueError(f"this planner process has {jax.device_count()} devices, not "
                         f"{devices}: is JAX_PLATFORMS=cpu honoured?")
      return _reexecute(argv, devices)
    if args.stages:
      return _plan_stages(exp, args.json, devices=devices, hbm_gib=args.hbm_gib,
                          num_slices=slices)
    report = plan(exp, devices=devices, hbm_gib=args.hbm_gib, num_slices=slices)
  except CompilerOutOfMemory as err:
    sys.stderr.write(f"pretrainx plan: does not fit: {err}\n")
    return 1
  except (ValueError, FileNotFoundError) as err:
    sys.stderr.write(f"pretrainx plan: error: {err}\n")
    return 2
  return _print(report, args.json)


def _print(report: PlanReport, as_json: bool) -> int:
  """Prints the report; 1 when it does not fit its HBM."""
  text = json.dumps(report.to_dict(), indent=1) if as_json else plan_text(report)
  sys.stdout.write(text + "\n")
  return 1 if report.fits is False else 0


if __name__ == "__main__":
  sys.exit(plan_main())
