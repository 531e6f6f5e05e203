"""Which documents of a domain one epoch of a stage trains on, and in what order, by their scores.

`epoch_documents` applies a Selection (pretrainx.config.data) to a domain's per-document scores:
bounds, a per-epoch Bernoulli draw, the top (or a Gumbel top-k sample of a) fraction, then a
shuffle or a score order, repeated. Pure numpy, a function of (seed, domain, stage, epoch) only.
"""

from __future__ import annotations

import numpy as np

from pretrainx.config.data import Selection

_STREAM = 21  # keeps these draws apart from the packing shuffles of the same (seed, domain, epoch)


class SelectionError(ValueError):
  """A Selection that keeps no documents (or too few tokens) of a domain."""


def describe(sel: Selection) -> str:
  """The selection's non-default settings, for messages: Selection(score='q', min_score=0.5)."""
  default = Selection()
  fields = [f"{k}={getattr(sel, k)!r}" for k in ("score", "version", "min_score", "max_score",
                                                "sample", "top_fraction", "lowest",
                                                "temperature", "order", "repeat", "upsample",
                                                "upsample_min_score")
            if k == "score" or getattr(sel, k) != getattr(default, k)]
  return f"Selection({', '.join(fields)})"


def _no_documents(sel: Selection, scores: np.ndarray, domain: str) -> SelectionError:
  finite = scores[~np.isnan(scores)]
  if not len(finite):
    return SelectionError(
        f"{describe(sel)} keeps no documents of domain {domain!r}: none of its "
        f"{len(scores)} documents has a {sel.score!r} score (all NaN); score the store first "
        "(`python -m pretrainx score ...`) or drop the filter.")
  if sel.sample and finite.max() <= 0:
    hint = "`sample` keeps a document with probability clip(score, 0, 1): use scores in (0, 1]"
  else:
    hint = "lower min_score or raise max_score" + (" or set sample=False" if sel.sample else "")
  return SelectionError(
      f"{describe(sel)} keeps no documents of domain {domain!r} (scores range "
      f"{finite.min():.4g}..{finite.max():.4g}); {hint}.")


def kept_documents(sel: Selection, scores: np.ndarray, rng: np.random.Generator,
                   domain: str = "") -> np.ndarray:
  """Ids of the documents the filters keep -> int64 [kept], ascending; SelectionError if none."""
  scores = np.asarray(scores, np.float32)  # [docs]
  keep = np.ones(len(scores), bool)
  if sel.filters:
    keep &= ~np.isnan(scores)
  if sel.min_score is not None:
    keep &= scores >= sel.min_score
  if sel.max_score is not None:
    keep &= scores <= sel.max_score
  if sel.sample:
    keep &= rng.random(len(scores)) < np.clip(np.nan_to_num(scores, nan=0.0), 0.0, 1.0)
  kept = np.flatnonzero(keep)
  if sel.top_fraction is not None and len(kept):
    kept = np.sort(kept[_top(sel, scores[kept].astype(np.float64), rng)])
  if not len(kept):
    raise _no_documents(sel, scores, domain)
  return kept


def _top(sel: Selection, scores: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Positions of the top_fraction highest (lowest) scores; with a temperature, a draw without
  replacement with probability proportional to exp(score / temperature) (Gumbel top-k)."""
  k = max(1, int(sel.top_fraction * len(scores) + 0.5))  # rounded half up
  key = -scores if sel.lowest else scores
  if sel.temperature is not None:
    key = key / sel.temperature + rng.gumbel(size=len(scores))
  ties = rng.random(len(scores))  # equal scores are chosen at random, not by position
  return np.lexsort((ties, -key))[:k]


def _one_pass(sel: Selection, scores: np.ndarray, kept: np.ndarray, rng: np.random.Generator,
              rank: np.ndarray | None) -> np.ndarray:
  """The kept documents in one pass's order: shuffled (or in `rank` order), or by score with
  ties shuffled; documents without a score come last in a score order."""
  if sel.upsample > 1:  # extra copies of the documents scored >= upsample_min_score
    high = kept[np.nan_to_num(scores[kept], nan=-np.inf) >= sel.upsample_min_score]
    kept = np.concatenate([kept] + [high] * (sel.upsample - 1))
  if sel.order == "shuffle":
    if rank is not None:
      return kept[np.argsort(rank[kept], kind="stable")]
    return rng.permutation(kept)
  perm = rng.permutation(kept)
  key = scores[perm] if sel.order == "ascending" else -scores[perm]
  return perm[np.argsort(key, kind="stable")]  # NaN sorts last


def epoch_documents(sel: Selection, scores: np.ndarray, *, seed: int, domain_index: int,
                    stage_index: int, epoch: int, domain: str = "",
                    rank: np.ndarray | None = None) -> np.ndarray:
  """Document ids in the training order of one epoch -> int64 [kept * repeat].

  The filters' draws (`sample`, Gumbel top-k, ties) are made again every epoch; each of the
  `repeat` passes over the kept documents gets its own order (a score order sorts every pass).
  `rank` (int64 [docs], e.g. each document's place in the neighbour chain) replaces the shuffle
  of order='shuffle'.
  """
  scores = np.asarray(scores, np.float32)
  rng = np.random.default_rng([int(seed), int(domain_index), int(stage_index), int(epoch),
                               _STREAM])
  kept = kept_documents(sel, scores, rng, domain)
  return np.concatenate([_one_pass(sel, scores, kept, rng, rank) for _ in range(sel.repeat)])


def document_weights(sel: Selection | None, scores: np.ndarray) -> np.ndarray:
  """Per-document loss weights -> float32 [docs]: the score with `loss_weight` (NaN: 1), else 1."""
  scores = np.asarray(scores, np.float32)
  if sel is None or not sel.loss_weight:
    return np.ones(len(scores), np.float32)
  return np.where(np.isnan(scores), np.float32(1), scores).astype(np.float32)
