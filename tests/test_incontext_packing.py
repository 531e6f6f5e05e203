"""In-context packing: the neighbour chain, rows packed along it, rows of one segment (attention
across the documents of a row), and the continuation probe that bench/data_selection.py scores
second halves of split code files with."""

import dataclasses

import numpy as np
import pytest

from pretrainx.config import DataConfig, ModelConfig, Stage
from pretrainx.data import corpus, neighbours
from pretrainx.data import prepare as data_prepare
from pretrainx.data.packing import DomainRows
from pretrainx.data.pipeline import TrainBatches
from pretrainx.train.ablation import continuation_batches
from pretrainx.vocab import ByteVocabulary
from test_mixture import FakeStore  # noqa: E402  (the in-memory token store)
from test_selection import _write_task  # noqa: E402

VOCAB = ByteVocabulary()


def _encode(text):
  return np.append(np.asarray(VOCAB.encode(text), np.int32), np.int32(VOCAB.eos_id))


def _halves(texts):
  """Each text cut at its middle into two documents: [a0, b0, a1, b1, ...]."""
  return [h for t in texts for h in (t[:len(t) // 2], t[len(t) // 2:])]


def _adjacent_share(order):
  """The share of pairs (2i, 2i + 1) that sit next to each other in `order`."""
  place = np.empty(len(order), np.int64)
  place[order] = np.arange(len(order))
  return float(np.mean(np.abs(place[0::2] - place[1::2]) == 1))


def test_the_chain_puts_the_two_halves_of_most_code_files_next_to_each_other():
  tokens = [_encode(h) for h in _halves(d.text for d in corpus.load_documents("train", ("code",)))]
  offsets = np.concatenate([[0], np.cumsum([len(t) for t in tokens])])
  emb = neighbours.normalise(neighbours.embed_tokens(np.concatenate(tokens), offsets))
  assert emb.shape == (len(tokens), neighbours.DIM)
  np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1, rtol=1e-5)
  exact = neighbours.chain(emb)
  blocks = neighbours.chain(emb, exact_limit=64, block=128)  # the big-store path, approximate
  for order in (exact, blocks):
    assert sorted(order.tolist()) == list(range(len(tokens)))
  random = np.random.default_rng(0).permutation(len(tokens))
  assert _adjacent_share(exact) > 0.75 and _adjacent_share(blocks) > 0.4
  assert _adjacent_share(random) < 0.05


def test_store_embeddings_do_not_depend_on_the_chunking(monkeypatch):
  store = FakeStore(np.random.default_rng(0).integers(1, 60, 50))
  whole = neighbours.normalise(neighbours.embed_tokens(store.flat, store.doc_offsets))
  monkeypatch.setattr(neighbours, "CHUNK_TOKENS", 100)
  monkeypatch.setattr(neighbours, "CHUNK_DOCS", 7)
  np.testing.assert_allclose(neighbours.embed_store(store), whole, atol=1e-6)


def test_neighbour_packing_walks_the_chain_from_a_new_place_each_epoch():
  store = FakeStore(np.random.default_rng(1).integers(5, 40, 60))
  rows = DomainRows(store, seq_len=32, seed=3, packing_order="neighbours")
  chain = neighbours.store_chain(store, seed=3)
  orders = []
  for epoch in range(3):
    lay = rows.layout(epoch)
    docs = lay.doc[np.r_[True, lay.doc[1:] != lay.doc[:-1]]]  # each document's first piece
    assert sorted(docs.tolist()) == list(range(60))
    shift = int(np.flatnonzero(chain == docs[0])[0])
    np.testing.assert_array_equal(docs, np.roll(chain, -shift))
    orders.append(docs)
  assert not np.array_equal(orders[0], orders[1])
  # Rows are still served shuffled.
  firsts = [rows.row(r)["inputs"][0] for r in range(rows.rows_in_epoch(0))]
  lay = rows.layout(0)
  in_layout = [store.flat[store.doc_offsets[lay.doc[lay.first[r]]] + lay.start[lay.first[r]]]
               for r in range(lay.num_rows)]
  assert sorted(firsts) == sorted(in_layout) and firsts != in_layout


@pytest.mark.parametrize("mode", ["pack", "concat"])
def test_cross_document_rows_are_one_segment_with_positions_through_the_row(mode):
  store = FakeStore([7, 12, 5, 30, 9, 4, 16, 8])
  apart = DomainRows(store, seq_len=16, seed=0, mode=mode)
  across = DomainRows(store, seq_len=16, seed=0, mode=mode, cross_document_attention=True)
  several = 0
  for r in range(apart.rows_in_epoch(0)):
    a, b = apart.row(r), across.row(r)
    for key in ("inputs", "targets", "loss_mask", "loss_weight"):
      np.testing.assert_array_equal(a[key], b[key])
    n = int((a["segment_ids"] > 0).sum())
    several += a["segment_ids"].max() > 1
    np.testing.assert_array_equal(b["segment_ids"], [1] * n + [0] * (16 - n))
    np.testing.assert_array_equal(b["positions"][:n], np.arange(n))
    assert (b["positions"][n:] == 0).all()
  assert several  # rows that did hold several documents


@pytest.mark.slow
def test_one_segment_lets_a_document_attend_to_the_one_before_it():
  import jax  # pylint: disable=import-outside-toplevel

  from pretrainx.model import Transformer  # pylint: disable=import-outside-toplevel

  model = Transformer(ModelConfig(vocab_size=259, embed_dim=32, num_layers=1, num_heads=2,
                                  num_kv_heads=1, mlp_dim=64, max_seq_len=32))
  tokens = np.repeat(np.random.default_rng(0).integers(3, 250, (1, 16)), 2, 0).astype(np.int32)
  tokens[1, :8] = np.random.default_rng(1).integers(3, 250, 8)  # another first document
  params = model.init(jax.random.key(0), tokens)["params"]
  two = np.repeat([[1] * 8 + [2] * 8], 2, 0)
  restart = np.repeat([list(range(8)) * 2], 2, 0)
  one, through = np.ones_like(two), np.repeat([list(range(16))], 2, 0)
  apart = model.apply({"params": params}, tokens, restart, two)
  across = model.apply({"params": params}, tokens, through, one)
  # The second document's logits ignore the first document unless the row is one segment.
  np.testing.assert_allclose(apart[0, 8:], apart[1, 8:], atol=1e-5)
  assert np.abs(np.asarray(across[0, 8:] - across[1, 8:])).max() > 1e-3


def test_cross_document_attention_refuses_ul2():
  cfg = DataConfig(vocabulary=ByteVocabulary(extra_ids=128), cross_document_attention=True,
                   stages=(Stage(0, objective="ul2"),))
  with pytest.raises(ValueError, match="causal objective only"):
    TrainBatches(cfg, 64, 8)


def _file_windows(split, width, per_file):
  """Up to `per_file` windows of `width` characters spread over each code file of `split`, each
  cut at its middle: [(first half, second half), ...]."""
  pairs = []
  for doc in corpus.load_documents(split, ("code",)):
    if len(doc.text) >= width:
      for s in sorted(set(np.linspace(0, len(doc.text) - width, per_file).astype(int))):
        window = doc.text[s:s + width]
        pairs.append((window[:width // 2], window[width // 2:]))
  return pairs


def test_neighbour_packing_puts_second_halves_after_their_first(tmp_path):
  # Windows of code files, each split into two documents of 200 characters; 'concat' rows of 128
  # positions along the neighbour chain put a second half right after its first half. (What
  # this does to the loss is measured in bench/data_selection.py, over hundreds of steps.)
  train = _file_windows("train", 400, 4)
  halves = [h for pair in train for h in pair]
  task = _write_task(tmp_path, "halves", halves, [0.0] * len(halves))
  stores = str(tmp_path / "stores")
  data_prepare.prepare(task, stores, VOCAB)
  random = DataConfig(domains=("halves",), tasks=(task,), store_dir=stores, packing="concat")
  incontext = dataclasses.replace(random, packing_order="neighbours", cross_document_attention=True)
  follows = {}
  for name, cfg in (("random", random), ("incontext", incontext)):
    lay = TrainBatches(cfg, 128, 8).rows[0].layout(0)
    starts = lay.doc[1:] != lay.doc[:-1]  # where a document follows another in the stream
    before = dict(zip(lay.doc[1:][starts].tolist(), lay.doc[:-1][starts].tolist()))
    follows[name] = np.mean([before.get(2 * i + 1) == 2 * i for i in range(len(train))])
  assert follows["incontext"] > 0.15 and follows["incontext"] > 3 * follows["random"], follows


def test_continuation_batches_score_a_second_half_after_or_without_its_first():
  first, second = _encode("def f(x):\n  return"), _encode(" x + 1\n" * 4)
  after, alone = (continuation_batches([(first, second)] * 8, 16, with_first)[0]
                  for with_first in (True, False))
  half = 8
  # after: the last 8 inputs of the first half, then the first 8 of the second, in one segment
  np.testing.assert_array_equal(after["inputs"][0], np.concatenate([first[:-1][-half:],
                                                                    second[:-1][:half]]))
  np.testing.assert_array_equal(after["targets"][0, half:], second[1:][:half])
  np.testing.assert_array_equal(after["loss_mask"][0], [0] * half + [1] * half)
  np.testing.assert_array_equal(after["positions"][0], np.arange(16))
  assert (after["segment_ids"] == 1).all()
  # alone: the same scored targets, nothing before them
  np.testing.assert_array_equal(alone["inputs"][0, :half], second[:-1][:half])
  np.testing.assert_array_equal(alone["targets"][0, :half], after["targets"][0, half:])
  np.testing.assert_array_equal(alone["loss_mask"][0], [1] * half + [0] * half)
  np.testing.assert_array_equal(alone["segment_ids"][0], [1] * half + [0] * half)
  assert after["inputs"].shape == (8, 16) and (after["domain"] == 0).all()
  assert continuation_batches([(first, second)] * 7, 16, True) == []  # no incomplete batch
