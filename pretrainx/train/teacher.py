"""The frozen teacher of knowledge distillation (DistillConfig): what the train step needs to run
it (`teacher_for`: its model, read from the source's config alone) and its params (`load_teacher
_params`: any source InitConfig takes, in DistillConfig.teacher_dtype, sharded on the student's
mesh by its own logical axes). Its params live beside the TrainState, never in it, so checkpoints
and the optimizer hold only the student; a resumed run loads the teacher again.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging

from pretrainx import hf
from pretrainx.config import DistillConfig, Experiment, InitConfig, ModelConfig, phases
from pretrainx.config.sources import source_kind, source_model_config
from pretrainx.model import Transformer, param_shapes
from pretrainx.sharding import logical_to_shardings
from pretrainx.train.distill_loss import OnlineTeacher
from pretrainx.train.init import load_source
from pretrainx.train.runtime import Runtime
from pretrainx.train.step import model_logits

# How the teacher runs, taken from the student: its kernels' interpret mode and flash tiles.
_RUN_LIKE_STUDENT = ("kernel_interpret", "flash_block_q", "flash_block_k")


def check_teacher_vocab(student: ModelConfig, teacher: ModelConfig, source: str) -> None:
  """Refuses a teacher whose vocabulary differs from the student's (KD compares their
  distributions token by token)."""
  if teacher.vocab_size != student.vocab_size:
    raise ValueError(
        f"the teacher {source} has vocab_size={teacher.vocab_size} but the student has "
        f"{student.vocab_size}; distillation needs one vocabulary, so pick a teacher with the "
        "student's tokenizer.")


def teacher_model_config(exp: Experiment, distill: DistillConfig | None = None) -> ModelConfig:
  """The teacher's ModelConfig in teacher_dtype, running as the student does (its kernels),
  checked against the student: one vocabulary, a context as long as every stage's sequence."""
  distill = distill or exp.distill
  source_kind(distill.teacher, field="DistillConfig.teacher")  # there, and a model
  cfg, _, _ = source_model_config(distill.teacher, like=exp.model, step=distill.teacher_step)
  check_teacher_vocab(exp.model, cfg, distill.teacher)
  longest = max(p.seq_len for p in phases(exp))
  if cfg.max_seq_len < longest:
    raise ValueError(f"the teacher {distill.teacher} has max_seq_len={cfg.max_seq_len}, shorter "
                     f"than the run's sequences ({longest} tokens); shorten them or pick a "
                     "teacher with a longer context.")
  return dataclasses.replace(cfg, dtype=distill.teacher_dtype, param_dtype=distill.teacher_dtype,
                             sow_kurtosis=False,
                             **{f: getattr(exp.model, f) for f in _RUN_LIKE_STUDENT})


def teacher_for(exp: Experiment) -> OnlineTeacher | None:
  """The teacher the train step of `exp` distils from (build_runtime's `teacher`): None without
  distillation; a cached one (its targets come with the batches) with DistillConfig.cache;
  otherwise an online one, built from its source's config alone (no params are read)."""
  distill = exp.distill
  if not distill.enabled:
    return None
  if distill.cache:
    return OnlineTeacher(None, distill, exp.run.steps)
  cfg = teacher_model_config(exp)
  model, width = Transformer(cfg), exp.model.padded_vocab_size

  def apply(p: Any, batch: dict[str, jax.Array]) -> jax.Array:
    """The teacher's fp32 logits [b, s, width]: its padded vocabulary cut or padded (with -inf,
    as the model masks its own padding) to the student's, the ids beyond vocab_size being off."""
    logits = model_logits(model, p, batch).astype(jnp.float32)[..., :width]
    pad = width - logits.shape[-1]
    return jnp.pad(logits, ((0, 0), (0, 0), (0, pad)), constant_values=-jnp.inf) if pad else logits

  return OnlineTeacher(apply, distill, exp.run.steps, param_shapes(cfg))


def load_teacher_params(rt: Runtime) -> Any:
  """The online teacher's frozen params (rt.teacher), in its dtype, on rt.teacher_shardings."""
  distill = rt.exp.distill
  kind = source_kind(distill.teacher)
  cfg = teacher_model_config(rt.exp)
  if kind == "hf":
    _, params = hf.import_hf(distill.teacher, mesh=rt.mesh, rules=rt.exp.mesh.rules,
                             cfg=dataclasses.replace(cfg, param_dtype="float32"))
  else:
    _, params, _, _ = load_source(rt, InitConfig(source=distill.teacher,
                                                 step=distill.teacher_step), kind)
  dtype = cfg.storage_dtype
  params = jax.jit(lambda p: jax.tree.map(lambda x: x.astype(dtype), p),
                   out_shardings=rt.teacher_shardings)(params)
  size = sum(x.size for x in jax.tree.leaves(params))
  logging.info("teacher %s (%s): %d layers, embed %d, %.3gM params in %s", distill.teacher, kind,
               cfg.num_layers, cfg.embed_dim, size / 1e6, distill.teacher_dtype)
  return params


def load_teacher(rt: Runtime, distill: DistillConfig | None = None
                 ) -> tuple[OnlineTeacher, Any]:
  """(an online teacher, its params on rt's mesh) for `distill` (default rt.exp.distill), also
  when rt was built without one (a notebook, `pretrainx distill cache`)."""
  distill = distill or rt.exp.distill
  if not distill.teacher:
    raise ValueError("DistillConfig.teacher is empty; set it to the teacher's source.")
  # Online, with alpha > 0: the teacher asked for, even where the run would not run it.
  distill = dataclasses.replace(distill, cache="", alpha=distill.alpha or 1.0)
  exp = rt.exp.replace(distill=dataclasses.asdict(distill))
  teacher = teacher_for(exp)
  shardings = logical_to_shardings(teacher.abstract, rt.mesh, rt.exp.mesh.rules)
  view = dataclasses.replace(rt, exp=exp, teacher=teacher, teacher_shardings=shardings)
  return teacher, load_teacher_params(view)
