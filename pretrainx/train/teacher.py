"""The frozen teacher of knowledge distillation (DistillConfig.teacher): its model and params,
loaded from any source InitConfig takes, in DistillConfig.teacher_dtype and sharded on the
student's mesh by its own logical axes. Its params live beside the TrainState, never in it, so
checkpoints and the optimizer hold only the student; a resumed run loads the teacher again.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging

from pretrainx import hf
from pretrainx.config import DistillConfig, InitConfig, ModelConfig
from pretrainx.config.sources import source_kind, source_model_config
from pretrainx.model import Transformer
from pretrainx.train.distill_loss import OnlineTeacher
from pretrainx.train.init import _load_pretrainx, _param_shardings
from pretrainx.train.runtime import Runtime
from pretrainx.train.step import model_logits


def check_teacher_vocab(student: ModelConfig, teacher: ModelConfig, source: str) -> None:
  """Refuses a teacher whose vocabulary differs from the student's (KD compares their
  distributions token by token)."""
  if teacher.vocab_size != student.vocab_size:
    raise ValueError(
        f"the teacher {source} has vocab_size={teacher.vocab_size} but the student has "
        f"{student.vocab_size}; distillation needs one vocabulary, so pick a teacher with the "
        "student's tokenizer.")


def teacher_model_config(rt: Runtime, distill: DistillConfig) -> ModelConfig:
  """The teacher's ModelConfig in teacher_dtype, long enough for the run's sequences; checks
  its vocabulary against the student's."""
  cfg, _, _ = source_model_config(distill.teacher, like=rt.exp.model, step=distill.teacher_step)
  check_teacher_vocab(rt.exp.model, cfg, distill.teacher)
  if cfg.max_seq_len < rt.exp.run.seq_len:
    raise ValueError(f"the teacher {distill.teacher} has max_seq_len={cfg.max_seq_len}, shorter "
                     f"than RunConfig.seq_len={rt.exp.run.seq_len}; use a shorter seq_len or a "
                     "teacher with a longer context.")
  return dataclasses.replace(cfg, dtype=distill.teacher_dtype, param_dtype=distill.teacher_dtype)


def load_teacher(rt: Runtime, distill: DistillConfig) -> tuple[OnlineTeacher, Any]:
  """(the OnlineTeacher for make_train_step, its frozen params on rt's mesh)."""
  if not distill.enabled:
    raise ValueError("DistillConfig.teacher is empty; set it to the teacher's source.")
  kind = source_kind(distill.teacher)
  cfg = teacher_model_config(rt, distill)
  if kind == "hf":
    _, params = hf.import_hf(distill.teacher, mesh=rt.mesh, rules=rt.exp.mesh.rules,
                             cfg=dataclasses.replace(cfg, param_dtype="float32"))
  else:
    init = InitConfig(source=distill.teacher, step=distill.teacher_step)
    _, params, _, _ = _load_pretrainx(rt, init, kind)
  dtype = cfg.storage_dtype
  params = jax.jit(lambda p: jax.tree.map(lambda x: x.astype(dtype), p),
                   out_shardings=_param_shardings(rt, cfg))(params)
  model, width = Transformer(cfg), rt.exp.model.padded_vocab_size

  def apply(p: Any, batch: dict[str, jax.Array]) -> jax.Array:
    """The teacher's fp32 logits [b, s, width]: its padded vocabulary cut or padded (with -inf,
    as the model masks its own padding) to the student's, the ids beyond vocab_size being off."""
    logits = model_logits(model, p, batch).astype(jnp.float32)[..., :width]
    pad = width - logits.shape[-1]
    return jnp.pad(logits, ((0, 0), (0, 0), (0, pad)), constant_values=-jnp.inf) if pad else logits

  teacher = OnlineTeacher(apply, distill, rt.exp.run.steps)
  logging.info("teacher %s (%s): %d layers, embed %d, %s", distill.teacher, kind,
               cfg.num_layers, cfg.embed_dim, distill.teacher_dtype)
  return teacher, params
