"""Hugging Face <-> pretrainx for the Llama family (Llama 2/3, Mistral, Qwen2) and its mixtures of
experts (Mixtral, Qwen2-MoE), on disk or in a bucket.

`import_hf` reads config.json and safetensors (one file or shards with an index) tensor by tensor,
each device reading only its own slice, straight into the target shardings; `export_hf` writes
params back as a directory `transformers` loads; `convert_main` is `python -m pretrainx convert`.
Safetensors shards in a bucket are downloaded one at a time into a temporary directory (safetensors
memory-maps local files); exported shards are uploaded whole.

Routed experts are read from one HF tensor per expert (the published layout, which transformers
5 still writes by default: `block_sparse_moe.experts.{j}.w1` in Mixtral, `mlp.experts.{j}.gate_proj`
in Qwen2-MoE) or from transformers 5's fused 3D tensors (`mlp.experts.gate_up_proj` [experts,
2 * mlp, embed], `mlp.experts.down_proj` [experts, embed, mlp], saved with
save_original_format=False); exports use the per-expert layout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
from typing import Any, Callable

import jax
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, so safetensors reads bf16 weights)
import numpy as np
from absl import logging
from flax import traverse_util

from pretrainx import storage
from pretrainx.checkpoint import load_params, save_params
from pretrainx.config import Experiment, MeshConfig, ModelConfig, RunConfig, experiment_to_gin
from pretrainx.config.hf_config import (ARCHITECTURES, QKV_BIAS_ARCHITECTURES, check_hf_compatible,
                                        default_architecture, hf_config_dict, load_hf_config,
                                        read_config_json)
from pretrainx.config.hf_config import architecture as architecture_of
from pretrainx.config.sources import read_meta, saved_experiment
from pretrainx.hf_tokenizer import write_tokenizer
from pretrainx.model.transformer import param_shapes
from pretrainx.sharding import logical_to_shardings, make_mesh
from pretrainx.tree import consecutive_groups, unbox_tree

DIRECTIONS = ("hf-to-pretrainx", "pretrainx-to-hf")
SINGLE_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"
DEFAULT_SHARD_SIZE = 4 * 2**30  # bytes per exported safetensors file
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some old checkpoints store; recomputed here


# ----------------------------------------------------------------------------- config.json


# ----------------------------------------------------------------------------- layouts


@dataclasses.dataclass(frozen=True)
class _Layout:
  """How one pretrainx parameter (per layer) relates to its HF tensor.

  hf_shape: our per-layer shape -> the HF shape; read: (HF slice handle, our per-layer index as
  [(start, stop)], our shape, vocab) -> that block of ours; write: our full array -> HF array
  (None: never written; exports use per-expert tensors).
  """
  hf_shape: Callable[[tuple[int, ...], int], tuple[int, ...]]
  read: Callable[..., np.ndarray]
  write: Callable[[np.ndarray, int], np.ndarray] | None


def _read_in_heads(t, idx, shape, vocab):  # ours [in, n, hd] <- HF [n * hd, in]
  (i0, i1), (n0, n1), (k0, k1) = idx
  hd = shape[2]
  return t[n0 * hd:n1 * hd, i0:i1].T.reshape(i1 - i0, n1 - n0, hd)[:, :, k0:k1]


def _read_heads_out(t, idx, shape, vocab):  # ours [n, hd, out] <- HF [out, n * hd]
  (n0, n1), (k0, k1), (o0, o1) = idx
  hd = shape[1]
  return t[o0:o1, n0 * hd:n1 * hd].T.reshape(n1 - n0, hd, o1 - o0)[:, k0:k1]


def _read_vocab_rows(t, v0, v1, d0, d1, vocab):
  """HF rows [v0, v1) x cols [d0, d1) of a [vocab, embed] table; padded rows are zeros."""
  real = min(v1, vocab)
  rows = t[v0:real, d0:d1] if v0 < real else np.zeros((0, d1 - d0), np.float32)
  return np.concatenate([rows, np.zeros((v1 - max(v0, real), d1 - d0), rows.dtype)])


def _read_fused(t, idx, shape, vocab, offset):
  """ours [experts, embed, mlp] <- fused HF [experts, 2 * mlp, embed]: gate rows first, then up
  (offset 0: gate, 1: up)."""
  (e0, e1), (d0, d1), (m0, m1) = idx
  m = shape[2] * offset
  return np.transpose(t[e0:e1, m + m0:m + m1, d0:d1], (0, 2, 1))


def _read_fused_down(t, idx, shape, vocab):  # ours [experts, mlp, embed] <- HF [.., embed, mlp]
  (e0, e1), (m0, m1), (d0, d1) = idx
  return np.transpose(t[e0:e1, d0:d1, m0:m1], (0, 2, 1))


_LAYOUTS = {
    "in_heads": _Layout(lambda s, v: (s[1] * s[2], s[0]), _read_in_heads,
                        lambda a, v: a.reshape(a.shape[0], -1).T),
    "heads_out": _Layout(lambda s, v: (s[2], s[0] * s[1]), _read_heads_out,
                         lambda a, v: a.reshape(-1, a.shape[2]).T),
    "linear": _Layout(lambda s, v: (s[1], s[0]),
                      lambda t, idx, s, v: t[idx[1][0]:idx[1][1], idx[0][0]:idx[0][1]].T,
                      lambda a, v: a.T),
    "heads": _Layout(lambda s, v: (s[0] * s[1],),
                     lambda t, idx, s, v: t[idx[0][0] * s[1]:idx[0][1] * s[1]].reshape(
                         -1, s[1])[:, idx[1][0]:idx[1][1]],
                     lambda a, v: a.reshape(-1)),
    "vector": _Layout(lambda s, v: s, lambda t, idx, s, v: t[idx[0][0]:idx[0][1]],
                      lambda a, v: a),
    "embedding": _Layout(lambda s, v: (v, s[1]),
                         lambda t, idx, s, v: _read_vocab_rows(t, *idx[0], *idx[1], v),
                         lambda a, v: a[:v]),
    "lm_head": _Layout(lambda s, v: (v, s[0]),
                       lambda t, idx, s, v: _read_vocab_rows(t, *idx[1], *idx[0], v).T,
                       lambda a, v: a[:, :v].T),
    # transformers 5's fused experts (import only)
    "fused_gate": _Layout(lambda s, v: (s[0], 2 * s[2], s[1]),
                          lambda t, idx, s, v: _read_fused(t, idx, s, v, 0), None),
    "fused_up": _Layout(lambda s, v: (s[0], 2 * s[2], s[1]),
                        lambda t, idx, s, v: _read_fused(t, idx, s, v, 1), None),
    "fused_down": _Layout(lambda s, v: (s[0], s[2], s[1]), _read_fused_down, None),
}

# our path inside a block -> (HF name inside model.layers.{i}., layout)
_BLOCK_TENSORS = {
    ("attention", "q_proj"): ("self_attn.q_proj.weight", "in_heads"),
    ("attention", "k_proj"): ("self_attn.k_proj.weight", "in_heads"),
    ("attention", "v_proj"): ("self_attn.v_proj.weight", "in_heads"),
    ("attention", "o_proj"): ("self_attn.o_proj.weight", "heads_out"),
    ("attention", "q_bias"): ("self_attn.q_proj.bias", "heads"),
    ("attention", "k_bias"): ("self_attn.k_proj.bias", "heads"),
    ("attention", "v_bias"): ("self_attn.v_proj.bias", "heads"),
    ("mlp", "gate_proj"): ("mlp.gate_proj.weight", "linear"),
    ("mlp", "up_proj"): ("mlp.up_proj.weight", "linear"),
    ("mlp", "down_proj"): ("mlp.down_proj.weight", "linear"),
    ("input_norm", "scale"): ("input_layernorm.weight", "vector"),
    ("post_attention_norm", "scale"): ("post_attention_layernorm.weight", "vector"),
}
_TOP_TENSORS = {
    ("embed", "embedding"): ("model.embed_tokens.weight", "embedding"),
    ("final_norm", "scale"): ("model.norm.weight", "vector"),
    ("lm_head",): ("lm_head.weight", "lm_head"),
}


_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
# our routed-expert param -> the HF per-expert projection (experts.{j}.<this>.weight)
_EXPERT_NAMES = {"MixtralForCausalLM": {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"},
                 "Qwen2MoeForCausalLM": {p: p for p in _PROJECTIONS}}
# our routed-expert param -> (transformers 5's fused tensor, layout)
_FUSED = {"gate_proj": ("experts.gate_up_proj", "fused_gate"),
          "up_proj": ("experts.gate_up_proj", "fused_up"),
          "down_proj": ("experts.down_proj", "fused_down")}


@dataclasses.dataclass(frozen=True)
class _Format:
  """Where a checkpoint keeps an MoE layer's tensors: under model.layers.{i}.<moe_prefix>
  ('block_sparse_moe.' in published Mixtral checkpoints, 'mlp.' otherwise), per expert or fused."""
  architecture: str
  moe_prefix: str = "mlp."
  fused: bool = False


def _default_format(architecture: str) -> _Format:
  """The published layout of `architecture` (what exports write)."""
  prefix = "block_sparse_moe." if architecture == "MixtralForCausalLM" else "mlp."
  return _Format(architecture, prefix)


def _detect_format(names, cfg: ModelConfig, architecture: str) -> _Format:
  """The layout of the checkpoint holding tensor `names`, from its first MoE layer."""
  default = _default_format(architecture)
  layer = next((i for i in range(cfg.num_layers) if cfg.is_moe_layer(i)), None)
  if layer is None:
    return default
  for prefix in dict.fromkeys((default.moe_prefix, "mlp.", "block_sparse_moe.")):
    moe = f"model.layers.{layer}.{prefix}"
    if f"{moe}gate.weight" in names or f"{moe}experts.gate_up_proj" in names:
      return _Format(architecture, prefix, f"{moe}experts.gate_up_proj" in names)
  return default  # the missing-tensor check names what is absent


@dataclasses.dataclass(frozen=True)
class _Entry:
  """One pretrainx parameter: its HF tensor names (one per layer when stacked) and layout.

  With `experts` each layer's name is a tuple, one HF tensor per routed expert: they stack into
  our leading experts axis (after 'layers' when stacked), each read with `layout`.
  """
  path: tuple[str, ...]
  names: tuple[Any, ...]
  layout: str
  stacked: bool  # leading 'layers' axis (scan_layers)
  experts: bool = False

  def all_names(self) -> list[str]:
    return [n for source in self.names for n in (source if self.experts else (source,))]


def _block_source(sub: tuple[str, ...], layer: int, cfg: ModelConfig, fmt: _Format):
  """(HF name, or a tuple of one per expert, and layout) of our param `sub` of block `layer`;
  None when HF has no such tensor."""
  pre = f"model.layers.{layer}."
  if sub in _BLOCK_TENSORS:
    name, layout = _BLOCK_TENSORS[sub]
    return pre + name, layout
  if sub[0] != "moe" or not cfg.is_moe_layer(layer) or fmt.architecture not in _EXPERT_NAMES:
    return None
  moe = pre + fmt.moe_prefix
  if sub == ("moe", "router"):
    return moe + "gate.weight", "linear"
  if len(sub) == 2 and sub[1] in _PROJECTIONS:
    if fmt.fused:
      name, layout = _FUSED[sub[1]]
      return moe + name, layout
    proj = _EXPERT_NAMES[fmt.architecture][sub[1]]
    return tuple(f"{moe}experts.{j}.{proj}.weight" for j in range(cfg.moe.num_experts)), "linear"
  if fmt.architecture == "Qwen2MoeForCausalLM":
    if len(sub) == 3 and sub[1] == "shared" and sub[2] in _PROJECTIONS:
      return f"{pre}mlp.shared_expert.{sub[2]}.weight", "linear"
    if sub == ("moe", "shared_gate"):
      return f"{pre}mlp.shared_expert_gate.weight", "linear"
  return None


def _entry(path: tuple[str, ...], cfg: ModelConfig, fmt: _Format) -> _Entry:
  if path in _TOP_TENSORS:
    name, layout = _TOP_TENSORS[path]
    return _Entry(path, (name,), layout, False)
  stacked = path[0] == "layers"
  layers = range(cfg.num_layers) if stacked else (
      [int(path[0][len("layers_"):])] if re.fullmatch(r"layers_\d+", path[0]) else [])
  sources = [_block_source(path[1:], i, cfg, fmt) for i in layers]
  if sources and all(sources):
    names = tuple(name for name, _ in sources)
    return _Entry(path, names, sources[0][1], stacked, isinstance(names[0], tuple))
  raise ValueError(f"pretrainx parameter {'/'.join(path)} has no Hugging Face "
                   f"{fmt.architecture} counterpart.")


# ----------------------------------------------------------------------------- reading


class _TensorFiles:
  """Name -> safetensors file of an HF directory; opens each file once (memory-mapped)."""

  def __init__(self, path: str, stack: contextlib.ExitStack):
    self.path, self._stack, self._open = path, stack, {}
    index = storage.join(path, INDEX_FILE)
    if storage.isfile(index):
      self.file_of = dict(json.loads(storage.read_text(index))["weight_map"])
      for file in sorted(set(self.file_of.values())):
        if not storage.isfile(storage.join(path, file)):
          names = [n for n, f in self.file_of.items() if f == file]
          raise FileNotFoundError(
              f"shard {file} listed in {index} (holding {len(names)} tensors, e.g. {names[0]}) "
              "is missing; download or copy every shard the index names into the directory.")
    elif storage.isfile(storage.join(path, SINGLE_FILE)):
      self.file_of = {n: SINGLE_FILE for n in self._handle(SINGLE_FILE).keys()}
    else:
      raise FileNotFoundError(
          f"{path} holds neither {SINGLE_FILE} nor {INDEX_FILE}; pretrainx reads safetensors only "
          "(re-save a PyTorch .bin checkpoint with save_pretrained(..., safe_serialization=True)).")

  def _handle(self, file: str):
    if file not in self._open:
      from safetensors import safe_open  # pylint: disable=import-outside-toplevel
      local = self._stack.enter_context(storage.local_copy(storage.join(self.path, file)))
      self._open[file] = self._stack.enter_context(safe_open(local, framework="np"))
    return self._open[file]

  def slice(self, name: str):
    return self._handle(self.file_of[name]).get_slice(name)


def _check_tensors(files: _TensorFiles, entries: list[_Entry], shapes: dict, vocab: int) -> None:
  """Every tensor the config implies exists with the shape it implies (headers only)."""
  missing = [n for e in entries for n in e.all_names() if n not in files.file_of]
  if missing:
    raise ValueError(f"{len(missing)} tensors that config.json implies are missing from the "
                     f"checkpoint in {files.path}, e.g. {missing[:3]}; the config and the weights "
                     "belong to different models (or the index is incomplete).")
  for e in entries:
    per_layer = shapes[e.path][1:] if e.stacked else shapes[e.path]
    per_tensor = per_layer[1:] if e.experts else per_layer
    expected = tuple(_LAYOUTS[e.layout].hf_shape(per_tensor, vocab))
    for name in dict.fromkeys(e.all_names()):
      found = tuple(files.slice(name).get_shape())
      if found != expected:
        raise ValueError(
            f"tensor {name} ({files.file_of[name]}) has shape {found} but config.json implies "
            f"{expected} (pretrainx {'/'.join(e.path)}); the config and the weights disagree: fix "
            "config.json or use the directory the weights came from.")
  expected = {n for e in entries for n in e.all_names()}
  unused = [n for n in files.file_of if n not in expected and not n.endswith(_IGNORED_SUFFIXES)]
  if unused:
    logging.warning("ignoring %d checkpoint tensors pretrainx has no place for, e.g. %s",
                    len(unused), unused[:3])


def _load_array(files: _TensorFiles, e: _Entry, shape: tuple[int, ...], dtype, sharding,
                vocab: int) -> jax.Array:
  """One parameter, each device's block read from its HF slice only (repeats are cached)."""
  layout, blocks = _LAYOUTS[e.layout], {}

  def read(source, idx, shape) -> np.ndarray:  # one layer's block
    if e.experts:  # idx[0]: the experts this device holds, one HF tensor each
      return np.stack([layout.read(files.slice(source[j]), idx[1:], shape[1:], vocab)
                       for j in range(*idx[0])])
    return layout.read(files.slice(source), idx, shape, vocab)

  def block(index) -> np.ndarray:
    idx = tuple((s.start or 0, dim if s.stop is None else s.stop) for s, dim in zip(index, shape))
    if idx not in blocks:
      if e.stacked:  # idx[0]: the layers this device holds
        parts = [read(e.names[i], idx[1:], shape[1:]) for i in range(*idx[0])]
        blocks[idx] = np.stack(parts).astype(dtype)
      else:
        blocks[idx] = np.asarray(read(e.names[0], idx, shape), dtype)
    return blocks[idx]

  return jax.make_array_from_callback(shape, sharding, block)


def import_hf(path: str, *, mesh: jax.sharding.Mesh | None = None, rules=None,
              dtype: str | None = None, cfg: ModelConfig | None = None,
              overrides: dict[str, Any] | None = None) -> tuple[ModelConfig, Any]:
  """Reads the HF model directory `path` into (ModelConfig, params).

  Args:
    mesh, rules: place each parameter directly into its NamedSharding (logical axis rules; default
      MeshConfig().rules); without a mesh everything lands on the first device.
    dtype: parameter storage dtype ('float32', 'bfloat16'); None keeps ModelConfig.param_dtype.
    cfg: use this config instead of config.json's (the weights' shapes are checked against it).
    overrides: ModelConfig fields to set on top of config.json's (scan_layers, max_seq_len, ...).
  """
  cfg = load_hf_config(path, **(overrides or {})) if cfg is None else cfg
  if dtype is not None:
    cfg = dataclasses.replace(cfg, param_dtype=dtype)
  arch = architecture_of(read_config_json(path))
  check_hf_compatible(cfg, arch)
  boxed = param_shapes(cfg)
  abstract = traverse_util.flatten_dict(unbox_tree(boxed))
  if mesh is None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = {p: device for p in abstract}
  else:
    rules = MeshConfig().rules if rules is None else rules
    shardings = traverse_util.flatten_dict(logical_to_shardings(boxed, mesh, rules))
  shapes = {p: tuple(a.shape) for p, a in abstract.items()}
  with contextlib.ExitStack() as stack:
    files = _TensorFiles(path, stack)
    fmt = _detect_format(files.file_of, cfg, arch)
    entries = [_entry(p, cfg, fmt) for p in abstract]
    _check_tensors(files, entries, shapes, cfg.vocab_size)
    params = {e.path: _load_array(files, e, shapes[e.path], np.dtype(abstract[e.path].dtype),
                                  shardings[e.path], cfg.vocab_size) for e in entries}
  return cfg, traverse_util.unflatten_dict(params)


# ----------------------------------------------------------------------------- writing


def _natural(name: str) -> tuple:
  """Sort key: 'experts.2' before 'experts.10'."""
  return tuple((0, int(t)) if t.isdigit() else (1, t) for t in re.split(r"(\d+)", name))


def _export_plan(cfg: ModelConfig, flat: dict, architecture: str
                 ) -> list[tuple[str, tuple, tuple[int, ...], str, int]]:
  """(HF name, our path, index into our array (layer, expert: each if present), layout, HF
  element count), in HF order."""
  expected = {p: tuple(a.shape) for p, a in
              traverse_util.flatten_dict(unbox_tree(param_shapes(cfg))).items()}
  if set(flat) != set(expected):
    raise ValueError(f"params do not fit the ModelConfig: extra {sorted(set(flat) - set(expected))}"
                     f", missing {sorted(set(expected) - set(flat))}.")
  plan, fmt = [], _default_format(architecture)
  for path, shape in expected.items():
    if tuple(flat[path].shape) != shape:
      raise ValueError(f"param {'/'.join(path)} has shape {tuple(flat[path].shape)} but the "
                       f"ModelConfig implies {shape}; pass the config the params were built with.")
    e = _entry(path, cfg, fmt)
    per_tensor = shape[int(e.stacked) + int(e.experts):]
    count = math.prod(_LAYOUTS[e.layout].hf_shape(per_tensor, cfg.vocab_size))
    for i, source in enumerate(e.names):
      layer = (i,) if e.stacked else ()
      if e.experts:
        plan.extend((name, path, layer + (j,), e.layout, count) for j, name in enumerate(source))
      else:
        plan.append((source, path, layer, e.layout, count))
  order = lambda item: (item[0].startswith("lm_head"), item[0] == "model.norm.weight",
                        int(item[0].split(".")[2]) if item[0].startswith("model.layers.") else -1,
                        _natural(item[0]))
  return sorted(plan, key=order)


def export_hf(params: Any, cfg: ModelConfig, out_dir: str, *,
              architecture: str | None = None, shard_size: int = DEFAULT_SHARD_SIZE,
              dtype: str | None = None) -> str:
  """Writes `params` of Transformer(cfg) as an HF directory (config.json + safetensors, sharded
  with an index above `shard_size` bytes); one file's tensors are on the host at a time.
  architecture: None picks Llama, Qwen2 (q/k/v biases), Mixtral or Qwen2-MoE (experts: shared
  ones, biases or dense layers) for cfg. dtype: 'float32' or 'bfloat16' on disk; None keeps
  ModelConfig.param_dtype."""
  from safetensors.numpy import save  # pylint: disable=import-outside-toplevel

  architecture = default_architecture(cfg) if architecture is None else architecture
  if architecture not in ARCHITECTURES:
    raise ValueError(f"unsupported Hugging Face architecture {architecture!r}; pretrainx exports "
                     f"{', '.join(ARCHITECTURES)}.")
  biased = architecture in QKV_BIAS_ARCHITECTURES
  # Qwen2-MoE's config.json says whether it has biases (qkv_bias, read since transformers 5)
  if cfg.qkv_bias != biased and architecture != "Qwen2MoeForCausalLM":
    raise ValueError(f"{architecture} {'has' if biased else 'has no'} q/k/v biases but "
                     f"ModelConfig.qkv_bias={cfg.qkv_bias}; export q/k/v biases as "
                     "Qwen2ForCausalLM (with experts: Qwen2MoeForCausalLM) and bias-free models "
                     "as LlamaForCausalLM (with experts: MixtralForCausalLM).")
  check_hf_compatible(cfg, architecture)
  dtype = cfg.param_dtype if dtype is None else dtype
  np_dtype = np.dtype(ModelConfig(param_dtype=dtype).storage_dtype)
  flat = traverse_util.flatten_dict(unbox_tree(params))
  plan = _export_plan(cfg, flat, architecture)
  sizes = [count * np_dtype.itemsize for *_, count in plan]
  groups = consecutive_groups(sizes, shard_size)
  out_dir = storage.resolve(out_dir)
  storage.check_bucket(out_dir, "export to")
  storage.makedirs(out_dir)
  weight_map = {}
  for g, group in enumerate(groups):
    file = (SINGLE_FILE if len(groups) == 1 else
            f"model-{g + 1:05d}-of-{len(groups):05d}.safetensors")
    tensors = {}
    for i in group:
      name, path, index, layout, _ = plan[i]
      value = flat[path][index] if index else flat[path]
      host = np.asarray(jax.device_get(value)).astype(np_dtype)
      tensors[name] = np.ascontiguousarray(_LAYOUTS[layout].write(host, cfg.vocab_size))
      weight_map[name] = file
    storage.write_bytes(storage.join(out_dir, file), save(tensors, metadata={"format": "pt"}))
    del tensors
  if len(groups) > 1:
    storage.write_text(storage.join(out_dir, INDEX_FILE), json.dumps(
        {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}, indent=2))
  storage.write_text(storage.join(out_dir, "config.json"),
                     json.dumps(hf_config_dict(cfg, architecture, dtype), indent=2))
  return out_dir


# ----------------------------------------------------------------------------- convert


def _read_export(path: str) -> tuple[dict[str, Any], ModelConfig]:
  """(meta, ModelConfig) of a pretrainx params export, read without reading the params."""
  storage.check_bucket(path, "read")
  if not storage.isdir(path):
    raise FileNotFoundError(f"pretrainx params directory {path} does not exist; write one with "
                            "`python -m pretrainx export` or convert an HF model into it.")
  meta = read_meta(storage.resolve(path))
  return meta, saved_experiment(meta, path).model


def _spread_mesh(cfg: ModelConfig) -> jax.sharding.Mesh:
  """All local devices, params split over 'fsdp' as far as embed_dim divides: no device holds
  the whole model while converting."""
  fsdp = math.gcd(jax.device_count(), cfg.embed_dim)
  return make_mesh(MeshConfig(data=jax.device_count() // fsdp, fsdp=fsdp, tensor=1))


def _hf_to_pretrainx(src: str, out: str, dtype: str | None) -> str:
  cfg = load_hf_config(src)
  cfg, params = import_hf(src, mesh=_spread_mesh(cfg), cfg=cfg, dtype=dtype)
  # RunConfig.seq_len must fit the model for the gin file to validate.
  exp = Experiment(model=cfg, run=RunConfig(seq_len=min(RunConfig.seq_len, cfg.max_seq_len)))
  gin_text = experiment_to_gin(exp)
  path = save_params(out, params, {"step": 0, "config_gin": gin_text,
                                   "source": storage.resolve(src),
                                   "architecture": architecture_of(read_config_json(src))})
  storage.write_text(storage.join(path, "config.gin"), gin_text)
  return path


def _pretrainx_to_hf(src: str, out: str, architecture: str | None, dtype: str | None,
                     shard_size: int) -> str:
  meta, cfg = _read_export(src)
  architecture = architecture or meta.get("architecture") or default_architecture(cfg)
  boxed = param_shapes(cfg)
  shardings = logical_to_shardings(boxed, _spread_mesh(cfg), MeshConfig().rules)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          unbox_tree(boxed), shardings)
  params, _ = load_params(src, abstract)
  out = export_hf(params, cfg, out, architecture=architecture, shard_size=shard_size,
                  dtype=dtype)
  write_tokenizer(saved_experiment(meta, src).data.vocabulary, out,
                  model_max_length=cfg.max_seq_len, source=meta.get("source"))
  return out


def convert_main(src: str, out: str, direction: str, *, architecture: str | None = None,
                 dtype: str | None = None, shard_size: int = DEFAULT_SHARD_SIZE) -> str:
  """`python -m pretrainx convert`: returns the directory written.

  'hf-to-pretrainx': an HF model directory -> pretrainx params (checkpoint.save_params, meta with
  'config_gin') plus config.gin of the model. 'pretrainx-to-hf': such params (or `pretrainx export`
  output) -> an HF directory with the run's tokenizer (hf_tokenizer.write_tokenizer);
  architecture defaults to the one imported from, else hf_config.default_architecture (Llama,
  Qwen2 with q/k/v biases, Mixtral / Qwen2-MoE with experts).
  """
  if direction == "hf-to-pretrainx":
    return _hf_to_pretrainx(src, out, dtype)
  if direction == "pretrainx-to-hf":
    return _pretrainx_to_hf(src, out, architecture, dtype, shard_size)
  raise ValueError(f"unknown conversion direction {direction!r}; choose one of {DIRECTIONS}.")
