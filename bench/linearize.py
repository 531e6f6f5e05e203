"""Linearizing the quickstart model (LoLCATs) against a linear-attention model from scratch.

1. Pretrains the quickstart model (gin_configs/quickstart.gin: softmax attention, 160 steps).
2. Linearizes it with gin_configs/linearize/quickstart.gin: hybrid attention (window 32 of 128,
   Hedgehog feature maps), stage 1 attention transfer, stage 2 LoRA.
3. Trains the same hybrid architecture from scratch for the tokens stages 1 and 2 used together.
4. As a control, gives the original softmax model the same stage-2 LoRA training, to separate
   what linearizing costs from what the extra training adds.
Prints validation loss and perplexity per domain, the tokens of each stage as a fraction of
pretraining, and the share of the gap between the scratch model and the original that stage 2
closes: (L_scratch - L_stage2) / (L_scratch - L_original). Copies the report plot to
bench/linearize.png. Finished runs are reused when the script runs again.
Run: .venv/bin/python bench/linearize.py
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil

from pretrainx.cli import configure_cpu_devices

configure_cpu_devices("auto")  # as the CLI does, before jax is imported

from pretrainx.config import parse_gin, parse_gin_with  # noqa: E402  pylint: disable=wrong-import-position
from pretrainx.config import LinearizeConfig
from pretrainx.cpt.linearize import linearized_config
from pretrainx.linearize.pipeline import linearize  # noqa: E402  pylint: disable=wrong-import-position
from pretrainx.config import InitConfig  # noqa: E402  pylint: disable=wrong-import-position
from pretrainx.config import TuneConfig  # noqa: E402  pylint: disable=wrong-import-position
from pretrainx.train.loop import train  # noqa: E402  pylint: disable=wrong-import-position
from pretrainx.train.runtime import evaluate_checkpoint, load_trained  # noqa: E402  pylint: disable=wrong-import-position

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(REPO, "runs", "bench_linearize")


def _trained(exp):
  """Trains exp (resuming a finished run is a no-op) and returns its validation result."""
  train(exp)
  rt, state, _ = load_trained(exp)
  return evaluate_checkpoint(rt, state, exp.run.eval_batches)


def main() -> None:
  os.chdir(REPO)
  quiet = {"run": {"progress_bar": False}, "sample": {"tokens": 0}}
  pretrain = parse_gin(["gin_configs/quickstart.gin"]).replace(
      run={"run_dir": os.path.join(OUT, "pretrain")}).replace(**quiet)
  _trained(pretrain)
  exp, extra = parse_gin_with(["gin_configs/linearize/quickstart.gin"], [],
                              (LinearizeConfig,))
  lin: LinearizeConfig = extra["LinearizeConfig"]
  exp = exp.replace(**quiet)
  report = linearize(pretrain.run.run_dir, exp, lin, os.path.join(OUT, "linearized"))
  steps = lin.transfer_steps + lin.lora_steps
  scratch = dataclasses.replace(exp, model=linearized_config(pretrain.model, lin)).replace(
      run={"run_dir": os.path.join(OUT, "scratch"), "steps": steps}, schedule={"warmup_steps": 10})
  scratch_eval = _trained(scratch)
  control = dataclasses.replace(exp, model=pretrain.model, init=InitConfig(
      source=pretrain.run.run_dir), tune=TuneConfig(lora=lin.lora)).replace(
          run={"run_dir": os.path.join(OUT, "softmax_lora"), "steps": lin.lora_steps},
          optimizer={"learning_rate": lin.lora_lr})
  control_eval = _trained(control)
  pretrain_tokens = pretrain.run.steps * pretrain.run.global_batch_size * pretrain.run.seq_len
  rows = list(report.rows) + [{
      "model": "hybrid from scratch", "tokens": steps * exp.run.global_batch_size * exp.run.seq_len,
      "loss": scratch_eval["loss"],
      "domain_loss": {d: scratch_eval[f"{d}/loss"] for d in ("prose", "code")}},
      {"model": "control: softmax + the stage-2 LoRA",
       "tokens": lin.lora_steps * exp.run.global_batch_size * exp.run.seq_len,
       "loss": control_eval["loss"],
       "domain_loss": {d: control_eval[f"{d}/loss"] for d in ("prose", "code")}}]
  print(f"pretraining: {pretrain_tokens:,} tokens; converted layers {report.layers}\n")
  print("| model | tokens | of pretraining | val loss | ppl | ppl prose | ppl code |")
  print("|---|---:|---:|---:|---:|---:|---:|")
  for r in rows:
    dom = r["domain_loss"]
    print(f"| {r['model']} | {r['tokens']:,} | {100 * r['tokens'] / pretrain_tokens:.0f}% | "
          f"{r['loss']:.4f} | {math.exp(r['loss']):.3f} | {math.exp(dom['prose']):.3f} | "
          f"{math.exp(dom['code']):.3f} |")
  original, stage2, scratch_loss = rows[0]["loss"], rows[3]["loss"], rows[4]["loss"]
  closed = (scratch_loss - stage2) / (scratch_loss - original)
  print(f"\nstage 2 closes {100 * closed:.1f}% of the gap between the hybrid model from scratch "
        f"({scratch_loss:.4f}) and the original ({original:.4f}); target >= 90%")
  print(f"linearized (stage 2) minus softmax with the same LoRA training: "
        f"{stage2 - rows[5]['loss']:+.4f} nats/token")
  print(f"recurrent generation equals chunked: {report.recurrent_matches_chunked}")
  print(f"sample: {report.sample!r}")
  shutil.copy(os.path.join(OUT, "linearized", "report.png"), os.path.join(REPO, "bench",
                                                                           "linearize.png"))


if __name__ == "__main__":
  main()
