"""Training objectives: how one piece of a document becomes an Example of tokens and masks.

'causal' is next-token prediction; 'ul2' is UL2's mixture of denoisers for a decoder-only model
(R and X: spans replaced by sentinels and predicted after a bidirectional prefix; S: prefix-LM).
Conditioning prefixes (a control token chosen from a score, and MeCo's metadata line) are put
before the piece as context: they carry no loss.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from pretrainx.data.vocab import num_sentinels, sentinel_id, special_id

OBJECTIVES = ("causal", "ul2")
MODES = ("R", "S", "X")


@dataclasses.dataclass(frozen=True)
class Example:
  """tokens [m]: model inputs are tokens[:-1] and targets tokens[1:]; loss_mask [m-1] marks the
  targets trained on; prefix_mask [m-1] marks the inputs of a bidirectional prefix."""

  tokens: np.ndarray
  loss_mask: np.ndarray
  prefix_mask: np.ndarray


@dataclasses.dataclass(frozen=True)
class Denoiser:
  """One UL2 denoiser: mode 'R'/'X' corrupt spans (mean_span tokens long, corruption_rate of the
  piece); mode 'S' predicts the last corruption_rate of the piece from the rest."""

  mode: str = "R"
  mean_span: float = 3.0
  corruption_rate: float = 0.15
  weight: float = 1.0

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"Denoiser.mode={self.mode!r}; choose one of {MODES}.")
    if not 0 < self.corruption_rate < 1 or self.mean_span < 1 or self.weight < 0:
      raise ValueError(f"bad Denoiser {self}: need 0 < corruption_rate < 1, mean_span >= 1, "
                       "weight >= 0.")


# UL2's mixture (Tay et al. 2022): R = regular, S = sequential, X = extreme denoising.
UL2_DENOISERS = (
    Denoiser("R", 3, 0.15, 1.0), Denoiser("R", 8, 0.15, 1.0), Denoiser("S", 1, 0.25, 2.0),
    Denoiser("X", 3, 0.5, 0.5), Denoiser("X", 8, 0.5, 0.5), Denoiser("X", 64, 0.15, 0.5),
    Denoiser("X", 64, 0.5, 0.5))


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
  """Settings of the non-causal objectives and conditioning prefixes.

  Attributes:
    denoisers: the UL2 mixture, drawn by weight for every piece.
    metadata_template: the MeCo line put before a document, '{}' standing for its metadata.
    control_thresholds: ((threshold, token), ...): a document gets the token of the highest
      threshold <= its score, else `control_default`; a missing (NaN) score gets no token.
    control_default: the token for scores below every threshold.
  """

  denoisers: tuple[Denoiser, ...] = UL2_DENOISERS
  metadata_template: str = "URL: {}\n\n"
  control_thresholds: tuple[tuple[float, str], ...] = ((0.5, "<|good|>"),)
  control_default: str = "<|bad|>"

  def __post_init__(self):
    object.__setattr__(self, "denoisers", tuple(self.denoisers))
    object.__setattr__(self, "control_thresholds",
                       tuple(tuple(t) for t in self.control_thresholds))
    if not self.denoisers or sum(d.weight for d in self.denoisers) <= 0:
      raise ValueError("ObjectiveConfig.denoisers needs at least one denoiser of positive weight.")


# -- conditioning prefixes ----------------------------------------------------------------------


def control_token(cfg: ObjectiveConfig, score: float | None) -> str | None:
  if score is None or not math.isfinite(score):
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
                                scores: np.ndarray, *, use_metadata: bool, use_control: bool
                                ) -> np.ndarray:
  """len(conditioning_prefix(...)) of every document -> int64 [n]."""
  return np.asarray([
      len(conditioning_prefix(vocab, cfg, metadata=m, score=float(s), use_metadata=use_metadata,
                              use_control=use_control)) for m, s in zip(metadata, scores)],
      np.int64)


# -- examples -----------------------------------------------------------------------------------


def causal_example(piece: np.ndarray, prefix: np.ndarray | None = None) -> Example:
  """prefix + piece; every target that is a piece token is trained, prefix targets are not."""
  prefix = np.zeros(0, np.int32) if prefix is None else np.asarray(prefix, np.int32)
  tokens = np.concatenate([prefix, np.asarray(piece, np.int32)])
  loss = (np.arange(1, len(tokens)) >= len(prefix)).astype(np.int32)
  return Example(tokens, loss, np.zeros(len(tokens) - 1, np.int32))


def _random_partition(total: int, parts: int, rng: np.random.Generator) -> np.ndarray:
  """`total` split into `parts` positive integers, uniformly over compositions."""
  cuts = np.sort(rng.choice(total - 1, parts - 1, replace=False) + 1) if parts > 1 else []
  return np.diff(np.concatenate([[0], cuts, [total]])).astype(np.int64)


def random_spans(length: int, density: float, mean_span: float, max_spans: int,
                 rng: np.random.Generator) -> np.ndarray:
  """Noise mask [length] bool of spans (T5's scheme): about density * length noise tokens in
  about that / mean_span spans, each preceded by clean text; at most `max_spans` spans."""
  noise = int(np.clip(round(length * density), 1, length - 1))
  spans = int(np.clip(round(noise / mean_span), 1, min(noise, length - noise, max_spans)))
  noise_lengths = _random_partition(noise, spans, rng)
  clean_lengths = _random_partition(length - noise, spans, rng)
  mask = np.zeros(length, bool)
  pos = 0
  for c, n in zip(clean_lengths, noise_lengths):
    pos += c
    mask[pos:pos + n] = True
    pos += n
  return mask


def _spans_needed(n: int, d: Denoiser, max_spans: int) -> int:
  noise = int(np.clip(round(n * d.corruption_rate), 1, n - 1))
  return int(np.clip(round(noise / d.mean_span), 1, min(noise, n - noise, max_spans)))


def ul2_example(piece: np.ndarray, prefix: np.ndarray | None, *, budget: int,
                rng: np.random.Generator, vocab, cfg: ObjectiveConfig) -> Example:
  """A decoder-only UL2 example of at most `budget` tokens.

  R/X: prefix + [mode] + piece with each span replaced by a sentinel | sentinel_0 span_0 ... eos.
  S:   prefix + [mode] + the start of the piece | the rest of the piece.
  The part before '|' is a bidirectional prefix without loss; the part after is the target.
  Raw tokens that do not fit next to the sentinels are left out (the piece's tail).
  """
  prefix = np.zeros(0, np.int32) if prefix is None else np.asarray(prefix, np.int32)
  piece = np.asarray(piece, np.int32)
  weights = np.asarray([d.weight for d in cfg.denoisers], np.float64)
  d = cfg.denoisers[int(rng.choice(len(weights), p=weights / weights.sum()))]
  mode = special_id(vocab, f"<|{d.mode}|>")
  room = budget - len(prefix) - 1  # after the mode token
  if d.mode == "S":
    n = min(len(piece), room)
    if n < 2:
      return causal_example(piece[:max(budget - len(prefix), 2)], prefix)
    keep = int(np.clip(round(n * (1 - d.corruption_rate)), 1, n - 1))
    head = np.concatenate([prefix, [mode], piece[:keep]]).astype(np.int32)
    return _prefix_lm(head, piece[keep:n])
  max_spans = num_sentinels(vocab)
  if max_spans < 1:
    sentinel_id(vocab, 0)  # raises the clear error
  n = min(len(piece), room - 1)  # -1: the closing eos
  while n >= 2 and n + 2 * _spans_needed(n, d, max_spans) > room - 1:
    n -= max(1, (n + 2 * _spans_needed(n, d, max_spans) - room + 1) // 3)
  if n < 2:
    return causal_example(piece[:max(budget - len(prefix), 2)], prefix)
  raw = piece[:n]
  noise = random_spans(n, d.corruption_rate, d.mean_span, max_spans, rng)
  is_start = noise & ~np.concatenate([[False], noise[:-1]])
  span_no = np.cumsum(is_start) - 1  # span index of each noise token
  inputs, targets = [], []
  for i in range(n):
    if not noise[i]:
      inputs.append(raw[i])
    elif is_start[i]:
      inputs.append(sentinel_id(vocab, int(span_no[i])))
      targets += [sentinel_id(vocab, int(span_no[i])), raw[i]]
    else:
      targets.append(raw[i])
  head = np.concatenate([prefix, [mode], inputs]).astype(np.int32)
  return _prefix_lm(head, np.asarray(targets + [vocab.eos_id], np.int32))


def _prefix_lm(head: np.ndarray, tail: np.ndarray) -> Example:
  """head (bidirectional, no loss) then tail (causal, trained)."""
  tokens = np.concatenate([head, tail]).astype(np.int32)
  inputs = np.arange(len(tokens) - 1)
  return Example(tokens, (inputs >= len(head) - 1).astype(np.int32),
                 (inputs < len(head)).astype(np.int32))


def ul2_reconstruct(example: Example, vocab, prefix_len: int = 0) -> np.ndarray:
  """The raw tokens a UL2 example was made from (undoing the span corruption)."""
  tokens = example.tokens
  head_end = int(example.prefix_mask.sum())
  mode = int(tokens[prefix_len])
  body, tail = tokens[prefix_len + 1:head_end], tokens[head_end:]
  if mode == special_id(vocab, "<|S|>"):
    return np.concatenate([body, tail]).astype(np.int32)
  first_sentinel = vocab.vocab_size - num_sentinels(vocab)
  spans: dict[int, list[int]] = {}
  current = None
  for t in tail[:-1].tolist():  # the last token is eos
    if t >= first_sentinel:
      current = vocab.vocab_size - 1 - t
      spans[current] = []
    else:
      spans[current].append(t)
  out = []
  for t in body.tolist():
    out.extend(spans[vocab.vocab_size - 1 - t] if t >= first_sentinel else [t])
  return np.asarray(out, np.int32)


def make_example(piece: np.ndarray, *, objective: str, prefix: np.ndarray | None, budget: int,
                 rng: np.random.Generator, vocab, cfg: ObjectiveConfig) -> Example:
  if objective == "causal":
    return causal_example(piece, prefix)
  if objective == "ul2":
    return ul2_example(piece, prefix, budget=budget, rng=rng, vocab=vocab, cfg=cfg)
  raise ValueError(f"unknown objective {objective!r}; choose one of {OBJECTIVES}.")
