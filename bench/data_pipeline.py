"""Data-pipeline throughput against what the quickstart train step consumes, on this machine.

Builds the quickstart experiment's pipeline (token stores, packing, step-scheduled mixture) and
times reading batches: in-thread random access (`batch_at`) and grain's prefetching iterator;
then times the quickstart train step on the same batches. The pipeline must deliver at least 10x
the tokens/s the step consumes. Also times UL2 denoising with metadata prefixes.
Run: .venv/bin/python bench/data_pipeline.py [--batches 200] [--steps 10]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

from pretrainx.cli import configure_cpu_devices

configure_cpu_devices("auto")  # as the CLI does, before jax is imported

from pretrainx.config import parse_gin  # noqa: E402  pylint: disable=wrong-import-position
from pretrainx.config import Stage  # noqa: E402  pylint: disable=wrong-import-position
from pretrainx.data.pipeline import TrainBatches  # noqa: E402  pylint: disable=wrong-import-position
from pretrainx.vocab import ByteVocabulary  # noqa: E402  pylint: disable=wrong-import-position

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from train_throughput import pretrainx_stepper  # noqa: E402  pylint: disable=wrong-import-position


def pipeline_tokens_per_second(data: TrainBatches, batches: int, tokens_per_batch: int
                               ) -> dict[str, float]:
  data.batch_at(0)  # layouts of the first epoch, built once
  t0 = time.perf_counter()
  for step in range(1, batches + 1):
    data.batch_at(step)
  direct = batches * tokens_per_batch / (time.perf_counter() - t0)
  it = data.iterate(batches + 1)
  next(it)
  t0 = time.perf_counter()
  for _ in range(batches):
    next(it)
  prefetched = batches * tokens_per_batch / (time.perf_counter() - t0)
  return {"batch_at": direct, "grain iterator": prefetched}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batches", type=int, default=200)
  parser.add_argument("--steps", type=int, default=10)
  args = parser.parse_args()

  exp = parse_gin(["gin_configs/quickstart.gin"])
  run = exp.run
  tokens = run.global_batch_size * run.seq_len
  data = TrainBatches(exp.data, run.seq_len, run.global_batch_size)
  rows = {"causal, natural mixture": pipeline_tokens_per_second(data, args.batches, tokens)}
  ul2 = dataclasses.replace(exp.data, vocabulary=ByteVocabulary(extra_ids=128),
                           stages=(Stage(0, {"prose": 0.5, "code": 0.5}, "ul2", True),))
  rows["UL2 + metadata prefix"] = pipeline_tokens_per_second(
      TrainBatches(ul2, run.seq_len, run.global_batch_size), args.batches, tokens)

  _, timed = pretrainx_stepper(exp, [data.batch_at(s) for s in range(args.steps + 1)])
  consumed = run.global_batch_size * run.seq_len / timed()[0]
  print(f"quickstart train step consumes {consumed:,.0f} tokens/s "
        f"({run.global_batch_size} x {run.seq_len} per step)\n")
  print(f"{'pipeline':<30} {'reader':<16} {'tokens/s':>12} {'x step':>8}")
  for name, result in rows.items():
    for reader, tps in result.items():
      print(f"{name:<30} {reader:<16} {tps:>12,.0f} {tps / consumed:>7.1f}x")


if __name__ == "__main__":
  main()
