"""Training objectives: how one piece of a document becomes an Example of tokens and masks.

'causal' is next-token prediction; 'ul2' is UL2's mixture of denoisers for a decoder-only model
(R and X: spans replaced by sentinels and predicted after a bidirectional prefix; S: prefix-LM).
Conditioning prefixes (a control token chosen from a score, and MeCo's metadata line) are put
before the piece as context: they carry no loss. Numpy only; deterministic for a given rng.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from pretrainx.vocab import ByteVocabulary, num_sentinels, sentinel_id, special_id
from pretrainx.config import Denoiser, ObjectiveConfig
from pretrainx.config.data import MODE_TOKENS, OBJECTIVES


@dataclasses.dataclass(frozen=True)
class Example:
  """One piece made ready for the model.

  tokens: int32 [m], 2 <= m <= budget; model inputs are tokens[:-1], targets tokens[1:].
  loss_mask: int32 [m-1], 1 where targets[i] is trained on.
  prefix_mask: int32 [m-1], 1 where input i belongs to a bidirectional prefix (prefix-LM).
  """

  tokens: np.ndarray
  loss_mask: np.ndarray
  prefix_mask: np.ndarray


# -- conditioning prefixes ----------------------------------------------------------------------


def control_token(cfg: ObjectiveConfig, score: float | None) -> str | None:
  """The control token for a score (rule in ObjectiveConfig's docstring), or None."""
  if score is None or np.isnan(score):
    return None
  passed = [(t, name) for t, name in cfg.control_thresholds if score >= t]
  return max(passed)[1] if passed else cfg.control_default


def conditioning_prefix(vocab, cfg: ObjectiveConfig, *, metadata: str | None,
                        score: float | None, use_metadata: bool, use_control: bool) -> np.ndarray:
  """Control token (if any) then the metadata line (if any) -> int32 [p]; empty if neither."""
  parts = []
  token = control_token(cfg, score) if use_control else None
  if token is not None:
    parts.append(np.asarray([special_id(vocab, token)], np.int32))
  if use_metadata and metadata:
    parts.append(np.asarray(vocab.encode(cfg.metadata_template.format(metadata)), np.int32))
  return np.concatenate(parts) if parts else np.zeros(0, np.int32)


def conditioning_prefix_lengths(vocab, cfg: ObjectiveConfig, metadata: Sequence[str | None],
                                scores: np.ndarray | None, use_metadata: bool,
                                use_control: bool) -> np.ndarray:
  """len(conditioning_prefix(...)) of every document -> int64 [n], without building them.

  Control tokens are counted vectorised from the scores; for a ByteVocabulary the metadata line's
  length is its UTF-8 length (no encoding), other vocabularies encode each line.
  """
  n = len(metadata)
  scores = np.full(n, np.nan) if scores is None else np.asarray(scores, np.float64).reshape(-1)
  if len(scores) != n:
    raise ValueError(f"{len(scores)} scores for {n} documents; pass one score (NaN: none) each.")
  lengths = np.zeros(n, np.int64)
  if use_control:
    has = ~np.isnan(scores)
    if cfg.control_default is None:
      lowest = min((t for t, _ in cfg.control_thresholds), default=np.inf)
      has &= scores >= lowest
    if has.any():  # a missing extra id fails here, before the packing is planned
      for name in [tok for _, tok in cfg.control_thresholds] + [cfg.control_default]:
        if name is not None:
          special_id(vocab, name)
    lengths += has
  if use_metadata:
    template = cfg.metadata_template
    if isinstance(vocab, ByteVocabulary):
      size = lambda m: len(template.format(m).encode("utf-8")) if m else 0
    else:
      size = lambda m: len(vocab.encode(template.format(m))) if m else 0
    lengths += np.fromiter((size(m) for m in metadata), np.int64, count=n)
  return lengths


# -- causal -------------------------------------------------------------------------------------


def _as_tokens(x) -> np.ndarray:
  return np.zeros(0, np.int32) if x is None else np.asarray(x, np.int32).reshape(-1)


def causal_example(piece: np.ndarray, prefix: np.ndarray | None = None) -> Example:
  """prefix + piece; every target that is a piece token is trained (piece[0] from the last prefix
  token too), targets inside the prefix are not; no bidirectional prefix."""
  prefix = _as_tokens(prefix)
  tokens = np.concatenate([prefix, _as_tokens(piece)])
  if len(tokens) < 2:
    raise ValueError(f"an example needs >= 2 tokens, got prefix {len(prefix)} + piece "
                     f"{len(tokens) - len(prefix)}; pass longer pieces.")
  loss = (np.arange(1, len(tokens)) >= len(prefix)).astype(np.int32)
  return Example(tokens, loss, np.zeros(len(tokens) - 1, np.int32))


def _prefix_lm(head: np.ndarray, tail: np.ndarray) -> Example:
  """head (bidirectional, no loss) then tail (causal, every tail token trained)."""
  tokens = np.concatenate([head, tail]).astype(np.int32)
  inputs = np.arange(len(tokens) - 1)  # input i predicts tokens[i + 1]
  return Example(tokens, (inputs >= len(head) - 1).astype(np.int32),
                 (inputs < len(head)).astype(np.int32))


# -- span corruption ----------------------------------------------------------------------------


def span_counts(length: int, density: float, mean_span: float, max_spans: int) -> tuple[int, int]:
  """(noise tokens, noise spans) for a piece of `length` >= 2, as T5 counts them:
  noise = round(length * density) in [1, length - 1], spans = round(noise / mean_span) >= 1,
  and at most the clean tokens and `max_spans` (the sentinels there are)."""
  noise = min(max(round(length * density), 1), length - 1)
  spans = min(max(round(noise / mean_span), 1), noise, length - noise, max(max_spans, 1))
  return noise, spans


def _random_partition(total: int, parts: int, rng: np.random.Generator) -> np.ndarray:
  """`total` split into `parts` positive integers, uniformly over the compositions."""
  cuts = np.sort(rng.choice(total - 1, parts - 1, replace=False) + 1) if parts > 1 else []
  return np.diff(np.concatenate([[0], cuts, [total]])).astype(np.int64)


def random_spans(length: int, density: float, mean_span: float, max_spans: int,
                 rng: np.random.Generator) -> np.ndarray:
  """Noise mask bool [length]: span_counts' noise tokens cut into its number of spans, with the
  span lengths and the clean gaps between them drawn uniformly, as T5's random_spans_noise_mask.

  Unlike T5 (clean text first, a noise span last), the first and last gaps may be empty, so the
  end of a piece (a document's eos) is not always corrupted; the span count stays exact.
  """
  noise, spans = span_counts(length, density, mean_span, max_spans)
  noise_lengths = _random_partition(noise, spans, rng)  # [spans]
  gaps = _random_partition(length - noise + 2, spans + 1, rng)  # [spans + 1], all >= 1
  gaps[0] -= 1
  gaps[-1] -= 1  # outer gaps >= 0, inner gaps >= 1
  runs = np.empty(2 * spans + 1, np.int64)  # gap, span, gap, ..., span, gap
  runs[0::2], runs[1::2] = gaps, noise_lengths
  return np.repeat(np.arange(2 * spans + 1) % 2 == 1, runs)


def span_corrupt(raw: np.ndarray, noise: np.ndarray, vocab) -> tuple[np.ndarray, np.ndarray]:
  """raw int32 [n], noise bool [n] -> (inputs, targets), T5 style: in inputs each noise span is
  replaced by its sentinel (span k -> sentinel k); targets are sentinel k then span k's tokens,
  for every span in order."""
  raw, noise = np.asarray(raw, np.int32), np.asarray(noise, bool)
  is_start = noise & ~np.concatenate([[False], noise[:-1]])
  spans = int(is_start.sum())
  if spans:
    sentinel_id(vocab, spans - 1)  # enough sentinels, or a clear error
  sentinels = (vocab.vocab_size - 1 - (np.cumsum(is_start) - 1)).astype(np.int32)  # per position
  inputs = np.where(is_start, sentinels, raw)[~noise | is_start]
  targets = np.insert(raw[noise], np.flatnonzero(is_start[noise]), sentinels[is_start])
  return inputs.astype(np.int32), targets.astype(np.int32)


# -- UL2 ----------------------------------------------------------------------------------------


def _fit_length(available: int, room: int, d: Denoiser, max_spans: int) -> int:
  """The most raw tokens n <= available whose corrupted form fits: n + 2 * spans(n) <= room
  (one sentinel per span in the input and one in the targets); 0 if not even 2 fit."""
  cost = lambda n: n + 2 * span_counts(n, d.corruption_rate, d.mean_span, max_spans)[1]
  if available < 2 or cost(2) > room:
    return 0
  lo, hi = 2, available  # cost is strictly increasing in n: bisect for the last n that fits
  while lo < hi:
    mid = (lo + hi + 1) // 2
    lo, hi = (mid, hi) if cost(mid) <= room else (lo, mid - 1)
  return lo


def _check_vocab(vocab, cfg: ObjectiveConfig) -> None:
  """Clear errors for missing mode tokens or sentinels before any piece is drawn."""
  for d in cfg.denoisers:
    special_id(vocab, f"<|{d.mode}|>")
    if d.mode != "S":
      sentinel_id(vocab, 0)


def ul2_example(piece: np.ndarray, prefix: np.ndarray | None, *, budget: int,
                rng: np.random.Generator, vocab, cfg: ObjectiveConfig) -> Example:
  """A decoder-only UL2 example of at most `budget` tokens; the denoiser is drawn by weight.

  R/X: prefix [mode] corrupted piece | sentinel_0 span_0 sentinel_1 span_1 ... eos
  S:   prefix [mode] start of the piece | rest of the piece
  The part before '|' is the bidirectional prefix (prefix_mask 1, no loss); every token after
  it is a trained target. R/X use the most raw tokens of the piece that fit with their sentinels
  (the tail is dropped); a budget too small for that gives a causal example of the piece's start.
  """
  prefix, piece = _as_tokens(prefix), _as_tokens(piece)
  if len(piece) < 2 or budget < len(prefix) + 2:
    raise ValueError(f"ul2_example needs a piece of >= 2 tokens (got {len(piece)}) and budget >= "
                     f"prefix + 2 = {len(prefix) + 2} (got {budget}).")
  _check_vocab(vocab, cfg)
  weights = np.asarray([d.weight for d in cfg.denoisers], np.float64)
  d = cfg.denoisers[int(rng.choice(len(weights), p=weights / weights.sum()))]
  head = np.concatenate([prefix, [special_id(vocab, f"<|{d.mode}|>")]]).astype(np.int32)
  room = budget - len(head)  # tokens after the mode token
  if d.mode == "S":
    n = min(len(piece), room)
    if n >= 2:
      keep = min(max(round(n * (1 - d.corruption_rate)), 1), n - 1)
      return _prefix_lm(np.concatenate([head, piece[:keep]]), piece[keep:n])
  else:
    n = _fit_length(len(piece), room - 1, d, num_sentinels(vocab))  # -1: the closing eos
    if n >= 2:
      noise = random_spans(n, d.corruption_rate, d.mean_span, num_sentinels(vocab), rng)
      inputs, targets = span_corrupt(piece[:n], noise, vocab)
      return _prefix_lm(np.concatenate([head, inputs]),
                        np.concatenate([targets, [vocab.eos_id]]).astype(np.int32))
  return causal_example(piece[:budget - len(prefix)], prefix)


def _mode_position(tokens: np.ndarray, head_end: int, vocab) -> int:
  mode_ids = [special_id(vocab, t) for t in MODE_TOKENS]
  found = np.flatnonzero(np.isin(tokens[:head_end], mode_ids))
  if not found.size:
    raise ValueError("no UL2 mode token in the example's bidirectional prefix; not a UL2 example.")
  return int(found[0])


def ul2_reconstruct(example: Example, vocab, prefix_len: int | None = None) -> np.ndarray:
  """The raw piece tokens a UL2 example was made from (undoing the span corruption) -> int32.

  prefix_len: the conditioning prefix's length; None finds the mode token (control tokens are
  never mode tokens and metadata is text, so the first mode token in the prefix is it).
  """
  tokens = np.asarray(example.tokens)
  head_end = int(example.prefix_mask.sum())
  if not head_end:
    raise ValueError("the example has no bidirectional prefix: a causal example, not UL2.")
  start = _mode_position(tokens, head_end, vocab) if prefix_len is None else int(prefix_len)
  mode, body, tail = int(tokens[start]), tokens[start + 1:head_end], tokens[head_end:]
  if mode == special_id(vocab, "<|S|>"):
    return np.concatenate([body, tail]).astype(np.int32)
  if not len(tail) or tail[-1] != vocab.eos_id:
    raise ValueError("R/X UL2 targets must end with eos.")
  first_sentinel = vocab.vocab_size - num_sentinels(vocab)
  tail = tail[:-1]
  starts = np.flatnonzero(tail >= first_sentinel)
  if not starts.size or starts[0] != 0:
    raise ValueError("R/X UL2 targets must start with a sentinel.")
  spans = {int(tail[s]): tail[s + 1:e] for s, e in zip(starts, list(starts[1:]) + [len(tail)])}
  out = [spans.pop(t, None) if t >= first_sentinel else [t] for t in body.tolist()]
  if spans or any(o is None for o in out):
    raise ValueError("the sentinels of the input and of the targets do not pair up.")
  return np.concatenate(out).astype(np.int32) if out else np.zeros(0, np.int32)


def make_example(piece: np.ndarray, *, objective: str, prefix: np.ndarray | None, budget: int,
                 rng: np.random.Generator, vocab, cfg: ObjectiveConfig) -> Example:
  """Dispatch on `objective`: 'causal' (prefix + piece; `budget` unused) or 'ul2'."""
  if objective == "causal":
    return causal_example(piece, prefix)
  if objective == "ul2":
    return ul2_example(piece, prefix, budget=budget, rng=rng, vocab=vocab, cfg=cfg)
  raise ValueError(f"unknown objective {objective!r}; choose one of {OBJECTIVES}.")
