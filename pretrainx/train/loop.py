"""The training loop, the only impure place: feed batches, step, log, evaluate, checkpoint, plot.

Metrics stay on device and are read every `log_every` steps, one step late (after the next step is
dispatched), so the host never waits on the accelerator between log points.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import time
from typing import Any

import jax
import numpy as np
from absl import logging
from tqdm.auto import tqdm

from pretrainx import checkpoint
from pretrainx.config import Experiment, RunPaths, experiment_to_gin, validate
from pretrainx.data.pipeline import TrainBatches, eval_batches, unigram_entropy
from pretrainx.flops import flops_per_token, machine_peak_flops, measure_peak_flops, mfu
from pretrainx.generate import generate
from pretrainx.metrics import MetricWriter, plot_losses
from pretrainx.model.transformer import Transformer
from pretrainx.optim import make_optimizer
from pretrainx.sharding import batch_sharding, check_batch_divisible, make_mesh, mesh_scope
from pretrainx.train.eval import evaluate, make_eval_step
from pretrainx.train.state import TrainState, create_train_state, state_shardings
from pretrainx.train.step import make_train_step


@dataclasses.dataclass
class Runtime:
  """Everything compiled or derived once per run: mesh, model, jitted step and eval."""

  exp: Experiment
  mesh: jax.sharding.Mesh
  model: Transformer
  optimizer: Any
  abstract_state: TrainState
  shardings: TrainState
  train_step: Any
  eval_step: Any

  def scope(self):
    """Context in which the model's logical constraints resolve against this mesh."""
    return mesh_scope(self.mesh, self.exp.mesh.rules)

  def put_batch(self, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Host-local rows -> global arrays sharded over the data-parallel axes."""
    sharding = batch_sharding(self.mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


def build_runtime(exp: Experiment) -> Runtime:
  """Mesh, model, optimizer, shardings and the jitted (donating) train step for `exp`."""
  validate(exp)
  run = exp.run
  mesh = make_mesh(exp.mesh)
  check_batch_divisible(run.global_batch_size, mesh, run.microbatches)
  model = Transformer(exp.model)
  optimizer, schedule = make_optimizer(exp.optimizer, run.steps)
  abstract, shardings = state_shardings(model, optimizer, mesh, exp.mesh.rules, run.seq_len)
  bs = batch_sharding(mesh)
  step_fn = make_train_step(model, optimizer, schedule, z_loss=run.z_loss,
                            microbatches=run.microbatches)
  train_step = jax.jit(step_fn, in_shardings=(shardings, bs), out_shardings=(shardings, None),
                       donate_argnums=0)
  eval_step = jax.jit(make_eval_step(model), in_shardings=(shardings.params, bs))
  return Runtime(exp, mesh, model, optimizer, abstract, shardings, train_step, eval_step)


def init_or_restore(rt: Runtime, paths: RunPaths) -> tuple[TrainState, int]:
  """The newest checkpoint of the run directory if there is one, else a fresh sharded init."""
  if checkpoint.latest_step(paths.checkpoints) is not None:
    state, _, step = checkpoint.restore(paths.checkpoints, rt.abstract_state)
    logging.info("resumed from %s at step %d", paths.checkpoints, step)
    return state, step
  state, _ = create_train_state(rt.model, rt.optimizer, rt.mesh, rt.exp.mesh.rules,
                                rt.exp.run.seed, rt.exp.run.seq_len)
  return state, 0


def prepare_run_dir(exp: Experiment, restart: bool) -> RunPaths:
  """Creates the run directory (wiping a previous run's outputs if restart) and writes config.gin."""
  paths = RunPaths.under(exp.run.run_dir)
  if jax.process_index() == 0:
    if restart:
      for p in (paths.checkpoints, paths.tensorboard):
        shutil.rmtree(p, ignore_errors=True)
      for p in (paths.metrics, paths.loss_plot):
        if os.path.exists(p):
          os.remove(p)
    os.makedirs(paths.root, exist_ok=True)
    with open(paths.config, "w", encoding="utf-8") as f:
      f.write(experiment_to_gin(exp))
  return paths


@dataclasses.dataclass
class TrainResult:
  run_dir: str
  steps: int
  train_loss: float
  eval_loss: float
  unigram_entropy: float
  tokens_per_second: float
  mfu: float
  compile_seconds: float
  sample: str
  paths: RunPaths


class _Throughput:
  """Tokens/s and MFU between reads, with eval/checkpoint pauses excluded."""

  def __init__(self, tokens_per_step: int, flops_token: float, peak: float):
    self.tokens_per_step, self.flops_token, self.peak = tokens_per_step, flops_token, peak
    self.last_time, self.last_step = None, None
    self.tokens_per_second = float("nan")

  def restart_clock(self, step: int) -> None:
    self.last_time, self.last_step = time.perf_counter(), step

  def read(self, step: int) -> dict[str, float]:
    now = time.perf_counter()
    if self.last_time is not None and step > self.last_step:
      self.tokens_per_second = (step - self.last_step) * self.tokens_per_step / (now - self.last_time)
    self.last_time, self.last_step = now, step
    return {"perf/tokens_per_second": self.tokens_per_second,
            "perf/mfu": mfu(self.tokens_per_second, self.flops_token, self.peak)}


def _check_finite(step: int, values: dict[str, float], paths: RunPaths) -> None:
  if not math.isfinite(values["train/loss"]) or not math.isfinite(values["train/grad_norm"]):
    latest = checkpoint.latest_step(paths.checkpoints)
    where = f"the last checkpoint is step {latest} in {paths.checkpoints}" if latest is not None \
        else "no checkpoint was saved yet"
    raise FloatingPointError(
        f"training diverged: loss={values['train/loss']}, grad_norm={values['train/grad_norm']} "
        f"at step {step}; {where}. Lower OptimizerConfig.learning_rate, lengthen warmup_steps, or "
        "enable clip_grad_norm, then rerun (the run resumes from its last checkpoint).")


def train(exp: Experiment, restart: bool = False) -> TrainResult:
  """Runs (or resumes) the experiment to `exp.run.steps`; returns what the run reached."""
  run, is_main = exp.run, jax.process_index() == 0
  rt = build_runtime(exp)  # validates everything before the run directory is touched
  paths = prepare_run_dir(exp, restart)
  data = TrainBatches(exp.data, run.seq_len, run.global_batch_size, jax.process_index(),
                      jax.process_count())
  host_eval = eval_batches(exp.data, run.seq_len, run.global_batch_size, run.eval_batches,
                           jax.process_index(), jax.process_count())
  baseline = unigram_entropy(host_eval, exp.data.vocabulary.vocab_size)
  peak = run.peak_tflops * 1e12 if run.peak_tflops else machine_peak_flops(measure_peak_flops())
  meter = _Throughput(run.global_batch_size * run.seq_len, flops_per_token(exp.model, run.seq_len),
                      peak)
  writer = MetricWriter(paths.metrics, paths.tensorboard, enabled=is_main)
  with rt.scope():
    state, start = init_or_restore(rt, paths)
    eval_device = [rt.put_batch(b) for b in host_eval]
    state, summary = _run_steps(rt, state, start, data, eval_device, meter, writer, paths)
    eval_loss = evaluate(rt.eval_step, state.params, eval_device)["loss"]
    writer.write(run.steps, {"eval/loss": eval_loss, "eval/unigram_entropy": baseline})
    if start < run.steps or checkpoint.latest_step(paths.checkpoints) != run.steps:
      _save(paths, run.steps, state, exp, {"eval/loss": eval_loss, **summary["last"]})
    sample = sample_text(rt, state.params, run.sample_prompt, run.sample_tokens, seed=run.seed,
                         temperature=run.sample_temperature,
                         top_k=run.sample_top_k) if run.sample_tokens else ""
  writer.close()
  if is_main:
    plot_losses(paths.metrics, paths.loss_plot, baseline)
  return TrainResult(paths.root, run.steps, summary["last"].get("train/loss", float("nan")),
                     eval_loss, baseline, meter.tokens_per_second,
                     mfu(meter.tokens_per_second, meter.flops_token, peak),
                     summary["compile_seconds"], sample, paths)


def _run_steps(rt: Runtime, state: TrainState, start: int, data: TrainBatches, eval_device,
               meter: _Throughput, writer: MetricWriter, paths: RunPaths):
  run = rt.exp.run
  bar = tqdm(total=run.steps, initial=start, desc="train", unit="step", dynamic_ncols=True,
             disable=not (run.progress_bar and jax.process_index() == 0))
  batches = data.iterate(start)
  pending, last, compile_seconds = None, {}, 0.0
  for step in range(start, run.steps):
    t0 = time.perf_counter()
    state, metrics = rt.train_step(state, rt.put_batch(next(batches)))
    done = step + 1
    if step == start:  # the first call compiles: time it and start the throughput clock after.
      jax.block_until_ready(metrics)
      compile_seconds = time.perf_counter() - t0
      meter.restart_clock(done)
    if pending is not None:  # read the previous log step's metrics now that this step is queued
      last = _log(pending, meter, writer, bar, paths)
      pending = None
    if done % run.log_every == 0 or done == run.steps:
      pending = (done, metrics)
    bar.update(1)
    eval_due = run.eval_every and done % run.eval_every == 0 and done < run.steps
    save_due = run.checkpoint_every and done % run.checkpoint_every == 0 and done < run.steps
    if eval_due or save_due:
      if pending is not None:  # read before pausing, so the pause is not counted as training
        last = _log(pending, meter, writer, bar, paths)
        pending = None
      if eval_due:
        writer.write(done, {"eval/loss": evaluate(rt.eval_step, state.params, eval_device)["loss"]})
      if save_due:
        _save(paths, done, state, rt.exp, last)
      meter.restart_clock(done)
  if pending is not None:
    last = _log(pending, meter, writer, bar, paths)
  bar.close()
  return state, {"last": last, "compile_seconds": compile_seconds}


def _log(pending, meter: _Throughput, writer: MetricWriter, bar, paths: RunPaths) -> dict:
  step, metrics = pending
  values = {f"train/{k}": float(v) for k, v in jax.device_get(metrics).items()}
  _check_finite(step, values, paths)
  values.update(meter.read(step))
  writer.write(step, values)
  bar.set_postfix(loss=f"{values['train/loss']:.3f}",
                  tok_s=f"{values['perf/tokens_per_second']:.0f}",
                  mfu=f"{100 * values['perf/mfu']:.1f}%", refresh=False)
  return values


def _save(paths: RunPaths, step: int, state: TrainState, exp: Experiment, metrics: dict) -> None:
  finite = {k: v for k, v in metrics.items() if isinstance(v, float) and math.isfinite(v)}
  checkpoint.save(paths.checkpoints, step, state,
                  {"step": step, "config_gin": experiment_to_gin(exp), "metrics": finite})
  logging.info("saved checkpoint %s", os.path.join(paths.checkpoints, str(step)))


def result_summary(result: TrainResult) -> str:
  """The human-readable closing lines of a run."""
  p = result.paths
  lines = [
      f"final validation loss {result.eval_loss:.4f} nats/token vs unigram-entropy baseline "
      f"{result.unigram_entropy:.4f} ({result.unigram_entropy - result.eval_loss:+.4f} better)",
      f"throughput {result.tokens_per_second:,.0f} tokens/s, MFU {100 * result.mfu:.1f}%, "
      f"compile {result.compile_seconds:.1f}s",
      f"metrics:     {p.metrics}", f"tensorboard: {p.tensorboard}", f"loss plot:   {p.loss_plot}",
      f"config:      {p.config}", f"checkpoint:  {os.path.join(p.checkpoints, str(result.steps))}",
  ]
  if result.sample:
    lines += ["sample:", result.sample]
  return "\n".join(lines)


def load_trained(exp: Experiment, checkpoint_dir: str | None = None, step: int | None = None
                 ) -> tuple[Runtime, TrainState, int]:
  """Runtime and restored state of a finished (or running) experiment, for eval and generate."""
  rt = build_runtime(exp)
  directory = checkpoint_dir or RunPaths.under(exp.run.run_dir).checkpoints
  with rt.scope():
    state, _, step = checkpoint.restore(directory, rt.abstract_state, step)
  return rt, state, step


def evaluate_checkpoint(rt: Runtime, state: TrainState, num_batches: int | None
                        ) -> dict[str, float]:
  """Validation loss and the unigram baseline of the same batches."""
  exp = rt.exp
  host = eval_batches(exp.data, exp.run.seq_len, exp.run.global_batch_size, num_batches,
                      jax.process_index(), jax.process_count())
  with rt.scope():
    result = evaluate(rt.eval_step, state.params, [rt.put_batch(b) for b in host])
  result["unigram_entropy"] = unigram_entropy(host, exp.data.vocabulary.vocab_size)
  return result


def sample_text(rt: Runtime, params, prompt: str, max_new_tokens: int, *, seed: int = 0,
                temperature: float = 0.7, top_k: int | None = 40) -> str:
  vocab = rt.exp.data.vocabulary
  with rt.scope():
    ids = generate(rt.model, params, vocab.encode(prompt), max_new_tokens,
                   rng=jax.random.key(seed), temperature=temperature, top_k=top_k,
                   eos_id=vocab.eos_id)
  return prompt + vocab.decode(ids)
