"""What a run compiles once: mesh, model, optimizer, shardings, the jitted train and eval steps.

Also the read-only uses of a trained run (eval, sampling), which need the same pieces.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import numpy as np

from pretrainx.checkpoint import Checkpointer
from pretrainx.config import (Experiment, Phase, RunPaths, experiment_of, phase_index, phases,
                              validate)
from pretrainx.config.cpt import SOFTMAX_IMPLS
from pretrainx.config.sources import RUNTIME_MODEL_FIELDS, saved_experiment, source_model
from pretrainx.data.pipeline import eval_batches, unigram_entropy
from pretrainx.ema import ema_as_params
from pretrainx.generate import generate
from pretrainx.model import context_parallel
from pretrainx.model.transformer import Transformer
from pretrainx.optim import make_optimizer
from pretrainx.sharding import (batch_sharding, check_batch_divisible, logical_to_shardings,
                                make_mesh, mesh_scope)
from pretrainx.train.distill_loss import OnlineTeacher
from pretrainx.train.eval import evaluate_domains, make_eval_step
from pretrainx.train.state import TrainState, abstract_params, state_shardings
from pretrainx.train.tuning import (ViewedModel, new_rows_first, params_view, trainable,
                                    tuned_optimizer)
from pretrainx.train.step import make_train_step


@dataclasses.dataclass
class Runtime:
  """Everything compiled or derived once per run."""

  exp: Experiment
  mesh: jax.sharding.Mesh
  model: Transformer
  optimizer: Any
  abstract_state: TrainState  # ShapeDtypeStructs carrying their target shardings
  shardings: TrainState
  train_step: Any
  eval_step: Any
  phases: tuple[Phase, ...] = ()
  # Knowledge distillation: the train step's teacher (train/teacher.teacher_for) and, for an
  # online one, where its params live; train_step then takes them as its third argument.
  teacher: OnlineTeacher | None = None
  teacher_shardings: Any = None
  # The runtime of each stage shape, rope setting and teacher use met so far (see `at`).
  _views: dict = dataclasses.field(default_factory=dict, repr=False)
  # (model, teacher) -> the (train, eval) steps
  _compile: Any = dataclasses.field(default=None, repr=False)

  def at(self, step: int, teacher: bool = True) -> "Runtime":
    """This runtime as the batch of `step` trains: exp.run's seq_len and batch size and the
    model (rope settings) of that step's stage (config.phases), with the steps compiled for
    that model; with teacher=False (past the step where KD stops, DistillConfig.active) a train
    step without the teacher. The base runtime when nothing changes; jit compiles once per
    shape."""
    teacher = teacher and self.teacher is not None
    if len(self.phases) <= 1 and teacher == (self.teacher is not None):
      return self
    phase = self.phases[phase_index(self.phases, step)] if self.phases else None
    key = (phase.shape, phase.rope, teacher) if phase else ((), (), teacher)
    if key not in self._views:  # once per shape, rope setting and teacher use: `at` runs often
      exp = experiment_of(self.exp, phase) if phase else self.exp
      own_teacher = teacher == (self.teacher is not None)
      if exp is self.exp and own_teacher:  # the run's own
        self._views[key] = self
      else:
        same_model = exp.model == self.exp.model
        model = self.model if same_model else Transformer(exp.model)
        if same_model and own_teacher:
          train_step, eval_step = self.train_step, self.eval_step
        else:
          train_step, eval_step = self._compile(model, self.teacher if teacher else None)
          eval_step = self.eval_step if same_model else eval_step
        self._views[key] = dataclasses.replace(
            self, exp=exp, model=model, train_step=train_step, eval_step=eval_step, phases=(),
            _views={}, teacher=self.teacher if teacher else None)
    return self._views[key]

  def step_args(self, teacher_params: Any) -> tuple[Any, ...]:
    """The train step's arguments after (state, batch): an online teacher's params, if any."""
    return (teacher_params,) if self.teacher is not None and self.teacher.online else ()

  @property
  def devices(self) -> list | None:
    """What build_runtime takes to build another model's runtime on this one's devices: None
    when the mesh holds every device (the default), else the mesh's own (a test's subset)."""
    own = list(self.mesh.devices.flat)
    return None if set(own) == set(jax.devices()) else own

  def scope(self):
    """Context in which the model's logical constraints resolve against this mesh."""
    return mesh_scope(self.mesh, self.exp.mesh.rules)

  def data_shard(self) -> tuple[int, int]:
    """(index, count): this process loads part `index` of `count` equal parts of each global
    batch's rows (pipeline.host_slice), the rows its devices hold. Processes whose devices hold
    the same rows and different parts of the sequence (a context axis across hosts) load the
    same part; otherwise this is (process_index, process_count)."""
    batch_size = self.exp.run.global_batch_size
    rows, _ = _local_region(self.mesh, batch_size, self.exp.run.seq_len)
    return rows.start // (rows.stop - rows.start), batch_size // (rows.stop - rows.start)

  def put_batch(self, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """This process's rows (data_shard) -> global arrays: [batch, seq] (and [batch, seq, k], a
    cached teacher's top-k) split over the data-parallel axes and the context axis, [batch]
    arrays over the data-parallel axes."""
    rows = batch_sharding(self.mesh)  # [batch, seq]
    per_row = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(rows.spec[0]))
    per_entry = jax.sharding.NamedSharding(self.mesh,
                                           jax.sharding.PartitionSpec(*rows.spec, None))
    parts = self.data_shard()[1]
    out = {}
    for k, v in local_batch.items():
      n = v.shape[0] * parts  # rows of the global batch
      if v.ndim >= 2:
        _, seq = _local_region(self.mesh, n, v.shape[1])  # this process's part of the sequence
        out[k] = jax.make_array_from_process_local_data(rows if v.ndim == 2 else per_entry,
                                                        v[:, seq], (n,) + v.shape[1:])
      else:
        out[k] = jax.make_array_from_process_local_data(per_row, v, (n,) + v.shape[1:])
    return out

  def inference_params(self, state: TrainState) -> Any:
    """The model params to evaluate, sample from and export: the EMA when one is kept, with
    LoRA adapters merged."""
    params = state.params if state.ema is None else ema_as_params(state.ema, state.params)
    return jax.jit(params_view(self.exp.tune))(params)

  def put_domain_batches(self, host: dict[str, list[dict[str, np.ndarray]]]
                         ) -> dict[str, list[dict[str, jax.Array]]]:
    return {d: [self.put_batch(b) for b in batches] for d, batches in host.items()}


@functools.lru_cache(maxsize=16)
def _local_region(mesh: jax.sharding.Mesh, batch: int, seq: int) -> tuple[slice, slice]:
  """(rows, positions) of a [batch, seq] batch that this process's devices hold."""
  index = batch_sharding(mesh).addressable_devices_indices_map((batch, seq)).values()
  bounds = lambda i: (min(ix[i].start or 0 for ix in index),
                      max(ix[i].stop if ix[i].stop is not None else (batch, seq)[i]
                          for ix in index))
  return slice(*bounds(0)), slice(*bounds(1))


def build_runtime(exp: Experiment, devices: list | tuple | None = None,
                  teacher: OnlineTeacher | None = None) -> Runtime:
  """Validates `exp` and builds the mesh, model, optimizer and jitted (donating) train step.

  `devices` (default: this process's) may be another platform's, e.g. a TPU topology's devices
  for an ahead-of-time compile on a CPU host. With a `teacher` (train/teacher.teacher_for, for
  the runs that train: other uses of a distilled run never read its teacher), the train step
  distils from it, an online one's params being its third argument, sharded by their logical
  axes on the same mesh."""
  validate(exp)
  run, all_phases = exp.run, phases(exp)
  mesh = make_mesh(exp.mesh, None if devices is None else list(devices))
  context = context_parallel.mesh_context_size(mesh, exp.mesh.rules)
  for phase in all_phases:  # every stage's shape splits over the mesh
    where = f"the stage at step {phase.start_step}" if phase.start_step else "RunConfig.seq_len"
    try:
      check_batch_divisible(phase.global_batch_size, mesh, exp.accumulation.microbatches)
    except ValueError as err:
      raise (ValueError(f"the stage at step {phase.start_step}: {err}") if phase.start_step
             else err) from None
    context_parallel.check_sequence(phase.seq_len, context, phase.model(exp.model), where)
  model = Transformer(exp.model)
  optimizer, schedule = make_optimizer(exp.optimizer, run.steps, exp.schedule)
  first_len = all_phases[0].seq_len
  grown_from = None
  if exp.tune.new_width_only and exp.init.grow_width:  # the copies: where the source's widths end
    grown_from = source_model(exp.init.source, exp.init.step), exp.init.grow_width
  shapes = abstract_params(model, first_len, exp.tune)
  mask = trainable(shapes, exp.tune, exp.model, exp.init.expand_every, grown_from)
  optimizer = tuned_optimizer(optimizer, mask)
  optimizer = new_rows_first(optimizer, shapes, exp.init, exp.tune, exp.data.vocabulary)
  abstract, shardings = state_shardings(model, optimizer, mesh, exp.mesh.rules, first_len,
                                        ema=exp.ema.enabled, tune=exp.tune)
  teacher_at = None
  if teacher is not None and teacher.online:
    teacher_at = logical_to_shardings(teacher.abstract, mesh, exp.mesh.rules)
  compile_steps = functools.partial(_compile_steps, exp, optimizer, schedule, shardings,
                                    teacher_at)
  train_step, eval_step = compile_steps(model, teacher)
  return Runtime(exp, mesh, model, optimizer, abstract, shardings, train_step, eval_step,
                 phases=all_phases, teacher=teacher, teacher_shardings=teacher_at,
                 _compile=compile_steps)


def _compile_steps(exp: Experiment, optimizer, schedule, shardings: TrainState,
                   teacher_shardings: Any, model: Transformer, teacher: OnlineTeacher | None
                   ) -> tuple[Any, Any]:
  """The jitted (donating) train step, distilling from `teacher` if given, and the eval step of
  `model`."""
  viewed = ViewedModel(model, params_view(exp.tune))  # LoRA: the model sees merged params
  step_fn = make_train_step(viewed, optimizer, schedule, z_loss=exp.loss.z_loss,
                            microbatches=exp.accumulation.microbatches, guard=exp.guard,
                            hessian_estimate=exp.optimizer.name == "sophia", seed=exp.run.seed,
                            stochastic_rounding=exp.optimizer.stochastic_rounding,
                            num_domains=len(exp.data.domains), ema=exp.ema,
                            example_temperature=(exp.loss.example_temperature
                                                 if exp.loss.example_weighting == "loss"
                                                 else None), teacher=teacher)
  # Batches arrive sharded by put_batch ([batch, seq] arrays, `loss_weight` included, and
  # per-row [batch] arrays alike).
  ins = (shardings, None) + ((teacher_shardings,) if teacher is not None and teacher.online
                             else ())
  train_step = jax.jit(step_fn, in_shardings=ins, out_shardings=(shardings, None),
                       donate_argnums=0)
  eval_step = jax.jit(make_eval_step(model, exp.run.eval_position_bucket),
                      in_shardings=(None, None))
  return train_step, eval_step


def load_trained(exp: Experiment, checkpoint_dir: str | None = None, step: int | None = None
                 ) -> tuple[Runtime, TrainState, int]:
  """Runtime and restored state of a trained run (newest readable checkpoint by default). The
  runtime is that of the stage the checkpoint's last batch came from (Runtime.at): its seq_len,
  batch size and rope settings, the ones to evaluate, sample and export with."""
  rt = build_runtime(exp)
  directory = checkpoint_dir or RunPaths.under(exp.run.run_dir).checkpoints
  ckpt = Checkpointer(directory, exp.checkpoint, create=False)
  try:
    with rt.scope():
      state, meta, step = ckpt.restore(rt.abstract_state, step)
  finally:
    ckpt.close()
  check_saved_model(meta, exp, ckpt.step_path(step))
  last_batch = max(step - 1, 0) + int(meta.get("data", {}).get("offset", 0))
  return rt.at(last_batch), state, step


def check_saved_model(meta: dict[str, Any], exp: Experiment, where: str) -> None:
  """Refuses a checkpoint written by another model than `exp`'s (its saved config differs from
  the run's config.gin in a field that decides what the weights mean, not only their shapes)."""
  if "config_gin" not in meta:
    return
  saved, model = saved_experiment(meta, where).model, exp.model
  free = set(RUNTIME_MODEL_FIELDS) | {"max_seq_len"}  # how it runs, not what its weights mean
  if {saved.attention_impl, model.attention_impl} <= set(SOFTMAX_IMPLS):
    free.add("attention_impl")  # the same function, by another kernel
  diffs = [f"ModelConfig.{f.name}: checkpoint {getattr(saved, f.name)!r}, run "
           f"{getattr(model, f.name)!r}" for f in dataclasses.fields(saved)
           if f.name not in free and getattr(saved, f.name) != getattr(model, f.name)]
  if diffs:
    raise ValueError(f"checkpoint {where} was written by another model than this run's config "
                     f"describes ({'; '.join(diffs[:6])}); pass the --run_dir of the run that "
                     "wrote it, or the --gin_file it was trained with.")


def evaluate_checkpoint(rt: Runtime, state: TrainState, num_batches: int | None
                        ) -> dict[str, float]:
  """Validation loss (overall and per domain) and the unigram baseline of the same batches."""
  exp = rt.exp
  host = eval_batches(exp.data, exp.run.seq_len, exp.run.global_batch_size, num_batches,
                      *rt.data_shard())
  with rt.scope():
    result = evaluate_domains(rt.eval_step, rt.inference_params(state),
                              rt.put_domain_batches(host))
  result["unigram_entropy"] = global_unigram_entropy(exp, num_batches)
  return result


def global_unigram_entropy(exp: Experiment, num_batches: int | None = -1) -> float:
  """The unigram baseline of the whole evaluation set (every host's rows), the same everywhere."""
  num_batches = exp.run.eval_batches if num_batches == -1 else num_batches
  per_domain = eval_batches(exp.data, exp.run.seq_len, exp.run.global_batch_size, num_batches)
  batches = [b for domain in per_domain.values() for b in domain]
  return unigram_entropy(batches, exp.data.vocabulary.vocab_size)


def sample_text(rt: Runtime, params, prompt: str, max_new_tokens: int, *, seed: int = 0,
                temperature: float = 0.7, top_k: int | None = 40) -> str:
  vocab = rt.exp.data.vocabulary
  with rt.scope():
    ids = generate(rt.model, params, vocab.encode(prompt), max_new_tokens,
                   rng=jax.random.key(seed), temperature=temperature, top_k=top_k,
                   eos_id=vocab.eos_id)
  return prompt + vocab.decode(ids)
