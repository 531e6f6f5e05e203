"""pretrainx.hf for mixtures of experts: Mixtral and Qwen2-MoE against transformers.

Tiny random fp32 models (hidden 64, 2 layers, 4 experts, top-2, vocab 300): imported logits match
transformers' within 1e-4, from the per-expert layout save_pretrained writes and from transformers
5's fused 3D experts; exports load in transformers with the same logits; the expert axis imports
sharded over the 'expert' mesh axis; configs HF cannot express are refused.
"""

import dataclasses
import json
import os

import numpy as np
import pytest

import safetensors  # noqa: F401  pylint: disable=unused-import
import torch
import transformers

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402
from safetensors import safe_open  # noqa: E402

from pretrainx import hf  # noqa: E402
from pretrainx.config import MeshConfig, ModelConfig  # noqa: E402
from pretrainx.config.model import MoeConfig  # noqa: E402
from pretrainx.flops import count_params  # noqa: E402
from pretrainx.model import Transformer  # noqa: E402
from pretrainx.sharding import make_mesh, mesh_scope  # noqa: E402
from pretrainx.tree import unbox_tree  # noqa: E402
from test_hf import _assert_close, _edited_copy  # noqa: E402  (the same checks as for Llama)

TINY = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            rms_norm_eps=1e-5, initializer_range=0.15, num_experts_per_tok=2)
MIXTRAL = dict(num_local_experts=4)
QWEN2_MOE = dict(num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                 norm_topk_prob=False)
ARCH = {"mixtral": ("MixtralConfig", "MixtralForCausalLM", MIXTRAL),
        "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", QWEN2_MOE)}
TOKENS = np.random.default_rng(0).integers(0, 300, size=(4, 32)).astype(np.int32)


def _hf_model(kind, **overrides):
  """A random HF MoE model whose norms and biases are perturbed (init leaves them 1 and 0)."""
  config_name, model_name, moe = ARCH[kind]
  torch.manual_seed(0)
  config = getattr(transformers, config_name)(**{**TINY, **moe, **overrides})
  model = getattr(transformers, model_name)(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name or name.endswith("bias"):
        p.add_(0.3 * torch.randn_like(p))
  return model


def _save(model, directory, **kw):
  model.save_pretrained(directory, safe_serialization=True, **kw)
  return str(directory)


def _tensor_names(directory):
  with safe_open(os.path.join(directory, hf.SINGLE_FILE), framework="np") as f:
    return set(f.keys())


def _hf_logits(model, tokens=TOKENS):
  with torch.no_grad():
    return model(torch.from_numpy(tokens).long()).logits.numpy()


def _our_logits(cfg, params, tokens=TOKENS):
  return np.asarray(Transformer(cfg).apply({"params": params}, jnp.asarray(tokens)))[..., :300]


def _moe_fields(cfg):
  names = ("vocab_size", "embed_dim", "num_layers", "num_heads", "num_kv_heads",
           "resolved_head_dim", "max_seq_len", "rope_theta", "norm_eps", "tie_embeddings",
           "qkv_bias", "expert_mlp_dim", "shared_mlp_dim")
  moe = dataclasses.replace(cfg.moe, shared_experts=min(cfg.moe.shared_experts, 1),
                            shared_mlp_dim=cfg.shared_mlp_dim or None,
                            expert_mlp_dim=cfg.expert_mlp_dim)
  return {**{n: getattr(cfg, n) for n in names}, "moe": moe}


@pytest.mark.slow
@pytest.mark.parametrize("kind,overrides,save_kw,pretrainx_overrides", [
    ("mixtral", {}, {}, {}),
    ("mixtral", {"tie_word_embeddings": True}, {"save_original_format": False},
     {"scan_layers": False}),
    ("qwen2_moe", {}, {}, {}),
    ("qwen2_moe", {"decoder_sparse_step": 2, "norm_topk_prob": True}, {}, {}),
    ("qwen2_moe", {}, {"save_original_format": False}, {}),
], ids=["mixtral", "mixtral-fused-tied-unscanned", "qwen2moe-shared-gate",
        "qwen2moe-sparse-step-2-norm-topk", "qwen2moe-fused"])
def test_imported_moe_logits_match_transformers(tmp_path, kind, overrides, save_kw,
                                                pretrainx_overrides):
  model = _hf_model(kind, **overrides)
  directory = _save(model, tmp_path, **save_kw)
  names = _tensor_names(directory)
  fused = any(n.endswith("experts.gate_up_proj") for n in names)
  assert fused == ("save_original_format" in save_kw)  # what this transformers writes
  cfg, params = hf.import_hf(directory, overrides=pretrainx_overrides)
  moe = cfg.moe
  assert (moe.num_experts, moe.top_k) == (4, 2)
  assert count_params(cfg)["total"] == sum(p.numel() for p in model.parameters())
  if kind == "mixtral":
    assert moe.norm_topk and not moe.shared_experts and not cfg.qkv_bias
    assert cfg.expert_mlp_dim == 128
  else:
    assert cfg.qkv_bias and moe.shared_gate and cfg.shared_mlp_dim == 48
    assert cfg.expert_mlp_dim == 32 and cfg.mlp_dim == 128
    assert moe.norm_topk == overrides.get("norm_topk_prob", False)
    assert moe.every == overrides.get("decoder_sparse_step", 1)
  if moe.every > 1:  # layer 0 dense, layer 1 MoE
    assert not cfg.scan_layers
    assert set(params["layers_0"]) >= {"mlp"} and "moe" not in params["layers_0"]
    assert "moe" in params["layers_1"] and "mlp" not in params["layers_1"]
  elif cfg.scan_layers:
    assert params["layers"]["moe"]["gate_proj"].shape == (2, 4, 64, cfg.expert_mlp_dim)
  _assert_close(_our_logits(cfg, params), _hf_logits(model))


@pytest.mark.parametrize("kind,overrides,pretrainx_overrides", [
    ("mixtral", {}, {}),
    ("qwen2_moe", {"decoder_sparse_step": 2}, {}),
    ("qwen2_moe", {"norm_topk_prob": True}, {"scan_layers": False}),
], ids=["mixtral", "qwen2moe-sparse-step-2", "qwen2moe-norm-topk-unscanned"])
def test_moe_export_loads_in_transformers(tmp_path, kind, overrides, pretrainx_overrides):
  """HF -> pretrainx -> (sharded) HF export: transformers gives our logits; re-import is exact."""
  model = _hf_model(kind, **overrides)
  cfg, params = hf.import_hf(_save(model, tmp_path / "src"), overrides=pretrainx_overrides)
  # a perturbed copy, so that the export cannot pass by echoing the source checkpoint
  params = jax.tree.map(lambda a: a * 1.05, params)
  out = hf.export_hf(params, cfg, str(tmp_path / "hf"), shard_size=200_000)  # default arch
  architecture = ARCH[kind][1]
  with open(os.path.join(out, "config.json"), encoding="utf-8") as f:
    assert json.load(f)["architectures"] == [architecture]
  with open(os.path.join(out, hf.INDEX_FILE), encoding="utf-8") as f:
    names = set(json.load(f)["weight_map"])
  prefix = "block_sparse_moe" if kind == "mixtral" else "mlp"
  expert = "w1" if kind == "mixtral" else "gate_proj"
  assert f"model.layers.1.{prefix}.experts.3.{expert}.weight" in names  # the published layout
  loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  assert type(loaded).__name__ == architecture
  _assert_close(_our_logits(cfg, params), _hf_logits(loaded))
  cfg2, params2 = hf.import_hf(out, overrides=pretrainx_overrides)
  assert _moe_fields(cfg2) == _moe_fields(cfg)
  _assert_close(_our_logits(cfg2, params2), _our_logits(cfg, params))


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory):
  model = _hf_model("mixtral")
  return _save(model, tmp_path_factory.mktemp("mixtral")), _hf_logits(model)


def test_experts_import_sharded_over_the_expert_axis(mixtral_dir):
  directory, hf_logits = mixtral_dir
  mesh = make_mesh(MeshConfig(data=1, fsdp=2, expert=2, tensor=2))
  rules = MeshConfig().rules
  cfg, params = hf.import_hf(directory, mesh=mesh, rules=rules)
  gate = params["layers"]["moe"]["gate_proj"]  # [layers, experts, embed, mlp]
  expected = NamedSharding(mesh, PartitionSpec(None, "expert", ("fsdp", "context"), "tensor"))
  assert gate.sharding.is_equivalent_to(expected, gate.ndim)
  assert {s.data.shape for s in gate.addressable_shards} == {(2, 2, 32, 64)}
  single = hf.import_hf(directory)[1]
  for name in ("gate_proj", "up_proj", "down_proj", "router"):
    np.testing.assert_array_equal(np.asarray(params["layers"]["moe"][name]),
                                  np.asarray(single["layers"]["moe"][name]))
  with mesh_scope(mesh, rules):
    logits = jax.jit(Transformer(cfg).apply)({"params": params}, jnp.asarray(TOKENS))
  _assert_close(np.asarray(logits)[..., :300], hf_logits)


def test_bad_moe_checkpoints_fail_with_clear_messages(mixtral_dir, tmp_path):
  directory, _ = mixtral_dir
  bad = _edited_copy(directory, tmp_path / "more", num_local_experts=5)
  with pytest.raises(ValueError, match=r"missing .*block_sparse_moe\.(gate|experts\.4)"):
    hf.import_hf(bad)
  bad = _edited_copy(directory, tmp_path / "wide", intermediate_size=96)
  with pytest.raises(ValueError, match=r"block_sparse_moe\.experts\.0\.w\d\.weight .* has shape "
                     r"\((128, 64|64, 128)\) but config.json implies \((96, 64|64, 96)\)"):
    hf.import_hf(bad)


def test_qwen2_moe_mlp_only_layers_is_refused(tmp_path):
  config = transformers.Qwen2MoeConfig(**TINY, **QWEN2_MOE, mlp_only_layers=[0]).to_dict()
  config.update(architectures=["Qwen2MoeForCausalLM"])
  with open(tmp_path / "config.json", "w", encoding="utf-8") as f:
    json.dump(config, f)
  with pytest.raises(ValueError, match=r"mlp_only_layers=\[0\].*decoder_sparse_step"):
    hf.load_hf_config(str(tmp_path))


def _tiny_moe_cfg(**moe):
  return ModelConfig(vocab_size=300, embed_dim=64, mlp_dim=128, num_layers=2, num_heads=4,
                     num_kv_heads=2, max_seq_len=64, moe=MoeConfig(num_experts=4, **moe))


def _zeros(cfg):
  abstract = jax.eval_shape(
      lambda: Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"])
  return jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), unbox_tree(abstract))


@pytest.mark.parametrize("cfg,architecture,match", [
    (_tiny_moe_cfg(shared_experts=1), "MixtralForCausalLM",
     r"MixtralForCausalLM equivalent: MoeConfig.shared_experts=1 .*Qwen2MoeForCausalLM"),
    (_tiny_moe_cfg(norm_topk=False), "MixtralForCausalLM", r"norm_topk=False"),
    (_tiny_moe_cfg(), "LlamaForCausalLM", r"LlamaForCausalLM is dense.*MixtralForCausalLM"),
    (dataclasses.replace(_tiny_moe_cfg(shared_experts=1), qkv_bias=True), "Qwen2MoeForCausalLM",
     r"shared_gate=False \(Qwen2-MoE always has a sigmoid-gated shared expert"),
    (_tiny_moe_cfg(), "MistralForCausalLM", r"MistralForCausalLM is dense"),
    (ModelConfig(vocab_size=300, qkv_bias=True), "Qwen2MoeForCausalLM",
     r"MoeConfig.num_experts=0 \(Qwen2MoeForCausalLM is a mixture of experts"),
])
def test_export_refuses_moe_configs_hf_cannot_hold(tmp_path, cfg, architecture, match):
  with pytest.raises(ValueError, match=match):
    hf.export_hf(_zeros(cfg), cfg, str(tmp_path), architecture=architecture)


def test_capacity_factor_is_exported_with_a_warning(caplog):
  cfg = _tiny_moe_cfg(capacity_factor=1.25)
  hf.check_hf_compatible(cfg, "MixtralForCausalLM")  # the weights fit; HF computes dropless
  assert "capacity_factor=1.25" in caplog.text and "dropless" in caplog.text


def test_default_architectures():
  assert hf.default_architecture(_tiny_moe_cfg()) == "MixtralForCausalLM"
  shared = _tiny_moe_cfg(shared_experts=1, shared_gate=True)
  assert hf.default_architecture(shared) == "Qwen2MoeForCausalLM"
  assert hf.default_architecture(ModelConfig(qkv_bias=True)) == "Qwen2ForCausalLM"
  assert hf.default_architecture(ModelConfig()) == "LlamaForCausalLM"


def test_convert_moe_both_directions(tmp_path):
  """`pretrainx convert` of a Qwen2-MoE with dense layers: config.gin carries the MoeConfig and
  the architecture comes back."""
  from pretrainx.config import parse_gin  # pylint: disable=import-outside-toplevel

  model = _hf_model("qwen2_moe", decoder_sparse_step=2)
  source = _save(model, tmp_path / "src")
  ours = hf.convert_main(source, str(tmp_path / "px"), "hf-to-pretrainx")
  model_cfg = parse_gin([os.path.join(ours, "config.gin")]).model
  assert _moe_fields(model_cfg) == _moe_fields(hf.load_hf_config(source))
  back = hf.convert_main(ours, str(tmp_path / "hf"), "pretrainx-to-hf")
  loaded = transformers.AutoModelForCausalLM.from_pretrained(back).eval()
  assert type(loaded).__name__ == "Qwen2MoeForCausalLM"
  np.testing.assert_allclose(_hf_logits(loaded), _hf_logits(model), atol=1e-5, rtol=0)


# config.json of Mixtral-8x7B and Qwen1.5-MoE-A2.7B as published (transformers 4 style)
MIXTRAL_8X7B = {
    "architectures": ["MixtralForCausalLM"], "hidden_act": "silu", "hidden_size": 4096,
    "intermediate_size": 14336, "max_position_embeddings": 32768, "model_type": "mixtral",
    "num_attention_heads": 32, "num_experts_per_tok": 2, "num_hidden_layers": 32,
    "num_key_value_heads": 8, "num_local_experts": 8, "rms_norm_eps": 1e-5, "rope_theta": 1e6,
    "router_aux_loss_coef": 0.02, "sliding_window": None, "tie_word_embeddings": False,
    "vocab_size": 32000}
QWEN15_MOE_A27B = {
    "architectures": ["Qwen2MoeForCausalLM"], "hidden_act": "silu", "hidden_size": 2048,
    "intermediate_size": 5632, "max_position_embeddings": 8192, "max_window_layers": 21,
    "model_type": "qwen2_moe", "num_attention_heads": 16, "num_hidden_layers": 24,
    "num_key_value_heads": 16, "rms_norm_eps": 1e-6, "rope_theta": 1e6, "sliding_window": 32768,
    "tie_word_embeddings": False, "use_sliding_window": False, "vocab_size": 151936,
    "decoder_sparse_step": 1, "moe_intermediate_size": 1408,
    "shared_expert_intermediate_size": 5632, "num_experts_per_tok": 4, "num_experts": 60,
    "norm_topk_prob": False, "router_aux_loss_coef": 0.001}


@pytest.mark.parametrize("config,total,moe", [
    (MIXTRAL_8X7B, 46_702_792_704, MoeConfig(num_experts=8, top_k=2, balance_loss=0.04)),
    (QWEN15_MOE_A27B, 14_315_784_192, MoeConfig(
        num_experts=60, top_k=4, expert_mlp_dim=1408, shared_experts=1, shared_mlp_dim=5632,
        shared_gate=True, norm_topk=False, balance_loss=0.004)),
], ids=["mixtral-8x7b", "qwen1.5-moe-a2.7b"])
def test_published_moe_configs(tmp_path, config, total, moe):
  """The totals are transformers' parameter counts of these configs (meta-device models); the
  balance loss is router_aux_loss_coef x top_k (pretrainx's load fractions sum to 1)."""
  with open(tmp_path / "config.json", "w", encoding="utf-8") as f:
    json.dump(config, f)
  cfg = hf.load_hf_config(str(tmp_path))
  assert cfg.moe == moe and cfg.scan_layers
  assert cfg.qkv_bias == (config["model_type"] == "qwen2_moe")
  assert count_params(cfg)["total"] == total
  architecture = config["architectures"][0]
  round_trip = hf.hf_config_dict(cfg, architecture, "bfloat16")
  assert {k: round_trip[k] for k in config if k != "max_window_layers"} == {
      **{k: v for k, v in config.items() if k != "max_window_layers"},
      "sliding_window": None}
