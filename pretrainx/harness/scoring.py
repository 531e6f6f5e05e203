"""Log-probabilities of token sequences under a model, packed into rows and sharded over devices.

A request is (context ids, continuation ids): the continuation's tokens are scored given
everything before them, truncated from the left to the row length as lm-eval's `hf` backend does.
Requests are packed first-fit into rows of `seq_len` positions with segment ids (packed documents
never attend to each other), rows go to the devices in batches sharded over the mesh's data axes,
and each request gets back its continuation's per-token log-probs and whether each token was the
argmax. lm-eval's requests and `pretrainx score` both go through `TokenScorer`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pretrainx.model import context_parallel
from pretrainx.sharding import axes_size


@dataclasses.dataclass(frozen=True)
class Scored:
  """A request's continuation: log p of each token [n] and whether it was the argmax [n]."""

  logprobs: np.ndarray
  greedy: np.ndarray

  @property
  def total(self) -> float:
    return float(self.logprobs.astype(np.float64).sum())


def rolling_windows(tokens: Sequence[int], prefix: int, seq_len: int
                    ) -> list[tuple[list[int], list[int]]]:
  """(context, continuation) windows that score every token of a long document once.

  The first window predicts the first seq_len tokens from `prefix` (e.g. eos); each next window
  predicts the following seq_len tokens with as much preceding text as fits. The same windows
  as lm-eval's `get_rolling_token_windows(..., context_len=1)` made disjoint.
  """
  tokens = list(tokens)
  out, done = [], 0
  while done < len(tokens):
    stop = min(len(tokens), done + seq_len)
    context = [prefix] if done == 0 else tokens[stop - seq_len - 1:done]  # fills the row
    out.append((context, tokens[done:stop]))
    done = stop
  return out


def _pack(lengths: Sequence[int], seq_len: int) -> list[list[int]]:
  """Request indices per row, first-fit by decreasing length (every length <= seq_len)."""
  rows: list[list[int]] = []
  free: list[int] = []
  for i in sorted(range(len(lengths)), key=lambda j: -lengths[j]):
    for r, room in enumerate(free):
      if room >= lengths[i]:
        rows[r].append(i)
        free[r] -= lengths[i]
        break
    else:
      rows.append([i])
      free.append(seq_len - lengths[i])
  return rows


class TokenScorer:
  """Scores requests with `model` and `params` (already placed on the mesh, if any).

  seq_len: positions per row; batch_rows: rows per device batch (a multiple of the data-parallel
  devices); sharding: where a [rows, seq_len] batch goes (None: the default device); scope: the
  context in which the model's logical constraints resolve (a Runtime's `scope`).
  """

  def __init__(self, model, params: Any, seq_len: int, batch_rows: int,
               sharding: jax.sharding.Sharding | None = None,
               scope: Callable[[], Any] | None = None):
    if seq_len > model.cfg.max_seq_len:
      raise ValueError(f"scoring rows of {seq_len} positions exceed the model's max_seq_len="
                       f"{model.cfg.max_seq_len}; lower the harness max_length "
                       "(--harness_max_length, HarnessConfig.max_length).")
    self.model, self.params, self.seq_len, self.batch_rows = model, params, seq_len, batch_rows
    self.sharding, self.scope = sharding, scope or contextlib.nullcontext
    # Rows split over a context axis must be a multiple of its chunks (context_parallel).
    self.row_multiple = 1
    if isinstance(sharding, jax.sharding.NamedSharding) and len(sharding.spec) > 1:
      context = axes_size(sharding.mesh, sharding.spec[1])
      self.row_multiple = context_parallel.seq_multiple(
          context, getattr(model.cfg, "context_load_balance", True))
    self._fn = jax.jit(self._score_rows)

  def _score_rows(self, params, tokens, targets, positions, segments):
    """[rows, seq] ids -> (log p of each target, target == argmax), both [rows, seq]."""
    logits = self.model.apply({"params": params}, tokens, positions, segments)  # fp32
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return picked, jnp.argmax(logits, axis=-1) == targets

  def _put(self, x: np.ndarray) -> jax.Array:
    if self.sharding is None:
      return jnp.asarray(x)
    # Every host holds the whole batch; each device takes its rows.
    return jax.make_array_from_callback(x.shape, self.sharding, lambda idx: x[idx])

  def _get(self, x: jax.Array) -> np.ndarray:
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)

  def score(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[Scored]:
    """Each (context ids, continuation ids) -> the continuation's Scored; the context may be
    empty only if the continuation's first token needs no prediction (it is then not scored)."""
    seqs = []  # (inputs, targets, number of scored targets at the end)
    for context, continuation in requests:
      whole = (list(context) + list(continuation))[-(self.seq_len + 1):]
      if len(continuation) == 0 or len(whole) < 2:
        seqs.append(([], [], 0))
        continue
      scored = min(len(continuation), len(whole) - 1)
      seqs.append((whole[:-1], whole[1:], scored))
    lengths = [len(s[0]) for s in seqs if s[2]]
    # Rows as short as the longest request allows (a power of two, so few shapes compile):
    # short requests then pay for no attention over empty positions.
    row_len = min(self.seq_len, max(16, 1 << (max(lengths, default=1) - 1).bit_length()))
    row_len = min(self.seq_len, -(-row_len // self.row_multiple) * self.row_multiple)
    rows = _pack(lengths, row_len)
    index = [i for i, s in enumerate(seqs) if s[2]]  # packable -> request
    rows = [[index[j] for j in row] for row in rows]
    results: list[Scored | None] = [None] * len(seqs)
    for i, s in enumerate(seqs):
      if not s[2]:
        results[i] = Scored(np.zeros(0, np.float32), np.zeros(0, bool))
    with self.scope():
      for start in range(0, len(rows), self.batch_rows):
        self._score_batch(rows[start:start + self.batch_rows], row_len, seqs, results)
    return results  # type: ignore[return-value]

  def _score_batch(self, rows: list[list[int]], row_len: int, seqs, results) -> None:
    shape = (self.batch_rows, row_len)
    tokens, targets = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
    positions, segments = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
    where = {}
    for r, row in enumerate(rows):
      at = 0
      for k, i in enumerate(row):
        inputs, target, _ = seqs[i]
        n = len(inputs)
        tokens[r, at:at + n], targets[r, at:at + n] = inputs, target
        positions[r, at:at + n], segments[r, at:at + n] = np.arange(n), k + 1
        where[i] = (r, at, n)
        at += n
    logp, greedy = self._fn(self.params, *(self._put(x) for x in
                                           (tokens, targets, positions, segments)))
    logp, greedy = self._get(logp), self._get(greedy)
    for i, (r, at, n) in where.items():
      scored = seqs[i][2]
      results[i] = Scored(logp[r, at + n - scored:at + n].copy(),
                          greedy[r, at + n - scored:at + n].copy())
