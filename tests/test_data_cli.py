"""Data configuration from gin and the `data prepare|inspect` commands, end to end."""

import glob
import json
import os

import pytest

from pretrainx import cli
from pretrainx.config import experiment_to_gin, parse_gin

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "gin_configs/tiny.gin")


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "gin_configs/data/*.gin"))))
def test_data_gin_files_parse_and_round_trip(path, tmp_path):
  exp = parse_gin([TINY, path])
  assert exp.data.stages or exp.data.tasks
  written = tmp_path / "config.gin"
  written.write_text(experiment_to_gin(exp))
  assert parse_gin([str(written)]) == exp


def _write_web_task(tmp_path):
  docs = [{"text": f"document {i}: " + "lorem ipsum dolor sit amet " * (5 + i % 7),
           "url": f"site{i % 3}.example", "quality": (i % 10) / 10} for i in range(60)]
  (tmp_path / "web").mkdir()
  with open(tmp_path / "web/part0.jsonl", "w", encoding="utf-8") as f:
    f.write("\n".join(json.dumps(d) for d in docs))
  gin_file = tmp_path / "web.gin"
  gin_file.write_text(
      open(os.path.join(REPO, "gin_configs/data/files_example.gin")).read().replace(
          "data/web/*.jsonl", str(tmp_path / "web/*.jsonl")) +
      f"DataConfig.store_dir = '{tmp_path / 'stores'}'\n")
  return str(gin_file)


@pytest.mark.slow
def test_prepare_inspect_and_train_on_a_user_task(tmp_path, capsys):
  gin_file = _write_web_task(tmp_path)
  args = ["--cpu_devices=1", "data", "inspect", "web", f"--gin_file={gin_file}"]
  assert cli.main(args) == 2  # not prepared yet
  assert "data prepare web" in capsys.readouterr().err
  assert cli.main(["data", "prepare", "web", f"--gin_file={gin_file}"]) == 0
  out = capsys.readouterr().out
  assert "web/train:" in out and "web/validation:" in out
  assert cli.main(args) == 0
  out = capsys.readouterr().out
  assert "documents" in out and "lorem ipsum" in out and "site" in out
  run_dir = tmp_path / "run"
  assert cli.main(["train", f"--gin_file={TINY}", f"--gin_file={gin_file}",
                   f"--run_dir={run_dir}", "--gin_param=RunConfig.steps=3",
                   "--gin_param=RunConfig.sample_tokens=0", "--gin_param=RunConfig.eval_batches=1",
                   "--gin_param=RunConfig.progress_bar=False"]) == 0
  out = capsys.readouterr().out
  assert "per-domain validation loss: web" in out and "code" in out
  records = [json.loads(l) for l in open(run_dir / "metrics.jsonl")]
  assert any(r.get("data/web/tokens", 0) > 0 for r in records)


@pytest.mark.parametrize("binding, message", [
    ("DataConfig.domains = ['poetry']", "unknown domain"),
    ("DataConfig.stages = [@Stage()]\nStage.weights = {'prose': -1.0}", "negative"),
    ("DataConfig.stages = [@Stage()]\nStage.weights = {'poetry': 1.0}", "unknown domain"),
    ("DataConfig.stages = [@Stage()]\nStage.objective = 'ul2'\nModelConfig.attention_impl = "
     "'linear'", "bidirectional prefix"),
    ("DataConfig.stages = [@Stage()]\nStage.selections = [@Selection()]\nSelection.score = "
     "'quality'", "holds no score 'quality'"),
    ("DataConfig.stages = [@Stage()]\nStage.selections = [@Selection()]\nSelection.domains = "
     "['prose']\nSelection.min_score = 0.5", "keeps no documents of domain 'prose'"),
])
def test_bad_data_config_is_one_clear_line(binding, message, tmp_path, capsys):
  gin_file = tmp_path / "bad.gin"
  gin_file.write_text(binding + "\n")
  code = cli.main(["train", f"--gin_file={TINY}", f"--gin_file={gin_file}",
                   f"--run_dir={tmp_path / 'run'}", "--gin_param=RunConfig.steps=1"])
  assert code == 2
  err = capsys.readouterr().err
  assert message in err and err.count("\n") == 1, err
  assert not (tmp_path / "run").exists()  # refused before anything was written


def test_a_store_of_another_vocabulary_is_refused(tmp_path, capsys):
  gin_file = _write_web_task(tmp_path)
  assert cli.main(["data", "prepare", "web", f"--gin_file={gin_file}"]) == 0
  capsys.readouterr()
  code = cli.main(["data", "inspect", "web", f"--gin_file={gin_file}",
                   "--gin_param=ByteVocabulary.extra_ids=0"])
  assert code == 2
  err = capsys.readouterr().err
  assert "vocabulary" in err and "--overwrite" in err
