"""Packed rows of one domain: documents cut into pieces and packed into rows of `seq_len` positions.

Each epoch is a fresh shuffle of the domain's documents, and then of the rows they pack into, by
(seed, domain, epoch). A document of n
tokens (its eos included) gives n - 1 (input, target) positions; 'pack' cuts it into pieces of at
most seq_len positions (less a conditioning prefix) and packs whole pieces into rows first-come,
padding the rest of a row; 'concat' lays the documents end to end and cuts rows at every seq_len,
leaving no padding. Either way every token is an input exactly once per epoch, pieces in one row
get their own `segment_ids`, and `positions` restart at every piece. Row r of epoch e is computed
from a layout of the whole epoch, so any row can be read at random.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from pretrainx.data import objectives as obj
from pretrainx.config import Stage
from pretrainx.config.data import PACKING_MODES

ROW_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask", "prefix_mask")


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
    store: a TokenStore (doc_offsets, doc_lengths, tokens(), metadata_all(), scores).
    seq_len: positions per row.
    seed, domain_index: the shuffle of epoch e depends on (seed, domain_index, e).
    mode: 'pack' or 'concat'.
    shuffle: False keeps the stored document order (evaluation).
    vocab, objective_cfg: for conditioning prefixes and UL2 sentinels.
  """

  def __init__(self, store: Any, *, seq_len: int, seed: int = 0, domain_index: int = 0,
               mode: str = "pack", shuffle: bool = True, vocab: Any = None,
               objective_cfg: obj.ObjectiveConfig | None = None):
    if mode not in PACKING_MODES:
      raise ValueError(f"packing mode {mode!r}; choose one of {PACKING_MODES}.")
    self.store, self.seq_len, self.mode, self.shuffle = store, int(seq_len), mode, shuffle
    self.seed, self.domain_index = int(seed), int(domain_index)
    self.vocab, self.cfg = vocab, objective_cfg or obj.ObjectiveConfig()
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

  # -- layouts ----------------------------------------------------------------------------------

  def _order(self, epoch: int) -> np.ndarray:
    n = len(self.lengths)
    if not self.shuffle:
      return np.arange(n)
    return np.random.default_rng([self.seed, self.domain_index, epoch]).permutation(n)

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

  def layout(self, epoch: int, use_metadata: bool = False, use_control: bool = False
             ) -> EpochLayout:
    key = (epoch, use_metadata, use_control)
    if key not in self._layouts:
      order = self._order(epoch)
      if self.mode == "concat":
        lay = concat_layout(self.lengths, order, self.seq_len)
      else:
        prefix = (self._prefix_lengths(use_metadata, use_control)
                  if use_metadata or use_control else None)
        lay = pack_layout(self.lengths, order, self.seq_len, prefix)
      if len(self._layouts) >= 4:
        self._layouts.pop(next(iter(self._layouts)))
      self._layouts[key] = lay
    return self._layouts[key]

  def _row_order(self, epoch: int, num_rows: int) -> np.ndarray:
    key = (epoch, num_rows)
    if key not in self._row_orders:
      if len(self._row_orders) >= 4:
        self._row_orders.pop(next(iter(self._row_orders)))
      rng = np.random.default_rng([self.seed, self.domain_index, epoch, 1])
      self._row_orders[key] = rng.permutation(num_rows)
    return self._row_orders[key]

  def rows_in_epoch(self, epoch: int, flags: tuple[bool, bool] = (False, False)) -> int:
    key = (epoch, *flags)
    if key not in self._rows_per_epoch:
      self._rows_per_epoch[key] = self.layout(epoch, *flags).num_rows
    return self._rows_per_epoch[key]

  def locate(self, index: int, flags: tuple[bool, bool] = (False, False)) -> tuple[int, int]:
    """Global row index of this domain -> (epoch, row within the epoch)."""
    epoch = 0
    while index >= (n := self.rows_in_epoch(epoch, flags)):
      index, epoch = index - n, epoch + 1
    return epoch, index

  # -- rows -------------------------------------------------------------------------------------

  def row(self, index: int, stage: Stage = Stage()) -> dict[str, np.ndarray]:
    """The domain's row `index` (counting across epochs) under `stage`'s objective."""
    flags = (stage.metadata_prefix, stage.control_tokens)
    if self.mode == "concat" and (any(flags) or stage.objective != "causal"):
      raise ValueError("DataConfig.packing='concat' supports the causal objective without "
                       "prefixes only; use packing='pack' for UL2, metadata or control tokens.")
    epoch, r = self.locate(int(index), flags)
    lay = self.layout(epoch, *flags)
    if self.shuffle:  # rows in shuffled order too, so a batch never holds a document's run of rows
      r = int(self._row_order(epoch, lay.num_rows)[r])
    out = {k: np.zeros(self.seq_len, np.int32) for k in ROW_KEYS}
    fill = 0
    for seg, k in enumerate(range(lay.first[r], lay.first[r + 1]), start=1):
      example = self._example(lay, k, epoch, stage)
      m = len(example.tokens) - 1
      span = slice(fill, fill + m)
      out["inputs"][span], out["targets"][span] = example.tokens[:-1], example.tokens[1:]
      out["loss_mask"][span], out["prefix_mask"][span] = example.loss_mask, example.prefix_mask
      out["segment_ids"][span], out["positions"][span] = seg, np.arange(m)
      fill += m
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
    rng = np.random.default_rng([self.seed, self.domain_index, epoch, k, 7])
    return obj.make_example(piece, objective=stage.objective, prefix=prefix,
                            budget=len(prefix) + length + 1, rng=rng, vocab=self.vocab,
                            cfg=self.cfg)
