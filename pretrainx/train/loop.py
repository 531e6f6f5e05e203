"""The training loop, the only impure place: feed batches, step, log, evaluate, checkpoint, plot.

Metrics stay on device and are read every `log_every` steps, one step late (after the next step is
dispatched), so the host never waits on the accelerator between log points. The loop resumes from
the newest readable checkpoint, saves asynchronously by the checkpoint policy, stops cleanly on
SIGTERM/SIGINT, and applies the bad-step policy (skip, roll back, or stop). With online domain
reweighting, each update's weights apply from the batch after the one in flight (see
_Driver._reweight), and the batch iterator restarts so that prefetched batches are redrawn.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from tqdm.auto import tqdm

import pretrainx
from pretrainx import faults, storage
from pretrainx.checkpoint import describe_error
from pretrainx.checkpoint.tiers import TieredCheckpointer, make_checkpointer
from pretrainx.config import Experiment, ModelConfig, RunPaths, experiment_to_gin, phases
from pretrainx.data.pipeline import TrainBatches, eval_batches
from pretrainx.data.reweighting import Reweighter, floats_from_json, floats_to_json
from pretrainx.harness import runner as harness
from pretrainx.flops import flops_per_token, machine_peak_flops, measure_peak_flops
from pretrainx.metrics import DOMAIN_WEIGHTS_PLOT, MetricWriter, plot_domain_weights, plot_losses
from pretrainx.train.eval import evaluate_domains
from pretrainx.train.goodput import GoodputRecorder
from pretrainx.train.init import initial_state
from pretrainx.train.preemption import PreemptionWatcher
from pretrainx.train.runtime import Runtime, build_runtime, global_unigram_entropy, sample_text
from pretrainx.train.start import preflight, prepare_run_dir
from pretrainx.train.state import TrainState, create_train_state
from pretrainx.train.teacher import load_teacher_params, teacher_for, teacher_model_config


@dataclasses.dataclass
class TrainResult:
  run_dir: str
  steps: int  # the step reached (less than RunConfig.steps when preempted)
  train_loss: float
  eval_loss: float
  unigram_entropy: float
  tokens_per_second: float
  mfu: float
  compile_seconds: float
  sample: str
  paths: RunPaths
  preempted: bool = False
  skipped_steps: int = 0
  checkpoint: str = ""
  eval_domain_losses: dict[str, float] = dataclasses.field(default_factory=dict)
  eval_batches: int | None = None  # per domain, of the final validation loss (None: all)
  goodput: dict[str, float] = dataclasses.field(default_factory=dict)  # goodput/* of the run


class _Throughput:
  """Tokens/s and MFU over whole windows of steps, each window opened and closed with the device
  idle (every dispatched step finished), with eval/checkpoint pauses and compiles left out.
  `work(a, b)` gives the (tokens, FLOPs) of steps a..b-1, which differ by stage when a stage
  changes the sequence length or batch. Until a window closes (a one-step run: its only step
  compiles) there is nothing to time, and both are NaN."""

  def __init__(self, work: Callable[[int, int], tuple[float, float]] | None, peak: float,
               peak_measured: bool = False):
    self.work, self.peak = work, peak
    self.on_window: Callable[[int, int, float], None] | None = None  # (first, last, seconds)
    self.peak_measured, self.peak_warned = peak_measured, False
    self.last_time, self.last_step = None, None
    self.tokens_per_second = self.flops_per_second = float("nan")
    self.timed_tokens, self.timed_flops, self.timed_seconds = 0.0, 0.0, 0.0  # closed windows

  def restart_clock(self, state: Any, step: int) -> None:
    """Opens a window at `step`, once `state` (that of step `step`) is computed."""
    jax.block_until_ready(state)
    self.last_time, self.last_step = time.perf_counter(), step

  def read(self, state: Any, step: int) -> dict[str, float]:
    """Closes the window at `step` (waiting for `state`) and opens the next one there."""
    jax.block_until_ready(state)
    now = time.perf_counter()
    if self.last_time is not None and step > self.last_step:
      tokens, flops = self.work(self.last_step, step)
      seconds = now - self.last_time
      self.tokens_per_second, self.flops_per_second = tokens / seconds, flops / seconds
      self.timed_tokens += tokens
      self.timed_flops += flops
      self.timed_seconds += seconds
      self._check_peak()
      if self.on_window is not None:
        self.on_window(self.last_step, step, seconds)
    self.last_time, self.last_step = now, step
    return {"perf/tokens_per_second": self.tokens_per_second,
            "perf/mfu": self.mfu}

  def _check_peak(self) -> None:
    """A window faster than the peak proves the peak low. A measured one (timed while the host
    was busy with something else, say) is raised to what the run reached, so MFU stays <= 100%;
    a peak given by --peak_tflops is the user's, and is only warned about."""
    achieved = self.flops_per_second
    if achieved <= self.peak:
      return
    if not self.peak_warned:
      logging.warning(
          "the run reached %.4g TFLOP/s, above the %s peak of %.4g TFLOP/s; %s", achieved / 1e12,
          "measured" if self.peak_measured else "given", self.peak / 1e12,
          "MFU is reported against what the run reached (pass --peak_tflops for a fixed one)"
          if self.peak_measured else "MFU above 100% means that --peak_tflops is too low")
      self.peak_warned = True
    if self.peak_measured:
      self.peak = achieved

  @property
  def mfu(self) -> float:
    return self.flops_per_second / self.peak if self.peak > 0 else float("nan")

  @property
  def run_tokens_per_second(self) -> float:
    """Over every timed window of the run (NaN if none closed)."""
    if not self.timed_seconds:
      return float("nan")
    return self.timed_tokens / self.timed_seconds

  @property
  def run_mfu(self) -> float:
    if not self.timed_seconds or self.peak <= 0:
      return float("nan")
    return self.timed_flops / self.timed_seconds / self.peak


def phase_work(exp: Experiment, offset: Callable[[], int], teacher: ModelConfig | None = None
               ) -> Callable[[int, int], tuple[float, float]]:
  """work(a, b) for _Throughput: the tokens and model FLOPs of the run's steps a..b-1, whose
  batches are a + offset() .. (config.phases: each stage's seq_len and batch size). With an
  online `teacher`, its forward's FLOPs (a third of training's) count too on the steps that run
  it (DistillConfig.active)."""
  all_phases = phases(exp)
  starts = np.asarray([p.start_step for p in all_phases])
  per_step = [(p.tokens_per_step, p.tokens_per_step * flops_per_token(p.model(exp.model),
                                                                        p.seq_len))
              for p in all_phases]
  teacher_step = [p.tokens_per_step * flops_per_token(teacher, p.seq_len) / 3.0
                  if teacher is not None else 0.0 for p in all_phases]
  distill, total = exp.distill, exp.run.steps

  def work(a: int, b: int) -> tuple[float, float]:
    steps = np.arange(a, b)
    index = np.maximum(np.searchsorted(starts, steps + offset(), side="right") - 1, 0)
    counts = np.bincount(index, minlength=len(per_step))
    runs_teacher = np.asarray([distill.active(s, total) for s in steps.tolist()], bool)
    taught = np.bincount(index[runs_teacher], minlength=len(per_step))
    return (float(sum(c * t for c, (t, _) in zip(counts, per_step))),
            float(sum(c * f for c, (_, f) in zip(counts, per_step)) +
                  sum(c * f for c, f in zip(taught, teacher_step))))

  return work


_PER_DOMAIN = ("domain_loss", "domain_tokens")
GOODPUT_LOG_EVERY_S = 60.0  # goodput/* metrics join the log point at most this often


@jax.jit
def _add_domain_sums(acc: jax.Array, loss: jax.Array, tokens: jax.Array) -> jax.Array:
  """acc [2, domains] + (loss sums, tokens) of one step, for online reweighting."""
  return acc + jnp.stack([loss * tokens, tokens])


class _Driver:
  """One training run's mutable state: the train state, data position, pending metrics."""

  def __init__(self, rt: Runtime, paths: RunPaths, data: TrainBatches, meter: _Throughput,
               eval_device: dict[tuple[int, int], dict[str, list]]):
    self.rt, self.paths, self.data, self.meter = rt, paths, data, meter
    self.eval_device = eval_device  # (seq_len, batch) of a stage -> its validation batches
    exp = rt.exp
    self.ckpt: TieredCheckpointer | None = None  # set by attach, once the run dir is written
    self.writer: MetricWriter | None = None
    self.goodput: GoodputRecorder | None = None  # set by attach
    self.goodput_logged = 0.0
    self.state: TrainState | None = None
    self.step, self.data_offset = 0, 0  # the batch of step k is batch k + data_offset
    self.pending: tuple[int, Any, Any, Any] | None = None  # (step, metrics, tokens, sums)
    # Tokens trained on per domain: summed on device every step and handed to the host with the
    # metrics at each log point (so the float32 sums stay small and exact).
    self.domain_tokens = {d: 0.0 for d in self.data.domains}  # through the last metrics read
    self.tokens_acc = self._zero_tokens()
    self.reweighter = Reweighter(exp.data.reweight, self.data.domains)
    self.sums_acc = jnp.zeros((2, len(self.data.domains)), jnp.float32)  # reweighting's window
    self.restart_batches = True  # (re)start the batch iterator before the next step
    self.teacher_params: Any = None  # an online teacher's frozen params (load_teacher)
    self.last: dict[str, float] = {}
    self.skipped_seen, self.compile_seconds = 0, 0.0

  # -- state ------------------------------------------------------------------------------------

  def restore(self, ckpt: TieredCheckpointer) -> bool:
    """The state, data position and reweighting of the run's newest complete checkpoint in
    either tier; False if neither holds one (a run killed before its first save)."""
    self.ckpt = ckpt
    restored = ckpt.restore(self.rt.abstract_state)
    if restored is None:
      logging.info("no checkpoint in either tier: starting from the beginning")
      return False
    self.state, meta, self.step = restored
    self.data_offset = int(meta.get("data", {}).get("offset", 0))
    self.domain_tokens.update(meta.get("data", {}).get("domain_tokens", {}))
    self._restore_reweighting(meta.get("data", {}).get("reweight"))
    self.skipped_seen = int(jax.device_get(self.state.guard.skipped))
    logging.info("resumed from %s (%s tier)", ckpt.step_path(self.step), ckpt.restored_tier)
    return True

  def start(self) -> None:
    """A fresh run's state: from InitConfig.source (continued pretraining), or a random init."""
    exp = self.rt.exp
    if exp.init.source:  # continued pretraining: the data starts at its first batch
      self.state, self.step = initial_state(self.rt, exp.init)
      self.data_offset = -self.step
    else:
      self.state, _ = create_train_state(self.rt.model, self.rt.optimizer, self.rt.mesh,
                                         exp.mesh.rules, exp.run.seed, exp.run.seq_len,
                                         ema=exp.ema.enabled, tune=exp.tune)
      self.step = 0
    self.skipped_seen = int(jax.device_get(self.state.guard.skipped))

  def load_teacher(self) -> None:
    """An online teacher's frozen params, from its source (never from the run's checkpoints:
    they hold only the student), on the run's mesh."""
    teacher, run = self.rt.teacher, self.rt.exp.run
    # alpha's schedules only end KD: a run resumed past that point needs no teacher
    if teacher is not None and teacher.online and teacher.cfg.active(self.step, run.steps):
      self.teacher_params = load_teacher_params(self.rt)

  def attach(self, ckpt: TieredCheckpointer, writer: MetricWriter,
             goodput: GoodputRecorder) -> None:
    self.ckpt, self.writer, self.goodput = ckpt, writer, goodput
    self.meter.on_window = lambda first, last, seconds: goodput.steps(first, last, seconds)

  def meta(self) -> dict[str, Any]:
    finite = {k: v for k, v in self.last.items() if isinstance(v, float) and math.isfinite(v)}
    data = {"seed": self.rt.exp.data.seed, "offset": self.data_offset,
            "next_batch": self.step + self.data_offset,
            "domain_tokens": self._domain_tokens_now()}
    if self.reweighter.cfg.enabled:
      data["reweight"] = self._reweighting_state()
    return {"step": self.step, "config_gin": experiment_to_gin(self.rt.exp), "data": data,
            "metrics": finite}

  def _reweighting_state(self) -> dict[str, Any]:
    """The weight history, the window and the unread loss sums (exact, float.hex)."""
    unread = self.sums_acc + (self.pending[3] if self.pending else 0.0)
    weights = self.data.schedule.weights_at(self.step + self.data_offset)
    return {**self.reweighter.state(), "partial": floats_to_json(jax.device_get(unread)),
            "weights": dict(zip(self.data.domains, map(float, weights)))}

  def _restore_reweighting(self, saved: dict[str, Any] | None) -> None:
    if not (saved and self.reweighter.cfg.enabled):
      return
    self.reweighter.load(saved, self.data.schedule)
    partial = floats_from_json(saved["partial"]).astype(np.float32)
    self.sums_acc = jnp.asarray(partial.reshape(self.sums_acc.shape))

  def save(self, block: bool = False) -> str:
    path = self.ckpt.save(self.step, self.state, self.meta(), block=block)
    for tier, seconds in self.ckpt.last_blocking.items():
      self.goodput.blocked(f"checkpoint_{tier}", seconds, self.step)
    logging.info("checkpoint %s %s", path, "written" if block else "being written")
    return path

  def timed(self, kind: str, fn: Callable[[], Any]) -> Any:
    """fn(), its wall time recorded as goodput badput of `kind` (eval, harness)."""
    started = time.perf_counter()
    try:
      return fn()
    finally:
      self.goodput.blocked(kind, time.perf_counter() - started, self.step)

  # -- the loop ---------------------------------------------------------------------------------

  def run(self, watcher: PreemptionWatcher) -> bool:
    """Steps to RunConfig.steps; returns True if stopped early by a signal."""
    run = self.rt.exp.run
    bar = tqdm(total=run.steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
               disable=not (run.progress_bar and jax.process_index() == 0))
    try:
      return self._steps(bar, watcher)
    finally:  # also when a step or a save fails: the error then starts a line of its own
      bar.close()

  def _steps(self, bar, watcher: PreemptionWatcher) -> bool:
    run, distill = self.rt.exp.run, self.rt.exp.distill
    batches, view, reweight = None, None, self.reweighter.cfg.enabled
    while self.step < run.steps:
      if self.restart_batches:
        batches = self._restart_batches(batches)
      # The stage's shape and model; past the step where KD stops, a step without the teacher.
      step_view = self.rt.at(self.step + self.data_offset,
                             teacher=distill.active(self.step, run.steps))
      if view is not None and step_view is not view:
        self.meter.read(self.state, self.step)  # a new shape compiles: close the window first
        if view.teacher is not None and step_view.teacher is None:  # SALT's switch to CE
          logging.info("step %d: distillation ends (alpha is 0 from here); the teacher's "
                       "memory is freed", self.step)
          self.teacher_params = None
      online = step_view.teacher is not None and step_view.teacher.online
      if online and self.teacher_params is None:  # a rollback went back before KD's end
        self.load_teacher()
      t0 = time.perf_counter()
      self.state, metrics = step_view.train_step(self.state, step_view.put_batch(next(batches)),
                                                 *step_view.step_args(self.teacher_params))
      self.tokens_acc = self.tokens_acc + metrics["domain_tokens"]
      if reweight:
        self.sums_acc = _add_domain_sums(self.sums_acc, metrics["domain_loss"],
                                         metrics["domain_tokens"])
      self.step += 1
      if step_view is not view:  # the first step of a shape compiles: time it, restart the clock
        jax.block_until_ready(metrics)
        seconds = time.perf_counter() - t0
        self.compile_seconds += seconds
        self.goodput.compiled(seconds, self.step)
        if view is not None:
          logging.info("step %d: seq_len %d, %d rows per step (compiled in %.1fs)", self.step,
                       step_view.exp.run.seq_len, step_view.exp.run.global_batch_size, seconds)
        view = step_view
        self.meter.restart_clock(self.state, self.step)
      rolled_back = self._read_pending(bar)
      if not rolled_back and (self.step % run.log_every == 0 or self.step == run.steps):
        self.pending = (self.step, metrics, self.tokens_acc, self.sums_acc if reweight else None)
        self.tokens_acc = self._zero_tokens()
        if reweight:
          self.sums_acc = jnp.zeros_like(self.sums_acc)
      if rolled_back:
        self.restart_batches = True
        bar.n = self.step
      bar.update(0 if rolled_back else 1)
      if watcher.should_stop(self.step):
        self._read_pending(bar)
        return True
      self._pause_for_eval_and_checkpoint(bar)
      if faults.due("after_step", self.step):
        self.ckpt.wait()  # the failure lands with the checkpoints in flight finished
        faults.maybe_kill("after_step", self.step)
    self._read_pending(bar)
    return False

  def _restart_batches(self, old):
    """A fresh batch iterator from the next batch to train on (the old one is closed)."""
    if old is not None and hasattr(old, "close"):
      old.close()
    self.restart_batches = False
    return self.data.iterate(self.step + self.data_offset)

  def _pause_for_eval_and_checkpoint(self, bar) -> None:
    run = self.rt.exp.run
    self.ckpt.check()  # a background save that failed stops the run here (CheckpointWriteError)
    if self.step >= run.steps:
      return
    eval_due = run.eval_every and self.step % run.eval_every == 0
    every = self.rt.exp.harness.every_steps
    harness_due = every and self.step % every == 0
    save_due = self.ckpt.due(self.step)
    if not (eval_due or save_due or harness_due):
      return
    self._read_pending(bar)  # before pausing, so the pause is not counted as training
    if eval_due:
      self.writer.write(self.step, self.timed("eval", self.evaluate))
    if harness_due:
      self.timed("harness", self.evaluate_harness)
    if save_due:
      self.save()
    self.meter.restart_clock(self.state, self.step)

  def _read_pending(self, bar) -> bool:
    """Reads the pending metrics; returns True if the bad-step policy rolled the state back."""
    if self.pending is None:
      return False
    step, metrics, tokens, sums = self.pending
    self.pending = None
    metrics, tokens, sums = jax.device_get((metrics, tokens, sums))
    values = self._named_metrics(step, metrics, tokens)
    values.update(self.meter.read(self.state, self.step))
    if time.time() - self.goodput_logged >= GOODPUT_LOG_EVERY_S or self.step >= self.rt.exp.run.steps:
      values.update(self.goodput.metrics())  # a summary over the run's events: not every step
      self.goodput_logged = time.time()
    self.writer.write(step, values)
    self.last = values
    bar.set_postfix(loss=f"{values['train/loss']:.3f}",
                    tok_s=f"{values['perf/tokens_per_second']:.0f}",
                    mfu=f"{100 * values['perf/mfu']:.1f}%", refresh=False)
    rolled_back = self._apply_bad_step_policy(step, values)
    if sums is not None and not rolled_back:
      self._reweight(step, sums)
    return rolled_back

  def _reweight(self, step: int, sums: np.ndarray) -> None:
    """Feeds the interval ending at `step` to the reweighter and, at an update, sets new weights.

    The metrics of step t (the t-th update, which trained on batch t - 1 + data_offset) are read
    once update t + 1 is in flight at the latest, so the new weights apply from batch
    t + 1 + data_offset: that of step t + 2, wherever the read happened. Batches already
    prefetched are drawn again."""
    self.reweighter.observe(step, sums[0], sums[1])
    if self.reweighter.due(step):
      new = self.reweighter.update(step + 1 + self.data_offset, self.data.schedule)
      self.restart_batches = True
      logging.info("step %d: domain weights %s", step, dict(zip(self.data.domains,
                                                              np.round(new, 4).tolist())))

  def _named_metrics(self, step: int, metrics: dict[str, Any], tokens) -> dict[str, float]:
    """Device metrics -> named floats; per-domain arrays become one value per domain."""
    domains = self.data.domains
    values = {f"train/{k}": float(v) for k, v in metrics.items() if k not in _PER_DOMAIN}
    for name, loss, n in zip(domains, metrics["domain_loss"], metrics["domain_tokens"]):
      if n > 0:
        values[f"train/{name}/loss"] = float(loss)
    for name, n in zip(domains, tokens):
      self.domain_tokens[name] += float(n)
      values[f"data/{name}/tokens"] = self.domain_tokens[name]
    for name, epochs in self.data.epochs(step).items():
      values[f"data/{name}/epochs"] = epochs
    weights = self.data.schedule.weights_at(step - 1 + self.data_offset)  # step's own batch
    for name, w in zip(domains, weights):
      values[f"data/{name}/weight"] = float(w)
    shape = self.rt.at(step - 1 + self.data_offset).exp.run
    values["data/seq_len"] = float(shape.seq_len)
    values["data/global_batch_size"] = float(shape.global_batch_size)
    return values

  def _zero_tokens(self) -> jax.Array:
    return jax.numpy.zeros(len(self.data.domains), jax.numpy.float32)

  def _domain_tokens_now(self) -> dict[str, float]:
    """Tokens trained on per domain up to now (waits for the steps in flight)."""
    unread = self.tokens_acc + (self.pending[2] if self.pending else 0.0)
    return {d: self.domain_tokens[d] + float(t)
            for d, t in zip(self.data.domains, jax.device_get(unread))}

  def view(self) -> Runtime:
    """The runtime of the stage the last trained batch came from (its seq_len and model)."""
    return self.rt.at(max(self.step - 1, 0) + self.data_offset)

  def _eval_batches(self, view: Runtime) -> dict[str, list]:
    """The fixed validation batches at the shape of `view`'s stage (made on first use)."""
    run = view.exp.run
    key = (run.seq_len, run.global_batch_size)
    if key not in self.eval_device:
      host = eval_batches(view.exp.data, *key, run.eval_batches, *self.rt.data_shard())
      self.eval_device[key] = view.put_domain_batches(host)
    return self.eval_device[key]

  def evaluate(self) -> dict[str, float]:
    """{'eval/loss', 'eval/<domain>/loss'} on the fixed validation batches of the current
    stage's sequence length."""
    view = self.view()
    result = evaluate_domains(view.eval_step, view.inference_params(self.state),
                              self._eval_batches(view))
    return {f"eval/{k}": v for k, v in result.items() if k != "tokens"}

  def evaluate_harness(self) -> dict[str, float]:
    """lm-eval tasks (HarnessConfig) on the current params: metrics and RUN_DIR/harness/."""
    view = self.view()
    values, _ = harness.run_and_record(view, view.inference_params(self.state),
                                      view.exp.harness, self.step, self.paths.root,
                                      self.writer)
    self.last.update(values)
    return values

  def _apply_bad_step_policy(self, step: int, values: dict[str, float]) -> bool:
    guard = self.rt.exp.guard
    skipped = int(values["train/skipped_steps"])
    if skipped == self.skipped_seen:
      return False
    new_bad, self.skipped_seen = skipped - self.skipped_seen, skipped
    consecutive = int(values["train/consecutive_bad"])
    what = (f"loss={values['train/loss']:.4g}, grad_norm={values['train/grad_norm']:.4g}, "
            f"loss z-score={values['train/loss_zscore']:.1f}")
    if guard.policy == "raise" or consecutive >= guard.max_consecutive:
      latest = self.ckpt.latest_step()
      where = (f"the last checkpoint is step {latest} in {self.paths.checkpoints}"
               if latest is not None else "no checkpoint was saved yet")
      raise FloatingPointError(
          f"training diverged: {new_bad} bad step(s) by step {step} ({consecutive} in a row; "
          f"{what}); {where}. Lower OptimizerConfig.learning_rate, lengthen ScheduleConfig.warmup_steps, or "
          "enable clip_grad_norm, then rerun (the run resumes from its last checkpoint).")
    if guard.policy == "skip":
      logging.warning("skipped %d bad step(s) by step %d (%s)", new_bad, step, what)
      return False
    return self._rollback(step, what)

  def _rollback(self, step: int, what: str) -> bool:
    self.ckpt.wait()
    latest = self.ckpt.latest_step()
    if latest is None:
      logging.warning("bad step by step %d (%s) but no checkpoint to roll back to: skipped it",
                      step, what)
      return False
    consumed = self.step + self.data_offset  # batches read so far, the bad ones included
    started = time.perf_counter()
    self.state, _, self.step = self.ckpt.restore(self.rt.abstract_state, latest)
    self.goodput.restored(self.step, self.ckpt.restored_tier, time.perf_counter() - started)
    self.goodput.started(self.step, self.ckpt.restored_tier)
    self.data_offset = consumed - self.step
    self.skipped_seen = int(jax.device_get(self.state.guard.skipped))
    logging.warning("bad step by step %d (%s): rolled back to step %d; training goes on with "
                    "batch %d, skipping the batches read since that checkpoint", step, what,
                    self.step, consumed)
    self.meter.restart_clock(self.state, self.step)
    return True


def train(exp: Experiment, restart: bool = False) -> TrainResult:
  """Runs (or resumes) the experiment to `exp.run.steps`; returns what the run reached.

  Everything that can fail at the start (the config, paths, runtime, data and the starting
  state) is checked or built before the run directory is first written, so a failed start leaves
  it as it was and the corrected command needs no --restart."""
  paths, resumes = preflight(exp, restart)  # host-side checks: no JAX backend yet
  run, is_main = exp.run, jax.process_index() == 0
  rt = build_runtime(exp, teacher=teacher_for(exp))
  data = TrainBatches(exp.data, run.seq_len, run.global_batch_size, *rt.data_shard(),
                      distill=exp.distill)
  host_eval = eval_batches(exp.data, run.seq_len, run.global_batch_size, run.eval_batches,
                           *rt.data_shard())
  baseline = global_unigram_entropy(exp)
  peak = run.peak_tflops * 1e12 if run.peak_tflops else machine_peak_flops(measure_peak_flops())
  meter = _Throughput(None, peak, peak_measured=not run.peak_tflops)
  driver = _Driver(rt, paths, data, meter,
                   {(run.seq_len, run.global_batch_size): rt.put_domain_batches(host_eval)})
  meter.work = phase_work(exp, lambda: driver.data_offset,  # batch k + data_offset at step k
                          teacher_model_config(exp) if exp.distill.online else None)
  ckpt = _checkpointer(exp, paths, rt) if resumes else None
  writer, recorder, failing, restore_s = None, None, True, None
  try:
    with rt.scope():
      started = time.perf_counter()
      if resumes and driver.restore(ckpt):
        restore_s = time.perf_counter() - started
      else:
        driver.start()
      driver.load_teacher()
    prepare_run_dir(exp, paths, restart, is_main)
    if ckpt is None:
      ckpt = _checkpointer(exp, paths, rt)
    if restore_s is None:  # a fresh start: a local tier left by an earlier run is not this run's
      ckpt.clear_local()
    writer = MetricWriter(paths.root, enabled=is_main,
                          resumed_at=driver.step if resumes else None)
    recorder = GoodputRecorder(paths.root, enabled=is_main, job_start=pretrainx.STARTED_AT)
    tier = ckpt.restored_tier if restore_s is not None else None
    if tier is not None:
      recorder.restored(driver.step, tier, restore_s)
    recorder.started(driver.step, tier)
    driver.attach(ckpt, writer, recorder)
    with rt.scope(), PreemptionWatcher(sync_every=run.log_every) as watcher:
      preempted = driver.run(watcher)
      if preempted:
        path = driver.save(block=True)
        logging.warning("preempted (%s) at step %d; checkpoint %s is complete; rerun the same "
                        "command to resume", watcher.signal_name or "signal to another process",
                        driver.step, path)
        recorder.ended(driver.step, "preempted")
        failing = False
        return _result(driver, float("nan"), baseline, "", preempted=True, checkpoint=path)
      final_eval = driver.timed("eval", driver.evaluate)
      eval_loss = final_eval["eval/loss"]
      writer.write(driver.step, {**final_eval, "eval/unigram_entropy": baseline})
      driver.last.update(final_eval)
      if exp.harness.every_steps:
        driver.timed("harness", driver.evaluate_harness)
      path = driver.save(block=True)
      sample = sample_text(driver.view(), rt.inference_params(driver.state), exp.sample.prompt,
                           exp.sample.tokens, seed=run.seed, temperature=exp.sample.temperature,
                           top_k=exp.sample.top_k) if exp.sample.tokens else ""
      recorder.ended(driver.step, "finished")
      writer.write(driver.step, recorder.metrics())
    failing = False
  finally:
    if failing and recorder is not None:
      recorder.ended(driver.step, "failed")
    _close(ckpt, writer, quiet=failing)
    if recorder is not None:
      recorder.close()
  if is_main:
    plot_losses(paths.metrics, paths.loss_plot, baseline)
    if exp.data.reweight.enabled or len(exp.data.schedule_stages) > 1:
      plot_domain_weights(paths.metrics, storage.join(paths.root, DOMAIN_WEIGHTS_PLOT))
  per_domain = {k.split("/")[1]: v for k, v in final_eval.items()
                if k.count("/") == 2 and k.endswith("/loss")}
  return _result(driver, eval_loss, baseline, sample, checkpoint=path,
                 eval_domain_losses=per_domain)


def _checkpointer(exp: Experiment, paths: RunPaths, rt: Runtime) -> TieredCheckpointer:
  """The run's checkpoint tiers (made by every process together when the local tier is on)."""
  return make_checkpointer(paths.checkpoints, exp.checkpoint, exp.run.run_dir, rt.mesh)


def _close(ckpt: TieredCheckpointer | None, writer: MetricWriter | None, quiet: bool) -> None:
  """Closes both; with `quiet` (an error is on its way out) a failure to close is logged, not
  raised, so the run's first error is the one reported (say, a bucket gone mid-save)."""
  try:
    if ckpt is not None:
      _close_one(ckpt, quiet)
  finally:
    if writer is not None:
      _close_one(writer, quiet)


def _close_one(closer: TieredCheckpointer | MetricWriter, quiet: bool) -> None:
  try:
    closer.close()
  except Exception as err:  # pylint: disable=broad-except
    if not quiet:
      raise
    logging.info("while stopping, %s could not be closed (%s)", type(closer).__name__,
                 describe_error(err))


def _result(driver: _Driver, eval_loss: float, baseline: float, sample: str, **extra
            ) -> TrainResult:
  return TrainResult(
      driver.paths.root, driver.step, driver.last.get("train/loss", float("nan")), eval_loss,
      baseline, driver.meter.run_tokens_per_second, driver.meter.run_mfu, driver.compile_seconds,
      sample,
      driver.paths, skipped_steps=driver.skipped_seen,
      eval_batches=driver.rt.exp.run.eval_batches,
      goodput=driver.goodput.metrics() if driver.goodput is not None else {}, **extra)


def _throughput(result: TrainResult) -> str:
  if not math.isfinite(result.tokens_per_second):
    return "throughput: nothing to time (the only step trained also compiled), "
  return (f"throughput {result.tokens_per_second:,.0f} tokens/s, MFU {100 * result.mfu:.1f}% "
          "(steps after the first, eval and checkpoint pauses excluded), ")


def _goodput_line(result: TrainResult) -> list[str]:
  """'goodput 87.3% of 412 s wall time (...)', from every attempt of the run so far."""
  g = result.goodput
  if not g:
    return []
  parts = [f"{k.rsplit('/', 1)[1][:-2]} {v:.1f}s" for k, v in g.items()
           if k.startswith("goodput/badput/") and v >= 0.05 * g["goodput/total_s"]]
  recomputed = int(g.get("goodput/recomputed_steps", 0))
  return [f"goodput {g['goodput/percent']:.1f}% of {g['goodput/total_s']:.0f}s wall time"
          + (f", {recomputed} steps recomputed after restores" if recomputed else "")
          + (f" (largest badput: {', '.join(parts)})" if parts else "")
          + f"; `pretrainx goodput --run_dir={result.run_dir}` breaks it down"]


def result_summary(result: TrainResult) -> str:
  """The human-readable closing lines of a run."""
  p = result.paths
  if result.preempted:
    return (f"preempted at step {result.steps}; checkpoint {result.checkpoint} is complete. "
            "Run the same command again to resume.")
  gain = result.unigram_entropy - result.eval_loss
  which = ("the whole validation split" if result.eval_batches is None else
           f"{result.eval_batches} batches per domain, RunConfig.eval_batches; `pretrainx eval` "
           "scores the whole split")
  lines = [
      f"final validation loss {result.eval_loss:.4f} nats/token ({which}) vs unigram-entropy "
      f"baseline {result.unigram_entropy:.4f} ({abs(gain):.4f} "
      f"{'better' if gain >= 0 else 'worse'})",
      "per-domain validation loss: " + ", ".join(
          f"{d} {v:.4f}" for d, v in result.eval_domain_losses.items()),
      _throughput(result) + f"compile {result.compile_seconds:.1f}s" +
      (f", {result.skipped_steps} bad steps skipped" if result.skipped_steps else ""),
      *_goodput_line(result),
      f"metrics:     {p.metrics}", f"tensorboard: {p.tensorboard}", f"loss plot:   {p.loss_plot}",
      f"config:      {p.config}", f"checkpoint:  {result.checkpoint}",
  ]
  if result.sample:
    lines += ["sample:", result.sample]
  return "\n".join(lines)
