"""What a run's starting point (InitConfig.source) is, and the architecture it fixes.

A source is a Hugging Face model directory (its config.json), a pretrainx run directory, its
checkpoints/ directory or a params export (their saved config_gin). Only configs are read here,
never weights (train/init.py loads those). `with_source_architecture` fills the ModelConfig
fields a source decides and refuses explicit bindings that disagree.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from absl import logging

from pretrainx import storage
from pretrainx.config.experiment import Experiment
from pretrainx.config.gin_io import parse_gin_bindings
from pretrainx.config.hf_config import load_hf_config, read_config_json
from pretrainx.config.model import ModelConfig

# ModelConfig fields that say how a model runs, not what its weights are: the run's own.
RUNTIME_MODEL_FIELDS = ("dtype", "param_dtype", "remat_policy", "scan_layers", "scan_unroll",
                        "kernel_interpret", "flash_block_q", "flash_block_k", "sow_kurtosis",
                        "vocab_multiple")
# Attention fields a linearized run sets for itself (its source is a softmax model).
_ATTENTION_FIELDS = ("attention_impl", "layer_attention_impls", "linear_feature",
                     "linear_feature_dim", "linear_decay", "linear_chunk", "attention_window")
# RoPE fields: taken from the source where the run leaves them unbound, but the run may bind
# other values (context extension: rope_scaling added to a Llama, a bigger rope_theta).
ROPE_MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig)
                          if f.name.startswith("rope_"))
# Widths a run may bind larger than its source's with InitConfig.grow_width (cpt.width).
_WIDTH_FIELDS = ("embed_dim", "num_heads", "num_kv_heads", "mlp_dim")
# What a source decides: every other field but init_std (used only by a random init),
# max_seq_len (a run may use a shorter context than its source) and moe (a run may upcycle a dense
# source into experts, or add experts to an MoE source: a dense run takes the source's experts).
SOURCE_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig) if f.name not in (
    *RUNTIME_MODEL_FIELDS, *_ATTENTION_FIELDS, "init_std", "max_seq_len", "moe"))
_META = ("meta", "metadata")  # where the checkpoint package's JSON meta item lands in an Orbax directory
_COMMIT = "commit_success.txt"


def source_kind(path: str, field: str = "InitConfig.source") -> str:
  """'hf', 'run', 'checkpoints' or 'export' for what `path` holds (`field` names the setting
  that gave it, for the errors)."""
  storage.check_bucket(path, f"read {field}")
  entries = set(storage.listdir(path))
  if not entries and not storage.exists(path):
    raise FileNotFoundError(f"{field} {path} does not exist.")
  if "config.json" in entries and any(e.endswith(".safetensors") or
                                      e.endswith(".safetensors.index.json") for e in entries):
    return "hf"
  if "checkpoints" in entries and "config.gin" in entries:
    return "run"
  if any(e.isdigit() for e in entries):
    return "checkpoints"
  if "params" in entries and "meta" in entries:
    return "export"
  raise ValueError(f"{field} {path} is neither a Hugging Face model directory, a "
                   "pretrainx run directory, a checkpoints directory nor a params export.")


def read_meta(directory: str) -> dict[str, Any]:
  """The JSON meta of a params export or of one checkpoint step directory (the JSON object in
  its meta/ item; Orbax names the file 'metadata')."""
  meta_dir = storage.join(directory, _META[0])
  names = storage.listdir(meta_dir) if storage.isdir(meta_dir) else []
  for name in sorted(names, key=lambda n: n != _META[1]):
    try:
      meta = json.loads(storage.read_text(storage.join(meta_dir, name)))
    except (ValueError, UnicodeDecodeError, IsADirectoryError):
      continue
    if isinstance(meta, dict) and "step" in meta:
      return meta
  raise FileNotFoundError(f"{directory} has no saved meta ({meta_dir}); it was not written by "
                          "pretrainx (export, convert or a training checkpoint).")


def newest_step(checkpoints: str) -> int:
  steps = sorted(int(e) for e in storage.listdir(checkpoints)
                 if e.isdigit() and storage.exists(storage.join(checkpoints, e, _COMMIT)))
  if not steps:
    raise FileNotFoundError(f"{checkpoints} holds no finished checkpoint.")
  return steps[-1]


def saved_experiment(meta: dict[str, Any], where: str) -> Experiment:
  """The Experiment a checkpoint or export was written with (its meta's config_gin: complete,
  so its own InitConfig.source is not consulted)."""
  if "config_gin" not in meta:
    raise ValueError(f"{where} has no config_gin in its meta; re-export it with pretrainx.")
  return parse_gin_bindings([meta["config_gin"]])[0]


def source_experiment(source: str, step: int | None = None) -> tuple[Experiment, int | None]:
  """(the Experiment a pretrainx source was trained with, its checkpoint step or None)."""
  kind = source_kind(source)
  path = storage.resolve(source)
  if kind == "export":
    return saved_experiment(read_meta(path), path), None
  if kind == "hf":
    raise ValueError(f"{source} is a Hugging Face model directory, not a pretrainx run.")
  directory = storage.join(path, "checkpoints") if kind == "run" else path
  step = newest_step(directory) if step is None else step
  return saved_experiment(read_meta(storage.join(directory, str(step))),
                          storage.join(directory, str(step))), step


def _hf_model(source: str, max_seq_len: int | None = None, **overrides: Any) -> ModelConfig:
  """load_hf_config at `max_seq_len` where that is shorter than config.json's context (a
  sliding window of some layers only is refused only where it binds)."""
  full = read_config_json(source)["max_position_embeddings"]
  if max_seq_len is not None and max_seq_len < full:
    overrides["max_seq_len"] = max_seq_len
  return load_hf_config(source, **overrides)


def source_model(source: str, step: int | None = None,
                 max_seq_len: int | None = None) -> ModelConfig:
  """The ModelConfig of what `source` holds (for a Hugging Face directory, from config.json, at
  the run's `max_seq_len` when that is shorter)."""
  if source_kind(source) == "hf":
    return _hf_model(source, max_seq_len)
  return source_experiment(source, step)[0].model


def _grown_layers(num_layers: int, init) -> int:
  num_layers *= init.stack_factor
  return num_layers + (num_layers // init.expand_every if init.expand_every else 0)


def with_source_architecture(exp: Experiment, bound: set[str] | None = None) -> Experiment:
  """`exp` with the ModelConfig fields its InitConfig.source decides taken from the source.

  bound: the ModelConfig fields set explicitly (by gin bindings); None counts those that differ
  from ModelConfig's defaults. A bound field that disagrees with the source is refused, with
  every difference listed, except the ROPE_MODEL_FIELDS, which a run may set to extend its
  context: a bound rope scaling on a source without one gets the source's context as
  rope_original_max_len (unless bound), and then max_seq_len may exceed the source's. The source
  is read only when some field it decides is unbound; one that is not there (yet, or any more: a
  resumed run no longer needs it) leaves `exp` as it is, and starting from it fails later with
  its own clear error.
  """
  if not exp.init.source:
    return exp
  model, default = exp.model, ModelConfig()
  if bound is None:
    bound = {f for f in SOURCE_FIELDS + ("max_seq_len",) if getattr(model, f) != getattr(default, f)}
  if set(SOURCE_FIELDS) <= bound:
    return exp
  try:
    src = source_model(exp.init.source, exp.init.step,
                       model.max_seq_len if "max_seq_len" in bound else None)
  except FileNotFoundError as err:
    logging.info("the architecture is not taken from InitConfig.source: %s", err)
    return exp
  wanted = {f: getattr(src, f) for f in SOURCE_FIELDS}
  wanted["num_layers"] = _grown_layers(src.num_layers, exp.init)
  # a run that grows the source's width binds its own widths (cpt.width checks them)
  widths = _WIDTH_FIELDS + ("head_dim",) if exp.init.grow_width else ()
  smaller = [f"ModelConfig.{f}={getattr(model, f)} < the source's {getattr(src, f)}"
             for f in widths[:4] if f in bound and getattr(model, f) < getattr(src, f)]
  if smaller:
    raise ValueError(f"InitConfig.grow_width only grows: {'; '.join(smaller)}; bind widths at "
                     "least the source's.")
  if exp.init.extend_vocab_from:  # the run's own: its extended tokenizer's size, unless bound
    del wanted["vocab_size"]
  clashes = [f"ModelConfig.{f}: bound {getattr(model, f)!r}, the source has {v!r}"
             for f, v in wanted.items() if f in bound and getattr(model, f) != v
             and f not in ROPE_MODEL_FIELDS and f not in widths
             and not (f == "head_dim" and model.resolved_head_dim == src.resolved_head_dim)]
  rope = {f: getattr(model, f) if f in bound else v for f, v in wanted.items()
          if f in ROPE_MODEL_FIELDS}
  extends = rope["rope_scaling"] is not None and src.rope_scaling is None
  if extends and "rope_original_max_len" not in bound:
    rope["rope_original_max_len"] = src.source_max_position_embeddings or src.max_seq_len
    logging.info("rope_scaling=%r on a source without scaling: rope_original_max_len=%d, the "
                 "source's context.", rope["rope_scaling"], rope["rope_original_max_len"])
  rope_changed = (any(rope[f] != getattr(src, f) for f in ROPE_MODEL_FIELDS) or
                  any(stage.rope for stage in exp.data.schedule_stages))
  if "max_seq_len" in bound and model.max_seq_len > src.max_seq_len and not rope_changed:
    logging.warning("ModelConfig.max_seq_len=%d is longer than the source's %d with its RoPE "
                    "unchanged: positions past %d were never trained (bind rope_scaling or "
                    "rope_theta, or a Stage.rope, to extend the context).", model.max_seq_len,
                    src.max_seq_len, src.max_seq_len)
  if clashes:
    raise ValueError(f"InitConfig.source={exp.init.source} fixes the architecture, and this "
                     "config disagrees with it:\n  " + "\n  ".join(clashes) +
                     "\nRemove those ModelConfig bindings (the source sets them) or pick another "
                     "source.")
  fields = {f: v for f, v in wanted.items() if f not in bound and not (
      f == "head_dim" and model.resolved_head_dim == src.resolved_head_dim)}
  if widths and "head_dim" not in bound:  # width growth keeps the source's head_dim
    fields["head_dim"] = src.resolved_head_dim
  fields.update({f: v for f, v in rope.items() if f not in bound})
  if "max_seq_len" not in bound:
    fields["max_seq_len"] = src.max_seq_len
  if exp.init.extend_vocab_from and "vocab_size" not in bound:
    fields["vocab_size"] = exp.data.vocabulary.vocab_size
  if src.moe.enabled and not model.moe.enabled:
    fields["moe"] = src.moe
  if exp.model.layer_attention_impls and "num_layers" in fields:
    fields.pop("num_layers")  # a per-layer attention list already fixes the depth
  return dataclasses.replace(exp, model=dataclasses.replace(model, **fields))


def source_model_config(source: str, like: ModelConfig | None = None, step: int | None = None
                        ) -> tuple[ModelConfig, Experiment | None, int | None]:
  """(ModelConfig, Experiment or None, step or None) of what `source` holds, without loading
  its params. For a Hugging Face directory the architecture comes from config.json, the
  RUNTIME_MODEL_FIELDS (and a shorter max_seq_len) from `like`."""
  if source_kind(source) == "hf":
    overrides = {f: getattr(like, f) for f in RUNTIME_MODEL_FIELDS} if like is not None else {}
    cfg = _hf_model(source, like.max_seq_len if like is not None else None, **overrides)
    return cfg, None, None
  exp, step = source_experiment(source, step)
  return exp.model, exp, step
