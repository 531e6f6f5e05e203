"""Optimizer comparison: each optimizer at a small learning-rate sweep on the same data and model.

Prints a table (best validation loss, steps to reach a target loss, wall time per step, optimizer
state memory) and writes one PNG of the loss curves.
Run: .venv/bin/python bench/optimizers.py [--config quickstart] [--steps 120] [--out bench/optimizers.png]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

from pretrainx.cli import configure_cpu_devices

configure_cpu_devices(next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--cpu_devices=")),
                           "auto"))

import jax  # noqa: E402  pylint: disable=wrong-import-position
import numpy as np  # noqa: E402  pylint: disable=wrong-import-position

from pretrainx.config import parse_gin  # noqa: E402  pylint: disable=wrong-import-position
from pretrainx.metrics import plot_curves, read_metrics  # noqa: E402  pylint: disable=wrong-import-position
from pretrainx.train import loop  # noqa: E402  pylint: disable=wrong-import-position
from pretrainx.train.runtime import build_runtime  # noqa: E402  pylint: disable=wrong-import-position

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Peak learning rates swept per optimizer (Lion wants ~10x smaller than AdamW; Muon's updates are
# RMS-matched to AdamW's, so it shares AdamW's range).
SWEEP = {"adamw": (3e-3, 1e-2), "adafactor": (3e-3, 1e-2), "lion": (3e-4, 1e-3),
         "muon": (3e-3, 1e-2), "sophia": (3e-3, 1e-2)}


def optimizer_state_mib(exp) -> float:
  rt = build_runtime(exp)
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(rt.abstract_state.opt_state)) / 2**20


def run_one(base, name: str, lr: float, steps: int, workdir: str) -> dict:
  exp = base.replace(optimizer={"name": name, "learning_rate": lr},
                     run={"steps": steps, "run_dir": os.path.join(workdir, f"{name}_{lr:g}"),
                          "eval_every": max(steps // 4, 1), "log_every": 5,
                          "progress_bar": False}, sample={"tokens": 0})
  result = loop.train(exp, restart=True)
  rows = read_metrics(result.paths.metrics)
  train = [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]
  evals = [(r["step"], r["eval/loss"]) for r in rows if "eval/loss" in r]
  return {"name": name, "lr": lr, "train": train, "eval": evals,
          "best_eval": min(v for _, v in evals),
          "step_s": exp.run.global_batch_size * exp.run.seq_len / result.tokens_per_second,
          "state_mib": optimizer_state_mib(exp)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="quickstart")
  parser.add_argument("--steps", type=int, default=120)
  parser.add_argument("--optimizers", default=",".join(SWEEP))
  parser.add_argument("--target", type=float, default=None,
                      help="train loss to reach (default: AdamW's best final loss + 10%)")
  parser.add_argument("--out", default=os.path.join(REPO, "bench", "optimizers.png"))
  parser.add_argument("--cpu_devices", default="auto")
  args = parser.parse_args()
  base = parse_gin([os.path.join(REPO, f"gin_configs/{args.config}.gin")])
  results = []
  with tempfile.TemporaryDirectory() as workdir:
    for name in args.optimizers.split(","):
      for lr in SWEEP[name]:
        results.append(run_one(base, name, lr, args.steps, workdir))
  best = {}
  for r in results:
    if r["name"] not in best or r["best_eval"] < best[r["name"]]["best_eval"]:
      best[r["name"]] = r
  target = args.target
  if target is None:
    ref = best.get("adamw", min(best.values(), key=lambda r: r["best_eval"]))
    target = 1.1 * np.mean([v for _, v in ref["train"][-3:]])
  print(f"\n{args.config}, {args.steps} steps, {jax.device_count()} {jax.default_backend()} "
        f"device(s); best learning rate of each optimizer; target train loss {target:.3f}\n")
  print("| optimizer | best lr | best validation loss | steps to target | time/step (s) "
        "| optimizer state (MiB) |")
  print("|---|---|---|---|---|---|")
  for name, r in best.items():
    reached = next((s for s, v in r["train"] if v <= target), None)
    print(f"| {name} | {r['lr']:g} | {r['best_eval']:.4f} | {reached if reached else 'not reached'} "
          f"| {r['step_s']:.3f} | {r['state_mib']:.1f} |")
  plot(best, args.out, target)
  print(f"\nloss curves: {args.out}")


def plot(best: dict, out: str, target: float) -> None:
  curves = []
  for name, r in best.items():
    curves += [(f"{name} (lr {r['lr']:g})", r["train"], "-"), (f"_{name} eval", r["eval"], "o--")]
  plot_curves(curves, out, ylabel="loss (nats/token); dashed: validation", hline=(target, "target"))


if __name__ == "__main__":
  main()
