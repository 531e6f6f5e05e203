"""Stages that change the sequence length, batch and RoPE settings (config.phases), and long-data
selection by document length. Resume across a length change is checked bit for bit in
test_train.py (in process) and test_fault_tolerance.py (kill -9)."""

import numpy as np
import pytest

from pretrainx.config import (DataConfig, Experiment, ModelConfig, RunConfig, Selection, Stage,
                              phase_experiment, phases, validate)
from pretrainx.config.phases import run_phases
from pretrainx.data.packing import DomainRows
from pretrainx.data.pipeline import TrainBatches

LONG = "gin_configs/data/prolong.gin"


def _staged(**later):
  return (Stage(), Stage(start_step=3, **later))


def test_phases_inherit_and_keep_tokens_per_step():
  stages = (Stage(), Stage(start_step=3, seq_len=128, tokens_per_step=1024),
            Stage(start_step=6, seq_len=256, rope={"rope_theta": 8e4}),
            Stage(start_step=9, weights={"code": 1.0}),
            Stage(start_step=12, global_batch_size=2))
  got = run_phases(RunConfig(seq_len=64, global_batch_size=16), stages,
                   ModelConfig(max_seq_len=512))
  assert [(p.seq_len, p.global_batch_size) for p in got] == [
      (64, 16), (128, 8), (256, 4), (256, 4), (256, 2)]  # tokens kept until a batch is given
  assert [dict(p.rope) for p in got] == [{}, {}, {"rope_theta": 8e4}] + [{"rope_theta": 8e4}] * 2
  exp = Experiment().replace(data={"stages": stages}, model={"max_seq_len": 512},
                             run={"seq_len": 64})
  assert phase_experiment(exp, 2) is exp
  late = phase_experiment(exp, 7)
  assert (late.run.seq_len, late.run.global_batch_size, late.model.rope_theta) == (256, 4, 8e4)
  assert late.data == exp.data and len(phases(exp)) == 5


@pytest.mark.parametrize("stages, model, message", [
    ((Stage(seq_len=32),), {}, "the first stage trains with RunConfig.seq_len"),
    (_staged(seq_len=512), {}, "the stage at step 3 trains at seq_len=512, above "
                               "ModelConfig.max_seq_len=256"),
    (_staged(seq_len=96, tokens_per_step=1000), {}, "tokens_per_step=1000, not a multiple of its "
                                                    "seq_len=96"),
    (_staged(rope={"rope_thetaa": 1.0}), {}, "sets rope field(s) ['rope_thetaa']"),
    (_staged(rope={"rope_scaling": "bogus"}), {}, "the stage at step 3: ModelConfig.rope_scaling"),
])
def test_bad_stages_get_one_line(stages, model, message):
  exp = Experiment().replace(data={"stages": stages}, model=model)
  with pytest.raises(ValueError, match=None) as err:
    validate(exp)
  assert message in str(err.value) and "\n" not in str(err.value)


def test_stage_fields_are_checked_as_they_are_made():
  with pytest.raises(ValueError, match="sets both global_batch_size and tokens_per_step"):
    Stage(start_step=2, global_batch_size=4, tokens_per_step=256)
  with pytest.raises(ValueError, match=r"may change only ModelConfig's rope_\* fields"):
    Stage(start_step=2, rope={"max_seq_len": 512})


def test_a_length_change_repacks_from_the_stage_start_in_a_new_shuffle(tmp_path):
  cfg = DataConfig(store_dir=str(tmp_path / "stores"),
                   stages=_staged(seq_len=128, tokens_per_step=1024))
  data = TrainBatches(cfg, 64, 16)
  first, later = data.batch_at(2), data.batch_at(3)
  assert first["inputs"].shape == (16, 64) and later["inputs"].shape == (8, 128)
  assert data.packing_of(1) == 1 and data.stage_rows(1)[0].seq_len == 128
  # The batch of a step is a function of the step: a fresh pipeline gives the same one.
  again = TrainBatches(cfg, 64, 16).batch_at(3)
  for k in later:
    np.testing.assert_array_equal(later[k], again[k])
  # The new packing counts its rows from the stage start, in its own document order: its first
  # rows are not the documents the run began with.
  prose = data.stage_rows(1)[0]
  assert data._row_starts(1)[0] == int(data.schedule.offsets(3)[0])  # row 0 of the new packing
  start = DomainRows(prose.store, seq_len=128, seed=cfg.seed, domain_index=0, name="prose")
  assert not np.array_equal(prose._order(0), start._order(0))
  epochs = data.epochs(4)
  assert all(0 < e < 1 for e in epochs.values()), epochs


class _NoTokens:
  """A store whose tokens cannot be read: selecting by length must not need them."""

  def __init__(self, lengths):
    self.doc_lengths = np.asarray(lengths)
    self.doc_offsets = np.concatenate([[0], np.cumsum(lengths)])
    self.scores = np.full(len(lengths), np.nan, np.float32)

  def tokens(self, start, stop):
    raise AssertionError("length selection read tokens")


def test_length_selection_keeps_and_upsamples_long_documents_without_reading_tokens():
  lengths = [10, 300, 40, 500, 20, 260]
  rows = DomainRows(_NoTokens(lengths), seq_len=64, name="books")
  keep_long = Stage(selections=(Selection(score="length", min_score=256),))
  view_long = rows.layout(0, _view(keep_long))
  assert sorted(set(view_long.doc.tolist())) == [1, 3, 5]
  upsample = Stage(selections=(Selection(score="length", upsample=3, upsample_min_score=256),))
  lay = rows.layout(0, _view(upsample))
  per_doc = np.bincount(lay.doc[lay.start == 0], minlength=len(lengths))
  assert per_doc.tolist() == [1, 3, 1, 3, 1, 3]
  with pytest.raises(ValueError, match="give both"):
    Selection(score="length", upsample=2)


def _view(stage):
  from pretrainx.data.packing import stage_view
  return stage_view(stage, 0, "books")


@pytest.mark.parametrize("params, message", [
    (["MeshConfig.context=4", "MeshConfig.data=2", "long/Stage.seq_len=68"],
     "the stage at step 10: sequence length 68 cannot be split into 2 x context = 8 chunks"),
    (["ModelConfig.attention_impl='flash'", "ModelConfig.flash_block_q=64",
      "long/Stage.seq_len=96"],
     "the stage at step 10: sequence length 96 is not a multiple of ModelConfig.flash_block_q=64"),
])
def test_a_stage_length_that_the_mesh_or_the_flash_block_cannot_split_exits_2(
    run_cli, tmp_path, params, message):
  out = run_cli("train", "--gin_file=gin_configs/tiny.gin", f"--run_dir={tmp_path / 'run'}",
                "--gin_param=DataConfig.stages=[@first/Stage(), @long/Stage()]",
                "--gin_param=long/Stage.start_step=10",
                *(f"--gin_param={p}" for p in params))
  assert out.returncode == 2, out.stderr[-2000:]
  last = out.stderr.strip().splitlines()[-1]
  assert message in last and len(out.stderr.strip().splitlines()) <= 3, out.stderr[-2000:]


def test_the_prolong_mixture_keeps_long_documents_masks_them_apart_and_repacks(tmp_path):
  """gin_configs/data/prolong.gin on three small jsonl tasks: the long domains train on their
  documents of >= LONG_MIN_TOKENS only (selected by length), packed documents get their own
  segments (no cross-document attention), and the long stage repacks at its length."""
  import json

  from pretrainx.config import parse_gin
  from pretrainx.data import prepare

  rng = np.random.default_rng(0)
  for name, sizes in (("books", [40, 900, 60, 700, 1200]), ("repos", [30, 800, 20, 650]),
                      ("short", [50, 80, 120, 40, 90] * 4)):
    (tmp_path / name).mkdir()
    with open(tmp_path / name / "a.jsonl", "w") as f:
      for n in sizes:
        text = "".join(rng.choice(list("abcdefgh ")) for _ in range(n))
        f.write(json.dumps({"text": text}) + "\n")
  params = [f"BOOKS = ['{tmp_path}/books/*.jsonl']", f"CODE_REPOS = ['{tmp_path}/repos/*.jsonl']",
            f"SHORT = ['{tmp_path}/short/*.jsonl']", "LONG_MIN_TOKENS = 500", "LONG_STEP = 2",
            "LONG_SEQ_LEN = 256", "LONG_TOKENS_PER_STEP = 1024",
            f"DataConfig.store_dir = '{tmp_path}/stores'", "RunConfig.global_batch_size = 8",
            "RunConfig.seq_len = 128", "books/FileTask.validation_fraction = 0.0",
            "code_repos/FileTask.validation_fraction = 0.0",
            "short/FileTask.validation_fraction = 0.0"]
  exp = parse_gin(["gin_configs/tiny.gin", LONG], params)
  for task in exp.data.tasks:
    prepare.prepare(task, exp.data.store_root, exp.data.vocabulary, splits=("train",))
  data = TrainBatches(exp.data, exp.run.seq_len, exp.run.global_batch_size)
  lengths = {d: np.diff(s.doc_offsets) for d, s in zip(data.domains, data.stores)}
  for step, shape in ((1, (8, 128)), (2, (4, 256))):
    batch = data.batch_at(step)
    assert batch["inputs"].shape == shape
    for row in range(shape[0]):
      domain = data.domains[batch["domain"][row]]
      segments = batch["segment_ids"][row]
      starts = np.flatnonzero((batch["positions"][row] == 0) & (segments > 0))
      assert len(starts) == segments.max()  # each packed document is its own segment
      if domain != "short":  # only long documents: every piece's document has >= 500 tokens
        rows = data.stage_rows(data.schedule.stage_index(step))[batch["domain"][row]]
        assert (lengths[domain][rows.layout(0, _view_of(exp, step, domain)).doc] >= 500).all()


def _view_of(exp, step, domain):
  from pretrainx.data.packing import stage_view
  index = 0 if step < 2 else 1
  return stage_view(exp.data.stages[index], index, domain)


def test_plan_reports_every_stage_at_its_own_shape(run_cli):
  import json
  out = run_cli("plan", "--gin_file=gin_configs/tiny.gin", "--stages", "--json",
                "--gin_param=DataConfig.stages=[@a/Stage(), @b/Stage()]",
                "--gin_param=b/Stage.start_step=10", "--gin_param=b/Stage.seq_len=256",
                "--gin_param=b/Stage.tokens_per_step=2048")
  assert out.returncode == 0, out.stderr[-2000:]
  reports = json.loads(out.stdout)
  assert [(r["start_step"], r["seq_len"], r["global_batch_size"], r["tokens_per_step"])
          for r in reports] == [(0, 64, 8, 512), (10, 256, 8, 2048)]
  assert reports[1]["temp_bytes"] > reports[0]["temp_bytes"]  # 4x the tokens per device


def test_each_stage_shape_gets_one_runtime_view_and_its_work_is_counted(tiny_exp):
  from pretrainx.flops import flops_per_token
  from pretrainx.train.loop import phase_work
  from pretrainx.train.runtime import build_runtime

  stages = (Stage(), Stage(start_step=4, seq_len=128, tokens_per_step=1024),
            Stage(start_step=6, weights={"code": 1.0}),
            Stage(start_step=8, rope={"rope_theta": 4e4}))
  exp = tiny_exp(run={"global_batch_size": 16}, data={"stages": stages})
  rt = build_runtime(exp)
  assert rt.at(0) is rt and rt.at(4) is rt.at(7)  # a weights-only stage shares the shape's view
  assert rt.at(4).train_step is rt.train_step  # same model: jit compiles the new shape once
  assert rt.at(8).train_step is not rt.train_step and rt.at(8).model.cfg.rope_theta == 4e4
  assert (rt.at(5).exp.run.seq_len, rt.at(5).exp.run.global_batch_size) == (128, 8)
  tokens, flops = phase_work(exp, lambda: 0)(2, 9)  # steps 2, 3 at 64 x 16; 4..8 at 128 x 8
  assert tokens == 7 * 1024
  assert flops == 2 * 1024 * flops_per_token(exp.model, 64) + \
      5 * 1024 * flops_per_token(exp.model, 128)


def test_a_stage_may_not_train_with_dynamic_rope():
  from pretrainx.config import check_trainable
  exp = Experiment().replace(data={"stages": _staged(rope={"rope_scaling": "dynamic"})})
  validate(exp)  # a valid model (eval and generate may use it) ...
  with pytest.raises(ValueError, match=r"the stage at step 3: rope_scaling='dynamic' is for "
                                       r"inference only"):
    check_trainable(exp)  # ... that a run does not train
