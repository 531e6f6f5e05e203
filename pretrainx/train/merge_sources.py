"""`pretrainx merge`: models read onto one mesh and merged group by group (cpt/merge.py), or a
run's last checkpoints averaged (LAWA), written as a params export or a Hugging Face directory.

Inputs: pretrainx runs, checkpoints directories, exports, or HF directories of one architecture.
Held at once: the merged params so far (one model, sharded over the mesh) and, per group of
parameters (about `group_bytes` per model), each input's copy of that group, sharded, read from
Orbax by a partial restore. A Hugging Face input is imported whole (sharded) before merging.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from absl import logging
from flax import traverse_util

from pretrainx import hf, storage
from pretrainx.checkpoint import Checkpointer, restore_subtree, save_params
from pretrainx.config import (Experiment, MeshConfig, ModelConfig, RunConfig, experiment_to_gin,
                              load_hf_config)
from pretrainx.config.sources import read_meta, saved_experiment, source_experiment, source_kind
from pretrainx.cpt.merge import NEEDS_BASE, MergeSettings, merge_leaf, param_key
from pretrainx.hf_tokenizer import write_tokenizer
from pretrainx.model import param_shapes
from pretrainx.sharding import make_mesh, sharded_shapes
from pretrainx.tree import consecutive_groups, unbox_tree

DEFAULT_GROUP_BYTES = 1 << 30
# What the weights of two models must share to be merged entry by entry.
ARCH_FIELDS = ("embed_dim", "num_layers", "num_heads", "num_kv_heads", "resolved_head_dim",
               "mlp_dim", "tie_embeddings", "qkv_bias", "norm_scale", "embed_projection",
               "layer_impls", "moe")


@dataclasses.dataclass
class Source:
  """One model to merge: where its params are and what it is."""

  path: str
  cfg: ModelConfig
  exp: Experiment | None  # what a pretrainx source was trained with (None: Hugging Face)
  step: int = 0
  directory: str = ""  # the Orbax directory holding the params
  item: str = "params"  # its Orbax item: 'params' (an export) or 'state' (a checkpoint step)
  params: dict | None = None  # a Hugging Face source, imported whole: {path tuple: array}

  def read(self, names: Sequence[tuple], abstract: dict[tuple, Any]) -> dict[tuple, jax.Array]:
    """The params `names`, each in its sharding of `abstract`; only those are read."""
    if self.params is not None:
      return {n: self.params[n] for n in names}
    nested = traverse_util.unflatten_dict({n: abstract[n] for n in names})
    if self.item == "state":
      got = restore_subtree(self.directory, "state", {"params": nested})["params"]
    else:
      got = restore_subtree(self.directory, "params", nested)
    return traverse_util.flatten_dict(got)


def open_source(path: str) -> Source:
  """A Source for a pretrainx run (its newest checkpoint), checkpoints directory, export, or a
  Hugging Face directory; nothing but configs is read."""
  kind = source_kind(path, field="merge source")
  if kind == "hf":
    return Source(path, load_hf_config(path), None)
  exp, step = source_experiment(path)
  if exp.tune.lora is not None:
    raise ValueError(f"{path} is a LoRA run; export its merged weights first (pretrainx export "
                     "--run_dir RUN --out DIR) and merge that export.")
  resolved = storage.resolve(path)
  if kind == "export":
    return Source(path, exp.model, exp, int(read_meta(resolved).get("step", 0)), resolved)
  directory = storage.join(resolved, "checkpoints") if kind == "run" else resolved
  return checkpoint_source(directory, step)


def checkpoint_source(directory: str, step: int) -> Source:
  """The params of checkpoint `step` of a checkpoints directory."""
  where = storage.join(directory, str(step))
  exp = saved_experiment(read_meta(where), where)
  return Source(where, exp.model, exp, step, where, "state")


def check_compatible(sources: Sequence[Source]) -> None:
  """Refuses models of different vocabularies or architectures (one line naming them)."""
  first = sources[0]
  for src in sources[1:]:
    if src.cfg.vocab_size != first.cfg.vocab_size:
      raise ValueError(f"{first.path} has vocab_size={first.cfg.vocab_size} but {src.path} has "
                       f"vocab_size={src.cfg.vocab_size}; merge only models of one vocabulary.")
    diffs = [f"{f} {getattr(first.cfg, f)} vs {getattr(src.cfg, f)}" for f in ARCH_FIELDS
             if getattr(first.cfg, f) != getattr(src.cfg, f)]
    if diffs:
      raise ValueError(f"{first.path} and {src.path} have different architectures (ModelConfig "
                       f"{'; '.join(diffs)}); merge only models of one architecture.")
    if src.cfg.rope_theta != first.cfg.rope_theta or src.cfg.rope_scaling != first.cfg.rope_scaling:
      logging.warning("%s and %s use different RoPE settings; the merge keeps %s's.", first.path,
                      src.path, first.path)


def merge_mesh(cfg: ModelConfig) -> jax.sharding.Mesh:
  """All devices, params split over 'fsdp' as far as embed_dim divides."""
  fsdp = next(d for d in range(jax.device_count(), 0, -1)
              if jax.device_count() % d == 0 and cfg.embed_dim % d == 0)
  return make_mesh(MeshConfig(data=jax.device_count() // fsdp, fsdp=fsdp, tensor=1))


def abstract_params(cfg: ModelConfig, mesh: jax.sharding.Mesh, rules: Any) -> dict[tuple, Any]:
  """{path: ShapeDtypeStruct with its NamedSharding} of Transformer(cfg)'s params."""
  return traverse_util.flatten_dict(sharded_shapes(param_shapes(cfg), mesh, rules))


def param_groups(abstract: dict[tuple, Any], group_bytes: int) -> list[list[tuple]]:
  """Consecutive params in groups of at most `group_bytes` (a bigger param alone)."""
  names = list(abstract)
  sizes = [a.size * jnp.dtype(a.dtype).itemsize for a in abstract.values()]
  return [[names[i] for i in group] for group in consecutive_groups(sizes, group_bytes)]


def _check_shapes(src: Source, abstract: dict[tuple, Any], mesh, rules) -> None:
  own = abstract_params(src.cfg, mesh, rules)
  diffs = ["/".join(n) for n in set(own) | set(abstract)
           if n not in own or n not in abstract or own[n].shape != abstract[n].shape]
  if diffs:
    raise ValueError(f"the params of {src.path} differ in shape from the first model's "
                     f"({', '.join(sorted(diffs)[:4])}); merge only models of one architecture.")


def merge_models(models: Sequence[Source], settings: MergeSettings, base: Source | None = None,
                 *, mesh: jax.sharding.Mesh | None = None, rules: Any = None,
                 group_bytes: int = DEFAULT_GROUP_BYTES) -> Any:
  """The merged params (a tree in the first model's layout and dtypes, sharded on `mesh`,
  default merge_mesh), merged `group_bytes` of params at a time."""
  if settings.method in NEEDS_BASE and base is None:
    raise ValueError(f"the {settings.method} merge needs a base model; pass --base.")
  if settings.method == "slerp" and len(models) != 2:
    raise ValueError(f"SLERP merges exactly two models, not {len(models)}; pass two sources.")
  if settings.weights and len(settings.weights) != len(models):
    raise ValueError(f"{len(settings.weights)} weights for {len(models)} models; pass one weight "
                     "per model (the base excluded).")
  everyone = ([base] if base is not None else []) + list(models)
  check_compatible(everyone)
  cfg = models[0].cfg
  mesh = merge_mesh(cfg) if mesh is None else mesh
  rules = MeshConfig().rules if rules is None else rules
  abstract = abstract_params(cfg, mesh, rules)
  for src in everyone:
    if src.exp is None and src.params is None:  # Hugging Face: imported whole, sharded
      _, params = hf.import_hf(src.path, mesh=mesh, rules=rules, cfg=cfg)
      src.params = traverse_util.flatten_dict(unbox_tree(params))
    elif src.exp is not None:
      _check_shapes(src, abstract, mesh, rules)
  merged = {}
  for names in param_groups(abstract, group_bytes):
    inputs = [src.read(names, abstract) for src in models]
    base_in = base.read(names, abstract) if base is not None else None
    for name in names:
      path = "/".join(name)
      leaf = settings.for_param(path, cfg)
      key = param_key(settings.seed, path) if leaf.method.startswith("dare") else None
      out = merge_leaf(leaf, tuple(x[name] for x in inputs),
                       None if base_in is None else base_in[name], key)
      merged[name] = jax.device_put(out.astype(abstract[name].dtype), abstract[name].sharding)
    del inputs, base_in
  logging.info("merged %d models (%s) in %d groups", len(models), settings.method,
               len(param_groups(abstract, group_bytes)))
  return traverse_util.unflatten_dict(merged)


def lawa_steps(run: str, average_last: int, every: int | None = None) -> tuple[str, list[int]]:
  """(checkpoints directory, the last `average_last` finalised steps of `run`, every `every`
  steps counted back from the newest when given)."""
  kind = source_kind(run, field="merge --average_last RUN")
  if kind not in ("run", "checkpoints"):
    raise ValueError(f"--average_last averages one run's checkpoints, and {run} is a {kind}; "
                     "pass a run directory or its checkpoints directory.")
  directory = storage.join(storage.resolve(run), "checkpoints") if kind == "run" else run
  ckpt = Checkpointer(directory, create=False)
  try:
    steps = ckpt.finalised_steps()
  finally:
    ckpt.close()
  if every:
    steps = [s for s in steps if (steps[-1] - s) % every == 0]
  if average_last < 1 or len(steps) < average_last:
    stride = f" at a stride of {every} steps" if every else ""
    raise ValueError(f"{run} has {len(steps)} finalised checkpoints{stride} ({steps}); pass "
                     f"--average_last between 1 and {len(steps)}.")
  return directory, steps[-average_last:]


def write_merged(out: str, params: Any, first: Source, *, step: int = 0, as_hf: bool = False,
                 info: dict | None = None) -> str:
  """Writes `params` (of first.cfg) as a params export (usable as InitConfig.source and by
  `pretrainx eval`), or with as_hf as a Hugging Face directory; returns its path."""
  cfg = first.cfg
  exp = first.exp or Experiment(model=cfg, run=RunConfig(seq_len=min(RunConfig.seq_len,
                                                                     cfg.max_seq_len)))
  hf_source = storage.resolve(first.path) if first.exp is None else None
  if as_hf:
    path = hf.export_hf(params, cfg, out)
    write_tokenizer(exp.data.vocabulary, path, model_max_length=cfg.max_seq_len, source=hf_source)
    return path
  gin = experiment_to_gin(exp)
  meta = {"step": step, "config_gin": gin, "merge": info or {}}
  if hf_source:
    meta["source"] = hf_source
  path = save_params(out, params, meta)
  storage.write_text(storage.join(path, "config.gin"), gin)
  return path


def run_merge(sources: Sequence[str], out: str, settings: MergeSettings, *,
              base: str | None = None, average_last: int | None = None,
              every: int | None = None, as_hf: bool = False,
              group_bytes: int = DEFAULT_GROUP_BYTES) -> str:
  """`pretrainx merge`: merges `sources` (or averages the last checkpoints of one run) into
  `out`; returns a line saying what it wrote."""
  step = 0
  if average_last is not None:
    if len(sources) != 1 or base is not None or settings.method != "linear":
      raise ValueError("--average_last averages the checkpoints of ONE run linearly; pass one "
                       "RUN, no --base, and --method linear.")
    directory, steps = lawa_steps(sources[0], average_last, every)
    models, step = [checkpoint_source(directory, s) for s in steps], steps[-1]
    what = f"the average of steps {steps} of {sources[0]}"
  else:
    if every is not None:
      raise ValueError("--every picks checkpoints for --average_last; pass --average_last too.")
    models = [open_source(s) for s in sources]
    what = f"the {settings.method} merge of {len(models)} models"
  base_src = open_source(base) if base is not None else None
  params = merge_models(models, settings, base_src, group_bytes=group_bytes)
  info = {"method": settings.method, "sources": [m.path for m in models], "base": base,
          "weights": list(settings.weights), "density": settings.density, "t": settings.t,
          "seed": settings.seed}
  path = write_merged(out, params, models[0], step=step, as_hf=as_hf, info=info)
  return f"wrote {what} to {path}" + (" (Hugging Face)" if as_hf else "")
