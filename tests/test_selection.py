"""Choosing a stage's documents by score: filters, orders, repeats, loss weights, and data
ablations that train one model per choice from the same initial state. What a filter or a
curriculum does to the loss is a finding of bench/data_selection.py, not a test."""

import dataclasses
import json

import numpy as np
import pytest

from pretrainx.config import DataConfig, FileTask, Selection, Stage
from pretrainx.data import corpus
from pretrainx.data import prepare as data_prepare
from pretrainx.data import score_sets
from pretrainx.data import selection as select
from pretrainx.data.packing import DomainRows, View
from pretrainx.data.pipeline import TrainBatches, eval_batches
from pretrainx.data.store import StoreError
from pretrainx.train.ablation import train_and_evaluate
from pretrainx.vocab import ByteVocabulary
from test_mixture import FakeStore  # noqa: E402  (the in-memory token store)

VOCAB = ByteVocabulary()
SCORES = np.float32([0.9, np.nan, 0.1, 0.5, 0.7, 0.3, 0.2, 0.8, 0.6, 0.4])


def _docs(sel, scores=SCORES, epoch=0, stage_index=0, domain_index=0, seed=0):
  return select.epoch_documents(sel, scores, seed=seed, domain_index=domain_index,
                                stage_index=stage_index, epoch=epoch, domain="web")


# -- selection.py -------------------------------------------------------------------------------


def test_bounds_drop_unscored_documents_and_no_filter_keeps_them():
  kept = sorted(_docs(Selection(min_score=0.3, max_score=0.7)).tolist())
  assert kept == [3, 4, 5, 8, 9]
  assert sorted(_docs(Selection()).tolist()) == list(range(10))  # NaN kept without a filter
  assert 1 not in _docs(Selection(min_score=-1.0))


def test_top_fraction_keeps_the_highest_or_lowest_share():
  assert sorted(_docs(Selection(top_fraction=0.3)).tolist()) == [0, 4, 7]  # 0.9, 0.7, 0.8
  assert sorted(_docs(Selection(top_fraction=0.3, lowest=True)).tolist()) == [2, 5, 6]
  # Applied after the bounds: the top half of [0.3, 0.7] is 0.7, 0.6 (and 0.5 by rounding).
  top = _docs(Selection(min_score=0.3, max_score=0.7, top_fraction=0.5))
  assert sorted(SCORES[top].tolist()) == pytest.approx([0.5, 0.6, 0.7])


def test_gumbel_top_k_keeps_the_count_favours_high_scores_and_redraws_each_epoch():
  scores = np.linspace(0, 1, 200, dtype=np.float32)
  sel = Selection(top_fraction=0.25, temperature=0.2)
  draws = [_docs(sel, scores, epoch=e) for e in range(50)]
  assert all(len(d) == 50 and len(set(d.tolist())) == 50 for d in draws)
  counts = np.bincount(np.concatenate(draws), minlength=200)
  assert counts[150:].sum() > 5 * counts[:50].sum() > 0  # high scores far more often, low ones too
  assert not np.array_equal(np.sort(draws[0]), np.sort(draws[1]))
  # A high temperature is close to uniform; a tiny one is the plain top fraction.
  hot = np.bincount(np.concatenate([_docs(Selection(top_fraction=0.25, temperature=100.0),
                                          scores, epoch=e) for e in range(50)]), minlength=200)
  assert 0.7 < hot[150:].sum() / hot[:50].sum() < 1.4
  cold = _docs(Selection(top_fraction=0.25, temperature=1e-4), scores)
  assert sorted(cold.tolist()) == list(range(150, 200))


def test_sample_keeps_documents_with_probability_of_their_score():
  scores = np.float32([0.0, 0.25, 0.5, 1.0, 2.0, -1.0, np.nan])
  kept = np.concatenate([_docs(Selection(sample=True), scores, epoch=e) for e in range(400)])
  freq = np.bincount(kept, minlength=7) / 400
  np.testing.assert_allclose(freq[:5], [0.0, 0.25, 0.5, 1.0, 1.0], atol=0.08)
  assert freq[5] == freq[6] == 0


def test_score_orders_sort_every_pass_and_shuffle_differs_per_pass():
  asc = _docs(Selection(order="ascending", repeat=2))
  assert len(asc) == 20 and (np.bincount(asc) == 2).all()
  first, second = asc[:10], asc[10:]
  assert first[-1] == 1 and second[-1] == 1  # NaN sorts last
  assert (np.diff(SCORES[first[:-1]]) > 0).all() and (np.diff(SCORES[second[:-1]]) > 0).all()
  desc = _docs(Selection(order="descending"))
  assert (np.diff(SCORES[desc[:-1]]) < 0).all()
  shuffled = _docs(Selection(repeat=3))
  assert (np.bincount(shuffled) == 3).all()
  assert not np.array_equal(shuffled[:10], shuffled[10:20])


def test_ties_in_a_score_order_are_broken_by_the_shuffle():
  ties = np.zeros(40, np.float32)
  a = _docs(Selection(order="ascending"), ties, epoch=0)
  b = _docs(Selection(order="ascending"), ties, epoch=1)
  assert sorted(a.tolist()) == list(range(40)) and not np.array_equal(a, b)


def test_selection_is_a_pure_function_of_seed_domain_stage_and_epoch():
  sel = Selection(top_fraction=0.5, temperature=0.5, sample=False)
  scores = np.random.default_rng(0).random(300).astype(np.float32)
  base = _docs(sel, scores)
  np.testing.assert_array_equal(base, _docs(sel, scores))
  for change in ({"epoch": 1}, {"stage_index": 1}, {"domain_index": 1}, {"seed": 1}):
    assert not np.array_equal(base, _docs(sel, scores, **change)), change


def test_a_selection_that_keeps_nothing_says_the_range_and_what_to_change():
  with pytest.raises(select.SelectionError, match=r"keeps no documents of domain 'web' "
                     r"\(scores range 0.1..0.9\); lower min_score"):
    _docs(Selection(min_score=2.0))
  for sample, hint in ((False, "lower min_score or raise max_score."),  # sample is off already
                       (True, "lower min_score or raise max_score or set sample=False.")):
    with pytest.raises(select.SelectionError) as err:
      _docs(Selection(min_score=2.0, sample=sample))
    assert str(err.value).endswith(hint)
  with pytest.raises(select.SelectionError, match="all NaN"):
    _docs(Selection(top_fraction=0.5), np.full(4, np.nan, np.float32))


# -- packed rows --------------------------------------------------------------------------------


def test_rows_follow_an_ascending_curriculum_without_a_row_shuffle():
  scores = np.random.default_rng(1).random(40).astype(np.float32)
  store = FakeStore([9] * 40, scores=scores)  # 8 positions a document, two a row of 16
  rows = DomainRows(store, seq_len=16, seed=0)
  stage = Stage(0, selections=(Selection(order="ascending", top_fraction=0.5),))
  view = View(selection=stage.selections[0])
  n = rows.rows_in_epoch(0, view)
  docs = [int(d) for r in range(n) for d in rows.layout(0, view).doc[
      rows.layout(0, view).first[r]:rows.layout(0, view).first[r + 1]]]
  assert n == 10 and sorted(docs) == sorted(np.argsort(scores)[20:].tolist())
  firsts = []
  for r in range(n):  # rows come in layout order: each row's first token is its document's
    row = rows.row(r, stage)
    firsts.append(int(row["inputs"][0]))
  expected = [int(store.flat[store.doc_offsets[d]]) for d in docs[::2]]
  assert firsts == expected
  assert (np.diff(scores[docs]) >= 0).all()


def test_loss_weight_rows_carry_each_documents_score_and_zero_on_padding():
  scores = np.float32([0.5, np.nan, 2.0, 0.25])
  store = FakeStore([6, 6, 6, 6], scores=scores)
  rows = DomainRows(store, seq_len=12, seed=0, shuffle=False)
  weighted = Stage(0, selections=(Selection(loss_weight=True),))
  for r in range(rows.rows_in_epoch(0, View(selection=weighted.selections[0]))):
    row = rows.row(r, weighted)
    lay = rows.layout(0, View(selection=weighted.selections[0]))
    for seg, k in enumerate(range(lay.first[r], lay.first[r + 1]), start=1):
      score = scores[lay.doc[k]]
      expected = 1.0 if np.isnan(score) else score
      np.testing.assert_array_equal(row["loss_weight"][row["segment_ids"] == seg], expected)
    assert (row["loss_weight"][row["segment_ids"] == 0] == 0).all()
    assert row["loss_weight"].dtype == np.float32
  plain = rows.row(0)
  np.testing.assert_array_equal(plain["loss_weight"], (plain["segment_ids"] > 0).astype(float))


# -- the pipeline on a scored store -------------------------------------------------------------


def _write_task(tmp_path, name, texts, scores):
  path = tmp_path / f"{name}.jsonl"
  path.write_text("".join(json.dumps({"text": t, "q": float(s)}) + "\n"
                          for t, s in zip(texts, scores)))
  return FileTask(name, (str(path),), score_field="q")


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
  """A prepared 'web' task of 60 documents whose source score is its index / 60, and a second
  score set 'rev' (1 - that) planted with ScoreWriter."""
  tmp = tmp_path_factory.mktemp("scored")
  rng = np.random.default_rng(0)
  texts = ["".join(chr(c) for c in rng.integers(97, 123, 90)) for _ in range(60)]
  task = _write_task(tmp, "web", texts, np.arange(60) / 60)
  root = str(tmp / "stores")
  [path] = data_prepare.prepare(task, root, VOCAB)
  writer = score_sets.ScoreWriter(path, "rev", "file", {"from": "test"}, 60)
  writer.write(0, 1 - np.arange(60, dtype=np.float32) / 60)
  writer.finish()
  return DataConfig(domains=("web", "prose"), tasks=(task,), store_dir=root)


def test_a_curriculum_stage_starts_at_its_first_documents_and_batches_stay_pure(scored):
  sel = Selection(domains=("web",), order="ascending", top_fraction=0.5)
  stages = (Stage(0, {"web": 0.5, "prose": 0.5}), Stage(3, {"web": 1.0}, selections=(sel,)))
  cfg = dataclasses.replace(scored, stages=stages)
  data = TrainBatches(cfg, 32, 8)
  it = data.iterate(0)
  iterated = [next(it) for _ in range(8)]
  fresh = TrainBatches(cfg, 32, 8)
  for k in (7, 3, 5, 0):  # in any order, in a new process: the same batches
    for key, value in fresh.batch_at(k).items():
      np.testing.assert_array_equal(value, iterated[k][key], err_msg=f"step {k} {key}")
  # The first stage read web rows, yet from step 3 on the web rows are the curriculum's from its
  # first one: the top half (docs 30..59) in ascending score order, rows unshuffled.
  assert data.schedule.offsets(3)[0] > 0
  web = fresh.rows[0]
  lay = web.layout(0, View(selection=sel, stage_index=1))
  docs = [int(lay.doc[lay.first[r]]) for r in range(40)]
  assert docs[0] == 30 and docs == sorted(docs) and max(docs) < 60
  got = np.concatenate([iterated[k]["inputs"] for k in range(3, 8)])  # [40, 32]
  np.testing.assert_array_equal(got[0], web.store.document(30)[:32])
  for r in (0, 1, 17, 39):
    np.testing.assert_array_equal(got[r], web.row(r, stages[1], 1)["inputs"])


def test_loss_weight_batches_carry_scores_and_eval_batches_do_not(scored):
  cfg = dataclasses.replace(scored, stages=(Stage(0, {"web": 1.0}, selections=(
      Selection(domains=("web",), score="rev", loss_weight=True),)),))
  assert cfg.uses_loss_weights
  batch = TrainBatches(cfg, 32, 8).batch_at(0)
  w = batch["loss_weight"]
  assert w.dtype == np.float32 and w.shape == (8, 32)
  assert (w[batch["segment_ids"] == 0] == 0).all()
  live = w[batch["segment_ids"] > 0]
  assert live.min() >= 1 / 60 - 1e-6 and live.max() <= 1 and len(np.unique(live)) > 3
  assert "loss_weight" not in TrainBatches(scored, 32, 8).batch_at(0)
  assert "loss_weight" not in eval_batches(dataclasses.replace(cfg, domains=("prose",)),
                                           32, 8, 1)["prose"][0]


def test_missing_scores_and_empty_filters_fail_when_the_batches_are_built(scored):
  later = lambda sel: dataclasses.replace(scored, stages=(Stage(0), Stage(10**6, selections=(
      sel,))))
  with pytest.raises(score_sets.ScoreSetError, match="holds no score 'quality'.*pretrainx "
                     "score"):
    TrainBatches(later(Selection(domains=("web",), score="quality")), 32, 8)
  with pytest.raises(select.SelectionError, match=r"keeps no documents of domain 'web' "
                     r"\(scores range 0..0.9833\); lower min_score") as err:
    TrainBatches(later(Selection(domains=("web",), min_score=1.5)), 32, 8)
  assert "\n" not in str(err.value)  # one line, as the CLI prints it
  with pytest.raises(ValueError, match="all NaN"):  # the corpus has no scores at all
    TrainBatches(later(Selection(domains=("prose",), top_fraction=0.5)), 32, 8)
  assert issubclass(score_sets.ScoreSetError, ValueError)
  assert issubclass(select.SelectionError, ValueError) and not issubclass(StoreError,
                                                                          select.SelectionError)


# -- what it does to training -------------------------------------------------------------------


def _noisy(text, rate, rng):
  """`text` with each character replaced, with probability `rate`, by a random printable one."""
  chars = np.array(list(text))
  hit = rng.random(len(chars)) < rate
  chars[hit] = [chr(c) for c in rng.integers(32, 127, int(hit.sum()))]
  return "".join(chars)


def _chunks(text, size):
  return [text[i:i + size] for i in range(0, len(text), size) if len(text[i:i + size]) > size // 4]


def _noisy_prose_task(tmp_path, name, chunk, total, max_rate, clean_copies):
  """Prose chunks with characters randomised at a rate drawn from [0, max_rate] per chunk; the
  source score is -rate (clean copies, when kept, score 0)."""
  rng = np.random.default_rng(0)
  text = "".join(d.text for d in corpus.load_documents("train", ("prose",)))[:total]
  texts, scores = [], []
  for c in _chunks(text, chunk):
    rate = rng.uniform(0, max_rate)
    if clean_copies:
      texts.append(c)
      scores.append(0.0)
    texts.append(_noisy(c, rate, rng))
    scores.append(-rate)
  task = _write_task(tmp_path, name, texts, scores)
  data_prepare.prepare(task, str(tmp_path / "stores"), VOCAB)
  return task


def test_top_half_by_noise_score_keeps_the_clean_copies(tmp_path):
  task = _noisy_prose_task(tmp_path, "noisy", 2000, 200_000, 0.6, clean_copies=True)
  base = DataConfig(domains=("noisy",), tasks=(task,), store_dir=str(tmp_path / "stores"))
  top = dataclasses.replace(base, stages=(Stage(0, selections=(Selection(top_fraction=0.5),)),))
  kept = TrainBatches(top, 64, 8).rows[0]
  view = View(selection=top.stages[0].selections[0])
  doc = kept.layout(0, view).doc
  assert (kept.scores(view.selection)[doc] == 0).all()  # the clean half, and only it
  assert len(np.unique(doc)) == len(kept.scores(view.selection)) // 2


@pytest.mark.slow
def test_ablations_train_each_data_config_from_one_initial_state(tmp_path, tiny_exp):
  """train_and_evaluate: the same data gives the same model bit for bit, and another order of
  the same documents another model. (What a filter or a curriculum does to the loss is measured
  in bench/data_selection.py: a few hundred steps, not a test's verdict.)"""
  task = _noisy_prose_task(tmp_path, "graded", 120, 20_000, 0.4, clean_copies=False)
  make = lambda order: DataConfig(domains=("graded",), tasks=(task,),
                                  store_dir=str(tmp_path / "stores"),
                                  stages=(Stage(0, selections=(Selection(order=order),)),))
  clean = eval_batches(DataConfig(domains=("prose",), store_dir=str(tmp_path / "stores")), 64, 8,
                       2)["prose"]
  exp = tiny_exp(run={"steps": 3}, schedule={"name": "constant"})
  ascending, again, shuffled = (r["clean"] for r in train_and_evaluate(
      exp, [make("ascending"), make("ascending"), make("shuffle")], {"clean": clean}))
  assert ascending == again and np.isfinite(ascending)
  assert ascending != shuffled


def test_the_gin_example_parses_into_a_filter_then_a_curriculum():
  import os  # pylint: disable=import-outside-toplevel

  from conftest import REPO  # pylint: disable=import-outside-toplevel
  from pretrainx.config import parse_gin  # pylint: disable=import-outside-toplevel
  from pretrainx.config.data import check_stages  # pylint: disable=import-outside-toplevel

  exp = parse_gin([os.path.join(REPO, "gin_configs/quickstart.gin"),
                   os.path.join(REPO, "gin_configs/data/select_top.gin")])
  first, cooldown = exp.data.stages
  assert first.selection_for("web").top_fraction == 0.5 and first.selection_for("code") is None
  assert cooldown.selection_for("web").order == "ascending" and cooldown.start_step == 128
  check_stages(exp.data.stages, exp.data.domains)
