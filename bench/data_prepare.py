"""`data prepare` and `sweep` on Ray against the same work in one process, on this machine.

Prepare: JSON-lines files tokenized into one store, in this process and on local Ray clusters of
1 and 2 workers (CPUs); tokens/s counts the whole prepare (shards, copy, checksums), the cluster's
start is shown apart. Sweep: a grid of tiny runs through `pretrainx sweep`, one after another in
one process and as Ray tasks on 1 worker; the overhead per run is their difference over the runs.
Prints a markdown table.
Run: .venv/bin/python bench/data_prepare.py [--files 8 --mb_per_file 6 --sweep_runs 4]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "gin_configs/tiny.gin")


def make_files(folder: str, files: int, mb_per_file: float) -> int:
  """English-like JSON lines, `mb_per_file` MB each; returns the bytes of text written."""
  rng = random.Random(0)
  words = ("the of and a to in is you that it he was for on are as with his they at be this "
           "have from or one had by word but not what all were we when your can said there use an "
           "each which she do how their if will up other about out many then them these so").split()
  total = 0
  os.makedirs(folder, exist_ok=True)
  for f in range(files):
    with open(os.path.join(folder, f"part-{f:03d}.jsonl"), "w", encoding="utf-8") as out:
      written = 0
      while written < mb_per_file * 1e6:
        text = " ".join(rng.choice(words) for _ in range(rng.randint(50, 600)))
        out.write(json.dumps({"text": text, "url": f"https://example.com/{f}/{written}"}) + "\n")
        written += len(text)
      total += written
  return total


def train_bpe(folder: str, out: str, vocab_size: int = 8192) -> str:
  """A byte-level BPE tokenizer.json trained on the files (offline, `tokenizers`)."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  tokenizer = Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"])

  def texts():
    for name in sorted(os.listdir(folder))[:2]:
      with open(os.path.join(folder, name), encoding="utf-8") as f:
        for line in f:
          yield json.loads(line)["text"]

  tokenizer.train_from_iterator(texts(), trainer)
  path = os.path.join(out, "tokenizer.json")
  tokenizer.save(path)
  return path


def time_prepare(folder: str, out: str, cluster, vocabulary) -> tuple[float, int]:
  from pretrainx.data import prepare
  from pretrainx.config import FileTask

  task = FileTask("web", (os.path.join(folder, "*.jsonl"),), metadata_field="url")
  shutil.rmtree(out, ignore_errors=True)
  t0 = time.perf_counter()
  manifest = prepare.prepare_file_split(out, task, "train", vocabulary, cluster=cluster)
  return time.perf_counter() - t0, manifest["num_tokens"]


def prepare_rows(work: str, folder: str, vocabularies: dict
                 ) -> list[tuple[str, str, float, float, float]]:
  from pretrainx import cluster as cluster_lib

  rows = []
  for vname, vocab in vocabularies.items():
    seconds, tokens = time_prepare(folder, os.path.join(work, "here"), cluster_lib.IN_PROCESS,
                                   vocab)
    rows.append((vname, "in this process", 0.0, seconds, tokens / seconds))
  for workers in (1, 2):
    t0 = time.perf_counter()
    where = cluster_lib.connect("", num_cpus=workers)
    start = time.perf_counter() - t0
    for vname, vocab in vocabularies.items():
      seconds, tokens = time_prepare(folder, os.path.join(work, f"ray{workers}"), where, vocab)
      rows.append((vname, f"Ray, {workers} worker{'s' * (workers > 1)}", start, seconds,
                   tokens / seconds))
    cluster_lib.shutdown()
  return rows


def sweep_file(work: str, name: str, runs: int) -> str:
  path = os.path.join(work, f"{name}.gin")
  bindings = ["SampleConfig.tokens = 0", "RunConfig.eval_batches = 1",
              "RunConfig.steps = 20", "RunConfig.log_every = 10", "RunConfig.peak_tflops = 1.0"]
  lrs = [1e-3 * (i + 1) for i in range(runs)]
  with open(path, "w", encoding="utf-8") as f:
    f.write(f"SweepConfig.name = {name!r}\nSweepConfig.gin_files = [{TINY!r}]\n"
            f"SweepConfig.bindings = {bindings!r}\n"
            f"SweepConfig.grid = {{'OptimizerConfig.learning_rate': {lrs!r}}}\n"
            f"SweepConfig.run_root = {os.path.join(work, name)!r}\n"
            f"SweepConfig.results = {os.path.join(work, name, 'results')!r}\n")
  return path


def time_sweep(path: str, *extra: str) -> float:
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  t0 = time.perf_counter()
  subprocess.run([sys.executable, "-m", "pretrainx", "sweep", path, *extra], cwd=REPO, env=env,
                 check=True, capture_output=True)
  return time.perf_counter() - t0


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--files", type=int, default=8)
  parser.add_argument("--mb_per_file", type=float, default=6.0)
  parser.add_argument("--sweep_runs", type=int, default=4)
  args = parser.parse_args()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  work = tempfile.mkdtemp(prefix="bench-prepare-")
  try:
    from pretrainx.vocab import ByteVocabulary, HFTokenizerVocabulary

    folder = os.path.join(work, "data")
    make_files(folder, args.files, args.mb_per_file)
    vocabularies = {"byte": ByteVocabulary(),
                    "BPE 8k": HFTokenizerVocabulary(train_bpe(folder, work))}
    rows = prepare_rows(work, folder, vocabularies)
    print(f"Prepare: {args.files} JSON-lines files x {args.mb_per_file:g} MB, {os.cpu_count()} "
          "cores\n")
    print("| vocabulary | where | cluster start s | prepare s | tokens/s | vs in-process | "
          "vs 1 Ray worker |")
    print("|---|---|---|---|---|---|---|")
    for vname, name, start, seconds, tps in sorted(rows, key=lambda r: r[0]):
      here = next(r[4] for r in rows if r[0] == vname and r[1] == "in this process")
      one = next(r[4] for r in rows if r[0] == vname and r[1] == "Ray, 1 worker")
      print(f"| {vname} | {name} | {start:.1f} | {seconds:.1f} | {tps:,.0f} | {tps / here:.2f}x "
            f"| {tps / one:.2f}x |")
    sequential = time_sweep(sweep_file(work, "seq", args.sweep_runs))
    on_ray = time_sweep(sweep_file(work, "ray", args.sweep_runs), "--ray", "--ray_cpus=1")
    print(f"\nSweep: {args.sweep_runs} tiny runs (20 steps each), `pretrainx sweep` in one process "
          "against `--ray --ray_cpus=1` (one run at a time, each in its own process)\n")
    print("| | wall s | s per run |\n|---|---|---|")
    print(f"| one process | {sequential:.1f} | {sequential / args.sweep_runs:.1f} |")
    print(f"| Ray, 1 worker | {on_ray:.1f} | {on_ray / args.sweep_runs:.1f} |")
    print(f"| overhead per run | | {(on_ray - sequential) / args.sweep_runs:+.1f} |")
  finally:
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
  main()
