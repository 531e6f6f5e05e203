"""RoPE scaling (ModelConfig.rope_scaling) against transformers: the frequencies, imported models'
logits beyond the original context, exports transformers loads, a run that adds YaRN to a Llama.

Tiny fp32 models (test_hf's: hidden 64, 2 layers, head_dim 16, vocab 300) whose original context
(16) is a third of the sequence (48), so that every scaling type changes the logits.
"""

import dataclasses
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from pretrainx import hf
from pretrainx.config import Experiment, ModelConfig, check_trainable
from pretrainx.model import Transformer
from pretrainx.model.layers import rope_frequencies, rope_tables

from test_hf import ARCH, TINY, TOKENS, _assert_close, _random_params, _tiny_cfg

ORIGINAL, FACTOR = 16, 4.0
# transformers' rope_parameters of each type, and the same as ModelConfig fields
HF_ROPE = {
    "linear": {"rope_type": "linear", "factor": FACTOR},
    "dynamic": {"rope_type": "dynamic", "factor": FACTOR},
    "yarn": {"rope_type": "yarn", "factor": FACTOR, "original_max_position_embeddings": ORIGINAL},
    "llama3": {"rope_type": "llama3", "factor": FACTOR, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": ORIGINAL},
}
OURS = {
    "linear": dict(rope_scaling="linear", rope_scaling_factor=FACTOR),
    "ntk": dict(rope_scaling="ntk", rope_scaling_factor=FACTOR),
    "dynamic": dict(rope_scaling="dynamic", rope_scaling_factor=FACTOR,
                    rope_original_max_len=ORIGINAL),
    "yarn": dict(rope_scaling="yarn", rope_scaling_factor=FACTOR, rope_original_max_len=ORIGINAL),
    "llama3": dict(rope_scaling="llama3", rope_scaling_factor=FACTOR, rope_low_freq_factor=1.0,
                   rope_high_freq_factor=4.0, rope_original_max_len=ORIGINAL),
}
# YaRN with every optional parameter moved off its default
YARN_ALL = ({**HF_ROPE["yarn"], "beta_fast": 8.0, "beta_slow": 0.5, "mscale": 0.9,
             "mscale_all_dim": 0.4, "truncate": False},
            dict(OURS["yarn"], rope_yarn_beta_fast=8.0, rope_yarn_beta_slow=0.5,
                 rope_yarn_mscale=0.9, rope_yarn_mscale_all_dim=0.4, rope_yarn_truncate=False))
UNSCANNED = {"scan_layers": False}
NTK_THETA = 10_000.0 * FACTOR ** (16 / 14)  # the base 'ntk' amounts to at head_dim 16


def _hf_config(kind, rope, **fields):
  """transformers config of architecture `kind` with rope_parameters `rope` (None: plain)."""
  fields = {**TINY, **({"sliding_window": None} if kind != "llama" else {}), **fields}
  if rope is not None:
    fields["rope_parameters"] = {"rope_theta": fields.pop("rope_theta", 10_000.0), **rope}
  return getattr(transformers, ARCH[kind][0])(**fields)


def _hf_run(config, state_dict):
  """Logits [2, 48, 300] of a fresh transformers model (dynamic RoPE keeps state across calls)."""
  model = getattr(transformers, ARCH[config.model_type][1])(config).eval()
  model.load_state_dict(state_dict)
  with torch.no_grad():
    return model(torch.from_numpy(TOKENS).long()).logits.numpy()


def _our_logits(cfg, params):
  # eagerly and unscanned (UNSCANNED): each op's compilation is shared by every config, where a
  # jit or a layer scan would compile each config anew
  return np.asarray(Transformer(cfg).apply({"params": params}, jnp.asarray(TOKENS)))[..., :300]


def _write(directory, config):
  os.makedirs(directory, exist_ok=True)
  out = config.to_dict()
  out["architectures"] = [ARCH[config.model_type][1]]
  with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
    json.dump(out, f)
  return str(directory)


# ---------------------------------------------------------------- frequencies, no model


@pytest.mark.parametrize("name", ["linear", "yarn", "yarn-all", "llama3"])
def test_frequencies_match_transformers(name):
  hf_rope, ours = YARN_ALL if name == "yarn-all" else (HF_ROPE[name], OURS[name])
  config = _hf_config("llama", hf_rope)
  expected, attention = ROPE_INIT_FUNCTIONS[hf_rope["rope_type"]](config, "cpu")
  cfg = _tiny_cfg(**ours)
  freqs, factor = rope_frequencies(cfg, cfg.resolved_head_dim)
  np.testing.assert_allclose(freqs, expected.numpy(), rtol=1e-6)
  assert factor == pytest.approx(attention, rel=1e-12)
  if name.startswith("yarn"):
    assert factor != 1.0  # the temperature is part of what is compared
    sin, cos = rope_tables(cfg, jnp.zeros((1, 1), jnp.int32), cfg.resolved_head_dim)
    np.testing.assert_allclose(np.asarray(cos), factor, rtol=1e-6)
    assert not np.any(np.asarray(sin))


def test_ntk_and_dynamic_frequencies_match_transformers():
  cfg = _tiny_cfg(**OURS["ntk"])
  assert cfg.rope_ntk_theta == pytest.approx(NTK_THETA, rel=1e-12)
  plain = _hf_config("llama", None, rope_theta=NTK_THETA)
  rotary = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding
  expected, _ = rotary.compute_default_rope_parameters(plain)
  np.testing.assert_allclose(rope_frequencies(cfg, 16)[0], expected.numpy(), rtol=1e-6)
  config = _hf_config("llama", HF_ROPE["dynamic"], max_position_embeddings=ORIGINAL)
  cfg = _tiny_cfg(**OURS["dynamic"])
  for length in (8, ORIGINAL, 48):
    expected, _ = ROPE_INIT_FUNCTIONS["dynamic"](config, "cpu", seq_len=torch.tensor(length))
    positions = jnp.arange(length)[None]  # the base follows max(positions) + 1
    sin, _ = rope_tables(cfg, positions, 16)
    angles = np.arcsin(np.asarray(sin)[0, 1, 0])  # position 1: the frequencies themselves
    np.testing.assert_allclose(angles, expected.numpy(), rtol=2e-5, atol=1e-7)


# ---------------------------------------------------------------- imported models


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
  """{arch: (HF state dict, pretrainx params)} of one random plain-RoPE model per architecture."""
  import test_hf  # pylint: disable=import-outside-toplevel
  out = {}
  for kind in ARCH:
    model = test_hf._hf_model(kind, **({"sliding_window": None} if kind != "llama" else {}))
    directory = test_hf._save(model, tmp_path_factory.mktemp(kind))
    _, params = hf.import_hf(directory, overrides=UNSCANNED)
    out[kind] = model.state_dict(), params
  return out


@pytest.mark.parametrize("kind", list(ARCH))
def test_imported_scaled_rope_matches_transformers_beyond_the_original_context(
    imported, tmp_path, kind):
  """Each scaling type in config.json (as transformers 5 writes it) imports to the logits
  transformers computes on 48 tokens, 3x the original context; 'ntk' is transformers' plain
  RoPE at the base it amounts to. The scaling matters: plain RoPE's logits differ."""
  state, params = imported[kind]
  diffs = {}
  for name in ("linear", "yarn", "llama3", "dynamic", "ntk"):
    rope = None if name == "ntk" else HF_ROPE[name]
    extra = {"max_position_embeddings": ORIGINAL} if name == "dynamic" else (
        {"rope_theta": NTK_THETA} if name == "ntk" else {})
    config = _hf_config(kind, rope, **extra)
    # the context is the run's choice: 64 here, longer than config.json's for 'dynamic'
    cfg = hf.load_hf_config(_write(tmp_path / name, config), max_seq_len=64, **UNSCANNED)
    if name == "ntk":
      assert cfg.rope_scaling is None and cfg.rope_theta == pytest.approx(NTK_THETA)
      cfg = dataclasses.replace(cfg, rope_theta=10_000.0, **OURS["ntk"])
    assert {f: getattr(cfg, f) for f in OURS[name]} == OURS[name], name
    theirs = _hf_run(config, state)
    ours = _our_logits(cfg, params)
    _assert_close(ours, theirs)
    diffs[name] = float(np.max(np.abs(ours - theirs)))
    plain = _our_logits(dataclasses.replace(cfg, rope_scaling=None, rope_theta=10_000.0), params)
    assert np.max(np.abs(plain - theirs)) > 1e-2, name
  print(f"{kind} max |logit diff|: {diffs}")


def test_transformers4_style_rope_scaling_imports(tmp_path):
  """Top-level rope_scaling under `type` (transformers 4), its defaults as transformers fills
  them: YaRN's original context from max_position_embeddings, and its factor from the two."""
  base = {"architectures": ["LlamaForCausalLM"], **TINY, "rope_theta": 500.0}
  cases = [({"type": "linear", "factor": 2.0},
            dict(rope_scaling="linear", rope_scaling_factor=2.0)),
           ({"type": "yarn", "factor": 4.0, "attention_factor": 1.5, "beta_fast": 16},
            dict(rope_scaling="yarn", rope_original_max_len=64, rope_attention_factor=1.5,
                 rope_yarn_beta_fast=16.0)),
           ({"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 16},
            dict(rope_scaling_factor=4.0, rope_original_max_len=16)),
           ({"type": "dynamic", "factor": 2.0},
            dict(rope_scaling="dynamic", rope_original_max_len=64)),
           ({"type": "default"}, dict(rope_scaling=None))]
  for i, (scaling, fields) in enumerate(cases):
    os.makedirs(tmp_path / str(i))
    with open(tmp_path / str(i) / "config.json", "w", encoding="utf-8") as f:
      json.dump({**base, "rope_scaling": scaling}, f)
    cfg = hf.load_hf_config(str(tmp_path / str(i)))
    assert cfg.rope_theta == 500.0
    assert {f: getattr(cfg, f) for f in fields} == fields, scaling


# ---------------------------------------------------------------- exports


@pytest.mark.parametrize("name", ["linear", "ntk", "yarn", "llama3", "dynamic", "yarn-all"])
def test_export_loads_in_transformers_with_the_same_scaling(tmp_path, name):
  """A pretrainx model with each scaling -> config.json + safetensors -> transformers gives our
  logits at 48 tokens; re-importing gives the same rope fields ('ntk': its base)."""
  ours = YARN_ALL[1] if name == "yarn-all" else OURS[name]
  arch = "Qwen2ForCausalLM" if name == "llama3" else (
      "MistralForCausalLM" if name == "yarn" else "LlamaForCausalLM")
  cfg = _tiny_cfg(qkv_bias=arch == "Qwen2ForCausalLM", **UNSCANNED, **ours)
  params = _random_params(cfg)
  out = hf.export_hf(params, cfg, str(tmp_path / "hf"), architecture=arch)
  loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  assert type(loaded).__name__ == arch
  with torch.no_grad():
    theirs = loaded(torch.from_numpy(TOKENS).long()).logits.numpy()
  _assert_close(_our_logits(cfg, params), theirs)
  back = hf.load_hf_config(out, max_seq_len=64)
  if name == "ntk":
    assert back.rope_scaling is None and back.rope_theta == pytest.approx(cfg.rope_ntk_theta)
  else:
    assert {f: getattr(back, f) for f in ours} == ours


# ---------------------------------------------------------------- a run adds YaRN to a Llama


def _cpt_gin(tmp_path, source, *extra, name="cpt.gin"):
  path = tmp_path / name
  path.write_text("\n".join([
      "include 'gin_configs/runs/pretrain.gin'", "STEPS = 2", "BATCH_SIZE = 8", "SEQ_LEN = 32",
      "LEARNING_RATE = 1e-3", f"InitConfig.source = '{source}'", "SampleConfig.tokens = 0",
      "RunConfig.eval_batches = 1", "RunConfig.progress_bar = False", "RunConfig.log_every = 1",
      f"RunConfig.run_dir = '{tmp_path / 'run'}'", *extra]))
  return str(path)


@pytest.mark.slow
def test_a_run_adds_yarn_to_a_hugging_face_llama_and_exports_it(tmp_path, run_cli):
  """An HF Llama with a 16-token context continues with YaRN (factor 4) over 32-token
  sequences (pretrainx train), is exported and converted back: transformers loads the YaRN
  config and gives pretrainx's logits at 48 tokens."""
  import test_hf  # pylint: disable=import-outside-toplevel
  from pretrainx.config import parse_gin  # pylint: disable=import-outside-toplevel
  source = test_hf._save(test_hf._hf_model("llama", max_position_embeddings=ORIGINAL),
                         tmp_path / "src")
  yarn = ["ModelConfig.rope_scaling = 'yarn'", "ModelConfig.rope_scaling_factor = 4.0",
          "ModelConfig.max_seq_len = 64"]
  gin = _cpt_gin(tmp_path, source, *yarn)
  exp = parse_gin([gin])
  # the source's context is the original one; the longer context is the run's
  assert (exp.model.rope_scaling, exp.model.rope_original_max_len, exp.model.max_seq_len) == (
      "yarn", ORIGINAL, 64)
  assert exp.model.embed_dim == 64 and exp.model.source_max_position_embeddings == ORIGINAL
  # a longer context without a RoPE change is the run's choice too (it is warned about)
  plain = parse_gin([_cpt_gin(tmp_path, source, "ModelConfig.max_seq_len = 64", name="plain.gin")])
  assert (plain.model.max_seq_len, plain.model.rope_scaling) == (64, None)
  out = run_cli("train", f"--gin_file={gin}")
  assert out.returncode == 0, out.stderr
  run_dir = str(tmp_path / "run")
  assert run_cli("export", f"--run_dir={run_dir}", f"--out={tmp_path / 'export'}").returncode == 0
  out = run_cli("convert", str(tmp_path / "export"), str(tmp_path / "hf"))
  assert out.returncode == 0, out.stderr
  with open(tmp_path / "hf" / "config.json", encoding="utf-8") as f:
    written = json.load(f)
  assert written["rope_scaling"]["rope_type"] == "yarn"
  assert (written["rope_scaling"]["original_max_position_embeddings"],
          written["max_position_embeddings"]) == (ORIGINAL, 64)
  loaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
  with torch.no_grad():
    theirs = loaded(torch.from_numpy(TOKENS).long()).logits.numpy()
  cfg, params = hf.import_hf(str(tmp_path / "hf"), overrides=UNSCANNED)
  assert (cfg.rope_scaling, cfg.rope_original_max_len, cfg.rope_scaling_factor) == (
      "yarn", ORIGINAL, 4.0)
  _assert_close(_our_logits(cfg, params), theirs)
  # training changed the source's weights
  with torch.no_grad():
    src = transformers.AutoModelForCausalLM.from_pretrained(source).eval()
    assert not torch.allclose(src.model.embed_tokens.weight, loaded.model.embed_tokens.weight)


# ---------------------------------------------------------------- bad input


def test_bad_rope_settings_are_one_line_errors(tmp_path, run_cli):
  for fields, match in [
      (dict(rope_scaling="yarn", rope_scaling_factor=0.0), r"rope_scaling_factor > 0"),
      (dict(rope_scaling="linear", rope_scaling_factor=-2.0), r"rope_scaling_factor > 0"),
      (dict(rope_scaling="dynamic", rope_original_max_len=0), r"rope_original_max_len >= 1"),
      (dict(rope_scaling="yarn", rope_yarn_beta_fast=1.0, rope_yarn_beta_slow=2.0),
       r"rope_yarn_beta_slow <= rope_yarn_beta_fast"),
      (dict(rope_scaling="yarn", rope_attention_factor=0.0), r"rope_attention_factor=0.0"),
      (dict(rope_scaling="llama3", rope_low_freq_factor=4.0), r"rope_low_freq_factor < rope_high"),
      (dict(rope_scaling="ntk", head_dim=2), r"head_dim > 2"),
      (dict(rope_scaling="longrope"), r"choose one of \(None, 'linear', 'ntk', 'yarn'"),
      (dict(rope_theta=0.0), r"rope_theta=0.0; use a positive base")]:
    with pytest.raises(ValueError, match=match) as err:
      ModelConfig(**fields)
    assert "\n" not in str(err.value)
  ModelConfig(rope_scaling=None, rope_scaling_factor=0.0)  # ignored without scaling
  with pytest.raises(ValueError, match=r"'dynamic' is for inference only") as err:
    check_trainable(Experiment(model=ModelConfig(rope_scaling="dynamic")))
  assert "\n" not in str(err.value)
  check_trainable(Experiment(model=ModelConfig(rope_scaling="yarn")))
  # config.json: a type transformers does not know, one it knows that pretrainx does not compute
  for i, (rope, match) in enumerate([
      ({"rope_type": "foo", "factor": 2.0}, r"rope type 'foo' .* not a type transformers knows "
       r"\(default, linear, dynamic, yarn, longrope, llama3"),
      ({"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
        "original_max_position_embeddings": 16},
       r"rope type 'longrope' .* not supported; pretrainx implements 'default', 'linear', "
       r"'dynamic', 'yarn', 'llama3'")]):
    config = {"architectures": ["LlamaForCausalLM"], **TINY, "rope_scaling": rope}
    directory = tmp_path / str(i)
    os.makedirs(directory)
    with open(directory / "config.json", "w", encoding="utf-8") as f:
      json.dump(config, f)
    with pytest.raises(ValueError, match=match):
      hf.load_hf_config(str(directory))
  (tmp_path / "0" / "model.safetensors").write_bytes(b"")
  out = run_cli("convert", str(tmp_path / "0"), str(tmp_path / "out"))
  assert out.returncode == 2 and "Traceback" not in out.stderr
  assert "rope type 'foo'" in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_dynamic_rope_is_refused_for_training(tmp_path, run_cli):
  gin = tmp_path / "dyn.gin"
  gin.write_text("include 'gin_configs/tiny.gin'\nModelConfig.rope_scaling = 'dynamic'\n"
                 f"RunConfig.run_dir = '{tmp_path / 'run'}'\n")
  out = run_cli("train", f"--gin_file={gin}")
  assert out.returncode == 2 and "Traceback" not in out.stderr
  assert "rope_scaling='dynamic' is for inference only" in out.stderr
  assert len(out.stderr.strip().splitlines()) == 1, out.stderr
  assert not os.path.exists(tmp_path / "run" / "config.gin")


def test_kv_cache_decoding_with_dynamic_rope_matches_transformers(imported, tmp_path):
  """Prefill 14 tokens, then decode one at a time past the original context (16): each step's
  RoPE base follows that step's length, the cached keys keep theirs, as in transformers'
  cached generation."""
  from pretrainx.generate import decode_step, prefill  # pylint: disable=import-outside-toplevel
  state, params = imported["llama"]
  config = _hf_config("llama", HF_ROPE["dynamic"], max_position_embeddings=ORIGINAL)
  cfg = hf.load_hf_config(_write(tmp_path, config), max_seq_len=64, **UNSCANNED)
  model = transformers.LlamaForCausalLM(config).eval()
  model.load_state_dict(state)
  tokens = torch.from_numpy(TOKENS[:, :20]).long()
  ours = Transformer(cfg, cache_len=32)
  with torch.no_grad():
    out = model(tokens[:, :14], use_cache=True)
    past, theirs = out.past_key_values, [out.logits[:, -1].numpy()]
    for t in range(14, 19):
      out = model(tokens[:, t:t + 1], past_key_values=past, use_cache=True)
      past = out.past_key_values
      theirs.append(out.logits[:, -1].numpy())
  logits, cache = prefill(ours, params, jnp.asarray(TOKENS[:, :14]))
  mine = [np.asarray(logits)[:, :300]]
  for t in range(14, 19):
    logits, cache = decode_step(ours, params, cache, jnp.asarray(TOKENS[:, t]), jnp.int32(t))
    mine.append(np.asarray(logits)[:, :300])
  np.testing.assert_allclose(np.stack(mine), np.stack(theirs), atol=1e-4, rtol=0)
  # the cached path is not the full forward pass: its early keys kept their shorter-base RoPE
  full = _our_logits(cfg, params)[:, 18]
  assert np.max(np.abs(full - mine[-1])) > 1e-4
