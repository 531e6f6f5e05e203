"""Step-scheduled mixtures and packing: exact counts, stage switches, coverage, random access."""

import collections

import numpy as np
import pytest

from pretrainx.data.mixture import MixtureSchedule
from pretrainx.config import Stage
from pretrainx.config.data import check_stages
from pretrainx.data.packing import DomainRows, concat_layout, pack_layout

DOMAINS = ("a", "b", "c")


class FakeStore:
  """An in-memory stand-in for a TokenStore: documents of distinct, recognisable tokens."""

  def __init__(self, lengths, metadata=None, scores=None, seed=0):
    rng = np.random.default_rng(seed)
    self.doc_lengths = np.asarray(lengths, np.int64)
    self.doc_offsets = np.concatenate([[0], np.cumsum(self.doc_lengths)])
    self.flat = rng.integers(3, 250, int(self.doc_offsets[-1])).astype(np.int32)
    self.flat[self.doc_offsets[1:] - 1] = 1  # eos ends every document
    self.num_tokens, self.num_docs, self.path = len(self.flat), len(lengths), "fake"
    self._meta = metadata or [None] * len(lengths)
    self.scores = np.asarray(scores if scores is not None else [np.nan] * len(lengths), np.float32)

  def tokens(self, start, stop):
    return self.flat[start:stop]

  def metadata(self, i):
    return self._meta[i]

  def metadata_all(self):
    return list(self._meta)


def test_counts_fill_the_batch_and_match_weights_within_binomial_tolerance():
  stages = [Stage(0, {"a": 0.6, "b": 0.3, "c": 0.1}), Stage(500, {"a": 0.1, "c": 0.9})]
  sched = MixtureSchedule(stages, DOMAINS, batch_size=12, seed=3)
  first, second = sched.counts(np.arange(0, 500)), sched.counts(np.arange(500, 1000))
  assert (first.sum(1) == 12).all() and (second.sum(1) == 12).all()
  n = 500 * 12
  for counts, weights in ((first, [0.6, 0.3, 0.1]), (second, [0.1, 0.0, 0.9])):
    share = counts.sum(0) / n
    tol = 4 * np.sqrt(np.asarray(weights) * (1 - np.asarray(weights)) / n) + 1e-9
    np.testing.assert_array_less(np.abs(share - weights), tol + 1e-12)
  assert second[:, 1].sum() == 0  # a domain weighted 0 gets no rows
  # The switch happens exactly at the boundary step.
  assert sched.stage(499).weights["a"] == 0.6 and sched.stage(500).weights["a"] == 0.1


def test_offsets_are_prefix_sums_across_the_cache_anchor():
  sched = MixtureSchedule([Stage(0, {"a": 1, "b": 2}), Stage(4000, {"a": 1})], ("a", "b"), 5, 0)
  brute = np.cumsum(sched.counts(np.arange(0, 9000)), axis=0)
  for step in (0, 1, 4095, 4096, 4097, 8999):
    expected = brute[step - 1] if step else np.zeros(2)
    np.testing.assert_array_equal(sched.offsets(step), expected)


def test_each_domain_row_is_used_exactly_once_in_order():
  sched = MixtureSchedule([Stage(0, {"a": 0.5, "b": 0.25, "c": 0.25})], DOMAINS, 8, seed=1)
  used = collections.defaultdict(list)
  for step in range(100):
    domain, index = sched.assignment(step)
    for d, i in zip(domain, index):
      used[int(d)].append(int(i))
  for d, idx in used.items():
    assert sorted(idx) == list(range(len(idx))), f"domain {d} rows skipped or repeated"
  # Rows of different domains are interleaved within a batch, not in domain blocks.
  domain, _ = sched.assignment(7)
  assert len(set(domain.tolist())) > 1


def test_assignment_is_a_pure_function_of_seed_and_step():
  make = lambda seed: MixtureSchedule([Stage(0, {"a": 1, "b": 1})], ("a", "b"), 16, seed)
  a, b = make(0), make(0)
  b.offsets(9000)  # a different cache history must not change anything
  for step in (0, 5, 8191, 8192):
    np.testing.assert_array_equal(a.assignment(step)[0], b.assignment(step)[0])
    np.testing.assert_array_equal(a.assignment(step)[1], b.assignment(step)[1])
  assert not np.array_equal(make(1).assignment(5)[0], a.assignment(5)[0])


@pytest.mark.parametrize("stages, message", [
    ([Stage(0, {"a": -1.0})], "negative"),
    ([Stage(0, {"zzz": 1.0})], "unknown domain"),
    ([Stage(5, {"a": 1.0})], "must start at 0"),
    ([Stage(0, {"a": 0.0, "b": 0.0})], "weight 0"),
    ([Stage(0), Stage(0)], "increasing"),
    ([Stage(0, objective="span")], "objective"),
    ([], "no stages"),
])
def test_bad_schedules_are_refused_with_a_reason(stages, message):
  with pytest.raises(ValueError, match=message):
    check_stages(stages, DOMAINS)


# -- packing ------------------------------------------------------------------------------------


def _covered_positions(layout):
  covered = collections.Counter()
  for d, s, n in zip(layout.doc, layout.start, layout.length):
    covered.update((int(d), int(p)) for p in range(s, s + n))
  return covered


@pytest.mark.parametrize("make", [pack_layout, concat_layout])
def test_layouts_cover_every_position_once_and_respect_rows(make):
  lengths = np.asarray([5, 40, 1, 17, 3, 64, 9, 2, 33])
  order = np.random.default_rng(0).permutation(len(lengths))
  lay = make(lengths, order, 16)
  covered = _covered_positions(lay)
  expected = {(d, p) for d in range(len(lengths)) for p in range(lengths[d] - 1)}
  assert all(c == 1 for c in covered.values())
  if make is pack_layout:
    assert set(covered) == expected
  else:  # concat drops only the last partial row
    assert set(covered) <= expected and len(expected) - len(covered) < 16
  for r in range(lay.num_rows):
    used = lay.length[lay.first[r]:lay.first[r + 1]].sum()
    assert used <= 16 if make is pack_layout else used == 16


def test_rows_hold_the_documents_tokens_with_segments_and_positions():
  store = FakeStore([30, 7, 50, 12, 3, 90, 20])
  rows = DomainRows(store, seq_len=16, seed=0, mode="pack")
  seen = collections.Counter()
  for r in range(rows.rows_in_epoch(0)):
    row = rows.row(r)
    seg = row["segment_ids"]
    assert seg[0] == 1 and (np.diff(seg[seg > 0]) >= 0).all()
    for s in np.unique(seg[seg > 0]):
      where = np.flatnonzero(seg == s)
      np.testing.assert_array_equal(row["positions"][where], np.arange(len(where)))
      np.testing.assert_array_equal(row["inputs"][where][1:], row["targets"][where][:-1])
    assert (row["loss_mask"] == (seg > 0)).all()
    assert (row["inputs"][seg == 0] == 0).all()  # padding
    seen.update(zip(row["inputs"][seg > 0].tolist(), row["targets"][seg > 0].tolist()))
  expected = collections.Counter()
  for d in range(store.num_docs):
    doc = store.flat[store.doc_offsets[d]:store.doc_offsets[d + 1]]
    expected.update(zip(doc[:-1].tolist(), doc[1:].tolist()))
  assert seen == expected  # every (input, target) pair exactly once per epoch


def test_epochs_reshuffle_and_rows_continue_across_them():
  store = FakeStore([20] * 10)
  rows = DomainRows(store, seq_len=19, seed=0)
  n = rows.rows_in_epoch(0)
  assert n == 10 and rows.locate(n + 3) == (1, 3)
  first = [rows.row(i)["inputs"][0] for i in range(n)]
  second = [rows.row(n + i)["inputs"][0] for i in range(n)]
  assert sorted(first) == sorted(second) and first != second


def test_concat_rows_are_full_and_mask_cross_document_targets():
  store = FakeStore([10, 10, 10, 10])
  rows = DomainRows(store, seq_len=8, mode="concat", shuffle=False)
  row = rows.row(1)  # positions 8..15: the end of doc 0 and the start of doc 1
  np.testing.assert_array_equal(row["segment_ids"], [1] * 1 + [2] * 7)
  assert row["loss_mask"].all() and rows.rows_in_epoch(0) == 36 // 8


def test_too_little_data_for_one_row_is_a_clear_error():
  with pytest.raises(ValueError, match="not enough for one row"):
    DomainRows(FakeStore([3, 4]), seq_len=64)
