"""The optimizer (OptimizerConfig, with one group of settings per optimizer that has its own) and
the learning-rate schedule (ScheduleConfig), as separate sections."""

from __future__ import annotations

import dataclasses

STATE_DTYPES = ("float32", "bfloat16")
SCHEDULES = ("cosine", "wsd", "constant", "rewarm", "infinite", "inverse_sqrt")
DECAY_SHAPES = ("linear", "1-sqrt")
REWARM_DECAYS = ("cosine", "wsd")
OPTIMIZERS = ("adamw", "adafactor", "lion", "muon", "sophia")


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
  """The learning rate over the run's `steps`, relative to the peak OptimizerConfig.learning_rate.

  Attributes:
    name: the schedule (peak = OptimizerConfig.learning_rate, end = end_lr_ratio * peak), always
      starting with a linear warmup of warmup_steps from 0 to the peak (capped at the steps):
      'cosine': cosine decay from the peak to `end` at the last step.
      'wsd': warmup, stable at the peak, then a decay to `end` over the last decay_fraction of
        the steps, shaped by decay_shape.
      'constant': the peak after warmup.
      'rewarm': continual pretraining from a trained checkpoint: before rewarm_start_step the LR
        is rewarm_start_lr_ratio * peak; from there a linear warmup over warmup_steps goes from
        rewarm_start_lr_ratio * peak to the (new) peak, then rewarm_decay picks 'cosine' (to
        `end` at the last step) or 'wsd' (stable, then decay over the last decay_fraction of the
        steps after rewarm_start_step). With rewarm_start_lr_ratio = 0 and rewarm_start_step = 0,
        'rewarm' with 'cosine' equals 'cosine'.
      'infinite': the infinite schedule of Ibrahim et al. 2024 ("Simple and Scalable Strategies
        to Continually Pre-train LLMs"): warmup, a cosine cooldown over cooldown_steps from the
        peak to infinite_constant_ratio * peak, a long constant phase at that LR, and a final
        annealing over the last decay_fraction of the steps to `end`, shaped by decay_shape.
        Before the annealing the LR does not depend on the run's length, so a checkpoint from the
        constant phase can be continued with more steps without a jump in the LR.
      'inverse_sqrt': warmup, then peak * sqrt(warmup_steps / step) (peak / 2 at 4 * warmup);
        needs warmup_steps >= 1.
    end_lr_ratio: the final LR of 'cosine', 'wsd', 'rewarm' and 'infinite', as a fraction of the
      peak.
    decay_fraction / decay_shape: the length (fraction of the steps) and shape ('linear' or
      '1-sqrt') of the final decay of 'wsd', 'rewarm' with 'wsd', and 'infinite'.
    rewarm_start_lr_ratio: where the rewarm starts, as a fraction of the peak (in [0, 1]).
    rewarm_decay: what follows the rewarm: 'cosine' or 'wsd'.
    rewarm_start_step: the step the rewarm begins at; set it to the restored step counter when a
      continued run keeps the counter of its checkpoint (0 when the counter is reset).
    cooldown_steps: 'infinite': steps of the cosine cooldown from the peak to the constant LR.
    infinite_constant_ratio: 'infinite': the constant phase's LR as a fraction of the peak.
    warmup_steps: linear warmup from 0 to the peak (capped at the run's steps).
  """

  name: str = "cosine"
  warmup_steps: int = 20
  end_lr_ratio: float = 0.1
  decay_fraction: float = 0.2
  decay_shape: str = "linear"
  rewarm_start_lr_ratio: float = 0.0
  rewarm_decay: str = "cosine"
  rewarm_start_step: int = 0
  cooldown_steps: int = 0
  infinite_constant_ratio: float = 0.5

  def __post_init__(self):
    """Clear errors for schedule fields that cannot be meant."""
    if self.name not in SCHEDULES:
      raise ValueError(f"ScheduleConfig.name={self.name!r}; choose one of {SCHEDULES}.")
    if self.decay_shape not in DECAY_SHAPES:
      raise ValueError(f"ScheduleConfig.decay_shape={self.decay_shape!r}; use 'linear' or '1-sqrt'.")
    if self.warmup_steps < 0:
      raise ValueError(f"ScheduleConfig.warmup_steps={self.warmup_steps} is negative; use >= 0.")
    if not 0.0 <= self.decay_fraction <= 1.0:
      raise ValueError(f"ScheduleConfig.decay_fraction={self.decay_fraction} is the fraction of "
                       "the steps spent in the final decay; use a value in [0, 1].")
    if self.end_lr_ratio < 0:
      raise ValueError(f"ScheduleConfig.end_lr_ratio={self.end_lr_ratio} is negative; use >= 0.")
    self._check_rewarm_and_infinite()

  def _check_rewarm_and_infinite(self):
    if self.rewarm_decay not in REWARM_DECAYS:
      raise ValueError(f"ScheduleConfig.rewarm_decay={self.rewarm_decay!r}; choose one of "
                       f"{REWARM_DECAYS}.")
    if not 0.0 <= self.rewarm_start_lr_ratio <= 1.0:
      raise ValueError(f"ScheduleConfig.rewarm_start_lr_ratio={self.rewarm_start_lr_ratio} is "
                       "a fraction of the peak learning rate; use a value in [0, 1].")
    if self.rewarm_start_step < 0:
      raise ValueError(f"ScheduleConfig.rewarm_start_step={self.rewarm_start_step} is negative; "
                       "use 0 or the step counter the continued run starts from.")
    if self.cooldown_steps < 0:
      raise ValueError(f"ScheduleConfig.cooldown_steps={self.cooldown_steps} is negative; "
                       "use >= 0.")
    if not 0.0 < self.infinite_constant_ratio <= 1.0:
      raise ValueError(f"ScheduleConfig.infinite_constant_ratio={self.infinite_constant_ratio} is "
                       "a fraction of the peak learning rate; use a value in (0, 1].")
    if self.name == "infinite" and self.end_lr_ratio > self.infinite_constant_ratio:
      raise ValueError(f"schedule 'infinite' anneals from infinite_constant_ratio="
                       f"{self.infinite_constant_ratio} down to end_lr_ratio={self.end_lr_ratio}; "
                       "set end_lr_ratio <= infinite_constant_ratio.")
    if self.name == "inverse_sqrt" and self.warmup_steps < 1:
      raise ValueError("schedule 'inverse_sqrt' decays as peak * sqrt(warmup_steps / step) and "
                       f"needs warmup_steps >= 1 (got {self.warmup_steps}).")


@dataclasses.dataclass(frozen=True)
class MuonConfig:
  """Muon's settings (OptimizerConfig.name = 'muon').

  Attributes:
    exclude: regexes of params Muon leaves to AdamW (embeddings, output layer, norms).
    fallback: 'adamw' handles excluded and non-matrix params; None makes any non-matrix param
      that Muon would get an error.
    consistent_rms: scale updates by this * sqrt(max(fan_in, fan_out)) so their RMS matches
      AdamW's (Moonlight's shape-aware scaling); None leaves them unscaled.
  """

  exclude: tuple[str, ...] = ("embed", "lm_head", "norm")
  fallback: str | None = "adamw"
  consistent_rms: float | None = 0.2

  def __post_init__(self):
    object.__setattr__(self, "exclude", tuple(self.exclude))
    if self.fallback not in (None, "adamw"):
      raise ValueError(f"MuonConfig.fallback={self.fallback!r}; use 'adamw' or None.")


@dataclasses.dataclass(frozen=True)
class SophiaConfig:
  """Sophia's settings (OptimizerConfig.name = 'sophia'): the Hessian scale `gamma` and the steps
  between Gauss-Newton-Bartlett Hessian estimates (`interval`)."""

  gamma: float = 0.01
  interval: int = 10


@dataclasses.dataclass(frozen=True)
class AdafactorConfig:
  """Adafactor's settings (OptimizerConfig.name = 'adafactor'): it factors the second moment of
  dims at least `min_dim` large."""

  min_dim: int = 128


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """The optimizer; its learning-rate schedule is the ScheduleConfig section.

  Attributes:
    name: 'adamw', 'adafactor', 'lion', 'muon' or 'sophia'.
    learning_rate: peak learning rate.
    b1 / b2 / eps: the moment decays and epsilon of AdamW (also Lion's b1/b2, Sophia's, and
      Muon's AdamW fallback).
    weight_decay: decoupled weight decay; not applied to params whose '/'-joined path matches any
      of no_decay_patterns (regexes), nor to 1-D params when decay_vectors is False.
    clip_grad_norm: global-norm clipping threshold; None disables it.
    state_dtype: dtype of the first moment ('float32' or 'bfloat16').
    stochastic_rounding: add updates to bf16 params in fp32 and round stochastically, so updates
      smaller than half a bf16 ulp still move the params in expectation.
    muon / sophia / adafactor: the settings only that optimizer has. In gin they are bound on
      their own classes (`MuonConfig.exclude = ...`), which fill these fields.
  """

  name: str = "adamw"
  learning_rate: float = 3e-3
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  no_decay_patterns: tuple[str, ...] = ("norm", "embed")
  decay_vectors: bool = False
  clip_grad_norm: float | None = 1.0
  state_dtype: str = "float32"
  stochastic_rounding: bool = False
  muon: MuonConfig = MuonConfig()
  sophia: SophiaConfig = SophiaConfig()
  adafactor: AdafactorConfig = AdafactorConfig()

  def __post_init__(self):
    object.__setattr__(self, "no_decay_patterns", tuple(self.no_decay_patterns))
    if self.name not in OPTIMIZERS:
      raise ValueError(f"unknown optimizer OptimizerConfig.name={self.name!r}; choose one of "
                       f"{OPTIMIZERS}.")
    if self.state_dtype not in STATE_DTYPES:
      raise ValueError(f"OptimizerConfig.state_dtype={self.state_dtype!r}; choose one of "
                       f"{list(STATE_DTYPES)}.")
