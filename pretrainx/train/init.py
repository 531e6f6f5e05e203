"""Where a new run's state comes from: random init, or an existing model to continue training.

`InitConfig.source` names a Hugging Face model directory, a pretrainx run directory, checkpoint
directory or step, or a params export (pretrainx.config.sources reads what each holds). Its
params are placed into the run's shardings, optionally grown (function-preserving width growth
to the run's widths, Llama-Pro block expansion, G_stack layer stacking), upcycled into experts
(a dense source into an MoE run, or an MoE source into one with more experts), or linearized (a
softmax source into a run whose ModelConfig uses 'hybrid'/'linear' attention: the new feature
maps start at their init), or given embedding rows for the ids an extended tokenizer adds
(cpt/vocab.py); the optimizer state and step counter are reset unless asked to be kept. Used
only when the run directory has no checkpoint of its own.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from absl import logging

from pretrainx import hf, storage
from pretrainx.checkpoint import Checkpointer, load_params
from pretrainx.config import InitConfig, ModelConfig, load_hf_config
from pretrainx.config.cpt import SOFTMAX_IMPLS
from pretrainx.config.sources import read_meta, saved_experiment, source_kind
from pretrainx.cpt.growth import expand_blocks, stack_layers
from pretrainx.cpt.linearize import convert_params
from pretrainx.cpt.width import grow_width, grown_config
from pretrainx.cpt.upcycle import needs_upcycling, upcycle_sharded
from pretrainx.cpt.vocab import NewTokens, extend_vocabulary
from pretrainx.model import param_shapes
from pretrainx.sharding import logical_to_shardings
from pretrainx.train.runtime import Runtime, build_runtime
from pretrainx.train.state import TrainState, new_state
from pretrainx.train.tuning import params_view, with_adapters
from pretrainx.tree import shape_differences
from pretrainx.vocab_extend import check_extension, new_token_pieces, overlapping_tokens


def load_source(rt: Runtime, init: InitConfig, kind: str) -> tuple[Any, Any, Any, int]:
  """(model config, params, opt_state or None, step) of a pretrainx source, on rt's mesh."""
  path = storage.resolve(init.source)
  if kind == "export":
    meta_exp = saved_experiment(read_meta(path), path)
    src = build_runtime(meta_exp.replace(mesh=dataclasses.asdict(rt.exp.mesh)), rt.devices)
    params, meta = load_params(path, src.abstract_state.params)
    return meta_exp.model, params, None, int(meta.get("step", 0))
  directory = storage.join(path, "checkpoints") if kind == "run" else path
  ckpt = Checkpointer(directory, create=False)
  try:
    meta = ckpt.read_meta(init.step)
    src_exp = saved_experiment(meta, directory)
    if init.keep_optimizer and src_exp.model.moe != rt.exp.model.moe:
      raise ValueError("InitConfig.keep_optimizer cannot be combined with upcycling or added "
                       "experts: the source's optimizer state has the old expert shapes; unset "
                       "keep_optimizer (or keep the source's MoeConfig).")
    # The source's own state layout (model, optimizer, EMA, adapters) restores it; keeping its
    # optimizer state needs that layout to be this run's.
    src = rt if init.keep_optimizer else build_runtime(src_exp.replace(
        mesh=dataclasses.asdict(rt.exp.mesh), run={"steps": rt.exp.run.steps}), rt.devices)
    with src.scope():
      state, _, step = ckpt.restore(src.abstract_state, init.step)
  finally:
    ckpt.close()
  params = state.params
  if src_exp.tune.lora is not None:  # a LoRA run continues from its merged weights
    params = params_view(src_exp.tune)(params)
  return src_exp.model, params, state.opt_state if init.keep_optimizer else None, step


def _softmax_twin(cfg: ModelConfig) -> ModelConfig:
  """cfg with every layer's attention softmax: the layout a linearized run's source has."""
  if all(impl in SOFTMAX_IMPLS for impl in cfg.layer_impls):
    return cfg
  return dataclasses.replace(cfg, attention_impl="reference", layer_attention_impls=())


_HF_SHAPE_FIELDS = ("vocab_size", "embed_dim", "num_layers", "num_heads", "num_kv_heads",
                    "resolved_head_dim", "mlp_dim", "tie_embeddings", "qkv_bias")


def _hf_import_config(source: str, run_cfg: ModelConfig, source_width: bool = False,
                      extend_vocab: bool = False) -> ModelConfig:
  """The config to import a Hugging Face source into: the run's own, with softmax attention
  (a linearized run converts after loading), the source's experts (an upcycled run converts
  after loading), with `source_width` the source's widths (a run that grows them) and with
  `extend_vocab` the source's vocabulary (extended after loading), after checking its shapes
  against config.json."""
  hf_cfg = load_hf_config(source)
  target = dataclasses.replace(_softmax_twin(run_cfg), moe=hf_cfg.moe)
  if source_width:
    target = grown_config(target, hf_cfg)
  if extend_vocab:
    target = dataclasses.replace(target, vocab_size=hf_cfg.vocab_size)
  diffs = [f"{f}: config.json {getattr(hf_cfg, f)}, this run {getattr(target, f)}"
           for f in _HF_SHAPE_FIELDS if getattr(hf_cfg, f) != getattr(target, f)]
  if diffs:
    raise ValueError(f"this run's ModelConfig does not match the Hugging Face model {source} ("
                     + "; ".join(diffs) + "). Leave those ModelConfig fields unbound (the source "
                     "sets them), or call pretrainx.config.with_source_architecture(exp).")
  return target


def _linearize(params: Any, src_cfg: ModelConfig, cfg: ModelConfig, rng: jax.Array) -> Any:
  """Carries a softmax source's params into a run whose layers use linear/hybrid attention."""
  if src_cfg.layer_impls == cfg.layer_impls:
    return params
  logging.info("linearizing the source: attention %s -> %s", src_cfg.layer_impls, cfg.layer_impls)
  return convert_params(params, src_cfg, cfg, rng)


def _grow_width(params: Any, cfg: ModelConfig, run_cfg: ModelConfig, init: InitConfig,
                seed: int) -> tuple[Any, ModelConfig]:
  """The source grown to the run's embed_dim, heads and mlp_dim, computing the same function."""
  if not init.grow_width:
    return params, cfg
  logging.info("growing the source's width (%s): embed %d -> %d, heads %d/%d -> %d/%d, mlp %d "
               "-> %d", init.grow_width, cfg.embed_dim, run_cfg.embed_dim, cfg.num_heads,
               cfg.num_kv_heads, run_cfg.num_heads, run_cfg.num_kv_heads, cfg.mlp_dim,
               run_cfg.mlp_dim)
  return grow_width(params, cfg, run_cfg, method=init.grow_width, noise=init.grow_width_noise,
                    seed=seed)


def _grow(params: Any, cfg: ModelConfig, init: InitConfig) -> tuple[Any, ModelConfig]:
  if init.stack_factor > 1:
    params, cfg = stack_layers(params, cfg, factor=init.stack_factor)
  if init.expand_every:
    params, cfg, _ = expand_blocks(params, cfg, every=init.expand_every)
  return params, cfg


def _param_shardings(rt: Runtime, cfg: ModelConfig) -> Any:
  """NamedShardings of Transformer(cfg)'s params on the run's mesh, from shapes alone."""
  return logical_to_shardings(param_shapes(cfg), rt.mesh, rt.exp.mesh.rules)


def _upcycle(rt: Runtime, params: Any, cfg: ModelConfig, rng: jax.Array
             ) -> tuple[Any, ModelConfig]:
  """A source's MLPs turned into the run's experts, when their MoeConfigs differ: built on the
  devices, each holding only its shard of the experts (cpt.upcycle.upcycle_sharded)."""
  run_cfg = rt.exp.model
  target = dataclasses.replace(cfg, moe=run_cfg.moe, scan_layers=run_cfg.scan_layers)
  if not needs_upcycling(cfg, target):
    return params, cfg
  logging.info("upcycling the source: %d -> %d experts per MoE layer", cfg.moe.num_experts,
               run_cfg.moe.num_experts)
  return upcycle_sharded(params, cfg, target, rng, _param_shardings(rt, target)), target


def _extend_vocab(rt: Runtime, init: InitConfig, params: Any, cfg: ModelConfig
                  ) -> tuple[Any, ModelConfig]:
  """The source's embedding (and untied head) with rows for the ids the run's tokenizer adds
  (InitConfig.extend_vocab_from; cpt/vocab.py makes the rows)."""
  if not init.extend_vocab_from:
    return params, cfg
  old, new = check_extension(rt.exp)
  start, stop = old.vocab_size, new.vocab_size
  if start > cfg.vocab_size:
    raise ValueError(f"the source's tokenizer has {start} ids but the source model only "
                     f"{cfg.vocab_size}; InitConfig.extend_vocab_from names another tokenizer.")
  as_tuples = lambda lists: tuple(tuple(x) for x in lists)
  tokens = NewTokens(start, stop, as_tuples(new_token_pieces(old.tokenizer, new.tokenizer, start,
                                                             stop)),
                     as_tuples(overlapping_tokens(old.tokenizer, new.tokenizer, start, stop)))
  target = dataclasses.replace(cfg, vocab_size=rt.exp.model.vocab_size,
                               vocab_multiple=rt.exp.model.vocab_multiple)
  logging.info("extending the vocabulary: ids %d..%d are new (%s init); vocab_size %d -> %d",
               start, stop - 1, init.new_embeddings, cfg.vocab_size, target.vocab_size)
  key = jax.random.key(rt.exp.run.seed + 3)
  return extend_vocabulary(params, cfg, target, tokens, init.new_embeddings, key), target


def check_param_shapes(params: Any, abstract: Any, source: str) -> None:
  diffs = shape_differences(params, abstract)
  if diffs:
    raise ValueError(f"the params of {source} do not fit this run's ModelConfig:\n  " +
                     "\n  ".join(diffs[:12]) + "\nSet ModelConfig to the source's shapes (or the "
                     "grown shapes with InitConfig.expand_every / stack_factor / grow_width).")


def initial_state(rt: Runtime, init: InitConfig) -> tuple[TrainState, int]:
  """The state a fresh run starts from, and its step."""
  kind = source_kind(init.source)
  if kind == "hf":
    cfg, params = hf.import_hf(init.source, mesh=rt.mesh, rules=rt.exp.mesh.rules,
                               cfg=None if init.stack_factor > 1 or init.expand_every else
                               _hf_import_config(init.source, rt.exp.model,
                                                 bool(init.grow_width),
                                                 bool(init.extend_vocab_from)))
    opt_state, step = None, 0
    if init.keep_optimizer or init.keep_step:
      raise ValueError("a Hugging Face source has no optimizer state or step; unset "
                       "InitConfig.keep_optimizer / keep_step.")
  else:
    cfg, params, opt_state, step = load_source(rt, init, kind)
  params, cfg = _grow_width(params, cfg, rt.exp.model, init, rt.exp.run.seed + 3)
  params, cfg = _grow(params, cfg, init)
  params, cfg = _upcycle(rt, params, cfg, jax.random.key(rt.exp.run.seed + 2))
  params = _linearize(params, cfg, rt.exp.model, jax.random.key(rt.exp.run.seed + 1))
  params, cfg = _extend_vocab(rt, init, params, cfg)
  params = with_adapters(params, rt.exp.tune, jax.random.key(rt.exp.run.seed))
  check_param_shapes(params, rt.abstract_state.params, init.source)
  step = step if init.keep_step else 0

  ema = rt.exp.ema.enabled
  # One program: no two leaves may share a buffer (the train step donates the state).
  assemble = lambda p, o: new_state(p, rt.optimizer, opt_state=o, step=step, ema=ema)
  state = jax.jit(assemble, out_shardings=rt.shardings)(params, opt_state)
  logging.info("initialised from %s (%s) at step %d", init.source, kind, step)
  return state, step
