"""Where a new run's state comes from: random init, or an existing model to continue training.

`InitConfig.source` names a Hugging Face model directory, a pretrainx run directory, checkpoint
directory or step, or a params export. Its params are placed into the run's shardings, optionally
grown (Llama-Pro block expansion, G_stack layer stacking) or linearized (a softmax source into a
run whose ModelConfig uses 'hybrid'/'linear' attention: the new feature maps start at their
init); the optimizer state and step counter are reset unless asked to be kept. Used only when
the run directory has no checkpoint of its own.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging

from pretrainx import storage
from pretrainx.checkpoint import Checkpointer, load_params
from pretrainx.train.state import TrainState, new_state
from pretrainx.train.tuning import params_view, with_adapters
from pretrainx.config import InitConfig


def source_kind(path: str) -> str:
  """'hf', 'run', 'checkpoints' or 'export' for what `path` holds."""
  storage.check_bucket(path, "read InitConfig.source")
  entries = set(storage.listdir(path))
  if not entries and not storage.exists(path):
    raise FileNotFoundError(f"InitConfig.source {path} does not exist.")
  if "config.json" in entries and any(e.endswith(".safetensors") or
                                      e.endswith(".safetensors.index.json") for e in entries):
    return "hf"
  if "checkpoints" in entries and "config.gin" in entries:
    return "run"
  if any(e.isdigit() for e in entries):
    return "checkpoints"
  if "params" in entries and "meta" in entries:
    return "export"
  raise ValueError(f"InitConfig.source {path} is neither a Hugging Face model directory, a "
                   "pretrainx run directory, a checkpoints directory nor a params export.")


def _experiment_from_gin_text(text: str):
  from pretrainx.config import parse_gin  # pylint: disable=import-outside-toplevel

  with tempfile.NamedTemporaryFile("w", suffix=".gin", delete=False) as f:
    f.write(text)
  try:
    return parse_gin([f.name])
  finally:
    os.remove(f.name)


def _load_pretrainx(rt, init: InitConfig, kind: str) -> tuple[Any, Any, Any, int]:
  """(model config, params, opt_state or None, step) of a pretrainx source, on rt's mesh."""
  from pretrainx.train.runtime import build_runtime  # pylint: disable=import-outside-toplevel

  path = storage.resolve(init.source)
  if kind == "export":
    meta_exp = _read_export_experiment(path)
    src = build_runtime(meta_exp.replace(mesh=dataclasses.asdict(rt.exp.mesh)))
    params, meta = load_params(path, src.abstract_state.params)
    return meta_exp.model, params, None, int(meta.get("step", 0))
  directory = storage.join(path, "checkpoints") if kind == "run" else path
  ckpt = Checkpointer(directory, create=False)
  try:
    meta = ckpt.read_meta(init.step)
    src_exp = _experiment_from_gin_text(meta["config_gin"])
    # The source's own state layout (model, optimizer, EMA, adapters) restores it; keeping its
    # optimizer state needs that layout to be this run's.
    src = rt if init.keep_optimizer else build_runtime(src_exp.replace(
        mesh=dataclasses.asdict(rt.exp.mesh), run={"steps": rt.exp.run.steps}))
    with src.scope():
      state, _, step = ckpt.restore(src.abstract_state, init.step)
  finally:
    ckpt.close()
  params = state.params
  if src_exp.tune.lora is not None:  # a LoRA run continues from its merged weights
    params = params_view(src_exp.tune)(params)
  return src_exp.model, params, state.opt_state if init.keep_optimizer else None, step


def _read_export_experiment(path: str):
  import json  # pylint: disable=import-outside-toplevel

  meta_dir = storage.join(path, "meta")
  for name in storage.listdir(meta_dir):
    try:
      meta = json.loads(storage.read_text(storage.join(meta_dir, name)))
    except ValueError:
      continue
    if "config_gin" in meta:
      return _experiment_from_gin_text(meta["config_gin"])
  raise ValueError(f"params export {path} has no config_gin in its meta; re-export it.")


# ModelConfig fields that describe how a model runs, not its weights: a Hugging Face source takes
# its architecture from config.json and these from the run's ModelConfig.
RUNTIME_MODEL_FIELDS = ("dtype", "param_dtype", "remat_policy", "scan_layers", "kernel_interpret",
                        "flash_block_q", "flash_block_k", "sow_kurtosis", "vocab_multiple")


def source_model_config(source: str, like=None, step: int | None = None):
  """(ModelConfig, Experiment or None, step or None) of what `source` holds, without loading
  its params. For a Hugging Face directory the architecture comes from config.json, the
  RUNTIME_MODEL_FIELDS (and a shorter max_seq_len) from `like`, a ModelConfig."""
  kind = source_kind(source)
  if kind == "hf":
    from pretrainx import hf  # pylint: disable=import-outside-toplevel

    overrides = {f: getattr(like, f) for f in RUNTIME_MODEL_FIELDS} if like is not None else {}
    cfg = hf.load_hf_config(source)
    if like is not None and like.max_seq_len < cfg.max_seq_len:
      overrides["max_seq_len"] = like.max_seq_len
    return hf.load_hf_config(source, **overrides), None, None
  if kind == "export":
    exp = _read_export_experiment(storage.resolve(source))
    return exp.model, exp, None
  directory = storage.join(source, "checkpoints") if kind == "run" else source
  ckpt = Checkpointer(directory, create=False)
  try:
    step = ckpt.latest_step() if step is None else step
    meta = ckpt.read_meta(step)
  finally:
    ckpt.close()
  exp = _experiment_from_gin_text(meta["config_gin"])
  return exp.model, exp, step


def _softmax_twin(cfg):
  """cfg with every layer's attention softmax: the layout a linearized run's source has."""
  from pretrainx.config.cpt import SOFTMAX_IMPLS  # pylint: disable=import-outside-toplevel

  if all(impl in SOFTMAX_IMPLS for impl in cfg.layer_impls):
    return cfg
  return dataclasses.replace(cfg, attention_impl="reference", layer_attention_impls=())


_HF_SHAPE_FIELDS = ("vocab_size", "embed_dim", "num_layers", "num_heads", "num_kv_heads",
                    "resolved_head_dim", "mlp_dim", "tie_embeddings", "qkv_bias")


def _hf_import_config(source: str, run_cfg):
  """The config to import a Hugging Face source into: the run's own, with softmax attention
  (a linearized run converts after loading), after checking its shapes against config.json."""
  from pretrainx import hf  # pylint: disable=import-outside-toplevel

  hf_cfg, target = hf.load_hf_config(source), _softmax_twin(run_cfg)
  diffs = [f"{f}: config.json {getattr(hf_cfg, f)}, this run {getattr(target, f)}"
           for f in _HF_SHAPE_FIELDS if getattr(hf_cfg, f) != getattr(target, f)]
  if diffs:
    raise ValueError(f"this run's ModelConfig does not match the Hugging Face model {source} ("
                     + "; ".join(diffs) + "). Set those ModelConfig fields to the source's; "
                     "pretrainx.hf.load_hf_config(path) gives them.")
  return target


def _linearize(params: Any, src_cfg, cfg, rng: jax.Array) -> Any:
  """Carries a softmax source's params into a run whose layers use linear/hybrid attention."""
  if src_cfg.layer_impls == cfg.layer_impls:
    return params
  from pretrainx.linearize.convert import convert_params  # pylint: disable=import-outside-toplevel

  logging.info("linearizing the source: attention %s -> %s", src_cfg.layer_impls, cfg.layer_impls)
  return convert_params(params, src_cfg, cfg, rng)


def _grow(params: Any, cfg, init: InitConfig):
  from pretrainx import peft  # pylint: disable=import-outside-toplevel

  if init.stack_factor > 1:
    params, cfg = peft.stack_layers(params, cfg, factor=init.stack_factor)
  if init.expand_every:
    params, cfg, _ = peft.expand_blocks(params, cfg, every=init.expand_every)
  return params, cfg


def check_param_shapes(params: Any, abstract: Any, source: str) -> None:
  got = jax.tree_util.tree_flatten_with_path(jax.tree.map(jnp.shape, params))[0]
  want = jax.tree_util.tree_flatten_with_path(jax.tree.map(jnp.shape, abstract))[0]
  got, want = ({jax.tree_util.keystr(k): v for k, v in t} for t in (got, want))
  diffs = [f"{k}: source {got.get(k, 'missing')} -> model {want.get(k, 'missing')}"
           for k in sorted(set(got) | set(want)) if got.get(k) != want.get(k)]
  if diffs:
    raise ValueError(f"the params of {source} do not fit this run's ModelConfig:\n  " +
                     "\n  ".join(diffs[:12]) + "\nSet ModelConfig to the source's shapes (or the "
                     "grown shapes with InitConfig.expand_every / stack_factor).")


def initial_state(rt, init: InitConfig) -> tuple[TrainState, int]:
  """The state a fresh run starts from, and its step."""
  kind = source_kind(init.source)
  if kind == "hf":
    from pretrainx import hf  # pylint: disable=import-outside-toplevel

    cfg, params = hf.import_hf(init.source, mesh=rt.mesh, rules=rt.exp.mesh.rules,
                               cfg=None if init.stack_factor > 1 or init.expand_every else
                               _hf_import_config(init.source, rt.exp.model))
    opt_state, step = None, 0
    if init.keep_optimizer or init.keep_step:
      raise ValueError("a Hugging Face source has no optimizer state or step; unset "
                       "InitConfig.keep_optimizer / keep_step.")
  else:
    cfg, params, opt_state, step = _load_pretrainx(rt, init, kind)
  params, cfg = _grow(params, cfg, init)
  params = _linearize(params, cfg, rt.exp.model, jax.random.key(rt.exp.run.seed + 1))
  params = with_adapters(params, rt.exp.tune, jax.random.key(rt.exp.run.seed))
  check_param_shapes(params, rt.abstract_state.params, init.source)
  step = step if init.keep_step else 0

  ema = rt.exp.ema.enabled
  # One program: no two leaves may share a buffer (the train step donates the state).
  assemble = lambda p, o: new_state(p, rt.optimizer, opt_state=o, step=step, ema=ema)
  state = jax.jit(assemble, out_shardings=rt.shardings)(params, opt_state)
  logging.info("initialised from %s (%s) at step %d", init.source, kind, step)
  return state, step
