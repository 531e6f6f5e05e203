"""Sweeps: grid expansion, budgets, bad grids, resumability and failures (Ray: test_ray.py)."""

import json
import os
import types

import pytest

from pretrainx.scaling import sweep as S
from pretrainx.scaling.results import load_results

from conftest import REPO

TINY = os.path.join(REPO, "gin_configs/tiny.gin")
QUIET = ("RunConfig.sample_tokens = 0", "RunConfig.eval_batches = 1", "RunConfig.log_every = 2",
         "RunConfig.peak_tflops = 1.0")


def make_sweep(tmp_path, **fields):
  fields.setdefault("grid", {"OptimizerConfig.learning_rate": [1e-3, 1e-2]})
  fields.setdefault("bindings", QUIET)
  return S.SweepConfig(name="t", gin_files=(TINY,), run_root=str(tmp_path / "r"),
                       results=str(tmp_path / "results.sqlite"), **fields)


def fake_result(loss=2.0):
  return types.SimpleNamespace(train_loss=loss + 0.1, eval_loss=loss, preempted=False,
                               eval_domain_losses={"prose": loss + 0.2, "code": loss - 0.2})


class FakeTrain:
  """Stands in for pretrainx.train.loop.train: records the experiments, returns fixed losses."""

  def __init__(self, error=None):
    self.calls, self.error = [], error

  def __call__(self, exp):
    self.calls.append(exp)
    if self.error:
      raise self.error
    return fake_result(1.0 + exp.optimizer.learning_rate)


def test_expand_models_tokens_and_grid(tmp_path):
  cfg = make_sweep(tmp_path, models={"w32": {"ModelConfig.embed_dim": 32},
                                     "w64": {"ModelConfig.embed_dim": 64}},
                   tokens=(5120, 10240))
  runs = S.expand(cfg)
  assert len(runs) == 2 * 2 * 2
  assert len({r.name for r in runs}) == len({r.config_hash for r in runs}) == 8
  widths = sorted({r.experiment.model.embed_dim for r in runs})
  assert widths == [32, 64]
  per_step = 8 * 64  # tiny.gin: 8 rows of 64 tokens
  assert sorted({r.experiment.run.steps for r in runs}) == [5120 // per_step, 10240 // per_step]
  assert {r.experiment.optimizer.learning_rate for r in runs} == {1e-3, 1e-2}
  assert all(r.experiment.run.run_dir == os.path.join(cfg.run_root, r.name) for r in runs)
  assert runs[0].name.startswith("t-w32-D5.12e03-")
  # the hash depends on the experiment only, not on where it is written
  again = S.expand(make_sweep(tmp_path / "elsewhere", models=cfg.models, tokens=cfg.tokens))
  assert [r.config_hash for r in again] == [r.config_hash for r in runs]


def test_flops_budget_sets_steps_per_model(tmp_path):
  from pretrainx.flops import flops_per_token

  cfg = make_sweep(tmp_path, models={"w32": {"ModelConfig.embed_dim": 32},
                                     "w64": {"ModelConfig.embed_dim": 64}},
                   flops=(2e10,), grid={})
  runs = S.expand(cfg)
  steps = [r.experiment.run.steps for r in runs]
  assert steps[0] > steps[1]  # the smaller model trains on more tokens at equal compute
  for r in runs:
    exp = r.experiment
    per_step = flops_per_token(exp.model, exp.run.seq_len) * exp.run.global_batch_size * 64
    assert abs(exp.run.steps * per_step - 2e10) <= per_step / 2


def test_token_range_leaves_out_runs_too_short_or_too_long(tmp_path):
  models = {"w32": {"ModelConfig.embed_dim": 32}, "w64": {"ModelConfig.embed_dim": 64}}
  full = S.expand(make_sweep(tmp_path, models=models, flops=(2e10, 8e10), grid={}))
  tokens = sorted(r.experiment.run.steps * 512 for r in full)
  kept = S.expand(make_sweep(tmp_path, models=models, flops=(2e10, 8e10), grid={},
                             token_range=(tokens[1], tokens[2])))
  assert sorted(r.experiment.run.steps * 512 for r in kept) == tokens[1:3]
  with pytest.raises(ValueError, match="leaves no grid point"):
    S.expand(make_sweep(tmp_path, models=models, flops=(2e10,), grid={}, token_range=(1, 2)))


def test_typo_in_grid_binding_fails_before_anything_runs(tmp_path):
  cfg = make_sweep(tmp_path, grid={"OptimizerConfig.learning_rat": [1e-3]})
  train = FakeTrain()
  with pytest.raises(ValueError, match=r"grid point .*learning_rat.*Did you mean "
                                       r"OptimizerConfig.learning_rate"):
    S.run_sweep(cfg, train_fn=train)
  assert not train.calls and not os.path.exists(cfg.results)


@pytest.mark.parametrize("fields, message", [
    ({"grid": {"learning_rate": [1.0]}}, "not a binding name"),
    ({"grid": {"OptimizerConfig.learning_rate": []}}, "non-empty list"),
    ({"grid": {"OptimizerConfig.learning_rate": 0.1}}, "non-empty list"),
    ({"grid": {}, "tokens": (1e4,), "flops": (1e9,)}, "choose one axis"),
    ({"grid": {}, "tokens": (-5,)}, "must be positive"),
    ({"grid": {}}, "no axes"),
    ({"token_range": (5.0, 1.0)}, "0 <= low < high"),
    ({"grid": {"OptimizerConfig.learning_rate": [1e-3]},
      "models": {"a": {"OptimizerConfig.learning_rate": 1e-2},
                 "b": {"OptimizerConfig.learning_rate": 2e-2}}}, "same experiment"),
])
def test_bad_grids_are_explained(tmp_path, fields, message):
  with pytest.raises(ValueError, match=message):
    S.expand(make_sweep(tmp_path, **fields))


def test_sweep_file_errors(tmp_path):
  with pytest.raises(FileNotFoundError):
    S.parse_sweep(str(tmp_path / "missing.gin"))
  bad = tmp_path / "bad.gin"
  bad.write_text("SweepConfig.gird = {'RunConfig.steps': [1]}\n")
  with pytest.raises(ValueError, match=r"bad sweep file .*gird.*SweepConfig fields"):
    S.parse_sweep(str(bad))


def test_sweep_files_in_the_repo_parse_and_expand():
  for name in sorted(os.listdir(os.path.join(REPO, "gin_configs/sweeps"))):
    cfg = S.parse_sweep(os.path.join(REPO, "gin_configs/sweeps", name))
    assert len(S.expand(cfg)) >= 9, name


def test_rows_then_finished_runs_are_skipped(tmp_path):
  cfg = make_sweep(tmp_path, ratio_domain="code",
                   bindings=QUIET + ("DataConfig.stages = [@Stage()]",
                                     "Stage.weights = {'prose': 1.0, 'code': 3.0}"))
  train = FakeTrain()
  report = S.run_sweep(cfg, train_fn=train)
  assert len(train.calls) == 2 and not report.failed
  rows = load_results(cfg.results)
  assert [r["status"] for r in rows] == ["done", "done"]
  exp = train.calls[0]
  assert rows[0]["D"] == exp.run.steps * 8 * 64
  assert rows[0]["N"] > 0 and rows[0]["C"] > 6 * rows[0]["N"] * rows[0]["D"]
  assert rows[0]["eval_loss"] == pytest.approx(1.001)
  assert rows[0]["domain_losses"] == {"prose": pytest.approx(1.201), "code": pytest.approx(0.801)}
  assert rows[0]["ratio"] == pytest.approx(0.75)
  assert "OptimizerConfig.learning_rate = 0.001" in rows[0]["bindings"]
  again = S.run_sweep(cfg, train_fn=train)
  assert len(train.calls) == 2  # nothing trained twice
  assert all("done before, skipped" in line for line in again.lines)
  assert len(load_results(cfg.results)) == 2
  S.run_sweep(make_sweep(tmp_path, grid={"OptimizerConfig.learning_rate": [1e-3, 1e-2, 3e-2]},
                         ratio_domain="code", bindings=cfg.bindings), train_fn=train)
  assert len(train.calls) == 3  # a widened grid runs only its new point


def test_diverged_runs_are_kept_and_failed_runs_retried(tmp_path):
  cfg = make_sweep(tmp_path, grid={"OptimizerConfig.learning_rate": [1e-3]})
  diverging = FakeTrain(FloatingPointError("loss is NaN at step 3"))
  report = S.run_sweep(cfg, train_fn=diverging)
  assert not report.failed and "diverged" in report.lines[0]
  assert [r["status"] for r in load_results(cfg.results)] == ["diverged"]
  S.run_sweep(cfg, train_fn=diverging)
  assert len(diverging.calls) == 1  # a diverged run is a result: not retried

  cfg2 = make_sweep(tmp_path / "b", grid={"OptimizerConfig.learning_rate": [1e-3, 1e-2]})
  crashing = FakeTrain(RuntimeError("host lost"))
  report = S.run_sweep(cfg2, train_fn=crashing)
  assert len(report.failed) == 2 and "host lost" in report.lines[0]  # the sweep went on
  assert [r["status"] for r in load_results(cfg2.results)] == ["failed", "failed"]
  ok = FakeTrain()
  S.run_sweep(cfg2, train_fn=ok)
  assert len(ok.calls) == 2  # failed runs are retried
  assert [r["status"] for r in load_results(cfg2.results)][-2:] == ["done", "done"]


def test_select_by_name_or_hash(tmp_path):
  runs = S.expand(make_sweep(tmp_path))
  assert S.select(runs, [runs[1].name]) == [runs[1]]
  assert S.select(runs, [runs[0].config_hash[:8]]) == [runs[0]]
  with pytest.raises(ValueError, match="no run of this sweep"):
    S.select(runs, ["nope"])


def _logged_steps(run_dir):
  with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line)["step"] for line in f if '"train/loss"' in line]


@pytest.mark.slow
def test_real_sweep_crashed_run_resumes_from_its_checkpoint(tmp_path):
  from pretrainx.train.loop import train

  cfg = make_sweep(tmp_path, grid={"RunConfig.steps": [8]},
                   bindings=QUIET + ("CheckpointConfig.every_steps = 4",))

  def crash_at_half(exp):  # trains 4 of 8 steps (checkpoint at 4), then the host "dies"
    train(exp.replace(run={"steps": 4}))
    raise RuntimeError("simulated crash")

  report = S.run_sweep(cfg, train_fn=crash_at_half)
  assert report.failed
  run = S.expand(cfg)[0]
  assert os.path.isdir(os.path.join(run.experiment.run.run_dir, "checkpoints", "4"))
  report = S.run_sweep(cfg)  # the real train: resumes at step 4
  assert not report.failed
  assert _logged_steps(run.experiment.run.run_dir) == [2, 4, 6, 8]  # 2 and 4 not trained twice
  row = load_results(cfg.results)[-1]
  assert row["status"] == "done" and row["eval_loss"] > 0
  assert set(row["domain_losses"]) == {"prose", "code"}


def test_cli_sweep_dry_run_and_typo(tmp_path, capsys):
  from pretrainx.cli import main

  good = tmp_path / "good.gin"
  good.write_text(f"SweepConfig.gin_files = [{TINY!r}]\n"
                  "SweepConfig.tokens = [5120, 10240]\n"
                  f"SweepConfig.results = {str(tmp_path / 'r.sqlite')!r}\n")
  assert main(["sweep", str(good), "--dry_run"]) == 0
  out = capsys.readouterr().out
  assert "2 runs" in out and out.count("pending") == 2 and "steps=10" in out
  typo = tmp_path / "typo.gin"
  typo.write_text(f"SweepConfig.gin_files = [{TINY!r}]\n"
                  "SweepConfig.grid = {'ModelConfig.embed_dims': [32]}\n")
  assert main(["sweep", str(typo)]) == 2
  err = capsys.readouterr().err
  assert "ModelConfig.embed_dims" in err and "Did you mean ModelConfig.embed_dim" in err


def test_config_hash_ignores_fields_left_at_their_defaults(tmp_path, monkeypatch):
  """A field pretrainx adds later, at its default, must not change finished runs' hashes."""
  from pretrainx import config

  run = S.expand(make_sweep(tmp_path))[0]
  original = config.experiment_to_gin
  monkeypatch.setattr(config, "experiment_to_gin",  # as if ModelConfig grew a field
                      lambda exp: original(exp) + "ModelConfig.new_field = 0\n")
  assert S.config_hash(run.experiment) == run.config_hash
  monkeypatch.setattr(config, "experiment_to_gin", original)
  other = run.experiment.replace(model={"linear_chunk": run.experiment.model.linear_chunk + 1})
  assert S.config_hash(other) != run.config_hash
