"""pretrainx.hf against transformers: imported HF models give the same logits, exports load in HF.

Tiny random fp32 models (hidden 64, 2 layers, 4 heads, 2 kv heads, vocab 300) of each supported
architecture; sharded import onto the 8 fake devices; bad inputs; the HF tokenizer vocabulary.
"""

import dataclasses
import json
import os
import shutil

import flax
import numpy as np
import pytest

import safetensors  # noqa: F401  pylint: disable=unused-import
import torch
import transformers

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from pretrainx import hf  # noqa: E402
from pretrainx.config import ModelConfig
from pretrainx.model import Transformer
from pretrainx.flops import count_params
from pretrainx.config import MeshConfig
from pretrainx.sharding import make_mesh, mesh_scope

TINY = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            rms_norm_eps=1e-5, initializer_range=0.15)
LLAMA3_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                   high_freq_factor=4.0, original_max_position_embeddings=32)
ARCH = {"llama": ("LlamaConfig", "LlamaForCausalLM"),
        "mistral": ("MistralConfig", "MistralForCausalLM"),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM")}
TOKENS = np.random.default_rng(0).integers(0, 300, size=(2, 48)).astype(np.int32)


def _hf_model(kind, **overrides):
  """A random HF model whose norms and biases are perturbed (init leaves them 1 and 0)."""
  config_cls, model_cls = (getattr(transformers, n) for n in ARCH[kind])
  torch.manual_seed(0)
  model = model_cls(config_cls(**{**TINY, **overrides})).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name or name.endswith("bias"):
        p.add_(0.3 * torch.randn_like(p))
  return model


def _save(model, directory, **kw):
  model.save_pretrained(directory, safe_serialization=True, **kw)
  return str(directory)


def _hf_logits(model):
  with torch.no_grad():
    return model(torch.from_numpy(TOKENS).long()).logits.numpy()


def _our_logits(cfg, params):
  return np.asarray(Transformer(cfg).apply({"params": params}, jnp.asarray(TOKENS)))[..., :300]


def _assert_close(ours, theirs):
  assert np.std(theirs) > 0.3  # logits of substance, so a layout error cannot hide under 1e-4
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("kind,overrides,pretrainx_overrides", [
    ("llama", {}, {}),
    ("llama", {"tie_word_embeddings": True}, {"scan_layers": False}),
    ("llama", {"rope_scaling": LLAMA3_ROPE, "rope_theta": 20_000.0}, {}),
    ("mistral", {"sliding_window": None}, {}),
    ("qwen2", {"tie_word_embeddings": True}, {}),
], ids=["llama", "llama-tied-unscanned", "llama3-rope", "mistral", "qwen2-bias"])
def test_imported_logits_match_transformers(tmp_path, kind, overrides, pretrainx_overrides):
  model = _hf_model(kind, **overrides)
  cfg, params = hf.import_hf(_save(model, tmp_path), overrides=pretrainx_overrides)
  assert cfg.tie_embeddings == bool(overrides.get("tie_word_embeddings", False))
  assert cfg.qkv_bias == (kind == "qwen2")
  assert ("lm_head" in params) != cfg.tie_embeddings
  assert count_params(cfg)["total"] == sum(p.numel() for p in model.parameters())
  if "rope_scaling" in overrides:
    assert cfg.rope_llama3 == (8.0, 1.0, 4.0, 32) and cfg.rope_theta == 20_000.0
    plain = _our_logits(dataclasses.replace(cfg, rope_scaling=None), params)
    assert np.max(np.abs(plain - _hf_logits(model))) > 1e-2  # the scaling matters here
  # padded vocabulary rows are zeros
  assert cfg.padded_vocab_size == 384
  assert not np.any(np.asarray(params["embed"]["embedding"])[300:])
  _assert_close(_our_logits(cfg, params), _hf_logits(model))


def _tiny_cfg(**kw):
  return ModelConfig(**{**dict(vocab_size=300, embed_dim=64, mlp_dim=128, num_layers=2,
                               num_heads=4, num_kv_heads=2, max_seq_len=64, init_std=0.15), **kw})


def _random_params(cfg, seed=1):
  """Random Transformer(cfg) params: weights N(0, .15), norm gains 1 + N(0, .3), biases N(0, .3)."""
  shapes = flax.traverse_util.flatten_dict(jax.eval_shape(
      lambda: Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]))
  rng = np.random.default_rng(seed)
  params = {}
  for path, leaf in shapes.items():
    noise = rng.normal(size=leaf.value.shape if hasattr(leaf, "value") else leaf.shape)
    params[path] = jnp.asarray(1.0 + 0.3 * noise if path[-1] == "scale" else
                               (0.3 if "bias" in path[-1] else 0.15) * noise, jnp.float32)
  return flax.traverse_util.unflatten_dict(params)


def _same_fields(a, b):
  names = ("vocab_size", "embed_dim", "mlp_dim", "num_layers", "num_heads", "num_kv_heads",
           "resolved_head_dim", "max_seq_len", "rope_theta", "norm_eps", "tie_embeddings",
           "qkv_bias", "rope_llama3")
  return {n: getattr(a, n) for n in names} == {n: getattr(b, n) for n in names}


@pytest.mark.parametrize("impl", ["reference", "flash"])
def test_windowed_mistral_matches_transformers(tmp_path, impl):
  """A Mistral whose sliding window (16) is shorter than the sequence (48): the same logits, with
  'reference' and with the flash kernel (interpret mode, blocks that skip what the window hides)."""
  model = _hf_model("mistral", sliding_window=16)
  overrides = {"attention_impl": impl}
  if impl == "flash":
    overrides.update(kernel_interpret=True, flash_block_q=16, flash_block_k=16)
  cfg, params = hf.import_hf(_save(model, tmp_path), overrides=overrides)
  assert cfg.sliding_window == 16 and TOKENS.shape[1] > 16
  _assert_close(_our_logits(cfg, params), _hf_logits(model))
  # the window binds: the logits without it are another model's
  unwindowed = _our_logits(dataclasses.replace(cfg, sliding_window=None), params)
  assert np.max(np.abs(unwindowed - _hf_logits(model))) > 1e-2


def test_convert_round_trip_keeps_the_window_and_the_source_context(tmp_path):
  """Mistral (window 16, max_position_embeddings 64) -> pretrainx -> HF: a MistralForCausalLM
  with the window and the source's max_position_embeddings, and the same logits."""
  model = _hf_model("mistral", sliding_window=16)
  ours = hf.convert_main(_save(model, tmp_path / "src"), str(tmp_path / "px"), "hf-to-pretrainx")
  back = hf.convert_main(ours, str(tmp_path / "hf"), "pretrainx-to-hf")
  with open(os.path.join(back, "config.json"), encoding="utf-8") as f:
    config = json.load(f)
  assert config["architectures"] == ["MistralForCausalLM"]
  assert (config["sliding_window"], config["max_position_embeddings"]) == (16, 64)
  loaded = transformers.AutoModelForCausalLM.from_pretrained(back).eval()
  np.testing.assert_allclose(_hf_logits(loaded), _hf_logits(model), atol=1e-5, rtol=0)
  # a run's shorter context is not what the export declares: the source's is
  cfg = hf.load_hf_config(back, max_seq_len=32)
  for arch in ("MistralForCausalLM", "Qwen2ForCausalLM"):
    written = hf.hf_config_dict(cfg, arch, "float32")
    assert (written["max_position_embeddings"], written["sliding_window"]) == (64, 16), arch
  assert hf.hf_config_dict(cfg, "Qwen2ForCausalLM", "float32")["use_sliding_window"]
  assert hf.hf_config_dict(dataclasses.replace(cfg, sliding_window=None), "LlamaForCausalLM",
                           "float32")["max_position_embeddings"] == 64
  with pytest.raises(ValueError, match=r"sliding_window=16 \(LlamaForCausalLM has no window"):
    hf.check_hf_compatible(cfg, "LlamaForCausalLM")


@pytest.mark.parametrize("kind,architecture", [("llama", "LlamaForCausalLM"),
                                               ("qwen2", "Qwen2ForCausalLM")])
def test_export_round_trip_loads_in_transformers(tmp_path, kind, architecture):
  """pretrainx params -> sharded HF export -> transformers gives our logits; re-import is exact."""
  cfg = _tiny_cfg(tie_embeddings=kind == "qwen2", qkv_bias=kind == "qwen2",
                  rope_scaling="llama3" if kind == "llama" else None, rope_original_max_len=32)
  params = _random_params(cfg)
  out = hf.export_hf(params, cfg, str(tmp_path / "hf"), architecture=architecture,
                     shard_size=100_000)
  files = sorted(os.listdir(out))
  assert hf.INDEX_FILE in files and sum(f.endswith(".safetensors") for f in files) > 1
  with open(os.path.join(out, "config.json"), encoding="utf-8") as f:
    assert json.load(f)["architectures"] == [architecture]
  loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  assert type(loaded).__name__ == architecture
  _assert_close(_our_logits(cfg, params), _hf_logits(loaded))
  cfg2, params2 = hf.import_hf(out)
  assert _same_fields(cfg, cfg2)
  _assert_close(_our_logits(cfg2, params2), _our_logits(cfg, params))


@pytest.fixture(scope="module")
def sharded_llama(tmp_path_factory):
  """A Llama checkpoint saved in several safetensors shards with an index, and its HF model."""
  model = _hf_model("llama")
  directory = _save(model, tmp_path_factory.mktemp("llama_sharded"), max_shard_size="100KB")
  return directory, _hf_logits(model)


def test_sharded_checkpoint_imports_into_mesh_shardings(sharded_llama):
  directory, hf_logits = sharded_llama
  shards = [f for f in os.listdir(directory) if f.endswith(".safetensors")]
  assert hf.INDEX_FILE in os.listdir(directory) and len(shards) > 2
  mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  rules = MeshConfig().rules
  cfg, params = hf.import_hf(directory, mesh=mesh, rules=rules)
  q = params["layers"]["attention"]["q_proj"]  # [layers, embed, heads, head_dim]
  expected = NamedSharding(mesh, PartitionSpec(None, ("fsdp", "context"), "tensor", None))
  assert q.sharding.is_equivalent_to(expected, q.ndim)
  assert {s.data.shape for s in q.addressable_shards} == {(2, 32, 2, 16)}
  table = params["embed"]["embedding"]  # [vocab, embed]
  assert table.sharding.is_equivalent_to(NamedSharding(mesh, PartitionSpec("tensor", "fsdp")), 2)
  with mesh_scope(mesh, rules):
    logits = jax.jit(Transformer(cfg).apply)({"params": params}, jnp.asarray(TOKENS))
  _assert_close(np.asarray(logits)[..., :300], hf_logits)


def _edited_copy(src, dst, **config_changes):
  shutil.copytree(src, dst)
  path = os.path.join(dst, "config.json")
  with open(path, encoding="utf-8") as f:
    config = json.load(f)
  config.update(config_changes)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(config, f)
  return str(dst)


def test_bad_checkpoints_fail_with_clear_messages(sharded_llama, tmp_path):
  directory, _ = sharded_llama
  bad = _edited_copy(directory, tmp_path / "gpt2", architectures=["GPT2LMHeadModel"])
  with pytest.raises(ValueError, match=r"GPT2LMHeadModel.*LlamaForCausalLM, MistralForCausalLM"):
    hf.import_hf(bad)
  bad = _edited_copy(directory, tmp_path / "wide", intermediate_size=96)
  with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.\w+_proj\.weight .* has shape "
                     r"\((128, 64|64, 128)\) but config.json implies \((96, 64|64, 96)\)"):
    hf.import_hf(bad)
  bad = _edited_copy(directory, tmp_path / "deep", num_hidden_layers=3)
  with pytest.raises(ValueError, match=r"missing .*model\.layers\.2\."):
    hf.import_hf(bad)
  bad = _edited_copy(directory, tmp_path / "no_shard")
  with open(os.path.join(bad, hf.INDEX_FILE), encoding="utf-8") as f:
    lost = sorted(set(json.load(f)["weight_map"].values()))[1]
  os.remove(os.path.join(bad, lost))
  with pytest.raises(FileNotFoundError, match=f"shard {lost} .* is missing"):
    hf.import_hf(bad)
  os.remove(os.path.join(bad, hf.INDEX_FILE))
  with pytest.raises(FileNotFoundError, match="neither model.safetensors nor"):
    hf.import_hf(bad)


@pytest.mark.parametrize("changes,match", [
    ({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "use_sliding_window": True,
      "sliding_window": 16, "max_window_layers": 1},
     r"sliding window of 16 tokens in layers \[1\] only.*max_seq_len <= 16"),
    ({"rope_parameters": {"rope_type": "longrope", "factor": 4.0}},
     r"'longrope' .* not supported; pretrainx implements 'default', 'linear'"),
    ({"rope_scaling": {"type": "linear", "factor": 4.0}}, r"rope_scaling of type 'linear' and "
     r"rope_parameters of type 'default'"),
    ({"hidden_act": "gelu"}, r"hidden_act='gelu'"),
])
def test_unsupported_config_options_are_refused(tmp_path, changes, match):
  config = transformers.MistralConfig(**TINY).to_dict()
  config.update({"architectures": ["MistralForCausalLM"], "sliding_window": None, **changes})
  with open(tmp_path / "config.json", "w", encoding="utf-8") as f:
    json.dump(config, f)
  with pytest.raises(ValueError, match=match):
    hf.load_hf_config(str(tmp_path))


def _write_config(directory, config_cls, **fields):
  config = getattr(transformers, config_cls)(**{**TINY, **fields}).to_dict()
  config.update(architectures=[config_cls.replace("Config", "ForCausalLM")])
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
    json.dump(config, f)
  return str(directory)


def test_sliding_windows_import_as_transformers_applies_them(tmp_path):
  """Mistral's window, Qwen2's only with use_sliding_window and in every layer (max_window_layers
  0); a window in some layers only is refused where it binds, dropped where it never does."""
  mistral = hf.load_hf_config(_write_config(tmp_path / "m", "MistralConfig", sliding_window=16))
  assert (mistral.sliding_window, mistral.max_seq_len) == (16, 64)
  assert mistral.source_max_position_embeddings == 64
  assert hf.load_hf_config(str(tmp_path / "m"), max_seq_len=16).sliding_window == 16
  qwen = lambda name, **kw: hf.load_hf_config(
      _write_config(tmp_path / name, "Qwen2Config", sliding_window=16, **kw))
  assert qwen("off").sliding_window is None  # use_sliding_window=False
  assert qwen("all", use_sliding_window=True, max_window_layers=0).sliding_window == 16
  partial = _write_config(tmp_path / "part", "Qwen2Config", sliding_window=16,
                          use_sliding_window=True, max_window_layers=1)
  assert hf.load_hf_config(partial, max_seq_len=16).sliding_window is None  # never binds


def test_a_windowed_source_under_a_shorter_bound_context(tmp_path):
  """InitConfig.source = a Mistral with a window: the run gets the window and its own shorter
  max_seq_len (the source's 64 is not held against the bound 32)."""
  from pretrainx.config import (  # pylint: disable=import-outside-toplevel
      Experiment, InitConfig, with_source_architecture)
  source = _write_config(tmp_path / "src", "MistralConfig", sliding_window=16)
  open(os.path.join(source, "model.safetensors"), "wb").close()  # an HF directory by its names
  exp = Experiment(model=ModelConfig(max_seq_len=32), init=InitConfig(source=source))
  model = with_source_architecture(exp, bound={"max_seq_len"}).model
  assert (model.sliding_window, model.max_seq_len, model.source_max_position_embeddings) == (
      16, 32, 64)


def test_export_refuses_what_hf_cannot_hold(tmp_path):
  cfg = _tiny_cfg(qkv_bias=True)
  params = _random_params(cfg)
  with pytest.raises(ValueError, match=r"LlamaForCausalLM has no q/k/v biases.*Qwen2ForCausalLM"):
    hf.export_hf(params, cfg, str(tmp_path), architecture="LlamaForCausalLM")
  with pytest.raises(ValueError, match="unsupported Hugging Face architecture 'GPT2LMHeadModel'"):
    hf.export_hf(params, cfg, str(tmp_path), architecture="GPT2LMHeadModel")
  with pytest.raises(ValueError, match=r"embed_projection=True"):
    hf.export_hf(params, dataclasses.replace(cfg, embed_projection=True), str(tmp_path),
                 architecture="Qwen2ForCausalLM")
  with pytest.raises(ValueError, match=r"layers/mlp/\w+_proj has shape \(2, (64, 128|128, 64)\) "
                     r"but the ModelConfig implies \(2, (64, 96|96, 64)\)"):
    hf.export_hf(params, dataclasses.replace(cfg, mlp_dim=96), str(tmp_path),
                 architecture="Qwen2ForCausalLM")


def test_convert_both_directions(sharded_llama, tmp_path):
  from pretrainx.config import parse_gin  # pylint: disable=import-outside-toplevel

  directory, hf_logits = sharded_llama
  ours = hf.convert_main(directory, str(tmp_path / "px"), "hf-to-pretrainx")
  model_cfg = parse_gin([os.path.join(ours, "config.gin")]).model
  assert _same_fields(model_cfg, hf.load_hf_config(directory))
  back = hf.convert_main(ours, str(tmp_path / "hf"), "pretrainx-to-hf", shard_size=200_000)
  loaded = transformers.AutoModelForCausalLM.from_pretrained(back).eval()
  np.testing.assert_allclose(_hf_logits(loaded), hf_logits, atol=1e-5, rtol=0)
  with pytest.raises(ValueError, match="unknown conversion direction 'sideways'"):
    hf.convert_main(ours, str(tmp_path / "x"), "sideways")


def test_hf_tokenizer_vocabulary(tmp_path):
  import tokenizers  # pylint: disable=import-outside-toplevel
  from pretrainx.vocab import HFTokenizerVocabulary  # pylint: disable=import-outside-toplevel

  texts = ["def add(a, b):\n  return a + b\n", "the quick brown fox jumps over the lazy dog",
           "héllo wörld, ünïcode 你好"] * 20
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  tok.train_from_iterator(texts, tokenizers.trainers.BpeTrainer(
      vocab_size=320, special_tokens=["<pad>", "</s>"],
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
  tok.save(str(tmp_path / "tokenizer.json"))
  vocab = HFTokenizerVocabulary(str(tmp_path))
  assert (vocab.pad_id, vocab.eos_id) == (0, 1) and vocab.vocab_size == tok.get_vocab_size()
  for text in texts[:3]:
    ids = vocab.encode(text)
    assert ids.dtype == np.int32 and 0 < len(ids) < len(text.encode())  # merges learnt
    assert vocab.decode(ids) == text
  assert vocab.decode(np.concatenate([vocab.encode("fox"), [vocab.eos_id, 5, 6]])) == "fox"
  assert vocab.name.startswith("hf-tokenizer-") and vocab == HFTokenizerVocabulary(str(tmp_path))
  name = vocab.name
  tok.add_tokens(["<extra>"])
  os.remove(tmp_path / "tokenizer.json")
  tok.save(str(tmp_path / "tokenizer.json"))
  assert vocab.name != name  # the name follows the file's content
  with pytest.raises(FileNotFoundError, match="Nothing is downloaded"):
    HFTokenizerVocabulary(str(tmp_path / "absent")).encode("x")


def test_transformers4_style_llama3_config(tmp_path):
  """Llama 3.1's config.json as transformers 4 writes it: top-level rope_theta + rope_scaling."""
  config = {"architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
            "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
            "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192, "rope_type": "llama3"},
            "tie_word_embeddings": False, "vocab_size": 128256, "hidden_act": "silu"}
  with open(tmp_path / "config.json", "w", encoding="utf-8") as f:
    json.dump(config, f)
  cfg = hf.load_hf_config(str(tmp_path), scan_layers=False)
  assert (cfg.rope_theta, cfg.rope_llama3) == (500000.0, (8.0, 1.0, 4.0, 8192))
  assert (cfg.resolved_head_dim, cfg.num_kv_heads, cfg.max_seq_len) == (128, 8, 131072)
  assert not cfg.scan_layers and not cfg.qkv_bias
  assert count_params(cfg)["total"] == 8_030_261_248  # Llama 3.1 8B
  round_trip = hf.hf_config_dict(cfg, "LlamaForCausalLM", "bfloat16")
  assert {k: round_trip[k] for k in config} == config
