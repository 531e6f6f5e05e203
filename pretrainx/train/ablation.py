"""Data ablations: one model trained per DataConfig from the same initial state, and evaluated.

For comparing data choices (filters, curricula, packing orders) at equal steps in a notebook, a
bench or a test: one compiled step serves every config, so only the data differs. Also builds
the continuation probe of in-context packing (a document's start after, or without, the one
before it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pretrainx.config import DataConfig, Experiment, check_trainable
from pretrainx.data.pipeline import TrainBatches
from pretrainx.train.eval import evaluate
from pretrainx.train.runtime import build_runtime
from pretrainx.train.state import create_train_state
from pretrainx.train.teacher import load_teacher_params, teacher_for

_ROW_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


def train_and_evaluate(exp: Experiment, data_cfgs: Sequence[DataConfig],
                       eval_sets: Mapping[str, list[dict[str, np.ndarray]]]
                       ) -> list[dict[str, float]]:
  """Trains exp's model for exp.run.steps steps on each DataConfig, from one initial state and
  one compiled step (distilling as exp.distill says) -> for each config, {name: mean loss on the
  host batches eval_sets[name]}.

  The configs must give batches of one shape (the first one builds the runtime)."""
  check_trainable(exp)
  rt = build_runtime(dataclasses.replace(exp, data=data_cfgs[0]), teacher=teacher_for(exp))
  out = []
  with rt.scope():
    device_sets = {name: [rt.put_batch(b) for b in batches] for name, batches in eval_sets.items()}
    init, _ = create_train_state(rt.model, rt.optimizer, rt.mesh, exp.mesh.rules, exp.run.seed,
                                 exp.run.seq_len, ema=False, tune=exp.tune)
    teacher_params = load_teacher_params(rt) if exp.distill.online else None
    for cfg in data_cfgs:
      batches = TrainBatches(cfg, exp.run.seq_len, exp.run.global_batch_size,
                             distill=exp.distill)
      state = jax.tree.map(jnp.copy, init)
      for k in range(exp.run.steps):
        view = rt.at(k, teacher=exp.distill.active(k, exp.run.steps))  # KD's end (SALT)
        state, metrics = view.train_step(state, view.put_batch(batches.batch_at(k)),
                                         *view.step_args(teacher_params))
        # One program in flight at a time: XLA's CPU collectives can deadlock with several on a
        # loaded machine.
        jax.block_until_ready(metrics)
      out.append({name: evaluate(rt.eval_step, state.params, device)["loss"]
                  for name, device in device_sets.items()})
  return out


def continuation_batches(pairs: Sequence[tuple[np.ndarray, np.ndarray]], seq_len: int,
                         with_first: bool, batch_size: int = 8) -> list[dict[str, np.ndarray]]:
  """Batches scoring the first seq_len / 2 targets of each pair's second document: in one
  segment after the last seq_len / 2 tokens of its first document, or alone.

  pairs: (first, second) token arrays, each ending in eos. Rows are int32 [batch, seq_len];
  a last incomplete batch is dropped."""
  half, rows = seq_len // 2, []
  for a, b in pairs:
    ins = [a[:-1][-half:]] * with_first + [b[:-1][:half]]
    outs = [a[1:][-half:]] * with_first + [b[1:][:half]]
    row = {k: np.zeros(seq_len, np.int32) for k in _ROW_KEYS}
    n = sum(len(x) for x in ins)
    row["inputs"][:n], row["targets"][:n] = np.concatenate(ins), np.concatenate(outs)
    row["loss_mask"][n - len(ins[-1]):n] = 1
    row["segment_ids"][:n], row["positions"][:n] = 1, np.arange(n)
    rows.append(row)
  full = len(rows) // batch_size * batch_size
  return [{**{k: np.stack([r[k] for r in rows[i:i + batch_size]]) for k in _ROW_KEYS},
           "domain": np.zeros(batch_size, np.int32)} for i in range(0, full, batch_size)]
