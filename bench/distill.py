"""Distilling a ~25M teacher into a ~3M student on the quickstart corpus, four ways.

1. Trains the teacher (8 layers, width 512: ~25M parameters) on the embedded corpus's `prose`
   domain (byte vocabulary, 128-token rows).
2. Trains the quickstart model (~3.4M) on the same data for the same tokens, each way:
   - CE only (plain next-token loss);
   - KD at a constant alpha = 0.5 (forward KL, T = 1; the teacher runs online in the step);
   - SALT: the same KD for the first 30% of the steps, then CE only;
   - a cached top-32 teacher (`pretrainx distill cache`, 'other' bucket for the rest of the
     mass), alpha = 0.5.
3. Reports each student's validation loss and wall time, the teacher's share of the online
   step's time, and the cache's cost (time) and size on disk.

Honest whatever it shows: at this scale and budget the teacher is itself undertrained, so KD may
not beat CE. Writes the "Distillation" section of bench/RESULTS.md.
Run: .venv/bin/python bench/distill.py [--teacher_steps 400] [--student_steps 300] [--reuse]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from pretrainx.cli import configure_cpu_devices

configure_cpu_devices("auto")  # as the CLI does, before jax is imported

from pretrainx.config import parse_gin  # noqa: E402  pylint: disable=wrong-import-position
from pretrainx.flops import count_params  # noqa: E402  pylint: disable=wrong-import-position
from pretrainx.train import distill_cache  # noqa: E402  pylint: disable=wrong-import-position
from pretrainx.train.loop import train  # noqa: E402  pylint: disable=wrong-import-position

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from maxtext_memory import write_section  # noqa: E402  pylint: disable=wrong-import-position

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "bench", "RESULTS.md")
HEADING = "## Distillation: a ~25M teacher into a ~3M student, four ways (issue 41)"
log = logging.getLogger("distill")

SEQ, BATCH = 128, 16
TEACHER = {"embed_dim": 512, "num_layers": 8, "num_heads": 8, "num_kv_heads": 4, "mlp_dim": 1536}
CACHE_K = 32
SALT_FRACTION = 0.3


def experiment(out: str, name: str, steps: int, model: dict | None = None, **sections):
  exp = parse_gin([os.path.join(REPO, "gin_configs/quickstart.gin")])
  run = {"run_dir": os.path.join(out, name), "steps": steps, "global_batch_size": BATCH,
         "seq_len": SEQ, "log_every": 50, "eval_every": 0, "eval_batches": 16,
         "progress_bar": False, **sections.pop("run", {})}
  return exp.replace(run=run, data={"domains": ("prose",)}, sample={"tokens": 0},
                     schedule={"warmup_steps": max(steps // 20, 5)}, model=model or {},
                     **sections)


def variants(teacher_dir: str, steps: int) -> dict[str, dict]:
  kd = {"teacher": teacher_dir, "alpha": 0.5, "teacher_dtype": "float32"}
  return {
      "CE only": {},
      "KD, alpha 0.5 (online)": kd,
      f"SALT: KD for {SALT_FRACTION:.0%} of the steps, then CE": {
          **kd, "alpha_schedule": "until", "alpha_end_step": int(SALT_FRACTION * steps)},
      f"KD from a cached top-{CACHE_K} teacher": {
          **kd, "cache": f"top{CACHE_K}", "truncation": "other"},
  }


def run_one(exp, reuse: bool) -> dict:
  """Trains exp (or reads back a finished run) -> validation loss, wall time, tokens/s."""
  saved = os.path.join(exp.run.run_dir, "bench.json")
  if reuse and os.path.exists(saved):
    with open(saved, encoding="utf-8") as f:
      return json.load(f)
  start = time.perf_counter()
  result = train(exp, restart=True)
  out = {"eval_loss": result.eval_loss, "seconds": time.perf_counter() - start,
         "tokens_per_second": result.tokens_per_second, "compile_seconds": result.compile_seconds,
         "steps": result.steps}
  with open(saved, "w", encoding="utf-8") as f:
    json.dump(out, f)
  return out


def section(teacher: dict, results: dict[str, dict], cache: dict, args, sizes: dict,
            seconds: float) -> str:
  ce = results["CE only"]
  online = results["KD, alpha 0.5 (online)"]
  share = 1.0 - online["tokens_per_second"] / ce["tokens_per_second"]
  tokens = args.student_steps * BATCH * SEQ
  lines = [
      HEADING, "",
      f"`.venv/bin/python bench/distill.py --teacher_steps {args.teacher_steps} --student_steps "
      f"{args.student_steps}` on this 2-core CPU host (no accelerator), {seconds / 60:.0f} min "
      "of runs in all (saved runs' times included). Data: the embedded corpus's `prose` domain "
      "(byte vocabulary), "
      f"{SEQ}-token rows, {BATCH} rows per step.", "",
      f"- Teacher: {sizes['teacher'] / 1e6:.1f}M parameters (8 layers, width 512), "
      f"{args.teacher_steps} steps ({args.teacher_steps * BATCH * SEQ / 1e6:.2f}M tokens) in "
      f"{teacher['seconds'] / 60:.1f} min; validation loss **{teacher['eval_loss']:.4f}**.",
      f"- Student: the quickstart model, {sizes['student'] / 1e6:.1f}M parameters; every way "
      f"trains {args.student_steps} steps ({tokens / 1e6:.2f}M tokens) with the same seed, "
      "data order and schedule.", "",
      "| student | validation loss | vs CE only | wall time (min) | tokens/s |",
      "|---|---:|---:|---:|---:|",
  ]
  for name, r in results.items():
    delta = r["eval_loss"] - ce["eval_loss"]
    lines.append(f"| {name} | {r['eval_loss']:.4f} | {delta:+.4f} | {r['seconds'] / 60:.1f} | "
                 f"{r['tokens_per_second']:,.0f} |")
  timing = args.timing
  if timing:
    share = 1.0 - timing["online"] / timing["ce"]
    lines += ["", f"Step time alone, the host otherwise idle ({args.timing_steps} steps each, "
              "after the runs above, which shared the host with other work):", "",
              "| run | tokens/s | vs CE |", "|---|---:|---:|"]
    lines += [f"| {name} | {timing[key]:,.0f} | {timing[key] / timing['ce']:.2f} |"
              for key, name in (("ce", "CE only"), ("online", "KD, online teacher"),
                                ("cached", f"KD, cached top-{CACHE_K}"))]
  lines += [
      "",
      "The runs of the first table shared the host with other work (tests, another benchmark), "
      "so their wall times and tokens/s are upper and lower bounds; the second table is the "
      "cost to read.",
      "",
      f"- The online teacher's share of the step time: **{share:.0%}** (1 - the KD run's "
      "tokens/s over the CE run's, compile and eval pauses excluded).",
      f"- The cache: top-{CACHE_K} ids and log-probs of every one of the "
      f"{cache['tokens']:,} training tokens, written in {cache['seconds'] / 60:.1f} min "
      f"({cache['tokens'] / cache['seconds']:,.0f} tokens/s), **{cache['bytes'] / 2**20:.0f} "
      f"MiB** on disk ({cache['bytes'] / cache['tokens']:.0f} bytes per token; the store's "
      "own tokens take 4). Training from it reads the entries with the batches, so its step "
      "costs what a CE step does plus the KD loss over 33 outcomes.",
      "",
  ]
  return "\n".join(lines)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default=os.path.join(REPO, "runs", "bench_distill"))
  p.add_argument("--teacher_steps", type=int, default=400)
  p.add_argument("--student_steps", type=int, default=300)
  p.add_argument("--timing_steps", type=int, default=40,
                 help="also time CE, online and cached KD alone for this many steps (0: not)")
  p.add_argument("--reuse", action="store_true", help="read back runs and the cache already made")
  p.add_argument("--write", default=RESULTS, help="the RESULTS.md to write ('' not to)")
  args = p.parse_args()
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  log.setLevel(logging.INFO)  # importing pretrainx may have configured the root logger already
  start = time.perf_counter()
  os.makedirs(args.out, exist_ok=True)
  teacher_exp = experiment(args.out, "teacher", args.teacher_steps, TEACHER,
                           optimizer={"learning_rate": 2e-3})
  teacher = run_one(teacher_exp, args.reuse)
  log.info("teacher: %s", teacher)
  runs = variants(teacher_exp.run.run_dir, args.student_steps)
  base = experiment(args.out, "student", args.student_steps)
  cache_path = os.path.join(args.out, "cache.json")
  if args.reuse and os.path.exists(cache_path):
    with open(cache_path, encoding="utf-8") as f:
      cache = json.load(f)
  else:
    t0 = time.perf_counter()
    cache_exp = base.replace(distill=runs["KD, alpha 0.5 (online)"])
    path, _ = distill_cache.cache_teacher(cache_exp, "prose", name=f"top{CACHE_K}", k=CACHE_K,
                                          seq_len=SEQ, batch_rows=64)
    from pretrainx.data.pipeline import open_domain_store  # pylint: disable=import-outside-toplevel
    cache = {"seconds": time.perf_counter() - t0, "bytes": distill_cache.disk_bytes(path),
             "tokens": int(open_domain_store(base.data, "prose", "train").num_tokens)}
    with open(cache_path, "w", encoding="utf-8") as f:
      json.dump(cache, f)
  log.info("cache: %s", cache)
  results = {}
  for i, (name, distill) in enumerate(runs.items()):
    exp = experiment(args.out, f"student_{i}", args.student_steps, distill=distill)
    results[name] = run_one(exp, args.reuse)
    log.info("%s: %s", name, results[name])
  args.timing = None
  if args.timing_steps:  # tokens/s of CE, online and cached KD alone on the host
    args.timing = {}
    for key, name in (("ce", "CE only"), ("online", "KD, alpha 0.5 (online)"),
                      ("cached", f"KD from a cached top-{CACHE_K} teacher")):
      exp = experiment(args.out, f"timing_{key}", args.timing_steps, distill=runs[name],
                       run={"log_every": args.timing_steps})
      args.timing[key] = run_one(exp, args.reuse)["tokens_per_second"]
    log.info("timing: %s", args.timing)
  sizes = {"teacher": count_params(teacher_exp.model)["total"],
           "student": count_params(base.model)["total"]}
  spent = (time.perf_counter() - start if not args.reuse else
           teacher["seconds"] + cache["seconds"] + sum(r["seconds"] for r in results.values()))
  text = section(teacher, results, cache, args, sizes, spent)
  sys.stdout.write(text)
  if args.write:
    write_section(text, args.write, HEADING)


if __name__ == "__main__":
  main()
