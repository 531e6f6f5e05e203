"""Packed rows of one domain: documents cut into pieces and packed into rows of `seq_len` positions.

Each epoch is a fresh shuffle of the domain's documents, and then of the rows they pack into, by
(seed, domain, epoch); a stage's Selection (pretrainx.data.selection) may instead choose, order
and repeat them by score, and packing_order 'neighbours' packs each document beside its nearest
neighbours (pretrainx.data.neighbours). A document of n
tokens (its eos included) gives n - 1 (input, target) positions; 'pack' cuts it into pieces of at
most seq_len positions (less a conditioning prefix) and packs whole pieces into rows first-come,
padding the rest of a row; 'concat' lays the documents end to end and cuts rows at every seq_len,
leaving no padding. Either way every token is an input exactly once per epoch, pieces in one row
get their own `segment_ids`, and `positions` restart at every piece (with cross-document
attention a row is one segment, its positions running through it). Row r of epoch e is computed
from a layout of the whole epoch, so any row can be read at random.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from pretrainx.data import neighbours
from pretrainx.data import objectives as obj
from pretrainx.data import selection as select
from pretrainx.data.teacher_cache import filler as teacher_filler
from pretrainx.config import Stage
from pretrainx.config.data import PACKING_MODES, PACKING_ORDERS, Selection

ROW_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask", "prefix_mask")
# A cached teacher's top-k in a row: ids int32 [seq, k], log-probs float32 [seq, k] (temperature
# 1, most likely first), the log-prob of each target float32 [seq] (train/distill_loss).
TEACHER_KEYS = ("teacher_ids", "teacher_logprobs", "teacher_target_logprob")


@dataclasses.dataclass(frozen=True)
class EpochLayout:
  """Pieces of one epoch, in row order. Piece k: tokens [start, start + length] of document doc
  (length positions, length + 1 tokens) after a prefix of prefix_len tokens; row r holds pieces
  first[r] .. first[r+1] - 1."""

  doc: np.ndarray         # int64 [pieces]
  start: np.ndarray       # int64 [pieces]
  length: np.ndarray      # int64 [pieces] positions taken from the document
  prefix_len: np.ndarray  # int64 [pieces]
  first: np.ndarray       # int64 [rows + 1]

  @property
  def num_rows(self) -> int:
    return len(self.first) - 1


@dataclasses.dataclass(frozen=True)
class View:
  """How a stage reads a domain: its conditioning prefixes and its Selection (with one, the
  stage's index too: each stage's curriculum has its own epochs)."""

  metadata: bool = False
  control: bool = False
  selection: Selection | None = None
  stage_index: int = 0


def stage_view(stage: Stage, stage_index: int, domain: str) -> View:
  sel = stage.selection_for(domain)
  return View(stage.metadata_prefix, stage.control_tokens, sel, stage_index if sel else 0)


def _as_view(view: View | tuple[bool, bool]) -> View:
  return view if isinstance(view, View) else View(*view)


def _next_fit(width: np.ndarray, seq_len: int) -> np.ndarray:
  """Row of each piece when pieces fill rows in order, a piece that does not fit opening a row."""
  row = np.empty(len(width), np.int64)
  r, fill = 0, 0
  for i, w in enumerate(width.tolist()):
    if fill + w > seq_len:
      r, fill = r + 1, 0
    row[i], fill = r, fill + w
  return row


def pack_layout(lengths: np.ndarray, order: np.ndarray, seq_len: int,
                prefix_len: np.ndarray | None = None) -> EpochLayout:
  """'pack': documents (token counts `lengths`, visited in `order`) cut into pieces of at most
  seq_len - prefix positions, then packed whole into rows."""
  positions = lengths[order] - 1
  prefix = np.zeros_like(positions) if prefix_len is None else prefix_len[order]
  per_piece = seq_len - prefix
  pieces = np.where(positions > 0, -(-positions // per_piece), 0)
  doc = np.repeat(order, pieces)
  piece_no = np.arange(pieces.sum()) - np.repeat(np.cumsum(pieces) - pieces, pieces)
  start = piece_no * np.repeat(per_piece, pieces)
  length = np.minimum(np.repeat(per_piece, pieces), np.repeat(positions, pieces) - start)
  pre = np.repeat(prefix, pieces)
  row = _next_fit(length + pre, seq_len)
  num_rows = int(row[-1]) + 1 if len(row) else 0
  first = np.searchsorted(row, np.arange(num_rows + 1))
  return EpochLayout(doc, start, length, pre, first)


def concat_layout(lengths: np.ndarray, order: np.ndarray, seq_len: int) -> EpochLayout:
  """'concat': documents end to end, cut at every seq_len positions; the last partial row is
  dropped."""
  positions = lengths[order] - 1
  doc_start = np.concatenate([[0], np.cumsum(positions)])  # stream offset of each document
  num_rows = int(doc_start[-1]) // seq_len
  end = num_rows * seq_len
  cuts = np.union1d(doc_start[doc_start < end], np.arange(0, end, seq_len))
  piece_end = np.append(cuts[1:], end)
  keep = piece_end > cuts
  cuts, piece_end = cuts[keep], piece_end[keep]
  which = np.searchsorted(doc_start, cuts, side="right") - 1
  first = np.searchsorted(cuts // seq_len, np.arange(num_rows + 1))
  return EpochLayout(order[which], cuts - doc_start[which], piece_end - cuts,
                     np.zeros(len(cuts), np.int64), first)


class DomainRows:
  """Random access to the packed rows of one domain's token store, over as many epochs as read.

  Args:
    store: a TokenStore (doc_offsets, doc_lengths, tokens(), metadata_all(), scores, score()).
    seq_len: positions per row.
    seed, domain_index: the shuffle of epoch e depends on (seed, domain_index, e).
    mode: 'pack' or 'concat'.
    shuffle: False keeps the stored document order (evaluation).
    vocab, objective_cfg: for conditioning prefixes and UL2 sentinels.
    packing_order: 'shuffle', or 'neighbours' (the neighbour chain, rotated by the seed each
      epoch; rows are still shuffled).
    cross_document_attention: every row is one segment, its positions counting 0..n-1.
    name: the domain's name, for messages and Stage.selection_for.
    packing_key: extra integers in every shuffle's seed: a stage that repacks at another
      seq_len (config.phases) gives its start step, so it does not replay the first packing's
      document order.
    teacher_cache: a teacher cache of the store (data/teacher_cache.py: read(start, stop) ->
      ids [n, k], log-probs [n, k], target log-probs [n]): rows then carry TEACHER_KEYS, the
      first `teacher_k` of its top-k at every input (a one-hot filler on padding).
    teacher_k: how many of the cache's tokens rows carry (0: all).
  """

  def __init__(self, store: Any, *, seq_len: int, seed: int = 0, domain_index: int = 0,
               mode: str = "pack", shuffle: bool = True, vocab: Any = None,
               objective_cfg: obj.ObjectiveConfig | None = None, packing_order: str = "shuffle",
               cross_document_attention: bool = False, name: str = "",
               packing_key: tuple[int, ...] = (), teacher_cache: Any = None,
               teacher_k: int = 0):
    if mode not in PACKING_MODES:
      raise ValueError(f"packing mode {mode!r}; choose one of {PACKING_MODES}.")
    if packing_order not in PACKING_ORDERS:
      raise ValueError(f"packing order {packing_order!r}; choose one of {PACKING_ORDERS}.")
    self.store, self.seq_len, self.mode, self.shuffle = store, int(seq_len), mode, shuffle
    self.seed, self.domain_index, self.name = int(seed), int(domain_index), name
    self.packing_key = tuple(int(k) for k in packing_key)
    self.vocab, self.cfg = vocab, objective_cfg or obj.ObjectiveConfig()
    self.packing_order, self.cross = packing_order, bool(cross_document_attention)
    self.lengths = np.asarray(store.doc_lengths, np.int64)
    self.offsets = np.asarray(store.doc_offsets, np.int64)
    if int((self.lengths - 1).clip(0).sum()) < self.seq_len:
      raise ValueError(f"token store {getattr(store, 'path', '')} holds "
                       f"{int(self.lengths.sum())} tokens, not enough for one row of "
                       f"seq_len={seq_len}; add data or lower RunConfig.seq_len.")
    self._rows_per_epoch: dict[tuple, int] = {}
    self._layouts: dict[tuple, EpochLayout] = {}  # a few recent epochs, oldest dropped first
    self._prefixes: dict[tuple, np.ndarray] = {}
    self._row_orders: dict[tuple, np.ndarray] = {}
    self._scores: dict[tuple, np.ndarray] = {}
    self._chain: np.ndarray | None = None
    self.teacher_cache = teacher_cache
    if teacher_cache is not None:
      teacher_k = min(teacher_k or teacher_cache.k, teacher_cache.k)
    self.teacher_k = teacher_k

  # -- document orders --------------------------------------------------------------------------

  def _order(self, epoch: int) -> np.ndarray:
    n = len(self.lengths)
    if not self.shuffle:
      return np.arange(n)
    if self.packing_order == "neighbours":
      return self._neighbour_order(epoch)
    return np.random.default_rng([self.seed, self.domain_index, epoch, *self.packing_key]
                                 ).permutation(n)

  def _neighbour_order(self, epoch: int) -> np.ndarray:
    """The neighbour chain, started at a place drawn from (seed, domain, epoch)."""
    if self._chain is None:
      self._chain = neighbours.store_chain(self.store, self.seed)
    shift = np.random.default_rng([self.seed, self.domain_index, epoch, 3, *self.packing_key]
                                  ).integers(
        len(self._chain))
    return np.roll(self._chain, -int(shift))

  def scores(self, sel: Selection) -> np.ndarray:
    """float32 [docs]: the selection's score of every document (ScoreSetError if not held)."""
    key = (sel.score, sel.version)
    if key not in self._scores:
      if hasattr(self.store, "score"):
        values = self.store.score(sel.score, sel.version)
      elif sel.score == "length":
        values = self.lengths
      elif sel.score == "source":  # a store without score sets
        values = self.store.scores
      else:
        raise select.SelectionError(f"the store of domain {self.name!r} holds no score sets; "
                                    f"Selection.score={sel.score!r} cannot be read.")
      self._scores[key] = np.asarray(values, np.float32)
    return self._scores[key]

  def _weights(self, sel: Selection | None) -> np.ndarray | None:
    """float32 [docs] loss weights of a selection with loss_weight, else None (all 1)."""
    if sel is None or not sel.loss_weight:
      return None
    key = ("weights", sel.score, sel.version)
    if key not in self._scores:
      self._scores[key] = select.document_weights(sel, self.scores(sel))
    return self._scores[key]

  def _selected_order(self, epoch: int, view: View) -> np.ndarray:
    rank = None
    if self.packing_order == "neighbours" and view.selection.order == "shuffle":
      rank = np.empty(len(self.lengths), np.int64)
      rank[self._neighbour_order(epoch)] = np.arange(len(self.lengths))
    return select.epoch_documents(view.selection, self.scores(view.selection), seed=self.seed,
                                  domain_index=self.domain_index, stage_index=view.stage_index,
                                  epoch=epoch, domain=self.name, rank=rank)

  # -- layouts ----------------------------------------------------------------------------------

  def _prefix_lengths(self, use_metadata: bool, use_control: bool) -> np.ndarray:
    key = (use_metadata, use_control)
    if key not in self._prefixes:
      lengths = obj.conditioning_prefix_lengths(
          self.vocab, self.cfg, self.store.metadata_all(), np.asarray(self.store.scores),
          use_metadata=use_metadata, use_control=use_control)
      self._prefixes[key] = np.minimum(np.asarray(lengths, np.int64), self.max_prefix)
    return self._prefixes[key]

  @property
  def max_prefix(self) -> int:
    """Conditioning prefixes are cut to a quarter of a row so that text always fits."""
    return self.seq_len // 4

  def layout(self, epoch: int, view: View | tuple[bool, bool] = View()) -> EpochLayout:
    view = _as_view(view)
    key = (epoch, view)
    if key not in self._layouts:
      order = self._order(epoch) if view.selection is None else self._selected_order(epoch, view)
      if self.mode == "concat":
        lay = concat_layout(self.lengths, order, self.seq_len)
      else:
        prefix = (self._prefix_lengths(view.metadata, view.control)
                  if view.metadata or view.control else None)
        lay = pack_layout(self.lengths, order, self.seq_len, prefix)
      if view.selection is not None and lay.num_rows == 0:
        raise select.SelectionError(
            f"{select.describe(view.selection)} keeps {len(np.unique(order))} documents of "
            f"domain {self.name!r} ({int(self.lengths[order].sum())} tokens), not enough for "
            f"one row of seq_len={self.seq_len}; keep more documents.")
      if len(self._layouts) >= 4:
        self._layouts.pop(next(iter(self._layouts)))
      self._layouts[key] = lay
    return self._layouts[key]

  def _row_order(self, epoch: int, num_rows: int, view: View) -> np.ndarray:
    key = (epoch, num_rows, view)
    if key not in self._row_orders:
      if len(self._row_orders) >= 4:
        self._row_orders.pop(next(iter(self._row_orders)))
      stream = [1] if view.selection is None else [1, view.stage_index + 1]
      rng = np.random.default_rng([self.seed, self.domain_index, epoch, *stream,
                                   *self.packing_key])
      self._row_orders[key] = rng.permutation(num_rows)
    return self._row_orders[key]

  def rows_in_epoch(self, epoch: int, view: View | tuple[bool, bool] = View()) -> int:
    key = (epoch, _as_view(view))
    if key not in self._rows_per_epoch:
      self._rows_per_epoch[key] = self.layout(epoch, key[1]).num_rows
    return self._rows_per_epoch[key]

  def locate(self, index: int, view: View | tuple[bool, bool] = View()) -> tuple[int, int]:
    """Row index of this domain (counted from the view's start) -> (epoch, row in the epoch)."""
    epoch = 0
    while index >= (n := self.rows_in_epoch(epoch, view)):
      index, epoch = index - n, epoch + 1
    return epoch, index

  # -- rows -------------------------------------------------------------------------------------

  def row(self, index: int, stage: Stage = Stage(), stage_index: int = 0
          ) -> dict[str, np.ndarray]:
    """The domain's row `index` under `stage` (the stage_index-th stage): counted across epochs,
    from the stage's start when the stage has a Selection for this domain. Holds ROW_KEYS
    (int32 [seq_len]) and `loss_weight` (float32 [seq_len], 0 on padding)."""
    view = stage_view(stage, stage_index, self.name)
    if self.mode == "concat" and (view.metadata or view.control or stage.objective != "causal"):
      raise ValueError("DataConfig.packing='concat' supports the causal objective without "
                       "prefixes only; use packing='pack' for UL2, metadata or control tokens.")
    epoch, r = self.locate(int(index), view)
    lay = self.layout(epoch, view)
    curriculum = view.selection is not None and view.selection.order != "shuffle"
    if self.shuffle and not curriculum:  # rows shuffled too: a batch never holds a document's run
      r = int(self._row_order(epoch, lay.num_rows, view)[r])
    out = {k: np.zeros(self.seq_len, np.int32) for k in ROW_KEYS}
    out["loss_weight"] = np.zeros(self.seq_len, np.float32)
    weights = self._weights(view.selection)
    if self.teacher_cache is not None:  # padding: a one-hot that the loss mask leaves out
      out.update(zip(TEACHER_KEYS, teacher_filler(self.seq_len, self.teacher_k)))
    fill = 0
    for seg, k in enumerate(range(lay.first[r], lay.first[r + 1]), start=1):
      example = self._example(lay, k, epoch, stage)
      m = len(example.tokens) - 1
      span = slice(fill, fill + m)
      if self.teacher_cache is not None:  # the cache's entries of the piece's inputs
        base = int(self.offsets[int(lay.doc[k])]) + int(lay.start[k])
        ids, logprobs, target = self.teacher_cache.read(base, base + m)
        out["teacher_ids"][span] = ids[:, :self.teacher_k]
        out["teacher_logprobs"][span] = logprobs[:, :self.teacher_k]
        out["teacher_target_logprob"][span] = target
      out["inputs"][span], out["targets"][span] = example.tokens[:-1], example.tokens[1:]
      out["loss_mask"][span], out["prefix_mask"][span] = example.loss_mask, example.prefix_mask
      out["segment_ids"][span], out["positions"][span] = seg, np.arange(m)
      out["loss_weight"][span] = 1.0 if weights is None else weights[int(lay.doc[k])]
      fill += m
    if self.cross:  # one segment: every piece attends to the pieces before it in the row
      out["segment_ids"][:fill], out["positions"][:fill] = 1, np.arange(fill)
    return out

  def _example(self, lay: EpochLayout, k: int, epoch: int, stage: Stage) -> obj.Example:
    doc, start, length = int(lay.doc[k]), int(lay.start[k]), int(lay.length[k])
    base = int(self.offsets[doc]) + start
    piece = np.asarray(self.store.tokens(base, base + length + 1), np.int32)
    prefix = np.zeros(0, np.int32)
    if lay.prefix_len[k]:
      prefix = obj.conditioning_prefix(
          self.vocab, self.cfg, metadata=self.store.metadata(doc),
          score=float(self.store.scores[doc]), use_metadata=stage.metadata_prefix,
          use_control=stage.control_tokens)[: self.max_prefix]
      assert len(prefix) == lay.prefix_len[k], "conditioning prefix length changed"
    if stage.objective == "causal":
      return obj.causal_example(piece, prefix)
    rng = np.random.default_rng([self.seed, self.domain_index, epoch, k, 7, *self.packing_key])
    return obj.make_example(piece, objective=stage.objective, prefix=prefix,
                            budget=len(prefix) + length + 1, rng=rng, vocab=self.vocab,
                            cfg=self.cfg)
