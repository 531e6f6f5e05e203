"""Extending a small model's context, four ways, and planning an 8k -> 128k extension on v5p.

1. Pretrains a small byte-level model at 256 tokens on the embedded corpus plus a `passkey`
   domain: passkey-retrieval prompts (pretrainx.harness.long_context's template, answer
   included) of 176-248 tokens built from the *training* split of `prose` (the evaluation builds
   its prompts from the validation split).
2. Continues it at 1,024 tokens (same tokens per step, same data) for the same short budget with
   each of: no change, linear interpolation, an ABF base x8, and YaRN (factor 4 over 256).
3. Reports for the base and each extension: passkey accuracy at 256 / 512 / 1,024 tokens
   (`pretrainx eval --needle`'s grid), validation loss by position at 1,024 tokens, and the
   validation loss at 256 tokens (what the extension forgot).
4. With --plan, compiles gin_configs/llama_8b_8k_to_128k.gin for a v5p-256 slice with the TPU
   compiler (`pretrainx plan --stages`), memory per device at each stage (8k, 32k, 128k).

Expected from the papers (PI, YaRN, ABF): without a change accuracy falls beyond the trained 256
tokens; a scaling plus a short continuation recovers most of it; the short-context loss barely
moves. Writes the "Long-context extension" section of bench/RESULTS.md.
Run: .venv/bin/python bench/long_context.py [--base_steps 1500] [--extend_steps 200] [--plan]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import subprocess
import sys
import time

from pretrainx.cli import configure_cpu_devices

configure_cpu_devices("auto")  # as the CLI does, before jax is imported

import numpy as np  # noqa: E402  pylint: disable=wrong-import-position

from pretrainx.config import (FileTask,  # noqa: E402  pylint: disable=wrong-import-position
                              LongContextEvalConfig, Stage, parse_gin)
from pretrainx.data import corpus, prepare  # noqa: E402  pylint: disable=wrong-import-position
from pretrainx.data.pipeline import eval_batches  # noqa: E402  pylint: disable=wrong-import-position
from pretrainx.harness import long_context  # noqa: E402  pylint: disable=wrong-import-position
from pretrainx.train.eval import evaluate_domains  # noqa: E402  pylint: disable=wrong-import-position
from pretrainx.train.loop import train  # noqa: E402  pylint: disable=wrong-import-position
from pretrainx.train.runtime import load_trained  # noqa: E402  pylint: disable=wrong-import-position

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from maxtext_memory import write_section  # noqa: E402  pylint: disable=wrong-import-position

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "bench", "RESULTS.md")
HEADING = "## Long-context extension: four ways, and a staged 8k -> 128k plan (issue 40)"
log = logging.getLogger("long_context")

SHORT, LONG = 256, 1024
BATCH = 16  # rows at 256 tokens; 4 at 1,024 (the same 4,096 tokens per step)
FACTOR = LONG // SHORT
# name -> the ModelConfig rope fields of the extension
VARIANTS = {
    "no change": {},
    "linear (PI) x4": {"rope_scaling": "linear", "rope_scaling_factor": float(FACTOR)},
    "ABF base x8": {"rope_theta": 80_000.0},
    "YaRN x4": {"rope_scaling": "yarn", "rope_scaling_factor": float(FACTOR),
                "rope_original_max_len": SHORT},
}
EVAL = LongContextEvalConfig(kinds=("passkey",), lengths=(SHORT, 2 * SHORT, LONG),
                             depths=(0.0, 0.25, 0.5, 0.75, 1.0), samples=4, domain="prose",
                             batch_rows=8)


def passkey_documents(path: str, count: int, vocab, seed: int = 0) -> str:
  """`count` passkey prompts with their answers, of 176-248 tokens, over the training split of
  `prose`, as JSON lines at `path`."""
  text = "\n\n".join(d.text for d in corpus.load_documents("train", ("prose",)))
  ids = np.asarray(vocab.encode(text))
  intro, needle, question = long_context.TEMPLATES["passkey"]
  rng = np.random.default_rng(seed)
  with open(path, "w", encoding="utf-8") as f:
    for _ in range(count):
      answer = str(rng.integers(10_000, 100_000))
      length = int(rng.integers(176, SHORT - 8))  # the template itself takes ~160 tokens
      start = int(rng.integers(0, len(ids) - length))
      fitted = long_context.fit_prompt(vocab, ids, start, length, float(rng.random()),
                                       (intro, needle.format(answer=answer), question))
      f.write(json.dumps({"text": f"{fitted['prompt']} {answer}.\n"}) + "\n")
  return path


def experiment(out: str, name: str, steps: int, width: int, layers: int, **sections):
  exp = parse_gin([os.path.join(REPO, "gin_configs/tiny.gin")], [
      f"ModelConfig.embed_dim = {width}", f"ModelConfig.mlp_dim = {3 * width}",
      f"ModelConfig.num_layers = {layers}", f"ModelConfig.scan_unroll = {layers}",
      f"ModelConfig.max_seq_len = {LONG + 64}", "LEARNING_RATE = 3e-3"])
  task = FileTask(name="passkey", train_patterns=(os.path.join(out, "passkey.jsonl"),),
                  validation_fraction=0.02)
  data = {"tasks": (task,), "domains": ("prose", "code", "passkey"),
          "stages": (Stage(weights={"prose": 0.3, "code": 0.2, "passkey": 0.5}),),
          "store_dir": os.path.join(out, "stores"), **sections.pop("data", {})}
  run = {"run_dir": os.path.join(out, name), "steps": steps, "global_batch_size": BATCH,
         "seq_len": SHORT, "log_every": 50, "eval_batches": 4, "progress_bar": False,
         "eval_position_bucket": 128, **sections.pop("run", {})}
  return exp.replace(run=run, data=data, sample={"tokens": 0}, **sections)


def measure(exp) -> dict:
  """Passkey grid, loss by position at LONG and the validation loss at SHORT of exp's run."""
  rt, state, _ = load_trained(exp)
  params = rt.inference_params(state)
  out = {"passkey": long_context.evaluate_grid(rt, params, EVAL)["passkey"]["mean_by_length"]}
  for seq, rows in ((LONG, 4), (SHORT, BATCH)):
    host = eval_batches(_without_passkey(exp.data), seq, rows, 8)
    with rt.scope():
      result = evaluate_domains(rt.eval_step, params, rt.put_domain_batches(host))
    out[f"loss@{seq}"] = result["loss"]
    if seq == LONG:
      out["by_position"] = {k.split("/", 1)[1]: v for k, v in result.items()
                            if k.startswith("loss_by_position/")}
  return out


def _without_passkey(data):
  """The natural text only: the passkey prompts are no validation text."""
  return dataclasses.replace(data, domains=("prose", "code"), stages=())


def run_plan(saved: str | None, reuse: bool) -> list[dict] | None:
  if reuse and saved and os.path.exists(saved):
    with open(saved, encoding="utf-8") as f:
      return json.load(f)
  cmd = [sys.executable, "-m", "pretrainx", "plan",
         "--gin_file=gin_configs/llama_8b_8k_to_128k.gin", "--topology=v5p-256", "--stages",
         "--json"]
  done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=3600, check=False)
  if done.returncode not in (0, 1):
    log.error("plan failed: %s", done.stderr[-2000:])
    return None
  reports = json.loads(done.stdout)
  if saved:
    with open(saved, "w", encoding="utf-8") as f:
      json.dump(reports, f, indent=1)
  return reports


def section(results: dict, plan: list[dict] | None, args, seconds: float) -> str:
  gib = lambda n: f"{n / 2**30:.2f}"
  lengths = [str(n) for n in EVAL.lengths]
  buckets = list(next(iter(results.values()))["by_position"])
  lines = [HEADING, "",
           f"`bench/long_context.py --base_steps {args.base_steps} --extend_steps "
           f"{args.extend_steps} --width {args.width} --layers {args.layers}` ({seconds / 60:.0f} "
           f"min on this 2-core CPU host). A byte-level model ({args.layers} layers, width "
           f"{args.width}, head_dim {args.width // 4}) pretrained for {args.base_steps} steps at "
           f"{SHORT} tokens ({BATCH} x {SHORT} tokens per step) on prose, code and passkey prompts "
           f"of 176-{SHORT - 8} tokens, then continued for {args.extend_steps} steps at {LONG} "
           "tokens "
           f"(4 x {LONG}) from that checkpoint, one run per way to extend. Passkey accuracy: "
           f"{len(EVAL.depths)} depths x {EVAL.samples} prompts per length from the prose "
           "validation split, greedy, exact match. Losses: prose + code validation, nats/token.",
           "",
           "| model | " + " | ".join(f"passkey @{n}" for n in lengths) +
           f" | loss @{LONG} | loss @{SHORT} (forgetting) |",
           "|---|" + "---:|" * (len(lengths) + 2)]
  base_short = results["base"][f"loss@{SHORT}"]
  for name, r in results.items():
    delta = r[f"loss@{SHORT}"] - base_short
    lines.append(f"| {name} | " + " | ".join(f"{r['passkey'][n]:.2f}" for n in lengths) +
                 f" | {r[f'loss@{LONG}']:.4f} | {r[f'loss@{SHORT}']:.4f}"
                 f"{'' if name == 'base' else f' ({delta:+.4f})'} |")
  lines += ["", f"Validation loss by position within the document at {LONG} tokens:", "",
            "| model | " + " | ".join(buckets) + " |", "|---|" + "---:|" * len(buckets)]
  for name, r in results.items():
    lines.append(f"| {name} | " + " | ".join(f"{r['by_position'][b]:.3f}" for b in buckets) +
                 " |")
  if plan:
    lines += ["", "Llama-3-8B shapes extended 8k -> 32k -> 128k on one v5p-256 slice "
              "(`pretrainx plan --gin_file=gin_configs/llama_8b_8k_to_128k.gin "
              "--topology=v5p-256 --stages`; 1M tokens per step, 16-way context x 8-way FSDP, "
              "flash attention, TPU compiler on this CPU host), per device:", "",
              "| stage from step | seq_len | rows | params GiB | optimizer GiB | temporaries GiB "
              "| total GiB | of 95 GiB | compile s |", "|" + "---:|" * 9]
    for r in plan:
      lines.append(f"| {r['start_step']} | {r['seq_len']} | {r['global_batch_size']} | "
                   f"{gib(r['param_bytes'])} | {gib(r['optimizer_bytes'])} | "
                   f"{gib(r['temp_bytes'])} | {gib(r['total_bytes'])} | "
                   f"{100 * r['total_bytes'] / (95 * 2**30):.1f}% | {r['compile_seconds']:.0f} |")
  return "\n".join(lines) + "\n"


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default=os.path.join(REPO, "runs", "bench_long_context"))
  p.add_argument("--base_steps", type=int, default=1500)
  p.add_argument("--extend_steps", type=int, default=200)
  p.add_argument("--width", type=int, default=128)
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--plan", action="store_true", help="also plan the 8B 8k -> 128k stages")
  p.add_argument("--plan_json", default=None, help="where the plan's JSON is kept")
  p.add_argument("--reuse", action="store_true", help="read back runs and plan already made")
  p.add_argument("--write", default=RESULTS, help="the RESULTS.md to write ('' not to)")
  args = p.parse_args()
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  start = time.perf_counter()
  os.makedirs(args.out, exist_ok=True)
  base = experiment(args.out, "base", args.base_steps, args.width, args.layers)
  jsonl = os.path.join(args.out, "passkey.jsonl")
  if not (args.reuse and os.path.exists(jsonl)):
    passkey_documents(jsonl, 4000, base.data.vocabulary)
  prepare.prepare(base.data.tasks[0], base.data.store_root, base.data.vocabulary)
  done = lambda exp: args.reuse and os.path.exists(os.path.join(exp.run.run_dir, "checkpoints"))
  if not done(base):
    train(base, restart=True)
  results = {"base": measure(base)}
  log.info("base: %s", results["base"])
  for name, rope in VARIANTS.items():
    slug = name.split()[0].lower()
    exp = experiment(args.out, f"extend_{slug}", args.extend_steps, args.width, args.layers,
                     run={"seq_len": LONG, "global_batch_size": BATCH * SHORT // LONG},
                     model=rope, init={"source": base.run.run_dir},
                     schedule={"warmup_steps": 10})
    if not done(exp):
      train(exp, restart=True)
    results[name] = measure(exp)
    log.info("%s: %s", name, results[name])
  plan = run_plan(args.plan_json or os.path.join(args.out, "plan_8b_stages.json"),
                  args.reuse) if args.plan else None
  text = section(results, plan, args, time.perf_counter() - start)
  sys.stdout.write(text)
  if args.write:
    write_section(text, args.write, HEADING)


if __name__ == "__main__":
  main()
