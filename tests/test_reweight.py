"""Online domain reweighting: the update rule, the weight history in the schedule, the loop."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from pretrainx.checkpoint import Checkpointer
from pretrainx.config import ReweightConfig, Stage, validate
from pretrainx.config import load_run_experiment
from pretrainx.data.mixture import MixtureSchedule
from pretrainx.data.reweighting import (Reweighter, excess_loss_signal, exponentiated_step,
                                        loss_slope_signal)
from pretrainx.metrics import read_metrics
from pretrainx.train import loop
from pretrainx.train.runtime import Runtime, load_trained

# -- the update rule ------------------------------------------------------------------------------


def test_a_domain_with_more_excess_loss_gains_weight():
  ce = np.array([[30.0, 40.0, 10.0], [36.0, 44.0, 0.0]])  # loss sums per interval and domain
  tokens = np.array([[10.0, 10.0, 5.0], [10.0, 10.0, 0.0]])
  signal = excess_loss_signal(ce, tokens, [3.0, 3.0, 5.0])
  np.testing.assert_allclose(signal, [0.3, 1.2, 0.0])  # means 3.3, 4.2, 2.0 (clipped at 0)
  w = np.array([0.5, 0.3, 0.2])
  new = exponentiated_step(w, signal, base=w, learning_rate=1.0, smoothing=0.0)
  assert new[1] > w[1] and new[2] < w[2] and new.sum() == pytest.approx(1.0)
  expected = w * np.exp(signal)
  np.testing.assert_allclose(new, expected / expected.sum())
  assert excess_loss_signal(ce, np.zeros_like(tokens), [0, 0, 0]).tolist() == [0, 0, 0]


def test_smoothing_keeps_a_floor_of_the_stage_weights_and_zero_stays_zero():
  base = np.array([0.6, 0.4, 0.0])
  new = exponentiated_step(base, np.array([50.0, 0.0, 50.0]), base, learning_rate=1.0,
                           smoothing=0.25)
  assert new[1] >= 0.25 * 0.4 - 1e-12 and new[1] == pytest.approx(0.1, rel=1e-6)
  assert new[2] == 0.0  # a domain the stage leaves out is never drawn
  same = exponentiated_step(base, np.array([50.0, 0.0, 50.0]), base, 1.0, 0.25)
  assert new.tobytes() == same.tobytes()  # deterministic to the bit


def test_loss_slope_signal_rewards_domains_still_learning():
  steps = np.array([10, 20, 30, 40])
  losses = np.array([[4.0, 3.0, 2.0], [3.0, 3.0, 2.0], [2.0, 3.0, 2.0], [1.0, 3.0, 2.0]])
  tokens = np.array([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
  signal = loss_slope_signal(steps, losses * tokens * 7, tokens * 7)
  np.testing.assert_allclose(signal, [0.1, 0.0, 0.0], atol=1e-12)  # one point: no slope


def test_the_reweighter_round_trips_through_json_bit_for_bit():
  cfg = ReweightConfig(method="excess_loss", every_steps=4, learning_rate=3.0, smoothing=0.1)
  sched = MixtureSchedule([Stage(0, {"a": 0.7, "b": 0.3})], ("a", "b"), 8, 0)
  rw = Reweighter(cfg, ("a", "b"))
  for step in (2, 4):
    rw.observe(step, [10.0 / 3, 29.0 / 7], [1.0, 1.0])
  assert rw.due(4) and not rw.due(6)
  rw.update(5, sched)
  rw.observe(6, [1.0 / 3, 2.0 / 3], [1.0, 1.0])
  again = Reweighter(cfg, ("a", "b"))
  other = MixtureSchedule([Stage(0, {"a": 0.7, "b": 0.3})], ("a", "b"), 8, 0)
  again.load(json.loads(json.dumps(rw.state())), other)
  assert [(s, w.tobytes()) for s, w in again.history] == [(s, w.tobytes()) for s, w in rw.history]
  assert [p[1].tobytes() for p in again.window] == [p[1].tobytes() for p in rw.window]
  assert rw.history[0][1][1] > 0.3  # b had the higher loss
  assert np.array_equal(sched.counts(np.arange(100)), other.counts(np.arange(100)))


# -- the weight history in the schedule --------------------------------------------------------


def test_history_entries_act_as_stages_until_the_next_stage_and_the_cache_follows():
  stages = [Stage(0, {"a": 1, "b": 1}), Stage(6000, {"a": 1, "b": 3})]
  sched = MixtureSchedule(stages, ("a", "b"), 8, 0)
  before = sched.offsets(9000)  # fills the cumulative-count cache past the change below
  sched.set_history([(5000, [0.1, 0.9])])
  assert sched.weights_at(4999).tolist() == [0.5, 0.5]
  assert sched.weights_at(5000).tolist() == [0.1, 0.9]
  assert sched.weights_at(6000).tolist() == [0.25, 0.75]  # the next stage resets the weights
  fresh = MixtureSchedule(stages, ("a", "b"), 8, 0, history=[(5000, [0.1, 0.9])])
  brute = fresh.counts(np.arange(9000)).sum(0)
  np.testing.assert_array_equal(sched.offsets(9000), brute)  # not the stale cached counts
  assert not np.array_equal(before, brute)
  np.testing.assert_array_equal(sched.offsets(4096), fresh.offsets(4096))
  share = sched.counts(np.arange(5000, 6000)).sum(0) / 8000
  assert abs(share[1] - 0.9) < 0.01
  with pytest.raises(ValueError, match="strictly increasing"):
    sched.set_history([(10, [1, 1]), (10, [1, 2])])


# -- the loop ----------------------------------------------------------------------------------


def _weights(path):
  return {r["step"]: r["data/prose/weight"] for r in read_metrics(path) if "train/loss" in r}


def test_online_reweighting_moves_weight_to_the_under_trained_domain(tiny_exp, monkeypatch):
  # Prose is drawn for 10% of the rows: it is the under-trained (and the harder) domain, so its
  # loss above the shared reference stays the larger one and its weight has to grow.
  fed = []
  put = Runtime.put_batch
  monkeypatch.setattr(Runtime, "put_batch", lambda rt, b: fed.append(b["domain"]) or put(rt, b))
  exp = tiny_exp(run={"steps": 24, "log_every": 2, "sample_tokens": 0, "eval_batches": 1,
                      "global_batch_size": 16},
                 data={"stages": (Stage(0, {"prose": 0.1, "code": 0.9}),),
                       "reweight": {"method": "excess_loss", "every_steps": 4,
                                    "learning_rate": 2.0, "smoothing": 0.1,
                                    "reference_losses": {"prose": 1.0, "code": 1.0}}})
  result = loop.train(exp)
  weights = _weights(result.paths.metrics)
  # The update read at step 4 applies from batch 5, the batch of step 6.
  assert weights[2] == weights[4] == pytest.approx(0.1) and weights[6] != weights[4]
  assert weights[24] > 0.18, weights  # measured 0.265
  meta = Checkpointer(result.paths.checkpoints, create=False).read_meta()
  saved = meta["data"]["reweight"]
  assert [s for s, _ in saved["history"]] == [5, 9, 13, 17, 21, 25]  # batch t + 1 after step t
  assert saved["weights"]["prose"] > 0.18
  # Every batch trained on was drawn with the weights in effect for it: none came stale from
  # the prefetch buffer.
  history = [(s, np.asarray([float.fromhex(v) for v in w])) for s, w in saved["history"]]
  sched = MixtureSchedule(exp.data.stages, exp.data.domains, 16, 0, history=history)
  assert len(fed) == 2 + 24  # first the two domains' validation batches
  for k, domain in enumerate(fed[2:]):
    np.testing.assert_array_equal(domain, sched.assignment(k)[0])
  assert os.path.getsize(os.path.join(result.paths.root, "domain_weights.png")) > 0


@pytest.mark.slow
def test_a_resumed_run_reproduces_the_weights_bit_for_bit(tiny_exp):
  exp = tiny_exp(run={"steps": 12, "log_every": 2, "sample_tokens": 0, "eval_batches": 1},
                 checkpoint={"every_steps": 5},  # not a log point: the unread sums are saved
                 data={"stages": (Stage(0, {"prose": 0.3, "code": 0.7}),),
                       "reweight": {"method": "loss_slope", "every_steps": 4,
                                    "learning_rate": 50.0, "smoothing": 0.1}})
  full = loop.train(exp)
  ckpts = full.paths.checkpoints
  expected_meta = Checkpointer(ckpts, create=False).read_meta(12)
  expected_weights = _weights(full.paths.metrics)
  assert len(set(expected_weights.values())) > 2  # the weights moved
  _, state, _ = load_trained(load_run_experiment(full.paths.root), step=12)
  expected_params = jax.tree.leaves(jax.tree.map(np.asarray, state.params))
  for step in ("10", "12"):  # as if the run had died after the checkpoint of step 5
    shutil.rmtree(os.path.join(ckpts, step))
  kept = [line for line in open(full.paths.metrics) if json.loads(line)["step"] <= 5]
  open(full.paths.metrics, "w").writelines(kept)
  loop.train(exp)
  meta = Checkpointer(ckpts, create=False).read_meta(12)
  assert meta["data"]["reweight"] == expected_meta["data"]["reweight"]
  assert _weights(full.paths.metrics) == expected_weights
  _, state, _ = load_trained(load_run_experiment(full.paths.root), step=12)
  for a, b in zip(jax.tree.leaves(jax.tree.map(np.asarray, state.params)), expected_params):
    np.testing.assert_array_equal(a, b)


# -- bad input -----------------------------------------------------------------------------------


def test_bad_reweighting_settings_are_refused_in_one_line(tiny_exp):
  exp = tiny_exp(run={"log_every": 10}, data={"reweight": {"method": "excess_loss",
                                                            "every_steps": 15}})
  with pytest.raises(ValueError, match=r"^ReweightConfig.every_steps=15 is not a multiple of "
                                       r"RunConfig.log_every=10 .*such as 10\.$"):
    validate(exp)
  exp = tiny_exp(data={"reweight": {"method": "excess_loss", "every_steps": 10,
                                    "reference_losses": {"prose": 2.0, "poetry": 1.0}}})
  with pytest.raises(ValueError, match=r"^ReweightConfig.reference_losses names unknown "
                                       r"domain\(s\) \['poetry'\]; the data has \['prose', "
                                       r"'code'\]\.$"):
    validate(exp)
  exp = tiny_exp(data={"reweight": {"method": "excess_loss", "every_steps": 10,
                                    "reference_losses": {"prose": 2.0}}})
  with pytest.raises(ValueError, match=r"^ReweightConfig.method='excess_loss' needs "
                                       r"ReweightConfig.reference_losses for every domain "
                                       r"\(missing \['code'\]\)"):
    validate(exp)
  exp = tiny_exp(run={"log_every": 10}, data={"reweight": {"method": "loss_slope",
                                                            "every_steps": 10}})
  with pytest.raises(ValueError, match="at least 2 \\* RunConfig.log_every = 20"):
    validate(exp)
  with pytest.raises(ValueError, match="ReweightConfig.method='doremi'"):
    ReweightConfig(method="doremi")
