"""Multislice and context-parallel plans against MaxText: `pretrainx plan --json` and MaxText's
`train_compile` compile the same train step for the same TPU slices with the same TPU compiler
(libtpu, no TPU needed), and the table compares their memory_analysis per device and, for several
slices, the bytes each sends over DCN.

Cases (--cases):
  multislice    Llama-2-70B on 2 x v5p-256 (256 chips): the slices on data parallelism over DCN,
                FSDP over the 128 chips of each slice, 2 x 4096 tokens per device (512
                sequences), flash attention. pretrainx: gin_configs/llama_70b.gin --num_slices=2
                --mesh=data=1,fsdp=-1,tensor=1; MaxText: compile_topology_num_slices=2
                dcn_data_parallelism=2 ici_fsdp_parallelism=-1 per_device_batch_size=2.
  long_context  Llama-3-8B at 131072 tokens on one v5p-256: context 16 x fsdp 8, 8 sequences per
                step (one per fsdp rank), flash attention, causal load balancing.
                pretrainx: gin_configs/llama_8b_128k.gin; MaxText: ici_context_parallelism=16
                ici_fsdp_parallelism=8 per_device_batch_size=0.0625 (8 / 128 chips)
                context_parallel_strategy=all_gather context_parallel_load_balance=True.
  context_32k   Llama-3-8B at 32768 tokens on one v5p-256: context 4 x fsdp 32, 32 sequences
                (MaxText per_device_batch_size=0.25), otherwise as long_context.

Both sides: full remat, bf16 compute, fp32 parameters and AdamW moments (MaxText's defaults,
named explicitly). pretrainx runs in a subprocess of this interpreter; MaxText runs
bench/maxtext_compile.py in its own virtual environment (see bench/maxtext_memory.py for how to
make one), which also saves its compiled HLO so that pretrainx/hlo_collectives.py counts what it
sends over DCN the way `pretrainx plan` counts its own. Compiles run one at a time; --json_dir
saves each result, --reuse reads saved ones back.

Run: python bench/maxtext_pod.py [--cases multislice,long_context,context_32k]
       [--systems pretrainx,maxtext] [--json_dir /tmp/maxtext_pod] [--reuse maxtext] [--write]
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import sys
import textwrap
import time
import types

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
sys.path.insert(0, REPO)
sys.path.insert(0, BENCH)

import maxtext_memory as mm  # pylint: disable=wrong-import-position
from pretrainx import hlo_collectives  # pylint: disable=wrong-import-position

GIB = 2**30
HEADING = "## Multislice and long context against MaxText (`bench/maxtext_pod.py`)"
COMMON_MAXTEXT = ["dataset_type=synthetic", "remat_policy=full", "attention=flash",
                  "dtype=bfloat16", "weight_dtype=float32", "opt_type=adamw"]
CASES = {
    "multislice": {
        "label": "llama2-70b, 2 x v5p-256, 512 x 4096", "slices": 2,
        "pretrainx": ("gin_configs/llama_70b.gin", "v5p-256",
                      ["--num_slices=2", "--mesh=data=1,fsdp=-1,tensor=1"],
                      ["ModelConfig.attention_impl='flash'", "RunConfig.global_batch_size=512"]),
        "maxtext": ["compile_topology=v5p-256", "compile_topology_num_slices=2",
                    "model_name=llama2-70b", "dcn_data_parallelism=2", "ici_fsdp_parallelism=-1",
                    "per_device_batch_size=2", "max_target_length=4096"],
    },
    "long_context": {
        "label": "llama3-8b, v5p-256, 8 x 131072, context 16", "slices": 1,
        "pretrainx": ("gin_configs/llama_8b_128k.gin", "v5p-256", [], []),
        "maxtext": ["compile_topology=v5p-256", "compile_topology_num_slices=1",
                    "model_name=llama3-8b", "ici_context_parallelism=16", "ici_fsdp_parallelism=8",
                    "per_device_batch_size=0.0625", "max_target_length=131072",
                    "context_parallel_strategy=all_gather", "context_parallel_load_balance=True"],
    },
    "context_32k": {
        "label": "llama3-8b, v5p-256, 32 x 32768, context 4", "slices": 1,
        "pretrainx": ("gin_configs/llama_8b_128k.gin", "v5p-256", ["--context=4"],
                      ["RunConfig.seq_len=32768", "ModelConfig.max_seq_len=32768",
                       "RunConfig.global_batch_size=32"]),
        "maxtext": ["compile_topology=v5p-256", "compile_topology_num_slices=1",
                    "model_name=llama3-8b", "ici_context_parallelism=4", "ici_fsdp_parallelism=32",
                    "per_device_batch_size=0.25", "max_target_length=32768",
                    "context_parallel_strategy=all_gather", "context_parallel_load_balance=True"],
    },
}

log = logging.getLogger("maxtext_pod")


def run_pretrainx(case: str, timeout: float) -> dict:
  """`pretrainx plan --json` for one case, plus the config's parameter count."""
  from pretrainx.config import parse_gin  # pylint: disable=import-outside-toplevel
  from pretrainx.flops import count_params  # pylint: disable=import-outside-toplevel

  gin_file, topo, flags, gin = CASES[case]["pretrainx"]
  cmd = [sys.executable, "-m", "pretrainx", "plan", f"--gin_file={gin_file}", f"--topology={topo}",
         "--json", *flags, *(f"--gin_param={g}" for g in gin)]
  env = dict(mm._compile_env(), PYTHONPATH=os.pathsep.join(  # pylint: disable=protected-access
      filter(None, [REPO, os.environ.get("PYTHONPATH")])))
  start = time.perf_counter()
  out = mm._run(cmd, env, timeout)  # pylint: disable=protected-access
  if out.returncode not in (0, 1):  # 1: planned, but does not fit its HBM
    raise RuntimeError(f"pretrainx plan failed ({out.returncode}): {out.stderr[-2000:]}")
  report = json.loads(out.stdout[out.stdout.index("{"):])
  exp = parse_gin([os.path.join(REPO, gin_file)], gin)
  version = mm._version  # pylint: disable=protected-access
  report.update(system="pretrainx", command="pretrainx " + " ".join(cmd[3:]), jax=version("jax"),
                libtpu=version("libtpu"), param_count=count_params(exp.model)["total"],
                wall_seconds=time.perf_counter() - start)
  return report


def maxtext_traffic(hlo_path: str, device_slices: list[int]) -> dict:
  """pretrainx/hlo_collectives.py's {'dcn': ..., 'ici': ...} of MaxText's compiled step."""
  with open(hlo_path, encoding="utf-8") as f:
    text = f.read()
  devices = [types.SimpleNamespace(id=i) for i in range(len(device_slices))]
  return hlo_collectives.traffic(text, devices, dict(enumerate(device_slices)))


def run_maxtext(case: str, python: str, hlo_dir: str, timeout: float) -> dict:
  """MaxText's train_compile for one case, through bench/maxtext_compile.py."""
  if not os.path.exists(python):
    raise FileNotFoundError(f"no MaxText interpreter at {python}: see bench/maxtext_memory.py")
  hlo = os.path.join(hlo_dir, f"maxtext_{case}.hlo.txt")
  overrides = [*CASES[case]["maxtext"], *COMMON_MAXTEXT]
  cmd = [python, mm.DRIVER, f"--hlo_out={hlo}", *overrides]
  env = mm._compile_env()  # pylint: disable=protected-access
  env.pop("PYTHONPATH", None)  # MaxText's venv imports only its own packages
  start = time.perf_counter()
  out = mm._run(cmd, env, timeout)  # pylint: disable=protected-access
  lines = [l for l in out.stdout.splitlines() if l.startswith(mm.MARKER)]
  if out.returncode != 0 or not lines:
    raise RuntimeError(f"MaxText train_compile failed ({out.returncode}): "
                       f"{(out.stdout + out.stderr)[-3000:]}")
  report = json.loads(lines[-1][len(mm.MARKER):])
  report["collectives"] = maxtext_traffic(hlo, report.pop("device_slices"))
  report.update(command="train_compile " + " ".join(overrides),
                wall_seconds=time.perf_counter() - start)
  return report


def _gib(n: float) -> str:
  return f"{n / GIB:.2f}"


def _traffic(report: dict, where: str) -> str:
  found = (report.get("collectives") or {}).get(where) or {}
  if not found:
    return "none"
  total = sum(v["bytes"] for v in found.values())
  top = sorted(found.items(), key=lambda kv: -kv[1]["bytes"])
  return f"{_gib(total)}: " + ", ".join(f"{k} {_gib(v['bytes'])} ({v['count']})" for k, v in top)


def _mesh(report: dict) -> str:
  return " x ".join(f"{k}={v}" for k, v in report["mesh"].items() if v > 1)


def table(rows: list[dict]) -> str:
  """The markdown table, one row per (case, system)."""
  out = ["| case | system | mesh (global) | params/dev GiB | optimizer/dev GiB | temp/dev GiB | "
         "total/dev GiB | DCN GiB per step per device (runs) | "
         "ICI GiB per step per device (runs) | compile s |",
         "|---|---|---|---:|---:|---:|---:|---|---|---:|"]
  for r in rows:
    name = r["system"] + (f" {r['maxtext']}" if r.get("maxtext") else "")
    dcn = _traffic(r, "dcn") if CASES[r["case"]]["slices"] > 1 else "-"
    out.append(f"| {CASES[r['case']]['label']} | {name} | {_mesh(r)} | {_gib(r['param_bytes'])} "
               f"| {_gib(r['optimizer_bytes'])} | {_gib(r['temp_bytes'])} | "
               f"**{_gib(r['total_bytes'])}** | {dcn} | {_traffic(r, 'ici')} | "
               f"{r['compile_seconds']:.0f} |")
  return "\n".join(out)


def section(rows: list[dict]) -> str:
  """The RESULTS.md section: how it was made, the table, the ratios and the commands."""
  fill = lambda text: textwrap.fill(text, width=100, break_on_hyphens=False)
  by_key = {(r["case"], r["system"]): r for r in rows}
  ratio = lambda c: by_key[(c, "pretrainx")]["total_bytes"] / by_key[(c, "maxtext")]["total_bytes"]
  ratios = [f"{c}: {ratio(c):.2f}x" for c in CASES
            if (c, "pretrainx") in by_key and (c, "maxtext") in by_key]
  versions = sorted({f"jax {r['jax']}, libtpu {r['libtpu']}" for r in rows})
  commands = [f"- {r['system']} ({r['case']}): `{r.get('command', '?')}`" for r in rows]
  return "\n".join([
      HEADING, "",
      fill(f"{datetime.date.today().isoformat()}, `bench/maxtext_pod.py` on this CPU host (no "
           f"TPU), {'; '.join(versions)}: pretrainx's `plan --json` and MaxText's train_compile "
           "compile the same train step for the same TPU slices, full remat, bf16 compute, fp32 "
           "parameters and AdamW moments, flash attention. Per device: parameters and optimizer "
           "state from the shardings, temp and total (arguments + outputs - aliased + temp) from "
           "memory_analysis. DCN: the megascale sends of libtpu's multislice program, counted "
           "for both by pretrainx/hlo_collectives.py (bytes of the buffer each send spans, per "
           "device, summed over the step; ICI likewise for the collectives within a slice, loops "
           "counted by their trip counts). Compile seconds: pretrainx compiles the train and "
           "eval steps, MaxText the train step, with other jobs on the 2 cores."), "",
      table(rows), "",
      fill("pretrainx / MaxText, total per device: " + ("; ".join(ratios) or "no pairs") + "."),
      "", "Commands:", *commands, "",
      fill("Rerun: `python bench/maxtext_pod.py --json_dir DIR --write` (`--reuse=maxtext` keeps "
           "MaxText's saved results and re-plans only pretrainx)."), ""])


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--maxtext_python", default=mm.DEFAULT_MAXTEXT_PYTHON,
                 help="python of a venv with maxtext[tpu]==0.2.5 (env MAXTEXT_PYTHON)")
  p.add_argument("--cases", default="multislice,long_context,context_32k",
                 help=f"comma-separated, of {', '.join(CASES)}")
  p.add_argument("--systems", default="pretrainx,maxtext")
  p.add_argument("--timeout", type=float, default=3600, help="seconds per compile")
  p.add_argument("--json_dir", default="/tmp/maxtext_pod",
                 help="save each result (and MaxText's HLO) here")
  p.add_argument("--reuse", default="", help="systems whose saved results in --json_dir to "
                 "read back instead of compiling (comma-separated, or 'all')")
  p.add_argument("--write", action="store_true", help="put the table in bench/RESULTS.md")
  args = p.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
  reuse = mm.reused_systems(args.reuse, args.systems)
  os.makedirs(args.json_dir, exist_ok=True)
  rows = []
  for case in args.cases.split(","):
    if case not in CASES:
      p.error(f"--cases: {case!r} is not one of {', '.join(CASES)}")
    for system in args.systems.split(","):
      saved = os.path.join(args.json_dir, f"{system}_{case}.json")
      report = mm.saved_or_run(
          saved, system in reuse,
          lambda: (run_pretrainx(case, args.timeout) if system == "pretrainx" else
                   run_maxtext(case, args.maxtext_python, args.json_dir, args.timeout)),
          f"{system} {case}", log)
      if report is None:
        continue
      report["case"] = case
      rows.append(report)
  print(table(rows))
  if args.write:
    mm.write_section(section(rows), os.path.join(REPO, "bench", "RESULTS.md"), HEADING)
    log.info("wrote the section %r of bench/RESULTS.md", HEADING)
  return 0 if rows else 1


if __name__ == "__main__":
  sys.exit(main())
