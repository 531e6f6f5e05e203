"""Collectives of a compiled SPMD program, from its HLO text, split into those that cross slices
(the data-centre network, DCN) and those that stay within one (ICI), with bytes per step.

Two kinds of program: one over every device (CPU, GPU; simulated slices), whose collectives
cross slices when a group holds devices of two; and libtpu's multislice program, which is the
program of ONE slice (num_partitions = devices per slice): its collectives stay within the slice,
and the DCN part of each cross-slice collective is a host-transfer `send` (with its `recv`) to the
megascale runtime, `frontend_attributes={..._xla_megascale_transfer_type="ALL_REDUCE"...}`,
counted here as that collective (all-reduce) crossing DCN, with the send's buffer as its bytes.

Replica groups hold logical device ids: in an SPMD program id i is the i-th device of the
executable's device assignment, which for a jitted step over a Mesh is `mesh.devices.flat`.
Three spellings are read: explicit `{{0,1},{2,3}}`, iota `[2,4]<=[4,2]T(1,0)` and mesh axes
`mesh['data'=2,'fsdp'=4] {'fsdp'}` (with optional `, device_ids=(...)` and sub-axes
`'fsdp':(1)2`); collective-permutes give `source_target_pairs`. An empty group list is one group
of every device.

Bytes per execution are per device: the size of the buffer the collective spans on one device,
i.e. the larger of its operand and result. That is the result for all-reduce, all-gather,
all-to-all and collective-permute, and the result times the group size for reduce-scatter (its
operand). Ring algorithms move about (n-1)/n of it per device (twice for an all-reduce).

Execution counts: a while body runs `known_trip_count` times (from the while's backend_config,
`"known_trip_count":{"n":"2"}`, as the CPU compiler writes it), its condition once more. libtpu
writes no trip count: its loops are read as `i < N` (or `<=`) in the condition, with the counter's
start a constant (through copies) in the while's operand tuple: a peeled layer scan runs 1 to 80,
its first layer outside the loop. calls, fusions and async wrappers
once; each branch of a conditional is counted once (as if every branch ran), which overcounts
a step that takes one of them. An async pair (`all-gather-start` / `all-gather-done`) counts
once, at its `-done`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import numpy as np

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
          "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "s4": 0.5,
          "u4": 0.5}
_COMP = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*(\(.*)?\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+([a-z][\w\-]*)\((.*)$")
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+\w*)?)\[([\d,]*)\]")
_CALLEES = re.compile(r"\b(calls|to_apply|body|condition|true_computation|false_computation)="
                      r"%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_MEGASCALE = re.compile(r'_xla_megascale_transfer_type="(\w+)"')
_PARTITIONS = re.compile(r"^HloModule\s.*?\bnum_partitions=(\d+)", re.M)
_TRIP = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"?(\d+)')


@dataclasses.dataclass
class Instr:
  name: str
  shape: str
  opcode: str
  rest: str  # operands and attributes


def parse_computations(text: str) -> tuple[dict[str, list[Instr]], str]:
  """{computation name: its instructions} and the ENTRY computation's name."""
  comps: dict[str, list[Instr]] = {}
  entry, current = "", None
  for line in text.splitlines():
    if current is None:
      m = _COMP.match(line)
      if m and not line.startswith((" ", "\t")):
        current = m.group(2)
        comps[current] = []
        entry = current if m.group(1) else entry
      continue
    if line.strip() == "}":
      current = None
      continue
    m = _INSTR.match(line)
    if m:
      comps[current].append(Instr(m.group(1), m.group(2), m.group(3), m.group(4)))
  return comps, entry


def shape_bytes(shape: str, first: bool = False) -> int:
  """Bytes of every array in an HLO type (a tuple's elements summed, or only the `first`;
  layouts ignored)."""
  total = 0.0
  for dtype, dims in _ARRAY.findall(re.sub(r"\{[^{}]*\}", "", shape))[:1 if first else None]:
    if dtype in _BYTES:
      total += _BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
  return int(total)


def _iota(text: str) -> np.ndarray:
  """'[2,4]<=[4,2]T(1,0)' -> the id array it names."""
  m = re.fullmatch(r"\s*\[([\d,]+)\]\s*<=\s*\[([\d,]+)\](?:T\(([\d,]+)\))?\s*", text)
  if not m:
    raise ValueError(f"unreadable iota device list {text!r}")
  out, dims = ([int(x) for x in g.split(",")] for g in m.group(1, 2))
  ids = np.arange(math.prod(dims)).reshape(dims)
  if m.group(3):
    ids = ids.transpose([int(x) for x in m.group(3).split(",")])
  return ids.reshape(out)


def _mesh_groups(text: str) -> list[list[int]]:
  """"mesh['a'=2,'b'=4] {'b'}" (optionally ", device_ids=(...)" and sub-axes 'a':(1)2)."""
  m = re.match(r"mesh\[([^\]]*)\](?:,\s*device_ids=\((.*?)\))?\s*\{([^}]*)\}", text)
  if not m:
    raise ValueError(f"unreadable mesh replica groups {text[:120]!r}")
  axes = [re.fullmatch(r"'?([^'=]+)'?=(\d+)", a.strip()).groups() for a in m.group(1).split(",")]
  names, sizes = [a for a, _ in axes], [int(n) for _, n in axes]
  if m.group(2) is None:
    ids = np.arange(math.prod(sizes))
  elif "<=" in m.group(2):
    ids = _iota(m.group(2)).reshape(-1)
  else:
    ids = np.asarray([int(x) for x in re.findall(r"\d+", m.group(2))][-math.prod(sizes):])
  refs = []  # (mesh axis, pre_size or None, size)
  for ref in filter(None, (r.strip() for r in m.group(3).split(","))):
    r = re.fullmatch(r"'?([^':]+)'?(?::\((\d+)\)(\d+))?", ref)
    axis = names.index(r.group(1))
    refs.append((axis, int(r.group(2)) if r.group(2) else None,
                 int(r.group(3)) if r.group(3) else sizes[axis]))
  dims: list[int] = []
  where: dict[tuple[int, int], int] = {}  # (axis, pre_size) -> dimension of the split array
  for axis, size in enumerate(sizes):  # split each axis at its sub-axes' boundaries, major first
    cuts = sorted({1, size} | {p for a, p, s in refs if a == axis and p}
                  | {p * s for a, p, s in refs if a == axis and p})
    for lo, hi in zip(cuts, cuts[1:]):
      where[(axis, lo)] = len(dims)
      dims.append(hi // lo)
    if len(cuts) == 1:
      where[(axis, 1)] = len(dims)
      dims.append(1)
  grouped = [where[(a, p or 1)] for a, p, _ in refs]
  order = [d for d in range(len(dims)) if d not in grouped] + grouped
  per = math.prod(s for _, _, s in refs)
  return ids.reshape(dims).transpose(order).reshape(-1, per).tolist()


def replica_groups(rest: str, num_devices: int) -> list[list[int]]:
  """Groups of logical ids of one collective (its operands-and-attributes text)."""
  m = re.search(r"source_target_pairs=\{(.*?)\}\}", rest)
  if m:
    return [[int(a), int(b)] for a, b in re.findall(r"\{(\d+),(\d+)", m.group(1) + "}")]
  m = re.search(r"replica_groups=(.*)", rest)
  if not m:
    return [list(range(num_devices))]
  spec = m.group(1)
  if spec.startswith("mesh["):
    return _mesh_groups(spec)
  if spec.startswith("["):
    return _iota(re.match(r"\[[\d,]+\]<=\[[\d,]+\](?:T\([\d,]+\))?", spec).group(0)).tolist()
  body = re.match(r"\{((?:\{[\d,\s]*\},?\s*)*)\}", spec).group(1)
  groups = [[int(x) for x in g.split(",") if x.strip()] for g in re.findall(r"\{([^}]*)\}", body)]
  return [g for g in groups if g] or [list(range(num_devices))]


def _kind(opcode: str) -> str | None:
  """The collective an opcode is; None for others and for a -start (counted at its -done)."""
  base = opcode[:-len("-done")] if opcode.endswith("-done") else opcode
  return base if base in KINDS else None


def _constant(name: str, by_name: dict[str, Instr]) -> int | None:
  """The integer constant `name` is, through copies and bitcasts, or None."""
  for _ in range(8):
    ins = by_name.get(name)
    if ins is None:
      return None
    if ins.opcode == "constant":
      m = re.match(r"\s*(-?\d+)\)", ins.rest)
      return int(m.group(1)) if m else None
    if ins.opcode not in ("copy", "bitcast", "convert", "tuple", "get-tuple-element"):
      return None
    name = re.match(r"\s*%?([\w.\-]+)", ins.rest).group(1)  # a tuple: its first element
  return None


def _trips(ins: Instr, comps: dict[str, list[Instr]], by_name: dict[str, Instr]) -> int:
  """Iterations of a while: known_trip_count, or `counter < N` read from its condition."""
  trip = _TRIP.search(ins.rest)
  if trip:
    return int(trip.group(1))
  cond = re.search(r"condition=%?([\w.\-]+)", ins.rest)
  root = comps.get(cond.group(1), [None])[-1] if cond else None
  m = root and re.match(r"\s*%?([\w.\-]+),\s*%?([\w.\-]+)\).*direction=(LT|LE)", root.rest)
  bound = m and _constant(m.group(2), by_name)
  if bound is None:
    return 1
  start = _constant(re.match(r"\s*%?([\w.\-]+)", ins.rest).group(1), by_name) or 0
  return max(bound - start + (m.group(3) == "LE"), 1)


def collectives(text: str) -> list[dict[str, Any]]:
  """Every collective of the program once: kind, groups, bytes per execution per device and
  executions per step."""
  comps, entry = parse_computations(text)
  by_name = {i.name: i for instrs in comps.values() for i in instrs}
  found: list[dict[str, Any]] = []

  def visit(comp: str, times: int) -> None:
    for ins in comps.get(comp, ()):
      kind = _kind(ins.opcode)
      if kind is not None:
        start = ins
        if ins.opcode.endswith("-done"):  # the groups are on its -start
          operand = re.match(r"\s*%?([\w.\-]+)", ins.rest)
          start = by_name.get(operand.group(1), ins) if operand else ins
        found.append({"kind": kind, "name": ins.name, "rest": start.rest,
                      "bytes": shape_bytes(ins.shape), "times": times, "dcn": None})
      mega = _MEGASCALE.search(ins.rest) if ins.opcode == "send" else None
      if mega:  # libtpu's DCN half of a collective: a send (and a recv) to the megascale runtime
        found.append({"kind": mega.group(1).lower().replace("_", "-"), "name": ins.name,
                      "rest": "", "bytes": shape_bytes(ins.shape, first=True), "times": times,
                      "dcn": True})
      n = _trips(ins, comps, by_name) if ins.opcode == "while" else 1
      callees = [(m.group(2), (n if m.group(1) == "body" else n + 1 if m.group(1) == "condition"
                               else 1)) for m in _CALLEES.finditer(ins.rest)]
      for branches in _BRANCHES.findall(ins.rest):
        callees += [(b.strip().lstrip("%"), 1) for b in branches.split(",") if b.strip()]
      for callee, factor in callees:
        if callee in comps and callee != comp:
          visit(callee, times * factor)

  visit(entry, 1)
  return found


def traffic(text: str, devices: list, slice_of: dict[int, int]) -> dict[str, dict[str, dict]]:
  """{'dcn': {kind: {'count', 'bytes'}}, 'ici': {...}} per step, per device. `devices` are the
  executable's devices in logical-id order (mesh.devices.flat); `slice_of` maps device id to
  slice (sharding.mesh_slices). A collective crosses DCN when one of its groups (or pairs) holds
  devices of two slices."""
  slices = [slice_of[d.id] for d in devices]
  partitions = _PARTITIONS.search(text)
  per_slice = partitions is not None and int(partitions.group(1)) < len(devices)
  out: dict[str, dict[str, dict]] = {"dcn": {}, "ici": {}}
  for c in collectives(text):
    groups = [] if c["dcn"] else replica_groups(c["rest"], len(devices))
    size = c["bytes"] * (max(map(len, groups)) if c["kind"] == "reduce-scatter" else 1)
    crosses = c["dcn"] or (not per_slice and any(len({slices[i] for i in g}) > 1
                                                 for g in groups))
    where = "dcn" if crosses else "ici"
    entry = out[where].setdefault(c["kind"], {"count": 0, "bytes": 0})
    entry["count"] += c["times"]
    entry["bytes"] += c["times"] * size
  return out

