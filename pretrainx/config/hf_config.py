"""Hugging Face config.json <-> ModelConfig for the Llama family (Llama 2/3, Mistral, Qwen2).

Only the architecture: reading and writing weights is pretrainx.hf's job.
"""

from __future__ import annotations

import json
from typing import Any

from pretrainx import storage
from pretrainx.config.model import ModelConfig

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                 "Qwen2ForCausalLM": "qwen2"}


def read_config_json(path: str) -> dict[str, Any]:
  file = storage.join(path, "config.json")
  storage.check_bucket(file, "read")
  if not storage.isfile(file):
    raise FileNotFoundError(f"{file} does not exist; point at a Hugging Face model directory "
                            "(config.json + model.safetensors or its sharded index).")
  return json.loads(storage.read_text(file))


def architecture(hf: dict[str, Any]) -> str:
  archs = hf.get("architectures") or [
      a for a, t in ARCHITECTURES.items() if t == hf.get("model_type")][:1]
  if len(archs) != 1 or archs[0] not in ARCHITECTURES:
    found = archs or hf.get("model_type")
    raise ValueError(f"unsupported Hugging Face architecture {found!r}; pretrainx converts "
                     f"{', '.join(ARCHITECTURES)} (the Llama family).")
  return archs[0]


def _rope_fields(hf: dict[str, Any]) -> dict[str, Any]:
  """rope_theta and the llama3 scaling from `rope_parameters` (transformers 5) or the older
  top-level `rope_theta` + `rope_scaling`."""
  old, new = hf.get("rope_scaling") or {}, hf.get("rope_parameters") or {}
  kind_of = lambda p: p.get("rope_type", p.get("type", "default"))
  if old and new and kind_of(old) != kind_of(new):
    raise ValueError(f"config.json has rope_scaling of type {kind_of(old)!r} and rope_parameters "
                     f"of type {kind_of(new)!r}; keep the one the model was trained with.")
  params = {**old, **new}
  kind = kind_of(params)
  out = {"rope_theta": float(params.get("rope_theta", hf.get("rope_theta", 10_000.0)))}
  if kind == "llama3":
    out.update(rope_scaling="llama3", rope_scaling_factor=float(params["factor"]),
               rope_low_freq_factor=float(params["low_freq_factor"]),
               rope_high_freq_factor=float(params["high_freq_factor"]),
               rope_original_max_len=int(params["original_max_position_embeddings"]))
  elif kind != "default":
    raise ValueError(f"rope scaling type {kind!r} (config.json rope_scaling/rope_parameters) is "
                     "not supported; pretrainx implements 'default' and 'llama3'.")
  return out


def _check_features(hf: dict[str, Any], arch: str) -> None:
  """Refuses config.json options whose computation pretrainx does not implement."""
  if hf.get("hidden_act", "silu") != "silu":
    raise ValueError(f"hidden_act={hf['hidden_act']!r} is not supported; pretrainx's MLP is SwiGLU "
                     "(hidden_act 'silu').")
  if hf.get("mlp_bias") or (arch != "Qwen2ForCausalLM" and hf.get("attention_bias")):
    raise ValueError("config.json sets attention_bias/mlp_bias; pretrainx supports only the q/k/v "
                     "biases of Qwen2ForCausalLM.")


def _check_sliding_window(hf: dict[str, Any], arch: str, max_seq_len: int) -> None:
  window = hf.get("sliding_window")
  if arch == "Qwen2ForCausalLM" and not hf.get("use_sliding_window", False):
    window = None
  if window is not None and window < max_seq_len:
    raise ValueError(
        f"{arch} here attends within a sliding window of {window} tokens (config.json "
        f"sliding_window), shorter than max_seq_len={max_seq_len}; pretrainx has no pure sliding-"
        f"window softmax attention. Import with max_seq_len <= {window} (load_hf_config(path, "
        f"max_seq_len={window}) or import_hf(..., overrides={{'max_seq_len': {window}}})), where "
        "the window never binds and the model is exact.")


def load_hf_config(path: str, **overrides: Any) -> ModelConfig:
  """The ModelConfig of the HF model directory `path`; `overrides` set pretrainx-only fields
  (scan_layers, dtype, attention_impl, remat_policy, ...) or a shorter max_seq_len."""
  hf = read_config_json(path)
  arch = architecture(hf)
  _check_features(hf, arch)
  heads = hf["num_attention_heads"]
  fields = dict(
      vocab_size=hf["vocab_size"], embed_dim=hf["hidden_size"], mlp_dim=hf["intermediate_size"],
      num_layers=hf["num_hidden_layers"], num_heads=heads,
      num_kv_heads=hf.get("num_key_value_heads") or heads,
      head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
      max_seq_len=hf["max_position_embeddings"], norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      qkv_bias=arch == "Qwen2ForCausalLM", **_rope_fields(hf))
  cfg = ModelConfig(**{**fields, **overrides})
  _check_sliding_window(hf, arch, cfg.max_seq_len)
  return cfg


def check_hf_compatible(cfg: ModelConfig) -> None:
  """Every pretrainx parameter of `cfg` must have a Hugging Face Llama-family counterpart."""
  problems = []
  if any(impl not in ("reference", "flash") for impl in cfg.layer_impls):
    problems.append(f"attention {sorted(set(cfg.layer_impls))} (use 'reference' or 'flash')")
  if cfg.norm_scale != "channel":
    problems.append(f"norm_scale={cfg.norm_scale!r} (use 'channel')")
  if cfg.embed_projection:
    problems.append("embed_projection=True (use False)")
  if problems:
    raise ValueError("this ModelConfig has no Hugging Face Llama-family equivalent: "
                     + "; ".join(problems) + ".")


def hf_config_dict(cfg: ModelConfig, architecture: str, dtype: str) -> dict[str, Any]:
  """config.json for `cfg` (rope as top-level rope_theta/rope_scaling, which transformers 4 and 5
  both read)."""
  rope_scaling = None
  if cfg.rope_scaling == "llama3":
    rope_scaling = {"rope_type": "llama3", "factor": cfg.rope_scaling_factor,
                    "low_freq_factor": cfg.rope_low_freq_factor,
                    "high_freq_factor": cfg.rope_high_freq_factor,
                    "original_max_position_embeddings": cfg.rope_original_max_len}
  out = {
      "architectures": [architecture], "model_type": ARCHITECTURES[architecture],
      "hidden_size": cfg.embed_dim, "intermediate_size": cfg.mlp_dim,
      "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.resolved_head_dim,
      "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
      "rope_scaling": rope_scaling, "max_position_embeddings": cfg.max_seq_len,
      "vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tie_embeddings,
      "torch_dtype": dtype, "use_cache": True, "initializer_range": cfg.init_std,
  }
  if architecture == "LlamaForCausalLM":
    out.update(attention_bias=False, mlp_bias=False)
  else:
    out.update(sliding_window=None, use_sliding_window=False)
  return out
