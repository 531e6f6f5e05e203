"""Per-device memory against MaxText (issue 38): `pretrainx plan --json` and MaxText's
`train_compile` compile the same Llama-2 train step for the same TPU slice with the same TPU
compiler (libtpu, no TPU needed), and the table compares their memory_analysis per device.

Both sides: FSDP over every chip (pretrainx mesh data=1,fsdp=-1,tensor=1; MaxText's default
ici_fsdp_parallelism=-1), 2 sequences of 4096 tokens per device, full remat, bf16 compute, fp32
parameters and AdamW moments. pretrainx runs in a subprocess of this interpreter; MaxText runs
bench/maxtext_compile.py in its own virtual environment, made once with
  python3.12 -m venv /tmp/mt312 && /tmp/mt312/bin/pip install 'maxtext[tpu]==0.2.5'
(MAXTEXT_PYTHON or --maxtext_python points at another one). Each compile takes minutes on a
small CPU host and the compiles run one at a time. With --json_dir every result is saved as
JSON; --reuse reads saved results back instead of compiling again (e.g. `--reuse=maxtext` to
re-plan only pretrainx after a change).

Run: python bench/maxtext_memory.py [--models 7b,70b] [--attention flash,dot_product]
       [--topology v5p-256] [--json_dir /tmp/maxtext_memory] [--reuse maxtext] [--write]
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import logging
import math
import os
import re
import subprocess
import sys
import textwrap
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from pretrainx import topology as tpu_topology  # pylint: disable=wrong-import-position

GIB = 2**30
HEADING = "## Per-device memory against MaxText (issue 38)"
DRIVER = os.path.join(REPO, "bench", "maxtext_compile.py")
DEFAULT_MAXTEXT_PYTHON = os.environ.get("MAXTEXT_PYTHON", "/tmp/mt312/bin/python")
# --models name: (pretrainx preset, MaxText model_name)
MODELS = {"7b": ("llama_7b", "llama2-7b"), "70b": ("llama_70b", "llama2-70b")}
# --attention name: (pretrainx ModelConfig.attention_impl, MaxText attention)
ATTENTION = {"flash": ("flash", "flash"), "dot_product": ("reference", "dot_product")}
MARKER = "MAXTEXT_JSON "

log = logging.getLogger("maxtext_memory")


def _version(dist: str) -> str | None:
  try:
    return importlib.metadata.version(dist)
  except importlib.metadata.PackageNotFoundError:
    return None


def _run(cmd: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
  log.info("running %s", " ".join(cmd))
  start = time.perf_counter()
  out = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                       check=False)
  log.info("exit %d after %.0f s", out.returncode, time.perf_counter() - start)
  return out


def _compile_env() -> dict[str, str]:
  # libtpu may load in several processes at once (another planner beside this one), and jax
  # itself stays on the CPU: the TPU compiler is reached through topology devices.
  return dict(os.environ, ALLOW_MULTIPLE_LIBTPU_LOAD="1", JAX_PLATFORMS="cpu")


def run_pretrainx(model: str, attention: str, topo: str, per_device_batch: int, seq: int,
                  timeout: float) -> dict:
  """`pretrainx plan --json` for one combination, plus the config's parameter count."""
  from pretrainx.config import parse_gin  # pylint: disable=import-outside-toplevel
  from pretrainx.flops import count_params  # pylint: disable=import-outside-toplevel

  preset, impl = MODELS[model][0], ATTENTION[attention][0]
  devices = math.prod(tpu_topology.parse(topo)[1])  # one device per chip on every generation
  gin = [f"ModelConfig.attention_impl='{impl}'",
         f"RunConfig.global_batch_size={per_device_batch * devices}", f"RunConfig.seq_len={seq}"]
  cmd = [sys.executable, "-m", "pretrainx", "plan", f"--gin_file=gin_configs/{preset}.gin",
         f"--topology={topo}", "--mesh=data=1,fsdp=-1,tensor=1", "--json",
         *(f"--gin_param={g}" for g in gin)]
  env = dict(_compile_env(), PYTHONPATH=os.pathsep.join(
      filter(None, [REPO, os.environ.get("PYTHONPATH")])))
  start = time.perf_counter()
  out = _run(cmd, env, timeout)
  if out.returncode not in (0, 1):  # 1: planned, but does not fit its HBM
    raise RuntimeError(f"pretrainx plan failed ({out.returncode}): {out.stderr[-2000:]}")
  report = json.loads(out.stdout[out.stdout.index("{"):])
  exp = parse_gin([os.path.join(REPO, f"gin_configs/{preset}.gin")], gin)
  report.update(system="pretrainx", jax=_version("jax"), libtpu=_version("libtpu"),
                param_count=count_params(exp.model)["total"], wall_seconds=time.perf_counter() - start)
  return report


def run_maxtext(model: str, attention: str, topo: str, per_device_batch: int, seq: int,
                python: str, timeout: float) -> dict:
  """MaxText's train_compile for one combination, through bench/maxtext_compile.py."""
  if not os.path.exists(python):
    raise FileNotFoundError(
        f"no MaxText interpreter at {python}: make one with `python3.12 -m venv DIR && "
        f"DIR/bin/pip install 'maxtext[tpu]==0.2.5'` and pass --maxtext_python=DIR/bin/python")
  cmd = [python, DRIVER, f"compile_topology={topo}", "compile_topology_num_slices=1",
         f"model_name={MODELS[model][1]}", f"per_device_batch_size={per_device_batch}",
         f"max_target_length={seq}", "dataset_type=synthetic", "remat_policy=full",
         f"attention={ATTENTION[attention][1]}", "dtype=bfloat16", "weight_dtype=float32",
         "opt_type=adamw", "ici_fsdp_parallelism=-1"]
  env = _compile_env()
  env.pop("PYTHONPATH", None)  # MaxText's venv imports only its own packages
  start = time.perf_counter()
  out = _run(cmd, env, timeout)
  lines = [l for l in out.stdout.splitlines() if l.startswith(MARKER)]
  if out.returncode != 0 or not lines:
    raise RuntimeError(f"MaxText train_compile failed ({out.returncode}): "
                       f"{(out.stdout + out.stderr)[-3000:]}")
  report = json.loads(lines[-1][len(MARKER):])
  report["wall_seconds"] = time.perf_counter() - start
  return report


def _gib(n: float) -> str:
  return f"{n / GIB:.2f}"


def table(rows: list[dict]) -> str:
  """The markdown table, one row per (system, model, attention)."""
  head = ("| system | jax / libtpu | model | attention | params | params/dev GiB | "
          "optimizer/dev GiB | temp/dev GiB | total/dev GiB | FLOPs/step | compile s |\n"
          "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
  out = [head]
  for r in rows:
    name = r["system"] + (f" {r['maxtext']}" if r.get("maxtext") else "")
    impl = r.get("attention_impl") or r["attention_label"]  # pretrainx's name, where it differs
    attention = r["attention_label"] + (f" ({impl})" if impl != r["attention_label"] else "")
    out.append(
        f"| {name} | {r['jax']} / {r['libtpu']} | {r['model_label']} | {attention} | "
        f"{r['param_count'] / 1e9:.2f}B | {_gib(r['param_bytes'])} | {_gib(r['optimizer_bytes'])} "
        f"| {_gib(r['temp_bytes'])} | **{_gib(r['total_bytes'])}** | {r['flops_per_step']:.3e} | "
        f"{r['compile_seconds']:.0f} |")
  return "\n".join(out)


def section(rows: list[dict], args: argparse.Namespace) -> str:
  """The RESULTS.md section: how it was made, the table, and the pairwise ratios."""
  ratios = []
  by_key = {(r["system"], r["model_label"], r["attention_label"]): r for r in rows}
  for (system, model, attention), r in by_key.items():
    other = by_key.get(("maxtext", model, attention))
    if system == "pretrainx" and other:
      ratios.append(f"{model} {attention}: {r['total_bytes'] / other['total_bytes']:.2f}x")
  chips = math.prod(tpu_topology.parse(args.topology)[1])
  fill = lambda text: textwrap.fill(text, width=100, break_on_hyphens=False)
  return "\n".join([
      HEADING, "",
      fill(f"{datetime.date.today().isoformat()}, `bench/maxtext_memory.py` on this CPU host (no TPU): "
      f"both compile the train step for {args.topology} ({chips} chips, FSDP over all of them), "
      f"{args.per_device_batch} x {args.seq_len} tokens per device (global batch "
      f"{args.per_device_batch * chips}), full remat, bf16 compute, fp32 parameters and AdamW "
      "moments, with the same TPU compiler. Per device: parameters and optimizer state from the "
      "shardings, temp and total (arguments + outputs - aliased + temp) from memory_analysis. "
      "FLOPs per step: pretrainx's analytic count and MaxText's "
      "calculate_tflops_training_per_device, both for the whole step. Compile seconds: pretrainx "
      "compiles the train and eval steps, MaxText the train step (with other jobs on the 2 cores). "
      "pretrainx's 'dot_product' row is its materialised 'reference' attention."), "",
      table(rows), "",
      fill("pretrainx / MaxText, total per device: " + ("; ".join(ratios) or "no pairs") + "."),
      "", fill("Rerun: `python bench/maxtext_memory.py --json_dir DIR --write` "
               "(`--reuse=maxtext` keeps MaxText's saved results and re-plans only pretrainx)."),
      ""])


def write_section(text: str, path: str, heading: str = HEADING) -> None:
  """Replaces the section under `heading` in `path` (up to the next '## ' heading), or appends
  it. The bench scripts that write RESULTS.md sections share it."""
  with open(path, encoding="utf-8") as f:
    old = f.read()
  pattern = re.compile(re.escape(heading) + r"\n.*?(?=^## |\Z)", re.S | re.M)
  new = pattern.sub(lambda _: text + "\n", old, count=1) if pattern.search(old) else (
      old.rstrip("\n") + "\n\n" + text)
  with open(path, "w", encoding="utf-8") as f:
    f.write(new.rstrip("\n") + "\n")


def reused_systems(reuse: str, systems: str) -> set[str]:
  """--reuse ('all' or comma-separated systems) as the set of systems to read back."""
  return set(systems.split(",")) if reuse == "all" else set(filter(None, reuse.split(",")))


def saved_or_run(saved: str | None, reuse: bool, run, label: str, logger=None) -> dict | None:
  """The result saved at `saved` when `reuse` and it exists; else run() (a compile), saved there
  when `saved` is given. None (logged) when the compile fails. The MaxText bench scripts share
  it."""
  logger = logger or log
  if reuse and saved and os.path.exists(saved):
    with open(saved, encoding="utf-8") as f:
      report = json.load(f)
    logger.info("read %s", saved)
    return report
  try:
    report = run()
  except (RuntimeError, FileNotFoundError, subprocess.TimeoutExpired) as err:
    logger.error("%s: %s", label, err)
    return None
  if saved:
    with open(saved, "w", encoding="utf-8") as f:
      json.dump(report, f, indent=1)
  return report


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--maxtext_python", default=DEFAULT_MAXTEXT_PYTHON,
                 help="python of a venv with maxtext[tpu]==0.2.5 (env MAXTEXT_PYTHON)")
  p.add_argument("--models", default="7b,70b", help=f"comma-separated, of {', '.join(MODELS)}")
  p.add_argument("--attention", default="flash,dot_product",
                 help=f"comma-separated, of {', '.join(ATTENTION)}")
  p.add_argument("--systems", default="pretrainx,maxtext")
  p.add_argument("--topology", default="v5p-256")
  p.add_argument("--per_device_batch", type=int, default=2)
  p.add_argument("--seq_len", type=int, default=4096)
  p.add_argument("--timeout", type=float, default=3600, help="seconds per compile")
  p.add_argument("--json_dir", default=None, help="save each result here as JSON")
  p.add_argument("--reuse", default="", help="systems whose saved results in --json_dir to "
                 "read back instead of compiling (comma-separated, or 'all')")
  p.add_argument("--write", action="store_true", help="put the table in bench/RESULTS.md")
  args = p.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
  reuse = reused_systems(args.reuse, args.systems)
  if args.json_dir:
    os.makedirs(args.json_dir, exist_ok=True)
  rows = []
  for model in args.models.split(","):
    for attention in args.attention.split(","):
      for system in args.systems.split(","):
        saved = args.json_dir and os.path.join(
            args.json_dir, f"{system}_{model}_{attention}_{args.topology}.json")
        call = (lambda *a: run_pretrainx(*a, args.timeout)) if system == "pretrainx" else (
            lambda *a: run_maxtext(*a, args.maxtext_python, args.timeout))
        report = saved_or_run(saved, system in reuse, lambda: call(
            model, attention, args.topology, args.per_device_batch, args.seq_len),
                              f"{system} {model} {attention}")
        if report is None:
          continue
        report.update(model_label=MODELS[model][1], attention_label=attention)
        rows.append(report)
  print(table(rows))
  if args.write:
    write_section(section(rows, args), os.path.join(REPO, "bench", "RESULTS.md"))
    log.info("wrote the section %r of bench/RESULTS.md", HEADING)
  return 0 if rows else 1


if __name__ == "__main__":
  sys.exit(main())
