"""Knowledge distillation (DistillConfig): which teacher, how its distribution is truncated and
compared with the student's, and how much of the loss it weighs at each step.

The loss itself is pretrainx/train/distill_loss.py; the teacher is loaded beside train/init.py.
"""

from __future__ import annotations

import dataclasses

ALPHA_SCHEDULES = ("constant", "linear", "until")
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
TRUNCATIONS = ("renormalize", "other")
TEACHER_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class DistillConfig:
  """Logit distillation from a frozen teacher: loss = (1 - alpha) * CE + alpha * T^2 * KD.

  CE and KD are both means over the loss tokens; T^2 keeps the KD gradients' size independent of
  the temperature (Hinton et al. 2015), so alpha means the same at any T.

  Attributes:
    teacher: '' (off), or the teacher's source: a Hugging Face model directory, a pretrainx run
      directory, its checkpoints/ directory or a params export, local or in a bucket. It must
      share the student's vocabulary.
    teacher_step: the checkpoint step of a pretrainx teacher (None: its newest).
    temperature: T > 0; both distributions are softmax(logits / T) in the KD term.
    alpha: the weight of KD against next-token CE, in [0, 1] (0: plain training).
    alpha_schedule: 'constant'; 'linear' (alpha decays linearly to 0 at alpha_end_step, or at the
      run's last step when alpha_end_step is 0); 'until' (alpha until alpha_end_step, then CE
      only: SALT).
    alpha_end_step: where 'linear' reaches 0 (0: the run's end) and where 'until' stops KD.
    divergence: 'forward_kl' KL(teacher || student), 'reverse_kl' KL(student || teacher), or
      'jsd': beta * KL(teacher || M) + (1 - beta) * KL(student || M), M = beta * teacher +
      (1 - beta) * student (symmetric at beta = 0.5).
    jsd_beta: beta of 'jsd', in (0, 1).
    top_k: keep only the teacher's k most likely tokens (0: all).
    top_p: keep the teacher's smallest most-likely set with probability >= top_p (1.0: all).
    truncation: what happens to the dropped mass: 'renormalize' (teacher and student both
      renormalised over the kept tokens) or 'other' (one extra bucket holds the rest of each).
    teacher_dtype: the teacher's compute and storage dtype ('float32' or 'bfloat16').
    cache: '' (the teacher runs online, in the train step), or the name of a teacher cache that
      `pretrainx distill cache` wrote beside every train domain's token store: the batches then
      carry the teacher's top-k ids and log-probs and the teacher is never loaded. Its top-k is
      at temperature 1, so 'renormalize' works at any temperature and top_k <= the cache's k;
      'other' and top_p need temperature 1.
    cache_version: the cache's version (None: its newest complete one).
  """

  teacher: str = ""
  teacher_step: int | None = None
  temperature: float = 1.0
  alpha: float = 0.5
  alpha_schedule: str = "constant"
  alpha_end_step: int = 0
  divergence: str = "forward_kl"
  jsd_beta: float = 0.5
  top_k: int = 0
  top_p: float = 1.0
  truncation: str = "renormalize"
  teacher_dtype: str = "bfloat16"
  cache: str = ""
  cache_version: int | None = None

  def __post_init__(self):
    if not 0.0 <= self.alpha <= 1.0:
      raise ValueError(f"DistillConfig.alpha={self.alpha} is outside [0, 1]; use 0 for plain "
                       "training, 1 for KD only.")
    if self.temperature <= 0:
      raise ValueError(f"DistillConfig.temperature={self.temperature}; use a positive "
                       "temperature (1.0: the teacher's own distribution).")
    _choice("alpha_schedule", self.alpha_schedule, ALPHA_SCHEDULES)
    _choice("divergence", self.divergence, DIVERGENCES)
    _choice("truncation", self.truncation, TRUNCATIONS)
    _choice("teacher_dtype", self.teacher_dtype, TEACHER_DTYPES)
    if self.alpha_end_step < 0:
      raise ValueError(f"DistillConfig.alpha_end_step={self.alpha_end_step} is negative; use 0 "
                       "(the run's end) or a step.")
    if self.alpha_schedule == "until" and self.alpha_end_step < 1:
      raise ValueError("DistillConfig.alpha_schedule='until' needs alpha_end_step, the step "
                       "where KD stops; set it to a positive step.")
    if not 0.0 < self.jsd_beta < 1.0:
      raise ValueError(f"DistillConfig.jsd_beta={self.jsd_beta} is outside (0, 1); use 0.5 for "
                       "the symmetric Jensen-Shannon divergence.")
    if self.top_k < 0:
      raise ValueError(f"DistillConfig.top_k={self.top_k} is negative; use 0 (all tokens) or "
                       "the number of teacher tokens to keep.")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"DistillConfig.top_p={self.top_p} is outside (0, 1]; use 1.0 to keep "
                       "every token.")

    if self.cache and self.temperature != 1.0 and (self.truncation == "other" or
                                                   self.top_p < 1.0):
      raise ValueError("a teacher cache holds log-probs at temperature 1, so truncation='other' "
                       "and top_p need DistillConfig.temperature=1.0; use "
                       "truncation='renormalize' and top_k, or an online teacher.")

  @property
  def enabled(self) -> bool:
    """Distillation is on: a teacher (online) or a cache of one, and alpha above 0."""
    return bool(self.teacher or self.cache) and self.alpha > 0.0

  @property
  def online(self) -> bool:
    """The teacher runs in the train step (no cache)."""
    return self.enabled and not self.cache

  def active(self, step: int, total_steps: int) -> bool:
    """Whether the update of `step` (0-based) mixes in KD at all: alpha > 0 there. Past
    'until''s or 'linear''s end step the teacher is not run (nor its cache read)."""
    if not self.enabled:
      return False
    return self.alpha_schedule == "constant" or step < self.end_step(total_steps)

  @property
  def truncated(self) -> bool:
    return self.top_k > 0 or self.top_p < 1.0

  def end_step(self, total_steps: int) -> int:
    """The step where alpha reaches 0 ('linear') or KD stops ('until')."""
    return self.alpha_end_step or total_steps


def _choice(field: str, value: str, choices: tuple[str, ...]) -> None:
  if value not in choices:
    raise ValueError(f"DistillConfig.{field}={value!r}; choose one of "
                     f"{', '.join(map(repr, choices))}.")
