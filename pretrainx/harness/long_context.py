"""Offline long-context retrieval: passkey and needle-in-a-haystack prompts built from the run's
own validation text, written as local lm-eval tasks (YAML + JSON lines), run greedily through
the harness, and reported as accuracy per (context length, depth): JSON, a heat map, a table.

Lengths are counted in the model's tokens (each prompt is fitted to its length by re-encoding);
a needle at depth d has a fraction d of the haystack before it. Everything follows from
LongContextEvalConfig.seed; nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from typing import Any, Sequence

import numpy as np
from absl import logging

from pretrainx import storage
from pretrainx.config import DataConfig, HarnessConfig, LongContextEvalConfig
from pretrainx.config.run import LONG_CONTEXT_KINDS

CITIES = ("Amsterdam", "Athens", "Bangkok", "Berlin", "Bogota", "Cairo", "Chicago", "Dublin",
          "Hanoi", "Helsinki", "Istanbul", "Jakarta", "Kyoto", "Lagos", "Lima", "Lisbon",
          "Madrid", "Manila", "Montreal", "Nairobi", "Oslo", "Prague", "Santiago", "Seoul",
          "Sydney", "Tbilisi", "Toronto", "Vienna", "Warsaw", "Zurich")
# (intro, needle, question) per kind; '{answer}' and '{city}' are filled per prompt. Short, so
# that byte-level models keep most of a short context for the haystack.
TEMPLATES = {
    "passkey": ("There is a pass key hidden in the text below. Remember it.\n\n",
                " The pass key is {answer}. Remember it. {answer} is the pass key. ",
                "\n\nWhat is the pass key? The pass key is"),
    "needle": ("A special magic number is hidden in the text below. Memorize it.\n\n",
               " The special magic number for {city} is {answer}. ",
               "\n\nWhat is the special magic number for {city}? The special magic number for "
               "{city} is"),
}
ANSWER_RANGE = {"passkey": (10_000, 100_000), "needle": (1_000_000, 10_000_000)}
LENGTH_TOLERANCE = 4  # tokens a fitted prompt may miss its length by (re-encoding at the seams)
METRIC = "exact_match"


def task_name(kind: str) -> str:
  return f"pretrainx_{kind}"


def check_lengths(cfg: LongContextEvalConfig, max_seq_len: int) -> None:
  """Every prompt length plus the generation budget fits the model's positions."""
  longest = cfg.lengths[-1]
  if longest + cfg.max_gen_toks > max_seq_len:
    raise ValueError(f"context length {longest} plus max_gen_toks={cfg.max_gen_toks} exceeds the "
                     f"model's max_seq_len={max_seq_len}; use lengths <= "
                     f"{max_seq_len - cfg.max_gen_toks} (--needle_lengths).")


def validation_text(data: DataConfig, domain: str, tokens: int) -> str:
  """Text of `domain`'s validation split ('': the first domain), whole documents joined by
  blank lines, at least `tokens` tokens of it (up to twice that, for varied filler windows)."""
  from pretrainx.data import pipeline  # pylint: disable=import-outside-toplevel

  domain = domain or data.domains[0]
  opened = pipeline.open_domain_store(data, domain, "validation")
  vocab, eos = data.vocabulary, int(data.vocabulary.eos_id)
  parts, have = [], 0
  for i in range(opened.num_docs):
    ids = opened.document(i)
    ids = ids[:-1] if len(ids) and int(ids[-1]) == eos else ids
    parts.append(vocab.decode(ids))
    have += len(ids)
    if have >= 2 * tokens:
      break
  if have < tokens:
    raise ValueError(f"the validation split of domain {domain!r} holds {have:,} tokens; the "
                     f"longest context needs at least {tokens:,}: lower --needle_lengths or take "
                     "the haystack from a domain with more validation text (--needle_domain).")
  return "\n\n".join(parts)


def _word_boundary(before: str, after: str) -> tuple[str, str]:
  """Moves a word cut in two to after the needle, so the needle sits between words."""
  if before and after and not before[-1].isspace() and not after[0].isspace():
    k = max(before.rfind(" "), before.rfind("\n"))
    if k >= 0:
      return before[:k + 1], before[k + 1:] + after
  return before, after


def fit_prompt(vocab, ids: np.ndarray, start: int, length: int, depth: float,
               parts: tuple[str, str, str]) -> dict[str, Any]:
  """intro + haystack[:cut] + needle + haystack[cut:] + question of `length` tokens, the haystack
  a window of `ids` from `start`, cut at `depth` of it (then at a word boundary).

  Returns {'prompt', 'tokens', 'needle_token' (where the needle starts), 'haystack_tokens'}.
  """
  intro, needle, question = parts
  encode = lambda text: len(vocab.encode(text))
  fixed = encode(intro + needle + question)
  budget = length - fixed
  if budget < 1:
    raise ValueError(f"context length {length} leaves no room for a haystack: the prompt's own "
                     f"text takes {fixed} tokens; use lengths > {fixed}.")
  best = None
  for _ in range(8):  # re-encoding at the seams may differ by a few tokens: correct and retry
    hay = ids[start:start + max(budget, 0)]
    # Cut the decoded text, not the ids: a cut inside a multi-byte character (byte vocabularies)
    # would decode to replacement characters that re-encode longer. The window's own edges may
    # split one too; those halves are dropped.
    text = vocab.decode(hay).strip("\ufffd")
    cut = int(round(depth * len(text)))
    before, after = _word_boundary(text[:cut], text[cut:])
    prompt = intro + before + needle + after + question
    n = encode(prompt)
    if best is None or abs(n - length) < abs(best[1] - length):
      best = (prompt, n, before)
    if n == length or len(hay) < budget:
      break
    budget += length - n
  prompt, n, before = best
  if abs(n - length) > LENGTH_TOLERANCE:
    raise ValueError(f"could not fit a {length}-token prompt (got {n}): the haystack text is too "
                     "short; lower --needle_lengths or use a domain with more validation text.")
  at = encode(intro + before)
  return {"prompt": prompt, "tokens": n, "needle_token": at,
          "haystack_tokens": n - fixed, "needle_depth": (at - encode(intro)) / max(n - fixed, 1)}


def make_docs(kind: str, text: str, vocab, cfg: LongContextEvalConfig) -> list[dict[str, Any]]:
  """The prompts of one kind, sorted by length (so generation batches share a length): each
  with its 'answer' (digits), 'length', 'depth', 'sample' and what fit_prompt measured."""
  ids = np.asarray(vocab.encode(text))
  if len(ids) < cfg.lengths[-1]:
    raise ValueError(f"the haystack text holds {len(ids):,} tokens; the longest context needs "
                     f"at least {cfg.lengths[-1]:,}: lower --needle_lengths or give more text.")
  intro, needle, question = TEMPLATES[kind]
  low, high = ANSWER_RANGE[kind]
  docs = []
  for length in cfg.lengths:
    for d, depth in enumerate(cfg.depths):
      for s in range(cfg.samples):
        rng = np.random.default_rng([cfg.seed, LONG_CONTEXT_KINDS.index(kind), length, d, s])
        answer, city = str(rng.integers(low, high)), str(rng.choice(CITIES))
        fill = lambda t: t.format(answer=answer, city=city)  # pylint: disable=cell-var-from-loop
        start = int(rng.integers(0, max(len(ids) - length, 0) + 1))
        fitted = fit_prompt(vocab, ids, start, length, depth,
                            (intro, fill(needle), fill(question)))
        docs.append({**fitted, "answer": answer, "length": length, "depth": depth, "sample": s})
  return docs


def write_task(kind: str, docs: Sequence[dict], folder: str, max_gen_toks: int) -> str:
  """The lm-eval task of one kind in `folder` (local): its JSON lines (named by their content,
  so datasets' cache never serves an older version) and YAML. Returns the task name."""
  rows = "".join(json.dumps(d, sort_keys=True) + "\n" for d in docs)
  data = storage.join(storage.resolve(folder),
                      f"{kind}_{hashlib.sha256(rows.encode()).hexdigest()[:12]}.jsonl")
  storage.write_text(data, rows)
  name = task_name(kind)
  storage.write_text(storage.join(folder, f"{name}.yaml"), "\n".join([
      f"task: {name}", "dataset_path: json", "dataset_kwargs:", "  data_files:",
      f"    test: {json.dumps(data)}", "test_split: test", "output_type: generate_until",
      "doc_to_text: prompt", "doc_to_target: answer", "generation_kwargs:",
      "  until: ['\\n']", f"  max_gen_toks: {max_gen_toks}", "  do_sample: false",
      "filter_list:", "  - name: digits", "    filter:", "      - function: regex",
      "        regex_pattern: '(\\d+)'", "      - function: take_first", "metric_list:",
      f"  - metric: {METRIC}", "    aggregation: mean", "    higher_is_better: true",
      "metadata:", "  version: 1.0", ""]))
  return name


def grid(kind: str, samples: Sequence[dict], cfg: LongContextEvalConfig,
         step: int | None = None) -> dict[str, Any]:
  """Accuracy per cell ('accuracy'[depth][length]), per length ('mean_by_length') and overall,
  with each prompt's answer and response, from lm-eval's per-document samples."""
  hits: dict[tuple[int, float], list[float]] = {}
  rows = []
  for s in samples:
    doc, value = s["doc"], float(s[METRIC])
    hits.setdefault((int(doc["length"]), float(doc["depth"])), []).append(value)
    response = s.get("filtered_resps", [""])
    rows.append({"length": int(doc["length"]), "depth": float(doc["depth"]),
                 "sample": int(doc["sample"]), "answer": doc["answer"],
                 "response": response[0] if isinstance(response, list) else response,
                 "correct": value, "tokens": int(doc["tokens"])})
  mean = lambda v: float(np.mean(v)) if v else float("nan")
  acc = [[mean(hits.get((L, d), [])) for L in cfg.lengths] for d in cfg.depths]
  by_length = {str(L): mean([v for (l2, _), vs in hits.items() if l2 == L for v in vs])
               for L in cfg.lengths}
  return {"kind": kind, "step": step, "lengths": list(cfg.lengths), "depths": list(cfg.depths),
          "samples_per_cell": cfg.samples, "seed": cfg.seed, "accuracy": acc,
          "mean_by_length": by_length, "mean": mean([v for vs in hits.values() for v in vs]),
          "prompts": sorted(rows, key=lambda r: (r["length"], r["depth"], r["sample"]))}


def plot_grid(result: dict[str, Any], out_png: str) -> str:
  """A heat map of accuracy: depth rows x length columns, 0..1, each cell annotated."""
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  from pretrainx.metrics import save_figure  # pylint: disable=import-outside-toplevel

  acc = np.asarray(result["accuracy"], np.float64)  # [depths, lengths]
  lengths, depths = result["lengths"], result["depths"]
  fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1.2 + 0.5 * len(depths)), dpi=110)
  image = ax.imshow(acc, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
  for (i, j), value in np.ndenumerate(acc):
    ax.text(j, i, "-" if np.isnan(value) else f"{value:.2f}", ha="center", va="center",
            fontsize=8)
  ax.set_xticks(range(len(lengths)), [str(L) for L in lengths])
  ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
  ax.set_xlabel("context length (tokens)")
  ax.set_ylabel("needle depth")
  step = "" if result.get("step") is None else f", step {result['step']}"
  ax.set_title(f"{result['kind']} retrieval accuracy{step}")
  fig.colorbar(image, ax=ax, fraction=0.05)
  fig.tight_layout()
  save_figure(fig, out_png)
  plt.close(fig)
  return out_png


def write_grid(result: dict[str, Any], out_dir: str) -> tuple[str, str]:
  """OUT_DIR/<kind>_grid.json and OUT_DIR/<kind>_grid.png."""
  base = storage.join(out_dir, f"{result['kind']}_grid")
  storage.write_text(base + ".json", json.dumps(result, indent=1))
  return base + ".json", plot_grid(result, base + ".png")


def table(result: dict[str, Any]) -> str:
  """Accuracy as a text table: a row per depth, a column per length, and the per-length mean."""
  head = f"{result['kind']:>8} | " + " ".join(f"{L:>7}" for L in result["lengths"])
  lines = [head, "-" * len(head)]
  for depth, row in zip(result["depths"], result["accuracy"]):
    lines.append(f"{depth:>8.0%} | " + " ".join(f"{v:>7.2f}" for v in row))
  lines.append(f"{'mean':>8} | " + " ".join(f"{result['mean_by_length'][str(L)]:>7.2f}"
                                          for L in result["lengths"]))
  return "\n".join(lines)


def metrics(results: dict[str, dict[str, Any]]) -> dict[str, float]:
  """{'long_context/<kind>/accuracy', 'long_context/<kind>/L<length>'} of evaluate_grid's grids."""
  out = {}
  for kind, result in results.items():
    out[f"long_context/{kind}/accuracy"] = result["mean"]
    out.update({f"long_context/{kind}/L{L}": v for L, v in result["mean_by_length"].items()})
  return out


def _lm_of(lm_or_rt, params: Any, cfg: LongContextEvalConfig):
  """(lm, vocabulary, run or None) for a Runtime (its model, mesh and data) or a ready LM."""
  if not hasattr(lm_or_rt, "exp"):
    lm = lm_or_rt
    if cfg.lengths[-1] + cfg.max_gen_toks > lm.max_length:
      raise ValueError(f"context length {cfg.lengths[-1]} plus max_gen_toks={cfg.max_gen_toks} "
                       f"exceeds the LM's max_length={lm.max_length}; make the LM longer or "
                       "lower the lengths.")
    return lm, lm.vocab, None
  from pretrainx.harness.lm import make_lm  # pylint: disable=import-outside-toplevel
  from pretrainx.sharding import (batch_sharding,  # pylint: disable=import-outside-toplevel
                                  check_batch_divisible)

  rt, exp = lm_or_rt, lm_or_rt.exp
  check_lengths(cfg, exp.model.max_seq_len)
  rows = cfg.batch_rows or exp.harness.batch_rows or exp.run.global_batch_size
  check_batch_divisible(rows, rt.mesh, 1)
  lm = make_lm(rt.model, params, exp.data.vocabulary,
               max_length=cfg.lengths[-1] + cfg.max_gen_toks, batch_rows=rows,
               sharding=batch_sharding(rt.mesh), scope=rt.scope, max_gen_toks=cfg.max_gen_toks,
               seed=cfg.seed)
  return lm, exp.data.vocabulary, rt


def evaluate_grid(lm_or_rt, params: Any, cfg: LongContextEvalConfig, *, text: str | None = None,
                  out_dir: str | None = None, step: int | None = None) -> dict[str, dict]:
  """{kind: grid} of cfg's retrieval tasks on a run's Runtime and `params` (the haystack: its
  domain's validation text, unless `text` is given), or on a ready lm-eval LM (a PretrainxLM;
  `params` unused, `text` required). With `out_dir`, writes <kind>_grid.json and .png there
  (from process 0)."""
  import jax  # pylint: disable=import-outside-toplevel

  from pretrainx.harness import runner  # pylint: disable=import-outside-toplevel

  lm, vocab, rt = _lm_of(lm_or_rt, params, cfg)
  if text is None:
    if rt is None:
      raise ValueError("evaluate_grid on an LM needs the haystack `text`; pass a Runtime to "
                       "read its run's validation split.")
    text = validation_text(rt.exp.data, cfg.domain, cfg.lengths[-1])
  folder = cfg.tasks_dir or (storage.join(out_dir, "tasks") if out_dir is not None and
                             not storage.is_remote(out_dir) else tempfile.mkdtemp(
                                 prefix="pretrainx-long-context-"))
  names = {kind: write_task(kind, make_docs(kind, text, vocab, cfg), folder, cfg.max_gen_toks)
           for kind in cfg.kinds}
  harness = HarnessConfig(tasks=tuple(names.values()), include_path=folder, seed=cfg.seed,
                          max_gen_toks=cfg.max_gen_toks)
  if rt is not None:
    with rt.scope():
      results = runner.evaluate(lm, harness, include_defaults=False)
  else:
    results = runner.evaluate(lm, harness, include_defaults=False)
  grids = {kind: grid(kind, results["samples"][name], cfg, step) for kind, name in names.items()}
  for result in grids.values():
    logging.info("long-context retrieval:\n%s", table(result))
    if out_dir is not None and jax.process_index() == 0:
      write_grid(result, out_dir)
  return grids
