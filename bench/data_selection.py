"""Data selection by score (issue 21): a score filter, a quality curriculum, in-context packing.

1. Filter: prose chunks of 2,000 characters plus a noisy copy of each (characters randomised at
   a rate drawn from [0, 0.6], score = -rate, the clean copies 0); Selection(top_fraction=0.5)
   against no filter, at equal steps; clean prose validation loss.
2. Curriculum: one pass over 120-character prose chunks, each noisy at a rate in [0, 0.6]
   (score = -rate): order 'ascending' (noisiest first, cleanest last) against 'shuffle', under a
   constant LR and under cosine decay to 0.01x; clean prose validation loss.
3. In-context packing: 400-character windows of the code files, each cut into two documents;
   'concat' rows of 128; neighbours + cross-document attention against random packing (with and
   without cross-document attention). Loss on the first 64 tokens of held-out second halves,
   after the last 64 tokens of their first half (one segment) or alone.
Prints markdown tables and replaces the "## Data selection (issue 21)" section of RESULTS.md.
Run: .venv/bin/python bench/data_selection.py [--seeds 2] [--results bench/RESULTS.md]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time

from pretrainx.cli import configure_cpu_devices

configure_cpu_devices("auto")  # as the CLI does, before jax is imported

import jax  # noqa: E402  pylint: disable=wrong-import-position
import numpy as np  # noqa: E402  pylint: disable=wrong-import-position

from pretrainx.config import (DataConfig, FileTask, Selection, Stage,  # noqa: E402
                              parse_gin)
from pretrainx.data import corpus  # noqa: E402  pylint: disable=wrong-import-position
from pretrainx.data import prepare as data_prepare  # noqa: E402
from pretrainx.data.packing import View  # noqa: E402  pylint: disable=wrong-import-position
from pretrainx.data.pipeline import TrainBatches, eval_batches  # noqa: E402
from pretrainx.train.ablation import continuation_batches, train_and_evaluate  # noqa: E402
from pretrainx.vocab import ByteVocabulary  # noqa: E402  pylint: disable=wrong-import-position

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = ByteVocabulary()
SECTION = "## Data selection (issue 21)"


def _task(root: str, name: str, texts: list[str], scores: list[float]) -> FileTask:
  path = os.path.join(root, f"{name}.jsonl")
  with open(path, "w", encoding="utf-8") as f:
    f.writelines(json.dumps({"text": t, "q": float(s)}) + "\n" for t, s in zip(texts, scores))
  task = FileTask(name, (path,), score_field="q")
  data_prepare.prepare(task, os.path.join(root, "stores"), VOCAB)
  return task


def _noisy(text: str, rate: float, rng) -> str:
  chars = np.array(list(text))
  hit = rng.random(len(chars)) < rate
  chars[hit] = [chr(c) for c in rng.integers(32, 127, int(hit.sum()))]
  return "".join(chars)


def _noisy_prose(root, name, chunk, total, max_rate, clean_copies) -> FileTask:
  rng = np.random.default_rng(0)
  text = "".join(d.text for d in corpus.load_documents("train", ("prose",)))[:total]
  texts, scores = [], []
  for i in range(0, len(text), chunk):
    c = text[i:i + chunk]
    if len(c) <= chunk // 4:
      continue
    rate = rng.uniform(0, max_rate)
    texts += [c, _noisy(c, rate, rng)] if clean_copies else [_noisy(c, rate, rng)]
    scores += [0.0, -rate] if clean_copies else [-rate]
  return _task(root, name, texts, scores)


def _experiment(root: str, steps: int, seq_len: int = 64, **schedule):
  exp = parse_gin([os.path.join(REPO, "gin_configs/tiny.gin")])
  run = {"run_dir": os.path.join(root, "run"), "steps": steps, "seq_len": seq_len,
         "progress_bar": False}
  return exp.replace(run=run, **({"schedule": schedule} if schedule else {}))


def _clean_prose(root: str) -> dict[str, list]:
  cfg = DataConfig(domains=("prose",), store_dir=os.path.join(root, "stores"))
  return {"clean": eval_batches(cfg, 64, 8, 16)["prose"]}


def bench_filter(root: str, seeds: int, steps: int) -> list[str]:
  task = _noisy_prose(root, "noisy", 2000, 10**7, 0.6, clean_copies=True)
  base = DataConfig(domains=("noisy",), tasks=(task,), store_dir=os.path.join(root, "stores"))
  top = dataclasses.replace(base, stages=(Stage(0, selections=(Selection(top_fraction=0.5),)),))
  rows, got = [], []
  for seed in range(seeds):
    cfgs = [dataclasses.replace(c, seed=seed) for c in (base, top)]
    none, half = (r["clean"] for r in train_and_evaluate(_experiment(root, steps), cfgs,
                                                         _clean_prose(root)))
    got.append((none, half))
    rows.append(f"| {seed} | {steps} ({steps * 512:,}) | {none:.4f} | {half:.4f} | "
                f"{none - half:+.4f} |")
  none, half = np.mean(got, axis=0)
  rows.append(f"| mean | | {none:.4f} | {half:.4f} | {none - half:+.4f} |")
  return ["| data seed | steps (token slots) | no filter | top 50% by score | gain |",
          "|---|---|---|---|---|"] + rows


def bench_curriculum(root: str, seeds: int) -> list[str]:
  task = _noisy_prose(root, "graded", 120, 200_000, 0.6, clean_copies=False)
  make = lambda order, seed: DataConfig(
      domains=("graded",), tasks=(task,), store_dir=os.path.join(root, "stores"), seed=seed,
      stages=(Stage(0, selections=(Selection(order=order),)),))
  rows_per_epoch = TrainBatches(make("ascending", 0), 64, 8).rows[0].rows_in_epoch(
      0, View(selection=Selection(order="ascending")))
  steps = rows_per_epoch // 8  # one pass
  rows = []
  for name, schedule in (("constant", {"name": "constant"}),
                         ("cosine to 0.01x", {"name": "cosine", "end_lr_ratio": 0.01})):
    exp = _experiment(root, steps, **schedule)
    # The ascending order has no ties to shuffle and its rows are not shuffled: one run serves
    # every data seed.
    cfgs = [make("ascending", 0)] + [make("shuffle", seed) for seed in range(seeds)]
    asc, *shuffled = (r["clean"] for r in train_and_evaluate(exp, cfgs, _clean_prose(root)))
    for seed, shuf in enumerate(shuffled):
      rows.append(f"| {name} | {seed} | {steps} | {asc:.4f} | {shuf:.4f} | {shuf - asc:+.4f} |")
    shuf = float(np.mean(shuffled))
    rows.append(f"| {name} | mean | | {asc:.4f} | {shuf:.4f} | {shuf - asc:+.4f} |")
  return ["The ascending order is the same for every data seed (unique scores, rows in order), so "
          "it is run once; the shuffle's seeds vary.", "",
          "| LR schedule | data seed | steps (one pass) | ascending | shuffle | "
          "ascending's gain |", "|---|---|---|---|---|---|"] + rows


def _windows(split: str, width: int, per_file: int) -> list[tuple[str, str]]:
  pairs = []
  for doc in corpus.load_documents(split, ("code",)):
    if len(doc.text) >= width:
      for s in sorted(set(np.linspace(0, len(doc.text) - width, per_file).astype(int))):
        w = doc.text[s:s + width]
        pairs.append((w[:width // 2], w[width // 2:]))
  return pairs


def bench_incontext(root: str, seeds: int, steps: int) -> list[str]:
  train = _windows("train", 400, 4)
  task = _task(root, "halves", [h for p in train for h in p], [0.0] * 2 * len(train))
  random = DataConfig(domains=("halves",), tasks=(task,), store_dir=os.path.join(root, "stores"),
                      packing="concat")
  runs = {"random packing": random,
          "random packing + cross-document attention": dataclasses.replace(
              random, cross_document_attention=True),
          "neighbours + cross-document attention": dataclasses.replace(
              random, packing_order="neighbours", cross_document_attention=True)}
  lay = TrainBatches(runs["neighbours + cross-document attention"], 128, 8).rows[0].layout(0)
  starts = lay.doc[1:] != lay.doc[:-1]
  before = dict(zip(lay.doc[1:][starts].tolist(), lay.doc[:-1][starts].tolist()))
  share = np.mean([before.get(2 * i + 1) == 2 * i for i in range(len(train))])
  held_out = _windows("validation", 400, 40)
  enc = lambda t: np.append(np.asarray(VOCAB.encode(t), np.int32), np.int32(VOCAB.eos_id))
  held_out = [(enc(a), enc(b)) for a, b in held_out]
  sets = {"after": continuation_batches(held_out, 128, True),
          "alone": continuation_batches(held_out, 128, False)}
  rows, got = [], {name: [] for name in runs}
  for seed in range(seeds):
    cfgs = [dataclasses.replace(c, seed=seed) for c in runs.values()]
    for name, r in zip(runs, train_and_evaluate(_experiment(root, steps, 128), cfgs, sets)):
      got[name].append((r["after"], r["alone"]))
      rows.append(f"| {name} | {seed} | {r['after']:.4f} | {r['alone']:.4f} |")
  for name, values in got.items():
    after, alone = np.mean(values, axis=0)
    rows.append(f"| {name} | mean | {after:.4f} | {alone:.4f} |")
  return [f"{len(train)} training files' windows (two documents each), {len(held_out)} held-out "
          f"windows; in the neighbour chain {100 * share:.0f}% of second halves directly follow "
          f"their own first half (random: ~0%). {steps} steps of 8x128 tokens.", "",
          "| training data | data seed | 2nd half after its 1st half | 2nd half alone |",
          "|---|---|---|---|"] + rows


def _write_section(path: str, lines: list[str]) -> None:
  text = open(path, encoding="utf-8").read() if os.path.exists(path) else ""
  section = "\n".join([SECTION, ""] + lines) + "\n"
  if SECTION in text:
    head, rest = text.split(SECTION, 1)
    tail = rest[rest.index("\n## "):] if "\n## " in rest else ""
    text = head + section + tail
  else:
    text = text.rstrip("\n") + "\n\n" + section
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seeds", type=int, default=2, help="data-order seeds per comparison")
  parser.add_argument("--filter_steps", type=int, default=200)
  parser.add_argument("--incontext_steps", type=int, default=600)
  parser.add_argument("--results", default=os.path.join(REPO, "bench/RESULTS.md"),
                      help="'' prints only")
  args = parser.parse_args()
  t0 = time.perf_counter()
  with tempfile.TemporaryDirectory() as root:
    parts = [("Score filter: clean prose validation loss", bench_filter(root, args.seeds,
                                                                        args.filter_steps)),
             ("Curriculum: clean prose validation loss after one pass",
              bench_curriculum(root, args.seeds)),
             ("In-context packing: loss on held-out second halves (first 64 tokens)",
              bench_incontext(root, args.seeds, args.incontext_steps))]
  lines = [f"`.venv/bin/python bench/data_selection.py --seeds {args.seeds}`; "
           f"{time.strftime('%Y-%m-%d')}, CPU ({jax.device_count()} XLA devices, data-parallel), "
           f"{(time.perf_counter() - t0) / 60:.1f} minutes. The tiny model (d64, 2 layers), "
           "8 rows a step, AdamW at 1e-2 (tiny.gin: cosine to 0.1x unless said), byte "
           "vocabulary; one initial state per comparison. Losses in nats per token."]
  for title, table in parts:
    lines += ["", f"{title}:", ""] + table
  print("\n".join(lines))
  if args.results:
    _write_section(args.results, lines)


if __name__ == "__main__":
  main()
