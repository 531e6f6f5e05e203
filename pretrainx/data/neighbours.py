"""In-context pretraining's document order: each document then its nearest unvisited neighbour.

Documents are embedded by hashing their token 3-grams into `dim` buckets (log counts, centred,
L2-normalised); `chain` walks greedily to the most similar unvisited document (Shi et al. 2023),
exactly for small stores, and within blocks of a SimHash sort for big ones (approximate there).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from absl import logging

DIM = 256
NGRAM = 3
EXACT_LIMIT = 4096  # documents up to which the chain is exact (a [docs, docs] similarity matrix)
BLOCK = 1024  # documents per block of the approximate chain
SIMHASH_BITS = 24
CHUNK_TOKENS = 1 << 22  # tokens hashed at a time
CHUNK_DOCS = 1 << 14  # and documents (their counts take CHUNK_DOCS * dim floats)


def _mix(x: np.ndarray) -> np.ndarray:
  """uint64 -> well-mixed uint64 (splitmix64's finaliser), vectorised."""
  with np.errstate(over="ignore"):
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _gram_buckets(tokens: np.ndarray, dim: int) -> np.ndarray:
  """Bucket of every token 3-gram starting at each position -> int64 [len(tokens) - 2]."""
  t = tokens.astype(np.uint64)
  with np.errstate(over="ignore"):
    h = _mix(_mix(t[:-2] + np.uint64(0x9E3779B97F4A7C15)) ^ t[1:-1])
    h = _mix(h ^ (t[2:] << np.uint64(32)))
  return (h % np.uint64(dim)).astype(np.int64)


def embed_tokens(tokens: np.ndarray, offsets: np.ndarray, dim: int = DIM) -> np.ndarray:
  """Log counts of each document's hashed 3-grams -> float32 [docs, dim] (not normalised).

  tokens: int [total]; offsets: int [docs + 1], document i being tokens[offsets[i]:offsets[i+1]].
  """
  offsets = np.asarray(offsets, np.int64)
  num_docs = len(offsets) - 1
  counts = np.zeros(num_docs * dim, np.int64)
  if len(tokens) >= NGRAM:
    doc = np.repeat(np.arange(num_docs), np.diff(offsets))  # [total]
    grams = _gram_buckets(np.asarray(tokens), dim)
    inside = doc[:-2] == doc[2:]  # grams within one document
    counts = np.bincount(doc[:-2][inside] * dim + grams[inside], minlength=num_docs * dim)
  return np.log1p(counts.reshape(num_docs, dim).astype(np.float32))


def normalise(emb: np.ndarray) -> np.ndarray:
  """Centred (the corpus mean removed, so common n-grams stop dominating), unit rows."""
  emb = emb - emb.mean(axis=0, keepdims=True)
  return (emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-6)).astype(np.float32)


def embed_store(store: Any, dim: int = DIM) -> np.ndarray:
  """The normalised embeddings of a token store's documents -> float32 [docs, dim] (dim * 4 bytes
  a document), read a few million tokens at a time."""
  offsets = np.asarray(store.doc_offsets, np.int64)
  out, first = [], 0
  while first < len(offsets) - 1:
    last = int(np.searchsorted(offsets, offsets[first] + CHUNK_TOKENS, "right")) - 1
    last = min(max(last, first + 1), first + CHUNK_DOCS)
    tokens = np.asarray(store.tokens(int(offsets[first]), int(offsets[last])))
    out.append(embed_tokens(tokens, offsets[first:last + 1] - offsets[first], dim))
    first = last
  return normalise(np.concatenate(out) if out else np.zeros((0, dim), np.float32))


def greedy_chain(emb: np.ndarray, start: int = 0) -> np.ndarray:
  """Exact greedy walk: from `start`, always to the most similar unvisited row -> int64 [n].

  emb: float32 [n, dim], unit rows. O(n^2) time and memory.
  """
  n = len(emb)
  if n == 0:
    return np.zeros(0, np.int64)
  sim = emb @ emb.T  # [n, n]
  order = np.empty(n, np.int64)
  cur = int(start)
  for i in range(n):
    order[i] = cur
    sim[:, cur] = -np.inf  # visited: never a target again
    if i + 1 < n:
      cur = int(np.argmax(sim[cur]))
  return order


def _simhash_order(emb: np.ndarray, seed: int) -> np.ndarray:
  """Rows sorted by a SimHash code read in Gray-code order, so that similar rows sit close."""
  planes = np.random.default_rng([seed, 77]).standard_normal((emb.shape[1], SIMHASH_BITS))
  bits = (emb @ planes > 0).astype(np.int64)  # [n, bits]
  gray = bits.copy()  # Gray -> binary: each bit xor all bits above it, so neighbouring codes
  for b in range(1, SIMHASH_BITS):  # (one bit apart) get neighbouring ranks
    gray[:, b] ^= gray[:, b - 1]
  code = gray @ (1 << np.arange(SIMHASH_BITS - 1, -1, -1, dtype=np.int64))
  return np.argsort(code, kind="stable")


def chain(emb: np.ndarray, *, exact_limit: int = EXACT_LIMIT, block: int = BLOCK,
          seed: int = 0) -> np.ndarray:
  """A visiting order in which each document is followed by its nearest unvisited neighbour
  -> int64 [n], a permutation.

  Up to `exact_limit` documents: the exact greedy chain from document 0. Beyond: documents are
  sorted by SimHash, cut into blocks of `block`, and each block is chained exactly, starting at
  the document nearest the previous block's last one (pairs split across blocks are missed).
  """
  n = len(emb)
  if n <= exact_limit:
    return greedy_chain(emb)
  t0 = time.perf_counter()
  sorted_rows = _simhash_order(emb, seed)
  out, last = [], None
  for lo in range(0, n, block):
    rows = sorted_rows[lo:lo + block]
    sub = emb[rows]
    start = 0 if last is None else int(np.argmax(sub @ emb[last]))
    order = rows[greedy_chain(sub, start)]
    out.append(order)
    last = int(order[-1])
  logging.info("neighbour chain of %d documents in blocks of %d: %.1fs", n, block,
               time.perf_counter() - t0)
  return np.concatenate(out)


def store_chain(store: Any, seed: int = 0) -> np.ndarray:
  """The neighbour chain of a token store's documents -> int64 [docs]."""
  return chain(embed_store(store), seed=seed)
