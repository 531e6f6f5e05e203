"""Where one train step's time goes, by op category, from an XLA profile of the compiled step.

Traces a few steps of a gin config (default: the quickstart model and batches) with
jax.profiler, sums each executed HLO op's time over the device threads, and puts every op of the
optimized HLO in one category: matmul (dots, oneDNN/YNNPACK dot fusions), attention (the
attention core: scores, mask, softmax, weighted sum, forward and backward), transpose/copy,
optimizer (update, clip, norms), collectives, elementwise (every other fusion, reduction or
scatter). Prints the table (and the heaviest ops with --top); --results appends it to a file.
Run: .venv/bin/python bench/profile_step.py [--config quickstart] [--steps 5] [--top 15]
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

from pretrainx.cli import configure_cpu_devices

configure_cpu_devices(next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--cpu_devices=")),
                           "auto"))

import jax  # noqa: E402  pylint: disable=wrong-import-position

from pretrainx.config import parse_gin  # noqa: E402  pylint: disable=wrong-import-position
from pretrainx.data.pipeline import TrainBatches  # noqa: E402
from pretrainx.flops import flops_per_token, machine_peak_flops, measure_peak_flops  # noqa: E402
from pretrainx.train.runtime import build_runtime  # noqa: E402
from pretrainx.train.state import create_train_state  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONTROL = {"while", "conditional", "call"}  # their events enclose their bodies' ops: not counted
CATEGORIES = ("matmul", "attention", "elementwise", "transpose/copy", "optimizer", "collectives")
COLLECTIVES = {"all-reduce", "all-reduce-start", "all-reduce-done", "all-gather", "all-gather-start",
               "all-gather-done", "reduce-scatter", "all-to-all", "collective-permute",
               "collective-permute-start", "collective-permute-done"}
# The scopes (jax.named_scope, in the HLO metadata's op_name) the model and step name them by.
ATTENTION_SCOPE, OPTIMIZER_SCOPE = "attention_core", "optimizer"
_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (?:\([^=]*\)|[\w\[\]{},:#*\s]+?) "
                    r"([\w\-]+)\((.*)$")


def parse_hlo(text: str) -> dict[str, dict]:
  """Optimized HLO text -> {instruction: {opcode, op_name, calls, computation}}, every
  computation's instructions, plus {computation: [opcodes]} under the key '__computations__'."""
  instrs, comps, comp = {}, collections.defaultdict(list), None
  for line in text.splitlines():
    line = re.sub(r"/\*.*?\*/", "", line)  # tuple shapes' /*index=N*/ comments
    if line and not line.startswith(" ") and "{" in line and "(" in line:
      comp = line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%")
      continue
    m = _INSTR.match(line)
    if not m or comp is None:
      continue
    name, opcode, rest = m.groups()
    calls = re.search(r"calls=%?([\w.\-]+)", rest)
    op_name = re.search(r'op_name="([^"]*)"', rest)
    custom = re.search(r'custom_call_target="([^"]*)"', rest)
    instrs[name] = {"opcode": opcode, "op_name": op_name.group(1) if op_name else "",
                    "calls": calls.group(1) if calls else None, "computation": comp,
                    "target": custom.group(1) if custom else ""}
    comps[comp].append(opcode)
  instrs["__computations__"] = dict(comps)
  return instrs


def _contains(comps: dict, instrs: dict, comp: str | None, opcodes: set, depth: int = 0) -> bool:
  """Whether computation `comp` (or what it calls) holds one of `opcodes`."""
  if comp is None or depth > 4:
    return False
  if opcodes & set(comps.get(comp, ())):
    return True
  return any(_contains(comps, instrs, i["calls"], opcodes, depth + 1)
             for i in instrs.values() if isinstance(i, dict) and i.get("computation") == comp
             and i.get("calls"))


def categorize(name: str, instrs: dict) -> str:
  """The category of one executed op (see the module docstring)."""
  info = instrs.get(name)
  if info is None:
    return "elementwise"
  comps = instrs["__computations__"]
  opcode, op_name = info["opcode"], info["op_name"]
  if opcode in COLLECTIVES or any(c in opcode for c in ("all-reduce", "all-gather", "all-to-all")):
    return "collectives"
  if OPTIMIZER_SCOPE + "/" in op_name or op_name.endswith("/" + OPTIMIZER_SCOPE):
    return "optimizer"
  if ATTENTION_SCOPE in op_name:
    return "attention"
  is_dot = opcode in ("dot", "convolution") or "matmul" in info["target"] or (
      opcode == "fusion" and _contains(comps, instrs, info["calls"], {"dot", "convolution"}))
  if is_dot:
    return "matmul"
  if opcode in ("transpose", "copy", "copy-start", "copy-done") or (
      opcode == "fusion" and _contains(comps, instrs, info["calls"], {"transpose", "copy"})):
    return "transpose/copy"
  return "elementwise"


def op_times(trace_dir: str, module_prefix: str) -> tuple[dict[str, float], int]:
  """Summed microseconds per HLO op of modules named module_prefix*, and the device threads."""
  path = glob.glob(os.path.join(trace_dir, "**", "*perfetto_trace.json.gz"), recursive=True)[0]
  with gzip.open(path) as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  times, threads = collections.Counter(), set()
  for e in events:
    args = e.get("args") or {}
    if e.get("ph") == "X" and args.get("hlo_module", "").startswith(module_prefix) and \
        "hlo_op" in args:
      times[args["hlo_op"]] += float(e.get("dur", 0.0))
      threads.add(e.get("tid"))
  return dict(times), len(threads)


def profile(config: str, steps: int, gin_params: list[str], top: int) -> list[str]:
  exp = parse_gin([os.path.join(REPO, f"gin_configs/{config}.gin")],
                  ["RunConfig.progress_bar = False", *gin_params])
  data = TrainBatches(exp.data, exp.run.seq_len, exp.run.global_batch_size)
  rt = build_runtime(exp)
  with rt.scope():
    state, _ = create_train_state(rt.model, rt.optimizer, rt.mesh, exp.mesh.rules, 0,
                                  exp.run.seq_len)
    batches = [rt.put_batch(data.batch_at(k)) for k in range(steps + 3)]
    instrs = parse_hlo(rt.train_step.lower(state, batches[0]).compile().as_text())
    for b in batches[:3]:  # compile and warm up
      state, m = rt.train_step(state, b)
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for b in batches[3:]:
      state, m = rt.train_step(state, b)
    jax.block_until_ready(m)
    step_s = (time.perf_counter() - t0) / steps
    with tempfile.TemporaryDirectory() as trace_dir:
      with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for b in batches[3:]:
          state, m = rt.train_step(state, b)
        jax.block_until_ready(m)
      times, threads = op_times(trace_dir, "jit_train_step")
  per_cat, per_op = collections.Counter(), []
  for name, us in times.items():
    if instrs.get(name, {}).get("opcode") in CONTROL:
      continue
    cat = categorize(name, instrs)
    per_cat[cat] += us
    per_op.append((us, name, cat, instrs.get(name, {}).get("op_name", "")))
  total = sum(per_cat.values())
  tokens = exp.run.global_batch_size * exp.run.seq_len
  peak = machine_peak_flops(measure_peak_flops())
  mfu = tokens / step_s * flops_per_token(exp.model, exp.run.seq_len) / peak
  busy = total / 1e6 / steps / max(threads, 1) / step_s
  lines = [f"`{config}`: {tokens:,} tokens a step, {step_s * 1e3:.1f} ms a step untraced "
           f"({tokens / step_s:,.0f} tok/s, MFU {100 * mfu:.1f}% of {peak / 1e9:.0f} GFLOP/s); "
           f"{jax.device_count()} XLA devices; ops busy {100 * busy:.0f}% of the step on "
           f"{threads} device threads. {steps} traced steps.", "",
           "| category | ms a step (summed over devices) | share |", "|---|---|---|"]
  for cat in CATEGORIES:
    ms = per_cat.get(cat, 0.0) / 1e3 / steps
    lines.append(f"| {cat} | {ms:.1f} | {100 * per_cat.get(cat, 0.0) / max(total, 1):.1f}% |")
  if top:
    lines += ["", "| heaviest ops | ms a step | category | op_name |", "|---|---|---|---|"]
    for us, name, cat, op_name in sorted(per_op, reverse=True)[:top]:
      lines.append(f"| {name} | {us / 1e3 / steps:.2f} | {cat} | {op_name[-70:]} |")
  return lines


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="quickstart", help="a gin file under gin_configs/")
  parser.add_argument("--steps", type=int, default=5, help="steps timed and traced")
  parser.add_argument("--gin_param", action="append", default=[])
  parser.add_argument("--top", type=int, default=0, help="also list the N heaviest ops")
  parser.add_argument("--cpu_devices", default="auto", help="as in `python -m pretrainx`")
  parser.add_argument("--results", default="", help="a markdown file to append the table to")
  args = parser.parse_args()
  lines = profile(args.config, args.steps, args.gin_param, args.top)
  print("\n".join(lines))
  if args.results:
    with open(args.results, "a", encoding="utf-8") as f:
      f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
