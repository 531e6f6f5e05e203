"""Objectives on hand-made pieces: causal, metadata and control prefixes, UL2 denoisers."""

import numpy as np
import pytest

from pretrainx.data import objectives as obj
from pretrainx.data.vocab import ByteVocabulary, sentinel_id, special_id

VOCAB = ByteVocabulary(extra_ids=64)
CFG = obj.ObjectiveConfig()


def test_special_tokens_and_sentinels_take_the_extra_ids():
  assert VOCAB.vocab_size == 259 + 64 and VOCAB.name == "byte+extra64"
  assert special_id(VOCAB, "<|R|>") == 259 and special_id(VOCAB, "<|bad|>") == 263
  assert sentinel_id(VOCAB, 0) == VOCAB.vocab_size - 1 and sentinel_id(VOCAB, 3) == 319
  assert VOCAB.decode([special_id(VOCAB, "<|good|>"), *VOCAB.encode("hi")]) == "hi"
  with pytest.raises(ValueError, match="extra_ids"):
    special_id(ByteVocabulary(), "<|good|>")
  with pytest.raises(ValueError, match="extra_ids"):
    sentinel_id(VOCAB, 59)  # 64 extra ids - 5 named tokens = 59 sentinels: 0..58
  with pytest.raises(ValueError, match="unknown special token"):
    special_id(VOCAB, "<|maybe|>")


def test_sentinels_match_seqio_convention():
  seqio = pytest.importorskip("seqio")
  ref = seqio.ByteVocabulary(extra_ids=64)
  assert ref.vocab_size == VOCAB.vocab_size
  assert list(ref.encode("añb")) == list(VOCAB.encode("añb"))


def test_causal_example_with_and_without_prefix():
  piece = np.asarray([10, 11, 12, 1], np.int32)
  ex = obj.causal_example(piece)
  np.testing.assert_array_equal(ex.tokens, piece)
  np.testing.assert_array_equal(ex.loss_mask, [1, 1, 1])
  ex = obj.causal_example(piece, np.asarray([5, 6], np.int32))
  np.testing.assert_array_equal(ex.tokens, [5, 6, 10, 11, 12, 1])
  # targets: 6 (prefix, no loss), 10 (first text token, trained), 11, 12, 1
  np.testing.assert_array_equal(ex.loss_mask, [0, 1, 1, 1, 1])
  assert not ex.prefix_mask.any()


def test_metadata_and_control_prefixes():
  prefix = obj.conditioning_prefix(VOCAB, CFG, metadata="example.com", score=0.9,
                                   use_metadata=True, use_control=True)
  assert prefix[0] == special_id(VOCAB, "<|good|>")
  assert VOCAB.decode(prefix[1:]) == "URL: example.com\n\n"
  low = obj.conditioning_prefix(VOCAB, CFG, metadata=None, score=0.1, use_metadata=True,
                                use_control=True)
  np.testing.assert_array_equal(low, [special_id(VOCAB, "<|bad|>")])
  none = obj.conditioning_prefix(VOCAB, CFG, metadata=None, score=float("nan"),
                                 use_metadata=True, use_control=True)
  assert len(none) == 0
  lengths = obj.conditioning_prefix_lengths(VOCAB, CFG, ["ab", None], np.asarray([0.7, np.nan]),
                                            use_metadata=True, use_control=True)
  np.testing.assert_array_equal(lengths, [1 + len("URL: ab\n\n"), 0])


def test_control_thresholds_pick_the_highest_passed():
  cfg = obj.ObjectiveConfig(control_thresholds=((0.3, "<|R|>"), (0.8, "<|good|>")))
  assert obj.control_token(cfg, 0.9) == "<|good|>"
  assert obj.control_token(cfg, 0.5) == "<|R|>"
  assert obj.control_token(cfg, 0.1) == "<|bad|>"
  assert obj.control_token(cfg, None) is None


@pytest.mark.parametrize("mode", ["R", "S", "X"])
def test_ul2_examples_reconstruct_and_mask_the_right_regions(mode):
  cfg = obj.ObjectiveConfig(denoisers=(obj.Denoiser(mode, 3, 0.3, 1.0),))
  rng = np.random.default_rng(0)
  piece = np.arange(10, 70, dtype=np.int32)
  prefix = np.asarray([7, 8], np.int32)
  ex = obj.ul2_example(piece, prefix, budget=80, rng=rng, vocab=VOCAB, cfg=cfg)
  assert len(ex.tokens) <= 80
  assert ex.tokens[2] == special_id(VOCAB, f"<|{mode}|>")
  head = int(ex.prefix_mask.sum())
  # The bidirectional prefix is a leading block; loss starts where it ends, never inside it.
  np.testing.assert_array_equal(ex.prefix_mask, np.arange(len(ex.tokens) - 1) < head)
  np.testing.assert_array_equal(ex.loss_mask, np.arange(len(ex.tokens) - 1) >= head - 1)
  rebuilt = obj.ul2_reconstruct(ex, VOCAB, prefix_len=2)
  np.testing.assert_array_equal(rebuilt, piece[:len(rebuilt)])
  if mode != "S":
    sentinels = [t for t in ex.tokens.tolist() if t >= VOCAB.vocab_size - 59]
    assert sentinels[: len(sentinels) // 2] == sentinels[len(sentinels) // 2:]  # paired
    assert ex.tokens[-1] == VOCAB.eos_id and len(sentinels) >= 2


def test_ul2_respects_the_budget_and_every_token_appears_once():
  rng = np.random.default_rng(1)
  for budget in (8, 17, 64, 129, 512):
    piece = rng.integers(3, 250, budget).astype(np.int32)
    for _ in range(5):
      ex = obj.ul2_example(piece, None, budget=budget, rng=rng, vocab=VOCAB, cfg=CFG)
      assert 2 <= len(ex.tokens) <= budget
      if ex.prefix_mask.any():
        rebuilt = obj.ul2_reconstruct(ex, VOCAB)
        np.testing.assert_array_equal(rebuilt, piece[:len(rebuilt)])


def test_ul2_is_deterministic_for_a_seed():
  piece = np.arange(3, 200, dtype=np.int32)
  a = obj.ul2_example(piece, None, budget=128, rng=np.random.default_rng(5), vocab=VOCAB, cfg=CFG)
  b = obj.ul2_example(piece, None, budget=128, rng=np.random.default_rng(5), vocab=VOCAB, cfg=CFG)
  np.testing.assert_array_equal(a.tokens, b.tokens)


def test_bad_objectives_are_clear_errors():
  with pytest.raises(ValueError, match="unknown objective"):
    obj.make_example(np.arange(5), objective="mlm", prefix=None, budget=8,
                     rng=np.random.default_rng(0), vocab=VOCAB, cfg=CFG)
  with pytest.raises(ValueError, match="mode"):
    obj.Denoiser("Q")
  with pytest.raises(ValueError, match="extra_ids"):
    obj.ul2_example(np.arange(3, 40), None, budget=64, rng=np.random.default_rng(0),
                    vocab=ByteVocabulary(), cfg=CFG)
