"""Hugging Face config.json <-> ModelConfig for the Llama family (Llama 2/3, Mistral, Qwen2) and
its mixture-of-experts relatives (Mixtral, Qwen2-MoE).

Only the architecture: reading and writing weights is pretrainx.hf's job.
"""

from __future__ import annotations

import json
from typing import Any

from absl import logging

from pretrainx import storage
from pretrainx.config.model import ModelConfig, MoeConfig

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                 "Qwen2ForCausalLM": "qwen2", "MixtralForCausalLM": "mixtral",
                 "Qwen2MoeForCausalLM": "qwen2_moe"}
MOE_ARCHITECTURES = ("MixtralForCausalLM", "Qwen2MoeForCausalLM")
# architectures with q/k/v biases (transformers 5 reads Qwen2-MoE's qkv_bias; earlier ones do not)
QKV_BIAS_ARCHITECTURES = ("Qwen2ForCausalLM", "Qwen2MoeForCausalLM")
# architectures whose sliding window applies only with use_sliding_window
_OPT_IN_WINDOW = ("Qwen2ForCausalLM", "Qwen2MoeForCausalLM")
# architectures that cannot put one sliding window on every layer (Qwen2-MoE: even layers only)
_NO_WINDOW = ("LlamaForCausalLM", "Qwen2MoeForCausalLM")


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
                     f"{', '.join(ARCHITECTURES)} (the Llama family and its MoE relatives).")
  return archs[0]


# rope types transformers knows (modeling_rope_utils.ROPE_INIT_FUNCTIONS and 'default', 'axial')
HF_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3", "proportional",
                 "axial")
# the ones pretrainx computes, and its ModelConfig.rope_scaling for each
_ROPE_IMPORTS = {"default": None, "linear": "linear", "dynamic": "dynamic", "yarn": "yarn",
                 "llama3": "llama3"}


def _float_or_none(value: Any) -> float | None:
  return None if value is None else float(value)


def _rope_fields(hf: dict[str, Any]) -> dict[str, Any]:
  """The ModelConfig rope_* fields of `rope_parameters` (transformers 5) or the older top-level
  `rope_theta` + `rope_scaling` (its kind under `rope_type` or `type`), read as transformers
  reads them (a missing original_max_position_embeddings is max_position_embeddings; 'dynamic'
  takes max_position_embeddings as the original context)."""
  old, new = hf.get("rope_scaling") or {}, hf.get("rope_parameters") or {}
  kind_of = lambda p: p.get("rope_type", p.get("type", "default"))
  if old and new and kind_of(old) != kind_of(new):
    raise ValueError(f"config.json has rope_scaling of type {kind_of(old)!r} and rope_parameters "
                     f"of type {kind_of(new)!r}; keep the one the model was trained with.")
  params = {**old, **new}
  kind = kind_of(params)
  if kind not in HF_ROPE_TYPES:
    raise ValueError(f"config.json's rope type {kind!r} (rope_scaling/rope_parameters) is not a "
                     f"type transformers knows ({', '.join(HF_ROPE_TYPES)}); fix config.json.")
  if kind not in _ROPE_IMPORTS:
    raise ValueError(f"rope type {kind!r} (config.json rope_scaling/rope_parameters) is not "
                     f"supported; pretrainx implements {', '.join(map(repr, _ROPE_IMPORTS))}.")
  if params.get("partial_rotary_factor", hf.get("partial_rotary_factor")) not in (None, 1, 1.0):
    raise ValueError("config.json sets partial_rotary_factor (RoPE on part of each head); "
                     "pretrainx rotates whole heads: convert a model without it.")
  out = {"rope_theta": float(params.get("rope_theta", hf.get("rope_theta", 10_000.0))),
         "rope_scaling": _ROPE_IMPORTS[kind]}
  if kind == "default":
    return out
  context = hf["max_position_embeddings"]
  original = hf.get("original_max_position_embeddings") or params.get(
      "original_max_position_embeddings") or context  # transformers' order
  factor = params.get("factor")
  if factor is None and kind == "yarn":
    factor = context / original  # as transformers: the ratio of the two contexts
  if factor is None:
    raise ValueError(f"config.json's rope type {kind!r} has no factor; add rope_scaling.factor.")
  out["rope_scaling_factor"] = float(factor)
  if kind == "dynamic":
    out["rope_original_max_len"] = int(context)
  elif kind in ("yarn", "llama3"):
    out["rope_original_max_len"] = int(original)
  if kind == "llama3":
    missing = [k for k in ("low_freq_factor", "high_freq_factor") if params.get(k) is None]
    if missing:
      raise ValueError(f"config.json's rope type 'llama3' has no {' or '.join(missing)}; add "
                       "them to rope_scaling.")
    out.update(rope_low_freq_factor=float(params["low_freq_factor"]),
               rope_high_freq_factor=float(params["high_freq_factor"]))
  if kind == "yarn":
    out.update(rope_yarn_beta_fast=float(params.get("beta_fast") or 32.0),
               rope_yarn_beta_slow=float(params.get("beta_slow") or 1.0),
               rope_yarn_mscale=_float_or_none(params.get("mscale")),
               rope_yarn_mscale_all_dim=_float_or_none(params.get("mscale_all_dim")),
               rope_yarn_truncate=bool(params.get("truncate", True)),
               rope_attention_factor=_float_or_none(params.get("attention_factor")))
  return out


def _hf_rope(cfg: ModelConfig) -> tuple[float, dict[str, Any] | None]:
  """(rope_theta, rope_scaling) of config.json for cfg's rope_* fields ('ntk' as its base)."""
  kind, factor = cfg.rope_scaling, cfg.rope_scaling_factor
  if kind is None:
    return cfg.rope_theta, None
  if kind == "ntk":
    return cfg.rope_ntk_theta, None
  scaling: dict[str, Any] = {"rope_type": kind, "factor": factor}
  if kind in ("yarn", "llama3"):
    scaling["original_max_position_embeddings"] = cfg.rope_original_max_len
  if kind == "llama3":
    scaling.update(low_freq_factor=cfg.rope_low_freq_factor,
                   high_freq_factor=cfg.rope_high_freq_factor)
  if kind == "yarn":
    scaling.update(beta_fast=cfg.rope_yarn_beta_fast, beta_slow=cfg.rope_yarn_beta_slow)
    optional = {"attention_factor": cfg.rope_attention_factor, "mscale": cfg.rope_yarn_mscale,
                "mscale_all_dim": cfg.rope_yarn_mscale_all_dim}
    scaling.update({k: v for k, v in optional.items() if v is not None})
    if not cfg.rope_yarn_truncate:
      scaling["truncate"] = False
  return cfg.rope_theta, scaling


def _check_features(hf: dict[str, Any], arch: str) -> None:
  """Refuses config.json options whose computation pretrainx does not implement."""
  if hf.get("hidden_act", "silu") != "silu":
    raise ValueError(f"hidden_act={hf['hidden_act']!r} is not supported; pretrainx's MLP is SwiGLU "
                     "(hidden_act 'silu').")
  if hf.get("mlp_bias") or (arch not in QKV_BIAS_ARCHITECTURES and hf.get("attention_bias")):
    raise ValueError("config.json sets attention_bias/mlp_bias; pretrainx supports only the q/k/v "
                     "biases of Qwen2ForCausalLM and Qwen2MoeForCausalLM.")
  if arch == "Qwen2MoeForCausalLM" and hf.get("mlp_only_layers"):
    raise ValueError(
        f"config.json sets mlp_only_layers={hf['mlp_only_layers']} (dense MLPs in chosen layers); "
        "pretrainx places dense layers only by decoder_sparse_step (MoeConfig.every): convert "
        "models whose mlp_only_layers is empty.")


def _window_layers(hf: dict[str, Any], arch: str, num_layers: int) -> list[int]:
  """The layers transformers runs with config.json's sliding window (its layer_types, else the
  architecture's rule: Mistral and Mixtral every layer, Qwen2 layers >= max_window_layers,
  Qwen2-MoE the even layers below max_window_layers)."""
  if hf.get("layer_types"):
    return [i for i, t in enumerate(hf["layer_types"]) if t == "sliding_attention"]
  limit = hf.get("max_window_layers", 28)
  if arch == "Qwen2ForCausalLM":
    return list(range(limit, num_layers))
  if arch == "Qwen2MoeForCausalLM":
    return [i for i in range(min(limit, num_layers)) if i % 2 == 0]
  return list(range(num_layers))


def _sliding_window(hf: dict[str, Any], arch: str, num_layers: int,
                    max_seq_len: int) -> int | None:
  """ModelConfig.sliding_window of config.json: its sliding_window when every layer uses it.

  A window in some layers only is refused where it binds (shorter than max_seq_len) and dropped
  where it never does."""
  window = hf.get("sliding_window")
  if arch == "LlamaForCausalLM" or not window or (
      arch in _OPT_IN_WINDOW and not hf.get("use_sliding_window", False)):
    return None
  layers = _window_layers(hf, arch, num_layers)
  if len(layers) == num_layers:
    return int(window)
  if layers and window < max_seq_len:
    raise ValueError(
        f"{arch} here attends within a sliding window of {window} tokens in layers {layers} only "
        f"(config.json layer_types / max_window_layers), and pretrainx's ModelConfig."
        f"sliding_window covers every layer; bind ModelConfig.max_seq_len <= {window} (then the "
        "window never binds) or convert a model whose layers all use the window.")
  if layers:
    logging.warning("config.json's sliding window of %d tokens (layers %s) never binds at "
                    "max_seq_len=%d; it is dropped (exports write use_sliding_window=false).",
                    window, layers, max_seq_len)
  return None


def _balance_loss(hf: dict[str, Any], top_k: int) -> float:
  """MoeConfig.balance_loss for router_aux_loss_coef: transformers' per-expert token fraction sums
  to top_k where pretrainx's sums to 1, so the same pull needs top_k times the coefficient
  (transformers also pools all layers into one loss; pretrainx adds one per layer)."""
  return float(hf.get("router_aux_loss_coef", 0.001)) * top_k


def _moe_fields(hf: dict[str, Any], arch: str) -> dict[str, Any]:
  """The MoeConfig (and Qwen2-MoE's q/k/v biases) of a Mixtral or Qwen2-MoE config.json."""
  if arch == "MixtralForCausalLM":
    # every layer is MoE, its experts as wide as intermediate_size (our mlp_dim); top-k renormalised
    return {"moe": MoeConfig(
        num_experts=hf.get("num_local_experts", 8), top_k=hf.get("num_experts_per_tok", 2),
        norm_topk=True, balance_loss=_balance_loss(hf, hf.get("num_experts_per_tok", 2)))}
  if arch != "Qwen2MoeForCausalLM":
    return {}
  out = {"qkv_bias": bool(hf.get("qkv_bias", True))}  # older config.json: always biased
  if not hf.get("num_experts", 60):
    return out
  shared = hf.get("shared_expert_intermediate_size", 5632)
  if not shared:
    raise ValueError("config.json has shared_expert_intermediate_size=0; pretrainx converts "
                     "Qwen2MoeForCausalLM only with its gated shared expert (a positive width).")
  out["moe"] = MoeConfig(
      num_experts=hf.get("num_experts", 60), top_k=hf.get("num_experts_per_tok", 4),
      expert_mlp_dim=hf.get("moe_intermediate_size", 1408), shared_experts=1,
      shared_mlp_dim=shared, shared_gate=True, every=hf.get("decoder_sparse_step", 1),
      norm_topk=bool(hf.get("norm_topk_prob", False)),
      balance_loss=_balance_loss(hf, hf.get("num_experts_per_tok", 4)))
  return out


def default_architecture(cfg: ModelConfig) -> str:
  """The HF architecture that holds `cfg`: Qwen2-MoE for MoE models with shared experts, q/k/v
  biases or dense layers, Mixtral for other MoE models; for dense ones Qwen2 (q/k/v biases),
  Mistral (a sliding window) or Llama."""
  if cfg.moe.enabled:
    qwen = cfg.moe.shared_experts or cfg.qkv_bias or cfg.moe.every > 1
    return "Qwen2MoeForCausalLM" if qwen else "MixtralForCausalLM"
  if cfg.qkv_bias:
    return "Qwen2ForCausalLM"
  return "LlamaForCausalLM" if cfg.sliding_window is None else "MistralForCausalLM"


def load_hf_config(path: str, **overrides: Any) -> ModelConfig:
  """The ModelConfig of the HF model directory `path`; `overrides` set pretrainx-only fields
  (scan_layers, dtype, attention_impl, remat_policy, MoeConfig.impl via moe=...) or a shorter
  max_seq_len. Qwen2-MoE with decoder_sparse_step > 1 (dense and MoE layers) gets
  scan_layers=False. A sliding window (Mistral, Mixtral; Qwen2 with use_sliding_window) becomes
  ModelConfig.sliding_window; config.json's max_position_embeddings is remembered as
  source_max_position_embeddings, which exports write back."""
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
  fields.update(_moe_fields(hf, arch))
  if "moe" in fields and fields["moe"].every > 1:
    fields["scan_layers"] = False  # dense and MoE layers differ: no scan over one structure
  max_seq_len = overrides.get("max_seq_len", fields["max_seq_len"])
  fields.update(sliding_window=_sliding_window(hf, arch, fields["num_layers"], max_seq_len),
                source_max_position_embeddings=hf["max_position_embeddings"])
  return ModelConfig(**{**fields, **overrides})


def _moe_problems(cfg: ModelConfig, architecture: str | None) -> list[str]:
  """What of cfg.moe the HF architecture cannot express (None: any MoE architecture)."""
  moe, problems = cfg.moe, []
  if architecture is None:
    architecture = default_architecture(cfg) if moe.enabled else None
  if architecture not in MOE_ARCHITECTURES:
    if moe.enabled:
      problems.append(f"MoeConfig.num_experts={moe.num_experts} ({architecture} is dense; export "
                      "as MixtralForCausalLM or Qwen2MoeForCausalLM)")
    return problems
  if not moe.enabled:
    return [f"MoeConfig.num_experts=0 ({architecture} is a mixture of experts; export a dense "
            "model as LlamaForCausalLM or Qwen2ForCausalLM)"]
  if architecture == "MixtralForCausalLM":
    if moe.shared_experts:
      problems.append(f"MoeConfig.shared_experts={moe.shared_experts} (Mixtral has none; export "
                      "as Qwen2MoeForCausalLM)")
    if moe.shared_gate:
      problems.append("MoeConfig.shared_gate=True (Mixtral has no shared expert; use False)")
    if moe.every != 1:
      problems.append(f"MoeConfig.every={moe.every} (every Mixtral layer is MoE; use 1 or export "
                      "as Qwen2MoeForCausalLM)")
    if not moe.norm_topk:
      problems.append("MoeConfig.norm_topk=False (Mixtral renormalises the top-k weights; use "
                      "True or export as Qwen2MoeForCausalLM)")
  else:
    if moe.shared_experts < 1 or not moe.shared_gate:
      problems.append(f"MoeConfig.shared_experts={moe.shared_experts}, shared_gate="
                      f"{moe.shared_gate} (Qwen2-MoE always has a sigmoid-gated shared expert; "
                      "set shared_experts >= 1 and shared_gate=True, or export as "
                      "MixtralForCausalLM)")
  if moe.capacity_factor > 0:
    logging.warning("MoeConfig.capacity_factor=%s drops tokens over an expert's capacity; %s is "
                    "dropless, so its outputs differ wherever this model drops tokens.",
                    moe.capacity_factor, architecture)
  return problems


def check_hf_compatible(cfg: ModelConfig, architecture: str | None = None) -> None:
  """Every pretrainx parameter of `cfg` must have a Hugging Face counterpart (in `architecture`,
  when given; otherwise in some Llama-family or MoE architecture)."""
  problems = _moe_problems(cfg, architecture)
  if any(impl not in ("reference", "flash") for impl in cfg.layer_impls):
    problems.append(f"attention {sorted(set(cfg.layer_impls))} (use 'reference' or 'flash')")
  if cfg.norm_scale != "channel":
    problems.append(f"norm_scale={cfg.norm_scale!r} (use 'channel')")
  if cfg.embed_projection:
    problems.append("embed_projection=True (use False)")
  if cfg.sliding_window is not None and architecture in _NO_WINDOW:
    problems.append(f"sliding_window={cfg.sliding_window} ({architecture} has no window in every "
                    "layer; export as MistralForCausalLM, Qwen2ForCausalLM or MixtralForCausalLM)")
  if problems:
    raise ValueError(f"this ModelConfig has no Hugging Face {architecture or 'Llama-family'} "
                     "equivalent: " + "; ".join(problems) + ".")


def hf_config_dict(cfg: ModelConfig, architecture: str, dtype: str) -> dict[str, Any]:
  """config.json for `cfg` (rope as top-level rope_theta/rope_scaling, which transformers 4 and 5
  both read; 'ntk' as the rope_theta it amounts to; max_position_embeddings the imported source's,
  if longer than max_seq_len, and for 'dynamic' rope_original_max_len, which transformers takes
  from it)."""
  rope_theta, rope_scaling = _hf_rope(cfg)
  context = max(cfg.source_max_position_embeddings or 0, cfg.max_seq_len)
  if cfg.rope_scaling == "dynamic":
    context = cfg.rope_original_max_len
  out = {
      "architectures": [architecture], "model_type": ARCHITECTURES[architecture],
      "hidden_size": cfg.embed_dim, "intermediate_size": cfg.mlp_dim,
      "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.resolved_head_dim,
      "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps, "rope_theta": rope_theta,
      "rope_scaling": rope_scaling,
      "max_position_embeddings": context,
      "vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tie_embeddings,
      "torch_dtype": dtype, "use_cache": True, "initializer_range": cfg.init_std,
  }
  window = cfg.sliding_window
  if architecture == "LlamaForCausalLM":
    out.update(attention_bias=False, mlp_bias=False)
  elif architecture == "Qwen2ForCausalLM" and window is not None:  # the window in every layer
    out.update(sliding_window=window, use_sliding_window=True, max_window_layers=0,
               layer_types=["sliding_attention"] * cfg.num_layers)
  else:
    out.update(sliding_window=window, use_sliding_window=False)
  moe = cfg.moe
  if architecture == "MixtralForCausalLM":
    out.update(intermediate_size=cfg.expert_mlp_dim, num_local_experts=moe.num_experts,
               num_experts_per_tok=moe.top_k, router_aux_loss_coef=moe.balance_loss / moe.top_k,
               router_jitter_noise=0.0, output_router_logits=False)
  elif architecture == "Qwen2MoeForCausalLM":
    out.update(num_experts=moe.num_experts, num_experts_per_tok=moe.top_k,
               moe_intermediate_size=cfg.expert_mlp_dim,
               shared_expert_intermediate_size=cfg.shared_mlp_dim,
               decoder_sparse_step=moe.every, norm_topk_prob=moe.norm_topk,
               router_aux_loss_coef=moe.balance_loss / moe.top_k, mlp_only_layers=[],
               qkv_bias=cfg.qkv_bias, output_router_logits=False)
  return out
