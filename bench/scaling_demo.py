"""Scaling-law demo on this CPU: a real IsoFLOP sweep on the embedded corpus, then the fits.

Runs gin_configs/sweeps/scaling_demo.gin (6 model sizes x 4 compute budgets, 19 runs after its
token range, about 14 minutes on 2 cores; rerunning skips finished runs). Fits the Chinchilla
law, IsoFLOP profiles and a held-out check with `pretrainx fit`, prints the runs and the fitted
numbers, and copies the plots to bench/ (scaling_fit.png, scaling_isoflop.png,
scaling_extrapolation.png) for README.md. The rows of the sweep's current grid are also written
to bench/scaling_demo_results.sqlite, the table that notebooks/scaling.ipynb loads when no sweep
of your own exists.
Run: .venv/bin/python bench/scaling_demo.py [--sweep gin_configs/sweeps/scaling_demo.gin]
"""

from __future__ import annotations

import argparse
import os
import shutil
import time

from pretrainx.cli import configure_cpu_devices

configure_cpu_devices("auto")  # as the CLI does, before jax is imported

from pretrainx.scaling import fit, sweep  # noqa: E402  pylint: disable=wrong-import-position
from pretrainx.scaling.results import append_result, load_results  # noqa: E402  pylint: disable=wrong-import-position

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "bench")


def runs_table(rows: list[dict]) -> str:
  lines = ["| run | N (non-emb.) | D tokens | C FLOPs | eval loss | prose | code | seconds |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
  for r in sorted(rows, key=lambda r: (r["C"], r["N"])):
    dom = r["domain_losses"] or {}
    lines.append(f"| {r['run']} | {r['N']:,} | {r['D']:,} | {r['C']:.3g} | {r['eval_loss']:.4f} | "
                 f"{dom.get('prose', float('nan')):.4f} | {dom.get('code', float('nan')):.4f} | "
                 f"{r['seconds']:.0f} |")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sweep", default=os.path.join(REPO, "gin_configs/sweeps/scaling_demo.gin"))
  parser.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples")
  args = parser.parse_args()
  os.chdir(REPO)  # the sweep file names repo-relative gin files and run directories
  cfg = sweep.parse_sweep(args.sweep)
  start = time.time()
  report = sweep.run_sweep(cfg)
  sweep_seconds = time.time() - start
  for line in report.lines:
    print(line)
  if report.failed:
    raise SystemExit(f"runs failed: {report.failed}; rerun to retry them")
  grid = {r.config_hash for r in sweep.expand(cfg)}  # rows of an older grid are not fitted
  rows = [r for r in load_results(cfg.results) if r["status"] == "done" and r["config_hash"] in grid]
  table = os.path.join(BENCH, "scaling_demo_results.sqlite")
  if os.path.exists(table):
    os.remove(table)
  for row in rows:
    append_result(table, row)
  out_dir = os.path.join(cfg.run_root, "fit")
  text = fit.fit_main(table, out_dir, n_boot=args.bootstrap)
  print(f"\n{len(rows)} runs, {sum(r['seconds'] for r in rows) / 60:.1f} min of training "
        f"({sweep_seconds / 60:.1f} min this invocation)\n")
  print(runs_table(rows))
  print("\n" + text)
  for name in ("fit", "isoflop", "extrapolation"):
    src = os.path.join(out_dir, f"{name}.png")
    if os.path.exists(src):
      shutil.copy(src, os.path.join(BENCH, f"scaling_{name}.png"))
  print(f"plots copied to {BENCH}/scaling_*.png")


if __name__ == "__main__":
  main()
