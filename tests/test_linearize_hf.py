"""Linearizing a Hugging Face Llama: the converted model keeps transformers' logits while the
window covers the sequence, and gin_configs/linearize/llama_hf.gin runs end to end."""

import dataclasses
import os

import numpy as np
import pytest

import torch
import transformers

import conftest  # noqa: E402
from pretrainx.config import parse_gin_with  # noqa: E402
from pretrainx.config import LinearizeConfig  # noqa: E402
from pretrainx.linearize.pipeline import linearize  # noqa: E402
from pretrainx.model import Transformer  # noqa: E402
from pretrainx.config import InitConfig
from pretrainx.config.sources import source_model_config
from pretrainx.train.init import initial_state
from pretrainx.train.runtime import build_runtime  # noqa: E402

GIN = os.path.join(conftest.REPO, "gin_configs/linearize/llama_hf.gin")


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
  """A random tiny Llama over the byte vocabulary (259 ids), saved as safetensors."""
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(vocab_size=259, hidden_size=64, intermediate_size=192,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=128, rms_norm_eps=1e-5,
                                 initializer_range=0.1, tie_word_embeddings=False)
  model = transformers.LlamaForCausalLM(cfg).eval()
  directory = str(tmp_path_factory.mktemp("hf") / "llama")
  model.save_pretrained(directory, safe_serialization=True)
  return directory, model


def _experiment(directory, tmp_path, *params):
  """llama_hf.gin on the embedded corpus (byte vocabulary) at toy sizes."""
  overrides = [f"MODEL_DIR = {directory!r}", "ModelConfig.vocab_size = 259",
               "ModelConfig.max_seq_len = 128", "ModelConfig.dtype = 'float32'",
               "DataConfig.vocabulary = @ByteVocabulary()", "DataConfig.tasks = []",
               "DataConfig.domains = ['prose', 'code']", "BATCH_SIZE = 8", "SEQ_LEN = 64",
               "RunConfig.log_every = 2", "RunConfig.progress_bar = False",
               "RunConfig.eval_batches = 1", f"RunConfig.run_dir = {str(tmp_path / 'r')!r}",
               *params]
  return parse_gin_with([GIN], overrides, (LinearizeConfig,))


def test_hf_source_into_a_hybrid_run_keeps_transformers_logits(hf_llama, tmp_path):
  directory, model = hf_llama
  exp, _ = _experiment(directory, tmp_path)
  src_cfg, _, _ = source_model_config(directory, like=exp.model)
  assert (src_cfg.num_layers, src_cfg.embed_dim, src_cfg.max_seq_len) == (2, 64, 128)
  hybrid = dataclasses.replace(exp, model=dataclasses.replace(
      src_cfg, attention_impl="hybrid", attention_window=128), init=InitConfig(source=directory))
  rt = build_runtime(hybrid)
  with rt.scope():
    state, _ = initial_state(rt, hybrid.init)
  tokens = np.random.default_rng(0).integers(3, 259, size=(2, 64)).astype(np.int32)
  ours = Transformer(hybrid.model).apply({"params": state.params}, tokens)[..., :259]
  with torch.no_grad():
    theirs = model(torch.from_numpy(tokens).long()).logits.numpy()
  np.testing.assert_allclose(np.asarray(ours), theirs, atol=2e-4, rtol=0)


@pytest.mark.slow
def test_llama_hf_gin_linearizes_end_to_end(hf_llama, tmp_path):
  directory, _ = hf_llama
  exp, extra = _experiment(directory, tmp_path, "LinearizeConfig.window = 16",
                           "LinearizeConfig.feature_dim = 16", "LinearizeConfig.transfer_steps = 4",
                           "LinearizeConfig.lora_steps = 4", "LinearizeConfig.eval_batches = 1",
                           "LinearizeConfig.sample_tokens = 8")
  lin = extra["LinearizeConfig"]
  assert lin.lora.rank == 8 and lin.lora.targets == ("attention/(q|k|v|o)_proj",)
  report = linearize(directory, exp, lin, str(tmp_path / "out"))
  assert report.layers == [0, 1]
  assert report.rows[0]["fraction_of_pretraining"] is None  # an HF source: unknown pretraining
  assert report.rows[3]["tokens"] == 8 * 8 * 64
  assert report.recurrent_matches_chunked
  assert (tmp_path / "out" / "stage2" / "checkpoints" / "4").is_dir()


def test_hf_source_into_a_run_of_other_shapes_is_explained(hf_llama, tmp_path):
  directory, _ = hf_llama
  exp, _ = _experiment(directory, tmp_path)
  src_cfg, _, _ = source_model_config(directory, like=exp.model)
  wrong = dataclasses.replace(exp, model=dataclasses.replace(src_cfg, mlp_dim=128),
                              init=InitConfig(source=directory))
  rt = build_runtime(wrong)
  with pytest.raises(ValueError, match=r"does not match the Hugging Face model .*mlp_dim: "
                                       r"config.json 192, this run 128"):
    initial_state(rt, wrong.init)
