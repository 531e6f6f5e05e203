"""`pretrainx score TASK --by=perplexity|reference_ratio|file`: a score per document written into
the token store as a versioned score set, equal to the JSON-lines mode's log-probs, resumable,
and refusing bad input in one line."""

import json
import os

import numpy as np
import pytest

from pretrainx import cli
from pretrainx.data import score_sets
from pretrainx.data.store import open_store
from pretrainx.harness import store_scores

pytestmark = pytest.mark.xdist_group("store_scores")  # its module fixtures are built once

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "gin_configs/tiny.gin")
QUIET = ["--gin_param=RunConfig.sample_tokens=0", "--gin_param=RunConfig.eval_batches=1",
         "--gin_param=RunConfig.progress_bar=False", "--peak_tflops=1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A tiny run trained 2 steps (checkpoints 1 and 2) whose config knows the task 'web' (20
  short documents, some longer than a 64-token row), and that task's prepared store."""
  tmp = tmp_path_factory.mktemp("store_scores")
  (tmp / "web").mkdir()
  with open(tmp / "web/part0.jsonl", "w", encoding="utf-8") as f:
    f.writelines(json.dumps({"text": f"doc {i}: " + "lorem ipsum dolor " * (i % 7 + 1)}) + "\n"
                 for i in range(20))
  gin_file = tmp / "web.gin"
  gin_file.write_text("DataConfig.tasks = [@web/FileTask()]\nweb/FileTask.name = 'web'\n"
                      f"web/FileTask.train_patterns = ['{tmp / 'web/*.jsonl'}']\n"
                      f"DataConfig.store_dir = '{tmp / 'stores'}'\n")
  gin = [f"--gin_file={TINY}", f"--gin_file={gin_file}"]
  assert cli.main(["data", "prepare", "web", "--split=train", *gin]) == 0
  run_dir = str(tmp / "run")
  assert cli.main(["train", *gin, f"--run_dir={run_dir}", "--gin_param=RunConfig.steps=2",
                   "--gin_param=CheckpointConfig.every_steps=1", *QUIET]) == 0
  return {"run_dir": run_dir, "gin": gin, "store": str(tmp / "stores/web/train"), "tmp": tmp}


def _score(run, *args) -> int:
  return cli.main(["score", "web", f"--run_dir={run['run_dir']}", *args])


@pytest.mark.slow
def test_perplexity_equals_the_jsonl_mode_and_versions_add_up(run, capsys):
  assert _score(run, "--by=perplexity") == 0
  out = capsys.readouterr().out
  assert f"{run['store']}: score 'perplexity' v1 of 20 documents: mean " in out
  jsonl = run["tmp"] / "logprobs.jsonl"
  assert cli.main(["score", "--domain=web", "--split=train", f"--run_dir={run['run_dir']}",
                   f"--out={jsonl}"]) == 0
  rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
  assert max(r["num_tokens"] for r in rows) > 64  # some documents need rolling windows
  expected = np.exp([-r["mean_logprob"] for r in rows])
  store = open_store(run["store"])
  np.testing.assert_allclose(store.score("perplexity"), expected, rtol=1e-5)
  _, info = score_sets.read_scores(run["store"], "perplexity", 1)
  assert info["params"] == {"run_dir": run["run_dir"], "step": 2, "seq_len": 64}

  assert _score(run, "--by=perplexity") == 0  # a finished score is never overwritten
  assert "'perplexity' v2 of 20" in capsys.readouterr().out
  store = open_store(run["store"])
  assert store.score_names()["perplexity"] == [1, 2]
  np.testing.assert_allclose(store.score("perplexity", 2), store.score("perplexity", 1),
                             rtol=1e-6)


def test_reference_ratio_is_the_ratio_of_mean_nlls(run, capsys):
  assert _score(run, "--by=perplexity", "--name=ppl_late") == 0
  assert _score(run, "--by=perplexity", "--name=ppl_early", "--step=1") == 0
  assert _score(run, "--by=reference_ratio", f"--reference_run_dir={run['run_dir']}",
                "--reference_step=1") == 0
  assert "score 'reference_ratio' v1 of 20 documents" in capsys.readouterr().out
  store = open_store(run["store"])
  expected = np.log(store.score("ppl_early")) / np.log(store.score("ppl_late"))
  np.testing.assert_allclose(store.score("reference_ratio"), expected, rtol=1e-5)
  assert (store.score("reference_ratio") > 1).mean() > 0.5  # step 2 learnt something over step 1
  info = score_sets.read_scores(run["store"], "reference_ratio")[1]
  assert info["params"]["reference_step"] == 1 and info["params"]["step"] == 2


@pytest.mark.slow
def test_file_scores_round_trip_without_a_model(run, capsys):
  values = np.round(np.random.default_rng(0).normal(size=20), 4)
  plain = run["tmp"] / "plain.jsonl"
  plain.write_text("".join(f"{v}\n" for v in values))
  order = np.random.default_rng(1).permutation(20)
  objects = run["tmp"] / "objects.jsonl"
  objects.write_text("".join(json.dumps({"i": int(i), "q": values[i]}) + "\n" for i in order))
  assert cli.main(["score", "web", "--by=file", f"--scores_file={plain}", "--name=quality",
                   *run["gin"]]) == 0
  assert f"{run['store']}: score 'quality' v1 of 20 documents" in capsys.readouterr().out
  assert cli.main(["score", "web", "--by=file", f"--scores_file={objects}", "--name=quality",
                   "--index_field=i", "--score_field=q", *run["gin"]]) == 0
  store = open_store(run["store"])
  np.testing.assert_array_equal(store.score("quality", 1), values.astype(np.float32))
  np.testing.assert_array_equal(store.score("quality", 2), values.astype(np.float32))


def test_an_interrupted_scoring_continues_its_version(run, monkeypatch, capsys):
  monkeypatch.setattr(store_scores, "CHUNK_DOCS", 6)
  real, calls = store_scores.mean_nll, []

  def interrupted(*args):
    calls.append(1)
    if len(calls) == 2:
      raise KeyboardInterrupt
    return real(*args)

  monkeypatch.setattr(store_scores, "mean_nll", interrupted)
  assert _score(run, "--by=perplexity", "--name=resumed") == 130
  assert "Run the same command again to resume" in capsys.readouterr().err
  info = json.loads((run["tmp"] / "stores/web/train/score_sets/resumed/v1/info.json").read_text())
  assert info["done"] == 6 and not info["complete"]
  assert "resumed" not in open_store(run["store"]).score_names()

  calls.clear()
  monkeypatch.setattr(store_scores, "mean_nll", lambda *a: (calls.append(1), real(*a))[1])
  assert _score(run, "--by=perplexity", "--name=resumed") == 0
  assert "'resumed' v1 of 20" in capsys.readouterr().out
  assert len(calls) == 3  # documents 6..19 only
  assert _score(run, "--by=perplexity", "--name=whole") == 0
  store = open_store(run["store"])
  assert store.score_names()["resumed"] == [1]
  np.testing.assert_array_equal(store.score("resumed"), store.score("whole"))


@pytest.mark.parametrize("args, message", [
    (["--by=file", "--scores_file=/nonexistent/scores.jsonl"], "does not exist"),
    (["--by=file", "--scores_file={tmp}/short.jsonl"], "19 have no score (the first: document 1)"),
    (["--by=file", "--scores_file={tmp}/far.jsonl"], "scores document 20, but the store holds"),
    (["--by=reference_ratio"], "needs --reference_run_dir"),
    (["--by=perplexity", "--out=x.jsonl"], "use one or the other"),
    (["--by=perplexity", "--scores_file=x.jsonl"], "--scores_file goes with --by=file"),
    (["--by=perplexity", "--name=source"], "score name 'source'"),
])
def test_bad_input_is_one_clear_line(run, capsys, args, message):
  (run["tmp"] / "short.jsonl").write_text('{"doc": 0, "score": 1.0}\n')
  (run["tmp"] / "far.jsonl").write_text('{"doc": 20, "score": 1.0}\n')
  assert _score(run, *(a.format(tmp=run["tmp"]) for a in args)) == 2
  err = capsys.readouterr().err
  assert message in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("argv, message", [
    (["score", "poetry", "--by=perplexity"], "unknown domain 'poetry'"),
    (["score", "--by=perplexity"], "needs both TASK and --by"),
    (["score", "web"], "needs both TASK and --by"),
    (["score", "--domain=web"], "pass --input or --domain with --out"),
])
def test_bad_modes_are_one_clear_line(run, capsys, argv, message):
  assert cli.main([*argv, f"--run_dir={run['run_dir']}"]) == 2
  err = capsys.readouterr().err
  assert message in err and err.count("\n") == 1


def test_file_scores_reads_numbers_or_objects(tmp_path):
  path = tmp_path / "s.jsonl"
  path.write_text('{"doc": 1, "score": 2}\n\n{"doc": 0, "score": -1.5}\n')
  values, params = store_scores.file_scores(str(path), 2)
  assert values.tolist() == [-1.5, 2.0] and params["score_field"] == "score"
  for text, message in (("1\n{\"doc\": 1, \"score\": 1}\n", "mixes bare numbers and objects"),
                        ("1\n1\n1\n", "scores document 2"), ("1\nNaN\n", "not a finite number"),
                        ('{"doc": 0, "score": 1}\n{"doc": 0, "score": 2}\n', "a second time"),
                        ("1\n[\n", "is not JSON")):
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
      store_scores.file_scores(str(path), 2)
