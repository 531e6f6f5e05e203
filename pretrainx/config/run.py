"""How a run trains, checkpoints, guards its steps, averages and evaluates: the run-level sections."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """What one training run does.

  Attributes:
    run_dir: where config.gin, metrics.jsonl, tensorboard/, loss.png and checkpoints/ go.
    seed: parameter-initialisation seed (the data order has its own DataConfig.seed).
    steps: optimizer updates in total.
    global_batch_size / seq_len: rows per step across all hosts, tokens per row.
    log_every: steps between metric reads (the only host syncs of the hot loop).
    eval_every: steps between validation passes (0: only at the end); eval_batches per pass
      (None: the whole validation split).
    eval_position_bucket: width in tokens of the buckets of position within the document that
      the validation loss is also reported by ('eval/loss_by_position/<lo>-<hi>'); 0: 1024, or
      a quarter of the row length when that is <= 1024.
    peak_tflops: the MFU denominator for the whole job; None measures this machine's matmul peak.
    progress_bar: show a tqdm bar on stderr.
  """

  run_dir: str = "runs/default"
  seed: int = 0
  steps: int = 100
  global_batch_size: int = 16
  seq_len: int = 128
  log_every: int = 10
  eval_every: int = 0
  eval_batches: int | None = 16
  eval_position_bucket: int = 0
  peak_tflops: float | None = None
  progress_bar: bool = True


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """The training loss beyond next-token cross-entropy.

  Attributes:
    z_loss: weight of the log(Z)^2 auxiliary loss that keeps the softmax normaliser near 1
      (PaLM); 0 disables it.
    example_weighting: 'none', or 'loss': each row's tokens are weighted by
      softmax(row loss / example_temperature) over the batch, times the number of rows, with no
      gradient through the weights (dynamic loss-based sample reweighting). Weights from scores
      come from the data (Selection.loss_weight); the two multiply.
    example_temperature: the softmax temperature of 'loss' weighting (larger: closer to uniform;
      negative: down-weights hard rows).
  """

  z_loss: float = 1e-4
  example_weighting: str = "none"
  example_temperature: float = 1.0

  def __post_init__(self):
    if self.z_loss < 0:
      raise ValueError(f"LossConfig.z_loss={self.z_loss} is negative; use 0 to disable it.")
    if self.example_weighting not in ("none", "loss"):
      raise ValueError(f"LossConfig.example_weighting={self.example_weighting!r}; choose "
                       "'none' or 'loss'.")
    if self.example_temperature == 0:
      raise ValueError("LossConfig.example_temperature must not be 0.")


@dataclasses.dataclass(frozen=True)
class AccumulationConfig:
  """Gradient accumulation: how one optimizer update is split over the batch.

  Attributes:
    microbatches: each update averages the gradients of this many equal microbatches of the
      global batch, computed one after another (memory of one microbatch, the update of all).
  """

  microbatches: int = 1


@dataclasses.dataclass(frozen=True)
class SampleConfig:
  """The text sample a run writes at its end.

  Attributes:
    prompt: what the sample continues.
    tokens: its length in new tokens (0: no sample).
    temperature / top_k: sampling settings (top_k None: the whole vocabulary).
  """

  prompt: str = "def "
  tokens: int = 160
  temperature: float = 0.7
  top_k: int | None = 40


# policy -> (ModelConfig.param_dtype, ModelConfig.dtype, OptimizerConfig.state_dtype)
PRECISION_POLICIES = {
    "fp32": ("float32", "float32", "float32"),
    "bf16_mixed": ("float32", "bfloat16", "float32"),
    "bf16_pure": ("bfloat16", "bfloat16", "bfloat16"),
}


@dataclasses.dataclass(frozen=True)
class PrecisionConfig:
  """A named dtype policy, applied when the Experiment is made (so every copy of the config,
  config.gin and the checkpoint's alike, holds the dtypes the run used).

  Attributes:
    policy: sets ModelConfig.param_dtype, ModelConfig.dtype and OptimizerConfig.state_dtype
      together: 'fp32', 'bf16_mixed' (fp32 params and optimizer state, bf16 compute) or
      'bf16_pure' (all bf16; pair with OptimizerConfig.stochastic_rounding). None leaves the
      three fields as they are set.
  """

  policy: str | None = None

  def __post_init__(self):
    if self.policy is not None and self.policy not in PRECISION_POLICIES:
      raise ValueError(f"PrecisionConfig.policy={self.policy!r}; choose one of "
                       f"{sorted(PRECISION_POLICIES)} or None.")

  @property
  def dtypes(self) -> tuple[str, str, str] | None:
    """(param_dtype, compute dtype, optimizer state dtype), or None without a policy."""
    return None if self.policy is None else PRECISION_POLICIES[self.policy]


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  """When to save and what to keep.

  Attributes:
    every_steps: save every this many steps (0: not by steps).
    every_minutes: save when this many minutes passed since the last save (0: not by time).
    keep_last: newest checkpoints kept; older ones are deleted only after a newer one finalised.
    keep_every: steps that are multiples of this are kept forever (None: none).
    async_save: write in a background thread; training continues while the files are written.
    local_dir: the fast local tier's directory on each host (local disk, or host RAM as
      /dev/shm/...; never a bucket). Each process writes its own shards under
      local_dir/<run>/process_<i>/ and keeps a copy of a peer's ('' : no local tier).
    local_every_steps: save to the local tier every this many steps (0: no local tier).
    local_keep: local checkpoints kept per process (and replicas kept per peer).
    local_replicas: peers (on other slices where there are) that each process's local
      checkpoint is copied to, so losing a host loses no local state (0 or 1).
  """

  every_steps: int = 0
  every_minutes: float = 0.0
  keep_last: int = 3
  keep_every: int | None = None
  async_save: bool = True
  local_dir: str = ""
  local_every_steps: int = 0
  local_keep: int = 2
  local_replicas: int = 1

  def __post_init__(self):
    if self.keep_last < 1:
      raise ValueError(f"CheckpointConfig.keep_last={self.keep_last} must be at least 1.")
    if self.local_every_steps < 0 or self.local_keep < 1 or self.local_replicas not in (0, 1):
      raise ValueError(
          f"CheckpointConfig.local_every_steps={self.local_every_steps}, local_keep="
          f"{self.local_keep}, local_replicas={self.local_replicas}: use a step count >= 0, "
          "keep >= 1, and 0 or 1 replicas.")
    if self.local_every_steps and not self.local_dir:
      raise ValueError(
          f"CheckpointConfig.local_every_steps={self.local_every_steps} needs "
          "CheckpointConfig.local_dir: a directory on each host's local disk or in RAM "
          "(/dev/shm/pretrainx, say).")
    if "://" in self.local_dir:
      raise ValueError(
          f"CheckpointConfig.local_dir={self.local_dir!r} is remote; the local tier lives on "
          "each host (local disk or /dev/shm). Buckets are for the persistent tier "
          "(the run directory).")

  @property
  def local_tier(self) -> bool:
    return bool(self.local_every_steps and self.local_dir)


GUARD_POLICIES = ("skip", "rollback", "raise")


@dataclasses.dataclass(frozen=True)
class GuardConfig:
  """What counts as a bad step and what happens then.

  Attributes:
    policy: 'skip' (drop the update, go on), 'rollback' (restore the last checkpoint and skip the
      batches since), or 'raise' (stop at the first bad step). The state is never updated with a
      bad step's update under any policy.
    spike_zscore: a loss more than this many standard deviations above its running mean is bad
      (None: only non-finite values are bad).
    spike_warmup: steps of statistics gathered before spikes are judged.
    ema_decay: decay of the running loss mean and variance.
    max_consecutive: this many bad steps in a row stop the run with an error.
  """

  policy: str = "skip"
  spike_zscore: float | None = 6.0
  spike_warmup: int = 50
  ema_decay: float = 0.98
  max_consecutive: int = 5

  def __post_init__(self):
    if self.policy not in GUARD_POLICIES:
      raise ValueError(f"GuardConfig.policy={self.policy!r}; choose one of {GUARD_POLICIES}.")


@dataclasses.dataclass(frozen=True)
class EmaConfig:
  """The parameter EMA.

  Attributes:
    decay: d in ema <- d * ema + (1 - d) * params, in [0, 1); 0 turns the EMA off (it would
      equal the params). Typical values are 0.999-0.9999 (an average over ~1/(1 - d) steps).
    start_step: before this step the EMA tracks the params (ema = params); averaging starts at it.
    debias: average only the params from start_step on, weighting them d^age and normalising by
      1 - d^k after k updates (Adam's bias correction of a zero-started EMA). The first update
      then copies the params and the effective decay grows towards d. Without debias, the params
      at start_step keep the weight d^k.
  """

  decay: float = 0.0
  start_step: int = 0
  debias: bool = False

  def __post_init__(self):
    if not 0.0 <= self.decay < 1.0:
      raise ValueError(f"EmaConfig.decay={self.decay} must be in [0, 1): 0 turns the EMA off, "
                       "0.999 averages over about 1000 steps.")
    if self.start_step < 0:
      raise ValueError(f"EmaConfig.start_step={self.start_step} is negative; use >= 0.")

  @property
  def enabled(self) -> bool:
    return self.decay > 0.0


@dataclasses.dataclass(frozen=True)
class HarnessConfig:
  """Downstream tasks of lm-evaluation-harness.

  Attributes:
    tasks: lm-eval task (or group) names; empty runs none.
    include_path: a directory of task YAML files (lm-eval's format) to add to its registry.
    every_steps: in training, evaluate every this many steps and at the end (0: not in training).
    num_fewshot: few-shot examples (None: each task's default).
    limit: documents per task (None: all), for quick checks.
    max_length: positions per scored row and the generation context (0: RunConfig.seq_len).
    batch_rows: rows per device batch (0: RunConfig.global_batch_size).
    max_gen_toks: the default generation budget of generate_until requests.
    seed: lm-eval's seeds (few-shot sampling) and the sampling key of generations.
  """

  tasks: tuple[str, ...] = ()
  include_path: str | None = None
  every_steps: int = 0
  num_fewshot: int | None = None
  limit: int | None = None
  max_length: int = 0
  batch_rows: int = 0
  max_gen_toks: int = 256
  seed: int = 1234

  def __post_init__(self):
    tasks = (self.tasks,) if isinstance(self.tasks, str) else tuple(self.tasks)
    object.__setattr__(self, "tasks", tuple(t for task in tasks for t in task.split(",") if t))
    if self.every_steps < 0 or self.max_length < 0 or self.batch_rows < 0:
      raise ValueError(f"HarnessConfig: every_steps={self.every_steps}, max_length="
                       f"{self.max_length} and batch_rows={self.batch_rows} must be >= 0.")
    if self.every_steps and not self.tasks:
      raise ValueError("HarnessConfig.every_steps is set but HarnessConfig.tasks is empty; name "
                       "the lm-eval tasks to run.")


LONG_CONTEXT_KINDS = ("passkey", "needle")


def _split_commas(values, cast):
  """('a,b', 'c') or 'a,b' or (1, 2) -> a flat tuple of `cast` values (gin and flags alike)."""
  values = (values,) if isinstance(values, (str, int, float)) else tuple(values)
  return tuple(cast(v) for value in values
               for v in (value.split(",") if isinstance(value, str) else (value,))
               if not isinstance(v, str) or v.strip())


@dataclasses.dataclass(frozen=True)
class LongContextEvalConfig:
  """Offline long-context retrieval (`pretrainx eval --needle`): a needle hidden in the run's own
  validation text at each depth of each context length, asked for back, answered greedily.

  Attributes:
    kinds: 'passkey' ("The pass key is 71432. Remember it." in filler; "What is the pass key?")
      and/or 'needle' ("The special magic number for <city> is <n>." in a haystack).
    lengths: prompt lengths in the model's tokens; each plus max_gen_toks must fit
      ModelConfig.max_seq_len.
    depths: where the needle sits, as a fraction of the haystack before it (0: start, 1: end).
    samples: prompts per (length, depth) cell, each with its own filler window and answer.
    seed: makes the prompts (filler windows, answers, cities); the same seed, the same tasks.
    domain: the DataConfig domain whose validation split is the haystack ('': the first).
    max_gen_toks: greedy generation budget per prompt (the answer is its first run of digits).
    batch_rows: prompts per generation batch (0: HarnessConfig.batch_rows, else
      RunConfig.global_batch_size).
    tasks_dir: where the lm-eval task YAML and JSON-lines files go (None:
      RUN_DIR/long_context/tasks, or a temporary directory when the run is in a bucket).
  """

  kinds: tuple[str, ...] = ("passkey",)
  lengths: tuple[int, ...] = (256, 512, 1024)
  depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
  samples: int = 4
  seed: int = 0
  domain: str = ""
  max_gen_toks: int = 16
  batch_rows: int = 0
  tasks_dir: str | None = None

  def __post_init__(self):
    kinds = tuple(dict.fromkeys(_split_commas(self.kinds, str.strip)))
    lengths = tuple(sorted(set(_split_commas(self.lengths, int))))
    depths = tuple(sorted(set(_split_commas(self.depths, float))))
    for name, value in (("kinds", kinds), ("lengths", lengths), ("depths", depths)):
      object.__setattr__(self, name, value)
      if not value:
        raise ValueError(f"LongContextEvalConfig.{name} is empty; name at least one.")
    bad = [k for k in kinds if k not in LONG_CONTEXT_KINDS]
    if bad:
      raise ValueError(f"LongContextEvalConfig.kinds: unknown {bad}; choose from "
                       f"{LONG_CONTEXT_KINDS}.")
    if lengths[0] < 1:
      raise ValueError(f"LongContextEvalConfig.lengths={lengths}: lengths are positive token "
                       "counts.")
    if depths[0] < 0.0 or depths[-1] > 1.0:
      raise ValueError(f"LongContextEvalConfig.depths={depths}: depths are fractions in [0, 1] "
                       "(0: the start of the haystack, 1: its end).")
    if self.samples < 1 or self.max_gen_toks < 1 or self.batch_rows < 0:
      raise ValueError(f"LongContextEvalConfig: samples={self.samples} and max_gen_toks="
                       f"{self.max_gen_toks} must be >= 1, batch_rows={self.batch_rows} >= 0.")
