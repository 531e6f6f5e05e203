"""Objectives on hand-made pieces: special ids, causal, metadata and control prefixes, UL2."""

import numpy as np
import pytest

from pretrainx.config.data import UL2_DENOISERS
from pretrainx.data import objectives as obj
from pretrainx.vocab import ByteVocabulary, extra_id_name, num_sentinels, sentinel_id, special_id

VOCAB = ByteVocabulary(extra_ids=64)  # ids 259..263 named tokens, 264..322 sentinels 58..0
CFG = obj.ObjectiveConfig()
S0, S1 = VOCAB.vocab_size - 1, VOCAB.vocab_size - 2  # sentinels 0 and 1: 322, 321


def _only(mode, mean_span=3, rate=0.3):
  return obj.ObjectiveConfig(denoisers=(obj.Denoiser(mode, mean_span, rate, 1.0),))


# -- vocabulary ---------------------------------------------------------------------------------


def test_special_tokens_and_sentinels_take_the_extra_ids():
  assert VOCAB.vocab_size == 259 + 64 and VOCAB.name == "byte+extra64"
  assert ByteVocabulary().name == "byte" and ByteVocabulary().vocab_size == 259
  assert [special_id(VOCAB, t) for t in ("<|R|>", "<|S|>", "<|X|>", "<|good|>", "<|bad|>")] == [
      259, 260, 261, 262, 263]
  assert num_sentinels(VOCAB) == 59
  assert (sentinel_id(VOCAB, 0), sentinel_id(VOCAB, 3), sentinel_id(VOCAB, 58)) == (322, 319, 264)
  assert extra_id_name(VOCAB, 262) == "<|good|>" and extra_id_name(VOCAB, 321) == "<extra_id_1>"


def test_missing_extra_ids_are_clear_errors():
  with pytest.raises(ValueError, match=r"needs at least 4 extra ids.*has 0.*extra_ids"):
    special_id(ByteVocabulary(), "<|good|>")
  with pytest.raises(ValueError, match=r"sentinel 59 needs at least 65 extra ids.*extra_ids"):
    sentinel_id(VOCAB, 59)  # 64 extra ids - 5 named tokens = 59 sentinels: 0..58
  with pytest.raises(ValueError, match="extra_ids"):
    sentinel_id(ByteVocabulary(extra_ids=5), 0)
  with pytest.raises(ValueError, match="negative"):
    sentinel_id(VOCAB, -1)
  with pytest.raises(ValueError, match="unknown special token"):
    special_id(VOCAB, "<|maybe|>")
  with pytest.raises(ValueError, match="not an extra id"):
    extra_id_name(VOCAB, 100)


def test_decode_drops_extra_ids_or_shows_their_names():
  ids = [special_id(VOCAB, "<|good|>"), *VOCAB.encode("hi"), S0, *VOCAB.encode("!"), VOCAB.eos_id,
         *VOCAB.encode("after")]
  assert VOCAB.decode(ids) == "hi!"
  assert VOCAB.decode(ids, show_special=True) == "<|good|>hi<extra_id_0>!"
  assert VOCAB.decode(VOCAB.encode("plain"), show_special=True) == "plain"


def test_extra_ids_match_seqio():
  import seqio  # pylint: disable=import-outside-toplevel
  ref = seqio.ByteVocabulary(extra_ids=64)
  assert ref.vocab_size == VOCAB.vocab_size
  assert list(ref.encode("añb")) == list(VOCAB.encode("añb"))
  ids = [*VOCAB.encode("Hi"), 300, S0, 0, 2, *VOCAB.encode("é"), VOCAB.eos_id, 80]
  assert ref.decode(ids) == VOCAB.decode(ids) == "Hié"  # extra ids, pad, unk dropped


# -- causal and conditioning prefixes -----------------------------------------------------------


def test_causal_example_with_and_without_prefix():
  piece = np.asarray([10, 11, 12, 1], np.int32)
  ex = obj.causal_example(piece)
  np.testing.assert_array_equal(ex.tokens, piece)
  np.testing.assert_array_equal(ex.loss_mask, [1, 1, 1])
  np.testing.assert_array_equal(ex.prefix_mask, [0, 0, 0])
  ex = obj.causal_example(piece, np.asarray([5, 6], np.int32))
  np.testing.assert_array_equal(ex.tokens, [5, 6, 10, 11, 12, 1])
  # targets: 6 (prefix, no loss), 10 (first piece token, trained), 11, 12, 1
  np.testing.assert_array_equal(ex.loss_mask, [0, 1, 1, 1, 1])
  np.testing.assert_array_equal(ex.prefix_mask, [0, 0, 0, 0, 0])
  assert ex.tokens.dtype == ex.loss_mask.dtype == ex.prefix_mask.dtype == np.int32
  with pytest.raises(ValueError, match=">= 2 tokens"):
    obj.causal_example(np.asarray([10]))


def test_meco_prefix_is_present_and_carries_no_loss():
  prefix = obj.conditioning_prefix(VOCAB, CFG, metadata="example.com", score=0.9,
                                   use_metadata=True, use_control=True)
  assert prefix[0] == special_id(VOCAB, "<|good|>")
  assert VOCAB.decode(prefix[1:]) == "URL: example.com\n\n"
  piece = VOCAB.encode("Hello.")
  ex = obj.causal_example(piece, prefix)
  assert VOCAB.decode(ex.tokens, show_special=True) == "<|good|>URL: example.com\n\nHello."
  p = len(prefix)
  np.testing.assert_array_equal(ex.loss_mask, [0] * (p - 1) + [1] * len(piece))
  only_meta = obj.conditioning_prefix(VOCAB, CFG, metadata="a.b", score=0.9, use_metadata=True,
                                      use_control=False)
  np.testing.assert_array_equal(only_meta, VOCAB.encode("URL: a.b\n\n"))
  for metadata in (None, ""):
    assert not len(obj.conditioning_prefix(VOCAB, CFG, metadata=metadata, score=0.9,
                                           use_metadata=True, use_control=False))


def test_control_token_by_thresholds():
  good, bad = special_id(VOCAB, "<|good|>"), special_id(VOCAB, "<|bad|>")
  ctl = lambda s: list(obj.conditioning_prefix(VOCAB, CFG, metadata="x", score=s,
                                               use_metadata=False, use_control=True))
  assert ctl(0.9) == [good] and ctl(0.5) == [good]  # threshold <= score
  assert ctl(0.49) == [bad] and ctl(float("-inf")) == [bad]
  assert ctl(float("nan")) == [] and ctl(None) == []
  three = obj.ObjectiveConfig(control_thresholds=((0.8, "<|good|>"), (0.3, "<|bad|>")),
                              control_default=None)
  assert [obj.control_token(three, s) for s in (0.9, 0.8, 0.5, 0.1, np.nan)] == [
      "<|good|>", "<|good|>", "<|bad|>", None, None]
  with pytest.raises(ValueError, match="control token"):
    obj.ObjectiveConfig(control_thresholds=((0.5, "<|R|>"),))  # mode tokens are reserved
  with pytest.raises(ValueError, match="distinct"):
    obj.ObjectiveConfig(control_thresholds=((0.5, "<|good|>"), (0.5, "<|bad|>")))


class _EncodeOnly:
  """A vocabulary that is not a ByteVocabulary: lengths must come from encode()."""

  vocab_size, eos_id, extra_ids, name = 323, 1, 64, "wrapped"

  def encode(self, text):
    return VOCAB.encode(text)[::2]  # a different length than the UTF-8 bytes


@pytest.mark.parametrize("vocab", [VOCAB, _EncodeOnly()], ids=["byte", "other"])
@pytest.mark.parametrize("flags", [(True, True), (True, False), (False, True), (False, False)])
def test_prefix_lengths_equal_the_prefixes(vocab, flags):
  metadata = ["example.com", None, "", "dé.jà/ü", "b", None]
  scores = np.asarray([0.7, np.nan, 0.1, 0.5, np.nan, 0.2])
  cfg = obj.ObjectiveConfig(control_default=None) if vocab is VOCAB else CFG
  lengths = obj.conditioning_prefix_lengths(vocab, cfg, metadata, scores, *flags)
  expected = [len(obj.conditioning_prefix(vocab, cfg, metadata=m, score=s, use_metadata=flags[0],
                                          use_control=flags[1])) for m, s in zip(metadata, scores)]
  assert lengths.dtype == np.int64 and lengths.tolist() == expected
  assert any(expected) == any(flags)


def test_prefix_lengths_check_the_vocabulary_early():
  with pytest.raises(ValueError, match="extra_ids"):
    obj.conditioning_prefix_lengths(ByteVocabulary(), CFG, ["a"], np.asarray([0.9]), False, True)
  lengths = obj.conditioning_prefix_lengths(ByteVocabulary(), CFG, ["a"], None, True, True)
  assert lengths.tolist() == [len("URL: a\n\n")]  # no scores: no control token needed
  with pytest.raises(ValueError, match="2 scores for 1 documents"):
    obj.conditioning_prefix_lengths(VOCAB, CFG, ["a"], np.zeros(2), True, True)


# -- span corruption ----------------------------------------------------------------------------


def test_span_corrupt_by_hand():
  raw = np.arange(10, 20, dtype=np.int32)
  noise = np.zeros(10, bool)
  noise[[2, 3, 7]] = True
  inputs, targets = obj.span_corrupt(raw, noise, VOCAB)
  np.testing.assert_array_equal(inputs, [10, 11, S0, 14, 15, 16, S1, 18, 19])
  np.testing.assert_array_equal(targets, [S0, 12, 13, S1, 17])
  noise[[0, 9]] = True  # spans at both ends
  inputs, targets = obj.span_corrupt(raw, noise, VOCAB)
  np.testing.assert_array_equal(inputs, [S0, 11, S1, 14, 15, 16, S1 - 1, 18, S1 - 2])
  np.testing.assert_array_equal(targets, [S0, 10, S1, 12, 13, S1 - 1, 17, S1 - 2, 19])


def test_random_spans_follow_t5_counts():
  starts_at_noise = ends_at_noise = 0
  for seed in range(200):
    rng = np.random.default_rng(seed)
    length = int(rng.integers(2, 300))
    density, mean = float(rng.choice([0.15, 0.25, 0.5])), float(rng.choice([3, 8, 64]))
    mask = obj.random_spans(length, density, mean, 59, rng)
    noise = min(max(round(length * density), 1), length - 1)
    spans = min(max(round(noise / mean), 1), noise, length - noise, 59)
    assert mask.shape == (length,) and mask.sum() == noise
    assert (mask & ~np.concatenate([[False], mask[:-1]])).sum() == spans  # exact span count
    starts_at_noise += mask[0]
    ends_at_noise += mask[-1]
  assert 0 < starts_at_noise < 200 and 0 < ends_at_noise < 200  # both ends can be clean or noise
  a = obj.random_spans(100, 0.15, 3, 59, np.random.default_rng(3))
  np.testing.assert_array_equal(a, obj.random_spans(100, 0.15, 3, 59, np.random.default_rng(3)))


def test_fit_length_is_the_longest_that_fits():
  for d in UL2_DENOISERS:
    if d.mode == "S":
      continue
    cost = lambda n: n + 2 * obj.span_counts(n, d.corruption_rate, d.mean_span, 59)[1]
    for room in (3, 4, 6, 10, 37, 100, 300):
      brute = max([n for n in range(2, 200) if cost(n) <= room], default=0)
      assert obj._fit_length(199, room, d, 59) == brute  # pylint: disable=protected-access


# -- UL2 ----------------------------------------------------------------------------------------


def test_ul2_sequential_by_hand():
  piece = np.arange(10, 30, dtype=np.int32)  # 20 tokens: 15 in the prefix, 5 to predict
  ex = obj.ul2_example(piece, [7, 8], budget=100, rng=np.random.default_rng(0), vocab=VOCAB,
                       cfg=_only("S", rate=0.25))
  np.testing.assert_array_equal(ex.tokens, [7, 8, special_id(VOCAB, "<|S|>"), *range(10, 30)])
  np.testing.assert_array_equal(ex.prefix_mask, [1] * 18 + [0] * 4)  # inputs 7 .. 24
  np.testing.assert_array_equal(ex.loss_mask, [0] * 17 + [1] * 5)  # targets 25 .. 29
  short = obj.ul2_example(piece, [7, 8], budget=11, rng=np.random.default_rng(0), vocab=VOCAB,
                          cfg=_only("S", rate=0.25))
  np.testing.assert_array_equal(short.tokens, [7, 8, 260, *range(10, 18)])  # 8 raw tokens fit
  np.testing.assert_array_equal(short.loss_mask, [0] * 8 + [1] * 2)


def _check_ul2(ex, piece, prefix, vocab=VOCAB):
  """Structure of an R/X example; returns the number of raw tokens used."""
  p, tokens = len(prefix), ex.tokens.tolist()
  head = int(ex.prefix_mask.sum())
  np.testing.assert_array_equal(ex.tokens[:p], prefix)
  assert tokens[p] in (special_id(vocab, "<|R|>"), special_id(vocab, "<|X|>"))
  np.testing.assert_array_equal(ex.prefix_mask, np.arange(len(tokens) - 1) < head)
  np.testing.assert_array_equal(ex.loss_mask, np.arange(len(tokens) - 1) >= head - 1)
  first = vocab.vocab_size - num_sentinels(vocab)
  body, tail = tokens[p + 1:head], tokens[head:]
  in_sentinels = [t for t in body if t >= first]
  out_sentinels = [t for t in tail if t >= first]
  k = len(in_sentinels)
  assert k >= 1 and in_sentinels == out_sentinels == [vocab.vocab_size - 1 - i for i in range(k)]
  assert tail[0] == in_sentinels[0] and tail[-1] == vocab.eos_id
  raw = [t for t in body + tail[:-1] if t < first]  # every raw token once, input or target
  n = len(raw)
  assert sorted(raw) == sorted(piece[:n].tolist())
  np.testing.assert_array_equal(obj.ul2_reconstruct(ex, vocab), piece[:n])
  np.testing.assert_array_equal(obj.ul2_reconstruct(ex, vocab, prefix_len=p), piece[:n])
  return n


@pytest.mark.parametrize("mode,mean_span,rate", [("R", 3, 0.15), ("X", 3, 0.5), ("X", 64, 0.5)])
def test_ul2_span_denoisers_reconstruct_and_mask_the_right_regions(mode, mean_span, rate):
  prefix = np.asarray([special_id(VOCAB, "<|good|>"), *VOCAB.encode("URL: a\n\n")], np.int32)
  piece = np.arange(10, 90, dtype=np.int32)  # distinct tokens
  for seed in range(5):
    ex = obj.ul2_example(piece, prefix, budget=120, rng=np.random.default_rng(seed), vocab=VOCAB,
                         cfg=_only(mode, mean_span, rate))
    assert ex.tokens[len(prefix)] == special_id(VOCAB, f"<|{mode}|>")
    assert _check_ul2(ex, piece, prefix) == len(piece)  # all of it fits in 120
    assert len(ex.tokens) <= 120


def test_ul2_respects_every_budget_and_uses_what_fits():
  rng = np.random.default_rng(1)
  for budget in (8, 9, 12, 17, 33, 64, 129, 256, 512):
    for prefix_len in (0, 3):
      prefix = rng.integers(3, 259, prefix_len).astype(np.int32)
      piece = rng.integers(3, 259, budget + 5).astype(np.int32)  # longer than the budget
      for _ in range(8):
        ex = obj.ul2_example(piece, prefix, budget=budget, rng=rng, vocab=VOCAB, cfg=CFG)
        assert 2 <= len(ex.tokens) <= budget
        assert len(ex.loss_mask) == len(ex.prefix_mask) == len(ex.tokens) - 1
        if not ex.prefix_mask.any():  # causal fallback: only when nothing else fits
          assert budget - prefix_len < 8
          np.testing.assert_array_equal(ex.tokens, np.concatenate([prefix, piece])[:budget])
        elif ex.tokens[prefix_len] == special_id(VOCAB, "<|S|>"):
          assert len(ex.tokens) == budget
          np.testing.assert_array_equal(obj.ul2_reconstruct(ex, VOCAB), piece[:budget - 1 -
                                                                                 prefix_len])
        else:
          _check_ul2(ex, piece, prefix)
          assert len(ex.tokens) >= budget - 2  # one more raw token costs at most 3


def test_default_mixture_draws_denoisers_by_weight():
  assert [(d.mode, d.mean_span, d.corruption_rate) for d in CFG.denoisers] == [
      ("R", 3, 0.15), ("R", 8, 0.15), ("S", 1, 0.25), ("X", 3, 0.5), ("X", 8, 0.5),
      ("X", 64, 0.15), ("X", 64, 0.5)]
  rng = np.random.default_rng(0)
  piece = np.arange(3, 60, dtype=np.int32)
  modes = [int(obj.ul2_example(piece, None, budget=64, rng=rng, vocab=VOCAB, cfg=CFG).tokens[0])
           for _ in range(1500)]
  weights = {m: sum(d.weight for d in CFG.denoisers if d.mode == m) / 6 for m in "RSX"}
  for m, w in weights.items():
    assert abs(modes.count(special_id(VOCAB, f"<|{m}|>")) / 1500 - w) < 0.05


def test_ul2_is_deterministic_for_a_seed():
  piece = np.arange(3, 200, dtype=np.int32)
  make = lambda seed: obj.make_example(piece, objective="ul2", prefix=None, budget=128,
                                       rng=np.random.default_rng(seed), vocab=VOCAB, cfg=CFG)
  np.testing.assert_array_equal(make(5).tokens, make(5).tokens)
  assert len({tuple(make(s).tokens.tolist()) for s in range(6)}) > 1
  causal = obj.make_example(piece, objective="causal", prefix=[4], budget=0,
                            rng=np.random.default_rng(0), vocab=VOCAB, cfg=CFG)
  np.testing.assert_array_equal(causal.tokens, [4, *piece])


def test_bad_objectives_are_clear_errors():
  with pytest.raises(ValueError, match=r"unknown objective 'mlm'.*causal.*ul2"):
    obj.make_example(np.arange(5), objective="mlm", prefix=None, budget=8,
                     rng=np.random.default_rng(0), vocab=VOCAB, cfg=CFG)
  with pytest.raises(ValueError, match=r"mode='Q'.*R.*S.*X"):
    obj.Denoiser("Q")
  with pytest.raises(ValueError, match="corruption_rate"):
    obj.Denoiser("R", 3, 1.5)
  with pytest.raises(ValueError, match="positive weight"):
    obj.ObjectiveConfig(denoisers=(obj.Denoiser("R", weight=0.0),))
  with pytest.raises(ValueError, match="extra_ids"):  # no mode tokens
    obj.ul2_example(np.arange(3, 40), None, budget=64, rng=np.random.default_rng(0),
                    vocab=ByteVocabulary(), cfg=CFG)
  with pytest.raises(ValueError, match=r"sentinel 0 needs at least 6 extra ids"):
    obj.ul2_example(np.arange(3, 40), None, budget=64, rng=np.random.default_rng(0),
                    vocab=ByteVocabulary(extra_ids=5), cfg=CFG)
  s_only = obj.ul2_example(np.arange(3, 40), None, budget=64, rng=np.random.default_rng(0),
                           vocab=ByteVocabulary(extra_ids=5), cfg=_only("S"))
  assert s_only.prefix_mask.any()  # S needs no sentinels
  with pytest.raises(ValueError, match="budget"):
    obj.ul2_example(np.arange(3, 40), [5, 5, 5], budget=4, rng=np.random.default_rng(0),
                    vocab=VOCAB, cfg=CFG)
  with pytest.raises(ValueError, match="causal example"):
    obj.ul2_reconstruct(obj.causal_example(np.arange(3, 9)), VOCAB)
