"""The training pipeline end to end: stores -> packed rows -> step-scheduled mixture -> batches."""

import dataclasses
import json

import numpy as np
import pytest

from pretrainx.config import Stage
from pretrainx.config import DataConfig
from pretrainx.data.pipeline import TrainBatches, eval_batches
from pretrainx.vocab import ByteVocabulary

SEQ, BATCH = 64, 16


def test_restoring_at_step_k_gives_the_batches_of_an_uninterrupted_run():
  cfg = DataConfig(stages=(Stage(0, {"prose": 0.7, "code": 0.3}), Stage(4, {"code": 1.0})))
  it = TrainBatches(cfg, SEQ, BATCH).iterate(0)
  uninterrupted = [next(it) for _ in range(7)]
  resumed = TrainBatches(cfg, SEQ, BATCH).iterate(3)  # a new process restoring step 3
  for k in range(3, 7):
    got = next(resumed)
    for key, value in uninterrupted[k].items():
      np.testing.assert_array_equal(got[key], value, err_msg=f"step {k} {key}")


def test_mixture_proportions_follow_the_stages_and_switch_at_the_boundary():
  cfg = DataConfig(stages=(Stage(0, {"prose": 0.25, "code": 0.75}), Stage(30, {"prose": 1.0})))
  data = TrainBatches(cfg, SEQ, BATCH)
  domains = np.stack([data.batch_at(k)["domain"] for k in range(40)])  # 0 prose, 1 code
  share = (domains[:30] == 0).mean()
  n = 30 * BATCH
  assert abs(share - 0.25) < 4 * np.sqrt(0.25 * 0.75 / n)
  assert (domains[30:] == 0).all()
  assert (domains[29] == 1).any()


def test_two_hosts_get_disjoint_rows_that_make_up_the_global_batch():
  cfg = DataConfig()
  whole = TrainBatches(cfg, SEQ, BATCH)
  hosts = [TrainBatches(cfg, SEQ, BATCH, process_index=i, process_count=2) for i in range(2)]
  for k in (0, 9):
    parts = [h.batch_at(k) for h in hosts]
    for key in ("inputs", "domain"):
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]),
                                    whole.batch_at(k)[key])
    a, b = ({r.tobytes() for r in p["inputs"]} for p in parts)
    assert not a & b


def test_metadata_prefix_before_cooldown_and_not_after():
  vocab = ByteVocabulary()
  cfg = DataConfig(domains=("prose",), stages=(Stage(0, metadata_prefix=True), Stage(5)))
  data = TrainBatches(cfg, SEQ, 8)
  before = [vocab.decode(r) for r in data.batch_at(4)["inputs"]]
  after = [vocab.decode(r) for r in data.batch_at(5)["inputs"]]
  assert all(t.startswith("URL: prose/") for t in before)
  assert not any("URL: prose/" in t for t in after)
  # The prefix is context, not a target: its tokens carry no loss. It is cut to a quarter row.
  row = data.batch_at(4)
  prefix_len = int(np.argmax(row["loss_mask"][0])) + 1
  assert 5 < prefix_len <= SEQ // 4
  assert vocab.decode(row["inputs"][0, :prefix_len]).startswith("URL: prose/")
  first_piece = row["segment_ids"][0] == 1
  assert row["loss_mask"][0][first_piece][prefix_len - 1:].all()


def test_ul2_stages_carry_a_bidirectional_prefix_mask():
  cfg = DataConfig(vocabulary=ByteVocabulary(extra_ids=128),
                   stages=(Stage(0, objective="ul2"), Stage(3)))
  data = TrainBatches(cfg, SEQ, 8)
  ul2, causal = data.batch_at(0), data.batch_at(3)
  assert ul2["prefix_mask"].any() and not causal["prefix_mask"].any()
  # No target inside a prefix is trained (the prefix's last position predicts the first target).
  assert (ul2["loss_mask"][:, :-1] * ul2["prefix_mask"][:, 1:]).sum() == 0
  assert ul2["loss_mask"].sum() > 0
  assert "prefix_mask" not in TrainBatches(DataConfig(), SEQ, 8).batch_at(0)


def test_eval_batches_are_per_domain():
  per_domain = eval_batches(DataConfig(), SEQ, BATCH, 2)
  assert sorted(per_domain) == ["code", "prose"]
  for i, (domain, batches) in enumerate(per_domain.items()):
    assert len(batches) == 2 and (batches[0]["domain"] == DataConfig().domains.index(domain)).all()


def test_unknown_domain_and_bad_packing_are_clear_errors():
  with pytest.raises(ValueError, match="unknown domain 'poetry'"):
    TrainBatches(DataConfig(domains=("poetry",)), SEQ, 8)
  with pytest.raises(ValueError, match="packing"):
    DataConfig(packing="zip")


@pytest.mark.slow
def test_training_logs_per_domain_losses_and_tokens_and_resumes_the_counts(tiny_exp):
  from pretrainx.train.loop import train

  data = dataclasses.replace(DataConfig(), stages=(Stage(0, {"prose": 0.5, "code": 0.5}),
                                                   Stage(4, {"code": 1.0})))
  exp = tiny_exp(run={"steps": 6, "log_every": 2, "sample_tokens": 0, "eval_batches": 1},
                 checkpoint={"every_steps": 4})
  exp = dataclasses.replace(exp, data=data)
  result = train(exp)
  assert set(result.eval_domain_losses) == {"prose", "code"}
  records = [json.loads(l) for l in open(result.paths.metrics)]
  tokens = [r for r in records if "data/code/tokens" in r]
  assert tokens[-1]["data/code/tokens"] > tokens[0]["data/code/tokens"] > 0
  # After step 4 only code is drawn: the prose count stops growing.
  by_step = {r["step"]: r for r in tokens}
  assert by_step[6]["data/prose/tokens"] == by_step[4]["data/prose/tokens"]
  assert any("eval/prose/loss" in r for r in records)
  # Resuming a longer run continues the counts from the checkpoint's data state.
  longer = dataclasses.replace(exp, run=dataclasses.replace(exp.run, steps=8))
  train(longer)
  records = [json.loads(l) for l in open(result.paths.metrics)]
  last = [r for r in records if "data/code/tokens" in r][-1]
  assert last["step"] == 8 and last["data/code/tokens"] > by_step[6]["data/code/tokens"]
