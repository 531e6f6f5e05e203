"""Embedded corpus, byte vocabulary, and the step-indexed batch order."""

import numpy as np
import pytest

from pretrainx.data.corpus import corpus_stats, load_documents
from pretrainx.config import DataConfig
from pretrainx.data.pipeline import TrainBatches, eval_batches, unigram_entropy
from pretrainx.vocab import ByteVocabulary


@pytest.mark.slow
def test_byte_vocabulary_round_trip_and_seqio_ids():
  vocab = ByteVocabulary()
  text = "déjà vu — λ x: x ** 2\n"
  ids = vocab.encode(text)
  assert vocab.decode(ids) == text
  assert vocab.decode(np.append(ids, [vocab.eos_id, 50, 60])) == text  # stops at eos
  import seqio  # pylint: disable=import-outside-toplevel
  ref = seqio.ByteVocabulary()
  assert vocab.vocab_size == ref.vocab_size == 259
  assert list(ids) == list(ref.encode(text))
  assert (vocab.pad_id, vocab.eos_id, vocab.unk_id) == (ref.pad_id, ref.eos_id, ref.unk_id)


def test_corpus_domains_split_is_deterministic_and_disjoint():
  train = load_documents("train")
  val = load_documents("validation")
  assert {d.domain for d in train} == {d.domain for d in val} == {"prose", "code"}
  assert not {d.name for d in train} & {d.name for d in val}
  assert [d.name for d in val] == [d.name for d in load_documents("validation")]
  stats = corpus_stats()
  for domain in ("prose", "code"):
    frac = stats[domain]["validation"]["bytes"] / sum(s["bytes"] for s in stats[domain].values())
    assert 0.04 < frac < 0.2
  assert stats["code"]["train"]["bytes"] > 1_000_000
  with pytest.raises(ValueError, match="unknown corpus domain"):
    load_documents("train", ("poetry",))


def test_batch_at_step_is_a_pure_function_of_seed_and_step():
  cfg = DataConfig()
  a, b = TrainBatches(cfg, 32, 8), TrainBatches(cfg, 32, 8)
  for k in (0, 5, 1234):
    for key in ("inputs", "segment_ids"):
      np.testing.assert_array_equal(a.batch_at(k)[key], b.batch_at(k)[key])
  assert not np.array_equal(a.batch_at(0)["inputs"], a.batch_at(1)["inputs"])
  other = TrainBatches(DataConfig(seed=1), 32, 8)
  assert not np.array_equal(a.batch_at(0)["inputs"], other.batch_at(0)["inputs"])
  it = a.iterate(start_step=5)
  np.testing.assert_array_equal(next(it)["inputs"], a.batch_at(5)["inputs"])
  np.testing.assert_array_equal(next(it)["inputs"], a.batch_at(6)["inputs"])


def test_hosts_get_disjoint_halves_of_the_global_batch():
  cfg = DataConfig()
  whole = TrainBatches(cfg, 32, 8).batch_at(3)["inputs"]
  h0 = TrainBatches(cfg, 32, 8, process_index=0, process_count=2).batch_at(3)["inputs"]
  h1 = TrainBatches(cfg, 32, 8, process_index=1, process_count=2).batch_at(3)["inputs"]
  np.testing.assert_array_equal(np.concatenate([h0, h1]), whole)


def test_eval_batches_pad_the_last_batch_and_baseline():
  per_domain = eval_batches(DataConfig(domains=("prose",)), 64, 16, None)
  assert list(per_domain) == ["prose"]
  batches = per_domain["prose"]
  assert len({b["inputs"].shape for b in batches}) == 1
  assert batches[-1]["loss_mask"][-1].sum() == 0  # padding rows carry no loss
  h = unigram_entropy(batches, 259)
  assert 2.5 < h < 3.5  # English bytes: ~4.3 bits ~ 3 nats
  uniform = [{"targets": np.arange(8)[None], "loss_mask": np.ones((1, 8), int)}]
  assert unigram_entropy(uniform, 259) == pytest.approx(np.log(8))
