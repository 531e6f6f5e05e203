"""Batches for training and evaluation: tokenize, pack into rows, shuffle by seed, shard per host.

Documents (each followed by eos) are concatenated and cut into rows of `seq_len`; `segment_ids`
keep packed documents apart and `positions` restart at every document. The training batch at step
k is a pure function of (seed, k): grain's shuffled MapDataset is read by index, so resuming at
step k needs no state beyond k. Batches are dicts of int32 [batch, seq] arrays.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterator

import grain
import numpy as np

from pretrainx.data.corpus import DOMAINS, load_documents
from pretrainx.data.vocab import ByteVocabulary

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where tokens come from and how they are split and shuffled.

  Attributes:
    domains: embedded-corpus domains to train on ('prose', 'code').
    validation_fraction: share of each domain's bytes held out for evaluation.
    vocabulary: any object with encode/decode/vocab_size/eos_id/pad_id (byte-level by default).
    seed: shuffle seed; the batch at step k depends on (seed, k) only.
    prefetch: batches prepared ahead of the training step by a background thread.
  """

  domains: tuple[str, ...] = DOMAINS
  validation_fraction: float = 0.05
  vocabulary: Any = ByteVocabulary()
  seed: int = 0
  prefetch: int = 2


def tokenize(texts: list[str], vocab) -> tuple[np.ndarray, np.ndarray]:
  """-> (tokens [T], doc_index [T]) with every document followed by eos."""
  pieces = [np.append(vocab.encode(t), np.int32(vocab.eos_id)) for t in texts]
  if not pieces:
    raise ValueError("no documents to tokenize; check DataConfig.domains and the split.")
  tokens = np.concatenate(pieces).astype(np.int32)
  doc_index = np.repeat(np.arange(len(pieces), dtype=np.int32), [len(p) for p in pieces])
  return tokens, doc_index


class PackedRows:
  """Random-access rows cut from one token stream; row i covers tokens [i*L, (i+1)*L] (+1 target)."""

  def __init__(self, tokens: np.ndarray, doc_index: np.ndarray, seq_len: int):
    if len(tokens) < seq_len + 1:
      raise ValueError(f"only {len(tokens)} tokens, fewer than one row of seq_len={seq_len} + 1.")
    self.tokens, self.doc_index, self.seq_len = tokens, doc_index, seq_len

  def __len__(self) -> int:
    return (len(self.tokens) - 1) // self.seq_len

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    start, length = int(i) * self.seq_len, self.seq_len
    inputs = self.tokens[start:start + length]
    targets = self.tokens[start + 1:start + length + 1]
    docs = self.doc_index[start:start + length]
    # Predicting the first token of the next document is not a target: the context is another doc.
    loss_mask = (docs == self.doc_index[start + 1:start + length + 1]).astype(np.int32)
    new_segment = np.concatenate([[True], docs[1:] != docs[:-1]])
    segment_ids = np.cumsum(new_segment).astype(np.int32)  # 1, 1, ..., 2, 2, ...
    starts = np.flatnonzero(new_segment)
    positions = (np.arange(length) - starts[segment_ids - 1]).astype(np.int32)
    return {"inputs": inputs, "targets": targets, "segment_ids": segment_ids,
            "positions": positions, "loss_mask": loss_mask}


def packed_rows(cfg: DataConfig, split: str, seq_len: int) -> PackedRows:
  docs = load_documents(split, cfg.domains, cfg.validation_fraction)
  return PackedRows(*tokenize([d.text for d in docs], cfg.vocabulary), seq_len)


def _stack(rows: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  return {k: np.stack([r[k] for r in rows]) for k in BATCH_KEYS}


def host_slice(global_batch_size: int, process_index: int, process_count: int) -> slice:
  """The rows of each global batch that this host loads."""
  if global_batch_size % process_count:
    raise ValueError(f"global batch {global_batch_size} does not split over {process_count} hosts.")
  per_host = global_batch_size // process_count
  return slice(process_index * per_host, (process_index + 1) * per_host)


class TrainBatches:
  """Training batch at step k = rows[k*B : (k+1)*B] of a seeded, endlessly repeated shuffle."""

  def __init__(self, cfg: DataConfig, seq_len: int, global_batch_size: int,
               process_index: int = 0, process_count: int = 1):
    self.rows = packed_rows(cfg, "train", seq_len)
    self.shuffled = grain.MapDataset.source(self.rows).shuffle(seed=cfg.seed).repeat()
    self.global_batch_size = global_batch_size
    self.local = host_slice(global_batch_size, process_index, process_count)
    self.prefetch = cfg.prefetch

  def batch_at(self, step: int) -> dict[str, np.ndarray]:
    """This host's part of the global batch of `step`."""
    base = int(step) * self.global_batch_size
    return _stack([self.shuffled[base + j] for j in range(self.local.start, self.local.stop)])

  def iterate(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Batches from `start_step` on, prepared ahead by grain's reader threads."""
    steps = grain.MapDataset.range(start_step, 2**62).map(self.batch_at)
    options = grain.ReadOptions(num_threads=1, prefetch_buffer_size=max(self.prefetch, 1))
    return iter(steps.to_iter_dataset(options))


def eval_batches(cfg: DataConfig, seq_len: int, batch_size: int, num_batches: int | None,
                 process_index: int = 0, process_count: int = 1) -> list[dict[str, np.ndarray]]:
  """The validation split as this host's parts of `num_batches` batches (None: all of it).

  A subset takes rows evenly spaced over the whole split, so that every domain and document is
  represented; a last partial batch is filled with pad rows whose loss_mask is 0.
  """
  rows = packed_rows(cfg, "validation", seq_len)
  available = math.ceil(len(rows) / batch_size)
  num_batches = available if num_batches is None else min(num_batches, available)
  wanted = min(num_batches * batch_size, len(rows))
  order = np.linspace(0, len(rows) - 1, wanted).round().astype(int) if wanted < len(rows) \
      else np.arange(len(rows))
  local = host_slice(batch_size, process_index, process_count)
  pad_row = {k: np.zeros(seq_len, np.int32) for k in BATCH_KEYS}
  batches = []
  for b in range(num_batches):
    idx = range(b * batch_size + local.start, b * batch_size + local.stop)
    batches.append(_stack([rows[order[i]] if i < len(order) else pad_row for i in idx]))
  return batches


def unigram_entropy(batches: list[dict[str, np.ndarray]], vocab_size: int) -> float:
  """Entropy (nats/token) of the target tokens' own unigram distribution: the loss of a model
  that knows the exact token frequencies of this text but nothing of context."""
  counts = np.zeros(vocab_size, np.float64)
  for b in batches:
    np.add.at(counts, b["targets"][b["loss_mask"] > 0], 1.0)
  p = counts[counts > 0] / counts.sum()
  return float(-(p * np.log(p)).sum())
