"""Multislice and long-context plans (issue "Pod-scale parallelism"): `pretrainx plan --json` with
the TPU compiler (libtpu, no TPU needed) for

  (a) Llama-2-70B (gin_configs/llama_70b.gin: fsdp x 4-way tensor within each slice) on v5p-256
      slices, 1, 2 and 4 of them joined over DCN on dcn_data, fsdp over each slice, flash
      attention, 256 sequences of 4096 per slice:
      per-device memory, DCN bytes per step by collective kind, compile seconds;
  (b) Llama-3-8B (gin_configs/llama_8b_128k.gin) on one v5p-256 slice at sequence lengths 4k to
      128k x context 1, 2, 4, 8 (fsdp takes the rest of the 128 chips), one sequence per
      data-parallel rank (seq / context tokens per device): per-device memory, compile seconds.

Each plan runs in a subprocess, one at a time (a 70B compile takes minutes on a small host).
Run: python bench/multislice_plan.py [--only=70b|8b] [--slices=1,2,4] [--seqs=4096,8192]
       [--contexts=1] [--write]
--write replaces the section under HEADING in bench/RESULTS.md (or appends it).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "bench"))
import maxtext_memory  # pylint: disable=wrong-import-position  # its RESULTS.md section writer
HEADING = "## Multislice and long-context plans (`bench/multislice_plan.py`)"
GIB = 2**30
CHIPS = 128  # v5p-256


def run_plan(gin_file: str, topology: str, flags: list[str], gin: list[str],
             timeout: float) -> dict:
  """`pretrainx plan --json` in a subprocess: its report plus the wall seconds, or an error."""
  cmd = [sys.executable, "-m", "pretrainx", "plan", f"--gin_file={gin_file}",
         f"--topology={topology}", "--json", *flags, *(f"--gin_param={g}" for g in gin)]
  env = dict(os.environ, ALLOW_MULTIPLE_LIBTPU_LOAD="1", JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
  start = time.perf_counter()
  try:
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=timeout, check=False)
  except subprocess.TimeoutExpired:
    return {"error": f"timed out after {timeout:.0f} s"}
  if out.returncode not in (0, 1) or "{" not in out.stdout:  # 1: planned, does not fit
    lines = out.stderr.strip().splitlines() or ["no output"]
    return {"error": next((l for l in lines if l.startswith("pretrainx plan:")), lines[-1])[:300]}
  report = json.loads(out.stdout[out.stdout.index("{"):])
  report["wall_seconds"] = time.perf_counter() - start
  return report


def _gib(n: float) -> str:
  return f"{n / GIB:.2f}"


def _dcn(report: dict) -> str:
  dcn = (report.get("collectives") or {}).get("dcn") or {}
  if not dcn:
    return "none"
  return ", ".join(f"{k} {_gib(v['bytes'])} GiB ({v['count']})"
                   for k, v in sorted(dcn.items(), key=lambda kv: -kv[1]["bytes"]))


def table_70b(rows: list[tuple[int, dict]]) -> str:
  out = ["| slices | chips | mesh | tokens/step | params/dev GiB | temp/dev GiB | total/dev GiB "
         "| DCN per step per device (runs) | compile s |", "|---:|---:|---|---:|---:|---:|---:|---|---:|"]
  for n, r in rows:
    if "error" in r:
      out.append(f"| {n} | {CHIPS * n} | error: {r['error']} | | | | | | |")
      continue
    mesh = " x ".join(f"{k}={v}" for k, v in r["mesh"].items() if v > 1)
    out.append(f"| {n} | {r['devices']} | {mesh} | {r['tokens_per_step']} | "
               f"{_gib(r['param_bytes'])} | {_gib(r['temp_bytes'])} | **{_gib(r['total_bytes'])}** "
               f"| {_dcn(r)} | {r['compile_seconds']:.0f} |")
  return "\n".join(out)


def table_8b(rows: list[tuple[int, int, dict]]) -> str:
  out = ["| seq | context | mesh | tokens/step | temp/dev GiB | total/dev GiB | fits 95 GiB | "
         "compile s |", "|---:|---:|---|---:|---:|---:|---|---:|"]
  for seq, context, r in rows:
    if "error" in r:
      out.append(f"| {seq} | {context} | error: {r['error']} | | | | | |")
      continue
    mesh = " x ".join(f"{k}={v}" for k, v in r["mesh"].items() if v > 1)
    out.append(f"| {seq} | {context} | {mesh} | {r['tokens_per_step']} | {_gib(r['temp_bytes'])} "
               f"| **{_gib(r['total_bytes'])}** | {'yes' if r['fits'] else 'no'} | "
               f"{r['compile_seconds']:.0f} |")
  return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--only", choices=("70b", "8b"), default=None, help="run one part only")
  p.add_argument("--slices", default="1,2,4", help="(a): slice counts")
  p.add_argument("--batch_per_slice", type=int, default=256, help="(a): sequences per slice")
  p.add_argument("--seqs", default="4096,8192,16384,32768,65536,131072", help="(b)")
  p.add_argument("--contexts", default="1,2,4,8", help="(b)")
  p.add_argument("--timeout", type=float, default=1800, help="seconds per plan")
  p.add_argument("--write", action="store_true", help="put the tables in bench/RESULTS.md")
  args = p.parse_args(argv)
  parts = []
  if args.only in (None, "70b"):
    rows = []
    for n in map(int, args.slices.split(",")):
      rows.append((n, run_plan("gin_configs/llama_70b.gin", "v5p-256",
                               [f"--num_slices={n}", "--mesh=data=1,fsdp=-1,tensor=1"],
                               [f"RunConfig.global_batch_size={args.batch_per_slice * n}",
                                "ModelConfig.attention_impl='flash'"], args.timeout)))
      print(table_70b(rows[-1:]).splitlines()[-1], flush=True)
    parts += ["Llama-2-70B on v5p-256 slices (128 chips each; fsdp over the 128 chips of a "
              "slice, the slices on dcn_data), 4096-token sequences, flash attention:", "",
              table_70b(rows), ""]
  if args.only in (None, "8b"):
    rows8 = []
    for seq in map(int, args.seqs.split(",")):
      for context in map(int, args.contexts.split(",")):
        batch = CHIPS // context  # one sequence per data rank: seq / context tokens per device
        rows8.append((seq, context, run_plan(
            "gin_configs/llama_8b_128k.gin", "v5p-256", [f"--context={context}"],
            [f"RunConfig.seq_len={seq}", f"ModelConfig.max_seq_len={seq}",
             f"RunConfig.global_batch_size={batch}", "MeshConfig.fsdp=-1"], args.timeout)))
        print(table_8b(rows8[-1:]).splitlines()[-1], flush=True)
    parts += ["Llama-3-8B on one v5p-256 slice (128 chips; fsdp takes what context leaves), "
              "flash attention, one sequence per data rank (128 / context sequences per step, so "
              "seq / context tokens per device):",
              "", table_8b(rows8), ""]
  text = "\n".join([HEADING, "", f"{datetime.date.today().isoformat()}, this CPU host (no TPU), "
                    "`pretrainx plan --json` with libtpu; per device; compile seconds cover the "
                    "train and eval steps. DCN bytes: the collectives libtpu sends over DCN "
                    "(pretrainx/hlo_collectives.py), per device per step.", "", *parts])
  print(text)
  if args.write:
    maxtext_memory.write_section(text, os.path.join(REPO, "bench", "RESULTS.md"), HEADING)
  return 0


if __name__ == "__main__":
  sys.exit(main())
