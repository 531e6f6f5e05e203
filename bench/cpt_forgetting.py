"""Continual pretraining and forgetting: pretrain on prose, continue on code with and without replay.

1. Pretrains the quickstart model on the `prose` domain only (cosine schedule).
2. Continues from that checkpoint on `code` with a rewarmed learning rate (linear warmup to a new
   peak, then cosine), (a) with no replay and (b) with 25% of every batch replayed from `prose`.
Both domains' validation losses are evaluated every few steps; the script plots them into one PNG
and prints a table. Expected from the literature (Gupta et al. 2023, Ibrahim et al. 2024): the
loss rises when the learning rate is rewarmed, and replay forgets less of `prose`.
Run: .venv/bin/python bench/cpt_forgetting.py [--pretrain_steps 160] [--cpt_steps 120]
"""

from __future__ import annotations

import argparse
import dataclasses
import os

from pretrainx.cli import configure_cpu_devices

configure_cpu_devices("auto")  # as the CLI does, before jax is imported

from pretrainx.config import parse_gin  # noqa: E402  pylint: disable=wrong-import-position
from pretrainx.config import Stage  # noqa: E402  pylint: disable=wrong-import-position
from pretrainx.metrics import read_metrics  # noqa: E402  pylint: disable=wrong-import-position
from pretrainx.config import InitConfig  # noqa: E402  pylint: disable=wrong-import-position
from pretrainx.train.loop import train  # noqa: E402  pylint: disable=wrong-import-position

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _experiment(out: str, name: str, steps: int, weights: dict, eval_every: int, **optimizer):
  exp = parse_gin([os.path.join(REPO, "gin_configs/quickstart.gin")])
  return exp.replace(
      run={"run_dir": os.path.join(out, name), "steps": steps, "eval_every": eval_every,
           "eval_batches": 4, "progress_bar": False}, sample={"tokens": 0},
      data={"stages": (Stage(0, weights),)}, optimizer=optimizer)


def _curves(run_dir: str) -> dict[str, list[tuple[int, float]]]:
  rows = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
  return {d: [(r["step"], r[f"eval/{d}/loss"]) for r in rows if f"eval/{d}/loss" in r]
          for d in ("prose", "code")}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--pretrain_steps", type=int, default=160)
  parser.add_argument("--cpt_steps", type=int, default=120)
  parser.add_argument("--eval_every", type=int, default=10)
  parser.add_argument("--out", default=os.path.join(REPO, "runs/cpt_forgetting"))
  args = parser.parse_args()

  base = _experiment(args.out, "pretrain", args.pretrain_steps, {"prose": 1.0}, args.eval_every)
  train(base, restart=True)
  peak = base.optimizer.learning_rate
  runs = {"no replay": {"code": 1.0}, "25% prose replay": {"code": 0.75, "prose": 0.25}}
  curves = {"pretrain": _curves(base.run.run_dir)}
  for name, weights in runs.items():
    exp = _experiment(args.out, name.replace(" ", "_").replace("%", "pct"), args.cpt_steps,
                      weights, args.eval_every, schedule="rewarm", learning_rate=peak,
                      warmup_steps=max(args.cpt_steps // 8, 1))
    exp = dataclasses.replace(exp, init=InitConfig(source=base.run.run_dir))
    train(exp, restart=True)
    curves[name] = _curves(exp.run.run_dir)
  _report(curves, args.pretrain_steps, os.path.join(args.out, "cpt_forgetting.png"))


def _report(curves: dict, offset: int, png: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
  for ax, domain in zip(axes, ("prose", "code")):
    for name, c in curves.items():
      shift = 0 if name == "pretrain" else offset
      ax.plot([s + shift for s, _ in c[domain]], [v for _, v in c[domain]], label=name)
    ax.axvline(offset, color="grey", linestyle=":")
    ax.set_title(f"validation loss: {domain}")
    ax.set_xlabel("step (pretrain, then continued)")
  axes[0].set_ylabel("nats/token")
  axes[0].legend()
  fig.tight_layout()
  fig.savefig(png, dpi=110)
  before = {d: curves["pretrain"][d][-1][1] for d in ("prose", "code")}
  print(f"after pretraining on prose: prose {before['prose']:.3f}, code {before['code']:.3f}")
  print(f"{'run':<18} {'prose peak':>10} {'prose end':>10} {'forgot':>8} {'code first':>10} "
        f"{'code end':>9}")
  for name in list(curves)[1:]:
    c = curves[name]
    prose = [v for _, v in c["prose"]]
    print(f"{name:<18} {max(prose):>10.3f} {prose[-1]:>10.3f} {prose[-1] - before['prose']:>+8.3f}"
          f" {c['code'][0][1]:>10.3f} {c['code'][-1][1]:>9.3f}")
  print(f"plot: {png}")


if __name__ == "__main__":
  main()
