"""`pretrainx score`: per-token log-probabilities of documents, written as JSON lines.

Each document (a JSON-lines file's text field, or a domain's token store) is scored whole: its
first token given eos, every later one given as much preceding text as fits in a row (rolling
windows, as lm-eval's loglikelihood_rolling). A line holds the ids, their log-probs, the mean and
the Min-K% score (the mean of the lowest K% log-probs, Shi et al. 2023) for membership studies
and data selection.
"""

from __future__ import annotations

import json
from typing import Iterable, Iterator, Sequence

import numpy as np

from pretrainx import storage
from pretrainx.harness.scoring import TokenScorer, rolling_windows

DOCS_PER_BATCH = 64


def min_k_score(logprobs: np.ndarray, fraction: float) -> float:
  """The mean of the lowest `fraction` of the log-probs (at least one)."""
  if len(logprobs) == 0:
    return float("nan")
  k = max(1, int(round(fraction * len(logprobs))))
  return float(np.sort(logprobs.astype(np.float64))[:k].mean())


def jsonl_documents(path: str, text_field: str = "text", id_field: str | None = None
                    ) -> Iterator[tuple[str, str]]:
  """(id, text) of each line of a JSON-lines file (local or in a bucket); ids default to the
  line number."""
  with storage.open_file(path, "r") as f:
    for line_no, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        rec = json.loads(line)
      except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{line_no} is not JSON ({err}).") from err
      if not isinstance(rec, dict) or not isinstance(rec.get(text_field), str):
        raise ValueError(f"{path}:{line_no} has no text field {text_field!r}; pass "
                         "--text_field.")
      yield str(rec.get(id_field, line_no) if id_field else line_no), rec[text_field]


def document_logprobs(scorer: TokenScorer, documents: Sequence[np.ndarray], prefix_id: int
                      ) -> list[np.ndarray]:
  """log p of every token of each document (float32 [len]), in one batched scorer call: the
  first token given `prefix_id`, later ones in rolling windows of the scorer's row length."""
  windows, owner = [], []
  for i, ids in enumerate(documents):
    for pair in rolling_windows([int(t) for t in ids], prefix_id, scorer.seq_len):
      windows.append(pair)
      owner.append(i)
  parts: list[list[np.ndarray]] = [[] for _ in documents]
  for i, scored in zip(owner, scorer.score(windows)):
    parts[i].append(scored.logprobs)
  return [np.concatenate(p) if p else np.zeros(0, np.float32) for p in parts]


def score_documents(scorer: TokenScorer, documents: Iterable[tuple[str, np.ndarray]],
                    out_path: str, prefix_id: int, min_k: float = 0.2) -> int:
  """Writes one JSON line per (id, token ids) document to out_path; returns the count."""
  staged = storage.StagedDir(storage.parent(storage.resolve(out_path)))
  name = storage.basename(out_path)
  count = 0
  with open(staged.path(name), "w", encoding="utf-8") as out:
    batch: list[tuple[str, np.ndarray]] = []

    def flush():
      scored = document_logprobs(scorer, [ids for _, ids in batch], prefix_id)
      for (doc_id, ids), logprobs in zip(batch, scored):
        out.write(json.dumps({
            "id": doc_id, "num_tokens": int(len(ids)), "tokens": [int(t) for t in ids],
            "logprobs": [round(float(x), 6) for x in logprobs],
            "mean_logprob": float(logprobs.mean()) if len(logprobs) else float("nan"),
            f"min_{round(100 * min_k)}_logprob": min_k_score(logprobs, min_k)}) + "\n")
      batch.clear()

    for doc_id, ids in documents:
      batch.append((doc_id, np.asarray(ids, np.int32)))
      count += 1
      if len(batch) >= DOCS_PER_BATCH:
        flush()
    if batch:
      flush()
  staged.close()
  return count
