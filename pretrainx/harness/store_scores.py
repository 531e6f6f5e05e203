"""`pretrainx score TASK --by=...`: a score per document of a token store, as a score set.

Chunks of documents resume from the version's committed progress; every process computes and
process 0 writes. Scores: perplexity, the reference/run ratio of mean NLL, or a file's values."""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any, Callable, Sequence

import jax
import numpy as np
from absl import logging

from pretrainx import storage
from pretrainx.data import score_sets
from pretrainx.harness.score_docs import document_logprobs
from pretrainx.harness.scoring import TokenScorer

CHUNK_DOCS = 256  # documents scored (and committed) at a time
ScoreChunk = Callable[[int, int], np.ndarray]  # (start, stop) -> float [stop - start]


def store_documents(store, start: int, stop: int) -> list[np.ndarray]:
  """Token ids of documents [start, stop), without their closing eos."""
  return [store.document(i)[:-1] for i in range(start, stop)]


def mean_nll(scorer: TokenScorer, documents: Sequence[np.ndarray], prefix_id: int
             ) -> np.ndarray:
  """float64 [len(documents)]: the mean negative log-likelihood per token (NaN if empty)."""
  parts = document_logprobs(scorer, documents, prefix_id)
  return np.asarray([-p.astype(np.float64).mean() if len(p) else np.nan for p in parts])


def perplexity(store, scorer: TokenScorer, prefix_id: int) -> ScoreChunk:
  """exp(mean NLL per token) of each document under the scorer's model."""
  return lambda start, stop: np.exp(mean_nll(scorer, store_documents(store, start, stop),
                                             prefix_id))


def reference_ratio(store, scorer: TokenScorer, reference: TokenScorer, prefix_id: int
                    ) -> ScoreChunk:
  """mean NLL under `reference` / mean NLL under `scorer`, over the same windows: high where the
  scored model finds a document much easier than the reference does."""

  def chunk(start: int, stop: int) -> np.ndarray:
    docs = store_documents(store, start, stop)
    with np.errstate(divide="ignore", invalid="ignore"):
      return mean_nll(reference, docs, prefix_id) / mean_nll(scorer, docs, prefix_id)

  return chunk


def _record(path: str, line_no: int, line: bytes) -> Any:
  try:
    return json.loads(line)
  except (json.JSONDecodeError, UnicodeDecodeError) as err:
    raise ValueError(f"{path}:{line_no} is not JSON ({err}); write one number or object a "
                     "line.") from err


def _number(value: Any, what: str) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
    raise ValueError(f"{what} is {value!r}, not a finite number.")
  return float(value)


def _place(rec: Any, k: int, where: str, index_field: str, score_field: str
           ) -> tuple[int, float]:
  """(document index, score) of the k-th record: a bare number, or an object."""
  if not isinstance(rec, dict):
    return k, _number(rec, f"{where}: the score")
  index = rec.get(index_field)
  if isinstance(index, bool) or not isinstance(index, int):
    raise ValueError(f"{where} has no integer {index_field!r} field (a document index); pass "
                     "--index_field.")
  if score_field not in rec:
    raise ValueError(f"{where} has no {score_field!r} field; pass --score_field.")
  return index, _number(rec[score_field], f"{where}: {score_field!r}")


def file_scores(path: str, num_docs: int, index_field: str = "doc", score_field: str = "score"
                ) -> tuple[np.ndarray, dict[str, Any]]:
  """(float32 [num_docs], params) from a JSON-lines file (local or in a bucket): each line a
  number (the k-th line scores document k) or an object {index_field: i, score_field: x}."""
  if not storage.exists(path):
    raise ValueError(f"--scores_file {path} does not exist; write one JSON line per document "
                     f'(a number, or {{"{index_field}": i, "{score_field}": x}}).')
  values = np.full(num_docs, np.nan, np.float32)
  digest, kinds, k = hashlib.sha256(), set(), 0
  with storage.open_file(path, "rb") as f:
    for line_no, line in enumerate(f, 1):
      digest.update(line)
      if not line.strip():
        continue
      rec, where = _record(path, line_no, line), f"{path}:{line_no}"
      kinds.add(isinstance(rec, dict))
      if len(kinds) > 1:
        raise ValueError(f"{where}: the file mixes bare numbers and objects; use one form.")
      index, value = _place(rec, k, where, index_field, score_field)
      if not 0 <= index < num_docs:
        raise ValueError(f"{where} scores document {index}, but the store holds documents "
                         f"0..{num_docs - 1}.")
      if not np.isnan(values[index]):
        raise ValueError(f"{where} scores document {index} a second time.")
      values[index], k = value, k + 1
  missing = np.flatnonzero(np.isnan(values))
  if len(missing):
    raise ValueError(f"{path} scores {num_docs - len(missing):,} of the store's {num_docs:,} "
                     f"documents: {len(missing):,} have no score (the first: document "
                     f"{missing[0]}); give every document a line.")
  return values, {"scores_file": storage.resolve(path), "sha256": digest.hexdigest(),
                  "index_field": index_field, "score_field": score_field}


def _from_main(values: tuple[int, ...]) -> tuple[int, ...]:
  """Process 0's values on every process."""
  if jax.process_count() == 1:
    return values
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

  shared = multihost_utils.broadcast_one_to_all(np.asarray(values, np.int64))
  return tuple(int(v) for v in np.asarray(shared))


def write_score_set(store, name: str, kind: str, params: dict[str, Any], score_chunk: ScoreChunk,
                    chunk_docs: int | None = None) -> tuple[int, np.ndarray | None]:
  """Scores every document of `store` into score set `name` (continuing an interrupted version
  with the same kind and params); (version, values), the values on process 0 only."""
  score_sets.check_name(name)
  chunk_docs = chunk_docs or CHUNK_DOCS
  main = jax.process_index() == 0
  writer = score_sets.ScoreWriter(store.path, name, kind, params, store.num_docs) if main else None
  version, start = _from_main((writer.version, writer.done) if main else (0, 0))
  if start:
    logging.warning("score %r v%d of %s: continuing at document %d of %d", name, version,
                    store.path, start, store.num_docs)
  for lo in range(start, store.num_docs, chunk_docs):
    hi = min(store.num_docs, lo + chunk_docs)
    values = np.asarray(score_chunk(lo, hi), np.float32)
    if main:
      writer.write(lo, values)
    logging.info("score %r v%d: %d of %d documents", name, version, hi, store.num_docs)
  if not main:
    return version, None
  writer.finish()
  return version, score_sets.read_scores(store.path, name, version, store.num_docs)[0]


def summary(store_path: str, name: str, version: int, values: np.ndarray) -> str:
  """One line: where the score went and its mean / min / max."""
  finite = values[np.isfinite(values)]
  stats = (f"mean {finite.mean(dtype=np.float64):.6g}, min {finite.min():.6g}, max "
           f"{finite.max():.6g}" if len(finite) else "no finite values")
  unscored = len(values) - len(finite)
  return (f"{store_path}: score {name!r} v{version} of {len(values):,} documents: {stats}" +
          (f" ({unscored:,} without a finite score, e.g. empty documents)" if unscored else ""))
