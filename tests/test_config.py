"""gin: presets parse, bad bindings explain themselves, and the operative config round-trips."""

import os

import pytest

from pretrainx.config import Experiment, experiment_to_gin, parse_gin

from conftest import REPO


def test_quickstart_and_tiny_parse():
  exp = parse_gin([os.path.join(REPO, "gin_configs/quickstart.gin")])
  assert exp.model.embed_dim == 256 and exp.run.run_dir == "runs/quickstart"
  tiny = parse_gin([os.path.join(REPO, "gin_configs/tiny.gin")], ["RunConfig.steps = 7"])
  assert tiny.run.steps == 7 and tiny.model.num_layers == 2


def test_unknown_gin_binding_names_the_closest_parameter():
  with pytest.raises(ValueError, match=r"doesn't have a parameter named 'num_layer'.*"
                                       r"Did you mean ModelConfig.num_layers"):
    parse_gin([], ["ModelConfig.num_layer = 3"])
  with pytest.raises(ValueError, match=r"No configurable matching 'RunConfg'.*Did you mean RunConfig"):
    parse_gin([], ["RunConfg.steps = 3"])


def test_missing_gin_file():
  with pytest.raises(FileNotFoundError, match="gin file nowhere.gin not found"):
    parse_gin(["nowhere.gin"])


def test_required_macro_must_be_set():
  with pytest.raises(ValueError, match="STEPS|required|REQUIRED"):
    parse_gin([os.path.join(REPO, "gin_configs/runs/pretrain.gin")])


def test_seq_len_above_model_max_is_refused():
  with pytest.raises(ValueError, match=r"RunConfig.seq_len=512 exceeds ModelConfig.max_seq_len=256"):
    parse_gin([os.path.join(REPO, "gin_configs/tiny.gin")], ["RunConfig.seq_len = 512"])


def test_operative_config_round_trips(tmp_path):
  exp = Experiment().replace(model={"num_layers": 3, "rope_theta": 5e5},
                             run={"sample_prompt": "it's \"quoted\"\n", "eval_batches": None})
  path = tmp_path / "config.gin"
  path.write_text(experiment_to_gin(exp))
  assert parse_gin([str(path)]) == exp
