"""What a run trains on: DataConfig and the values it nests (tasks, mixture stages, objectives).

The functions that read, tokenize, mix and pack live in pretrainx.data; these are only the
settings, checked as they are made.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Sequence

import numpy as np

from pretrainx import storage
from pretrainx.vocab import SPECIAL_TOKENS, ByteVocabulary

DOMAINS = ("prose", "code")  # the embedded corpus's domains (pretrainx.data.corpus)
PACKING_MODES = ("pack", "concat")


def default_store_root() -> str:
  """Where token stores live when DataConfig.store_dir is '': $PRETRAINX_DATA_DIR, else
  ~/.cache/pretrainx/stores."""
  return storage.resolve(os.environ.get("PRETRAINX_DATA_DIR", "~/.cache/pretrainx/stores"))

FORMATS = ("text", "jsonl", "parquet")


@dataclasses.dataclass(frozen=True)
class FileTask:
  """Documents from files matched by glob patterns.

  Attributes:
    name: the task (and mixture domain) name.
    train_patterns / validation_patterns: globs per split, local or over a bucket prefix
      (gs://bucket/data/*.jsonl, s3://...); files are streamed, never copied whole.
    format: 'text' (a document per file), 'jsonl' (per line), 'parquet' (per row) or 'auto'
      (from the file extension).
    text_field / metadata_field / score_field: record fields (jsonl and parquet).
    validation_fraction: without validation_patterns, hold out this share of the training
      documents, chosen by a hash of (file, index), never at random.
  """

  name: str = ""
  train_patterns: tuple[str, ...] = ()
  validation_patterns: tuple[str, ...] = ()
  format: str = "auto"
  text_field: str = "text"
  metadata_field: str | None = None
  score_field: str | None = None
  validation_fraction: float = 0.0

  def __post_init__(self):
    for f in ("train_patterns", "validation_patterns"):
      value = getattr(self, f)
      object.__setattr__(self, f, (value,) if isinstance(value, str) else tuple(value))
    if self.format not in FORMATS + ("auto",):
      raise ValueError(f"FileTask {self.name!r}: unknown format {self.format!r}; choose one of "
                       f"{FORMATS} or 'auto'.")
    if not self.name:
      raise ValueError("FileTask needs a name.")


@dataclasses.dataclass(frozen=True)
class CorpusTask:
  """One domain of the embedded default corpus; metadata is the document's name.

  `validation_fraction` is the share of the domain's bytes held out (whole documents, by a hash
  of their names); it must match DataConfig.validation_fraction for training to reuse the store.
  """

  domain: str = "prose"
  validation_fraction: float = 0.05

  @property
  def name(self) -> str:
    return self.domain


@dataclasses.dataclass(frozen=True)
class MixtureSpec:
  """A named SeqIO mixture of tasks with sampling rates."""

  name: str = ""
  rates: Mapping[str, float] = dataclasses.field(default_factory=dict)


OBJECTIVES = ("causal", "ul2")
SCORE_ORDERS = ("shuffle", "ascending", "descending")


@dataclasses.dataclass(frozen=True)
class Selection:
  """Which documents of some domains a stage trains on, in what order, by a stored score.

  Filters apply in this order: [min_score, max_score], then `sample`, then `top_fraction`. The
  subset and its order are a pure function of (DataConfig.seed, domain, stage, epoch), so the
  batch at step k stays a function of (seed, stages, k). With a selection, a stage's epochs of
  a domain count from the stage's start (a curriculum starts at its beginning).

  Attributes:
    score: the score set in each domain's token store: 'source' (FileTask.score_field at prepare
      time), a name written by `pretrainx score --name=...`, or 'length' (each document's token
      count, eos included, read from the store's offsets without reading tokens): min_score=L
      then keeps documents of at least L tokens, order='ascending' is a length curriculum.
    version: that score's version (None: the newest complete one).
    domains: the domains it applies to (empty: every domain).
    min_score / max_score: keep documents whose score lies in [min_score, max_score] (None: no
      bound). Whenever a filter is set, documents without a score (NaN) are dropped.
    sample: keep each document with probability clip(score, 0, 1) (a classifier's probability),
      drawn again every epoch.
    top_fraction: keep this share of the (remaining) documents with the highest scores (the
      lowest when `lowest`). With `temperature`, draw that many without replacement with
      probability proportional to exp(score / temperature) (Gumbel top-k) instead.
    order: 'shuffle' (a new permutation per epoch) or 'ascending' / 'descending' by score (a
      curriculum; ties broken by the shuffle).
    repeat: each epoch goes over the chosen subset this many times (repeating a chosen subset).
    loss_weight: weight each kept document's tokens by its score (self-normalised to mean 1 over
      the batch's tokens; NaN scores weigh 1).
    upsample / upsample_min_score: kept documents whose score is >= upsample_min_score appear
      `upsample` times in every pass (each copy at its own place in a shuffle); with
      score='length' this upsamples long documents within a domain, as ProLong does.
  """

  score: str = "source"
  version: int | None = None
  domains: tuple[str, ...] = ()
  min_score: float | None = None
  max_score: float | None = None
  sample: bool = False
  top_fraction: float | None = None
  lowest: bool = False
  temperature: float | None = None
  order: str = "shuffle"
  repeat: int = 1
  loss_weight: bool = False
  upsample: int = 1
  upsample_min_score: float | None = None

  def __post_init__(self):
    domains = (self.domains,) if isinstance(self.domains, str) else tuple(self.domains)
    object.__setattr__(self, "domains", domains)
    if self.order not in SCORE_ORDERS:
      raise ValueError(f"Selection.order={self.order!r}; choose one of {SCORE_ORDERS}.")
    if self.top_fraction is not None and not 0 < self.top_fraction <= 1:
      raise ValueError(f"Selection.top_fraction={self.top_fraction}; it must lie in (0, 1].")
    if self.temperature is not None and (self.temperature <= 0 or self.top_fraction is None):
      raise ValueError(f"Selection.temperature={self.temperature} needs to be > 0 and to come "
                       "with a top_fraction (it samples that many documents).")
    if (self.min_score is not None and self.max_score is not None and
        self.min_score > self.max_score):
      raise ValueError(f"Selection.min_score={self.min_score} > max_score={self.max_score}: "
                       "that keeps no documents.")
    if self.repeat < 1:
      raise ValueError(f"Selection.repeat={self.repeat}; it must be >= 1.")
    if self.upsample < 1 or (self.upsample > 1) != (self.upsample_min_score is not None):
      raise ValueError(f"Selection.upsample={self.upsample}, upsample_min_score="
                       f"{self.upsample_min_score}: give both (upsample >= 2 copies of the "
                       "documents scored >= upsample_min_score) or neither.")

  @property
  def filters(self) -> bool:
    return (self.min_score is not None or self.max_score is not None or self.sample or
            self.top_fraction is not None)


@dataclasses.dataclass(frozen=True)
class Stage:
  """From `start_step` on, domains are drawn with `weights` (normalised) and these objectives.

  Attributes:
    start_step: first step of the stage; the first stage starts at 0.
    weights: {domain: weight >= 0}; domains left out get 0. Empty means natural proportions (by
      training tokens).
    objective: 'causal' or 'ul2' (mixture of denoisers with a bidirectional prefix).
    metadata_prefix: prepend each document's metadata (URL/source) as MeCo does.
    control_tokens: prepend a control token chosen from the document's score.
    selections: Selection(...)s that filter, order, repeat or loss-weight documents of some
      domains by a stored score; at most one per domain.
    seq_len: positions per row from this stage on (None: the previous stage's, the first
      stage's being RunConfig.seq_len). A change repacks every domain at the new length (the
      rows count afresh from the stage's start, in a new shuffle) and compiles the step once
      for the new shape; the step count, LR schedule and optimizer state go on.
    global_batch_size: rows per step from this stage on (None: the previous stage's).
    tokens_per_step: instead of global_batch_size, the rows per step are tokens_per_step /
      seq_len (it must divide), so a longer context keeps the tokens of each update.
    rope: {ModelConfig rope_* field: value} from this stage on, on top of the earlier stages'
      (e.g. {'rope_theta': 500000.0} for an ABF base change with the context extension, or
      {'rope_scaling': 'yarn', 'rope_scaling_factor': 4.0}); the weights stay the same.
  """

  start_step: int = 0
  weights: Mapping[str, float] = dataclasses.field(default_factory=dict)
  objective: str = "causal"
  metadata_prefix: bool = False
  control_tokens: bool = False
  selections: tuple[Selection, ...] = ()
  seq_len: int | None = None
  global_batch_size: int | None = None
  tokens_per_step: int | None = None
  rope: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    value = self.selections
    object.__setattr__(self, "selections",
                       (value,) if isinstance(value, Selection) else tuple(value))
    object.__setattr__(self, "rope", dict(self.rope))
    for name in ("seq_len", "global_batch_size", "tokens_per_step"):
      if getattr(self, name) is not None and getattr(self, name) < 1:
        raise ValueError(f"Stage(start_step={self.start_step}).{name}={getattr(self, name)}; "
                         "use a positive number or None (the previous stage's).")
    if self.global_batch_size is not None and self.tokens_per_step is not None:
      raise ValueError(f"Stage(start_step={self.start_step}) sets both global_batch_size and "
                       "tokens_per_step; set one (tokens_per_step / seq_len gives the rows).")
    bad = sorted(k for k in self.rope if not str(k).startswith("rope_"))
    if bad:
      raise ValueError(f"Stage(start_step={self.start_step}).rope names {bad}; a stage may "
                       "change only ModelConfig's rope_* fields (rope_theta, rope_scaling, ...).")

  def selection_for(self, domain: str) -> Selection | None:
    """The selection that applies to `domain` in this stage, if any."""
    for sel in self.selections:
      if not sel.domains or domain in sel.domains:
        return sel
    return None


def check_stages(stages: Sequence[Stage], domains: Sequence[str]) -> None:
  """Clear errors for schedules that cannot be meant."""
  if not stages:
    raise ValueError("the mixture schedule has no stages; give at least one Stage(start_step=0).")
  if stages[0].start_step != 0:
    raise ValueError(f"the first stage starts at step {stages[0].start_step}; it must start at 0.")
  starts = [s.start_step for s in stages]
  if starts != sorted(set(starts)):
    raise ValueError(f"stage start steps {starts} must be strictly increasing.")
  for s in stages:
    unknown = sorted(set(s.weights) - set(domains))
    if unknown:
      raise ValueError(f"stage at step {s.start_step} weights unknown domain(s) {unknown}; the "
                       f"data has {list(domains)} (add them to DataConfig.domains or tasks).")
    bad = {d: w for d, w in s.weights.items() if not np.isfinite(w) or w < 0}
    if bad:
      raise ValueError(f"stage at step {s.start_step} has negative or non-finite weights {bad}; "
                       "weights must be >= 0.")
    if s.weights and sum(s.weights.values()) <= 0:
      raise ValueError(f"stage at step {s.start_step} gives every domain weight 0.")
    for sel in s.selections:
      unknown = sorted(set(sel.domains) - set(domains))
      if unknown:
        raise ValueError(f"stage at step {s.start_step}: a Selection names unknown domain(s) "
                         f"{unknown}; the data has {list(domains)}.")
    for d in domains:
      if sum(1 for sel in s.selections if not sel.domains or d in sel.domains) > 1:
        raise ValueError(f"stage at step {s.start_step} has more than one Selection for domain "
                         f"{d!r}; give each domain at most one.")
    if s.objective not in OBJECTIVES:
      raise ValueError(f"stage at step {s.start_step} has objective {s.objective!r}; choose one "
                       f"of {OBJECTIVES}.")


MODES = ("R", "S", "X")


MODE_TOKENS = tuple(f"<|{m}|>" for m in MODES)


@dataclasses.dataclass(frozen=True)
class Denoiser:
  """One UL2 denoiser.

  mode 'R' (regular) / 'X' (extreme): spans of about `mean_span` tokens, `corruption_rate` of the
  piece in all, are each replaced by a sentinel and predicted after the corrupted input.
  mode 'S' (sequential, prefix-LM): the last `corruption_rate` of the piece is predicted from the
  rest (`mean_span` is unused). `weight`: relative frequency in the mixture.
  """

  mode: str = "R"
  mean_span: float = 3.0
  corruption_rate: float = 0.15
  weight: float = 1.0

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"Denoiser.mode={self.mode!r}; choose one of {MODES}.")
    if not 0 < self.corruption_rate < 1 or self.mean_span < 1 or self.weight < 0:
      raise ValueError(f"bad {self}: need 0 < corruption_rate < 1, mean_span >= 1, weight >= 0.")


# UL2's mixture (Tay et al. 2022): R = regular, S = sequential, X = extreme denoising.
UL2_DENOISERS = (
    Denoiser("R", 3, 0.15, 1.0), Denoiser("R", 8, 0.15, 1.0), Denoiser("S", 1, 0.25, 2.0),
    Denoiser("X", 3, 0.5, 0.5), Denoiser("X", 8, 0.5, 0.5), Denoiser("X", 64, 0.15, 0.5),
    Denoiser("X", 64, 0.5, 0.5))


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
  """Settings of the UL2 objective and of conditioning prefixes.

  Attributes:
    denoisers: the UL2 mixture; each piece draws one denoiser with probability weight / sum.
    metadata_template: the MeCo line put before a document, '{}' standing for its metadata.
    control_thresholds: ((threshold, token), ...) with distinct thresholds. A document whose score
      is NaN or missing gets no control token; otherwise it gets the token of the highest
      threshold <= score, and if no threshold is <= score, `control_default`.
    control_default: the token for scores below every threshold; None gives no token then.
  Control tokens must be SPECIAL_TOKENS names other than the UL2 mode tokens.
  """

  denoisers: tuple[Denoiser, ...] = UL2_DENOISERS
  metadata_template: str = "URL: {}\n\n"
  control_thresholds: tuple[tuple[float, str], ...] = ((0.5, "<|good|>"),)
  control_default: str | None = "<|bad|>"

  def __post_init__(self):
    object.__setattr__(self, "denoisers", tuple(self.denoisers))
    thresholds = tuple((float(t), str(name)) for t, name in self.control_thresholds)
    object.__setattr__(self, "control_thresholds", thresholds)
    if not self.denoisers or sum(d.weight for d in self.denoisers) <= 0:
      raise ValueError("ObjectiveConfig.denoisers needs at least one denoiser of positive weight.")
    names = [name for _, name in thresholds] + [self.control_default] * bool(self.control_default)
    allowed = tuple(t for t in SPECIAL_TOKENS if t not in MODE_TOKENS)
    for name in names:
      if name not in allowed:
        raise ValueError(f"control token {name!r} in ObjectiveConfig; choose one of {allowed}.")
    values = [t for t, _ in thresholds]
    if len(set(values)) != len(values) or not all(np.isfinite(values)):
      raise ValueError(f"ObjectiveConfig.control_thresholds={thresholds}: thresholds must be "
                       "finite and distinct.")


REWEIGHT_METHODS = ("none", "excess_loss", "loss_slope")
PACKING_ORDERS = ("shuffle", "neighbours")


@dataclasses.dataclass(frozen=True)
class ReweightConfig:
  """Online domain reweighting: the mixture's weights follow the per-domain training loss.

  Every `every_steps` steps (a multiple of RunConfig.log_every, where the losses are read) the
  weights take an exponentiated-gradient step, w <- w * exp(learning_rate * signal) normalised,
  then mixed with the stage's weights by `smoothing` (DoReMi). The signal per domain is
    'excess_loss': the mean training loss since the last update minus `reference_losses[d]`
      (clipped at 0), as DoReMi against a reference model;
    'loss_slope': how fast the domain's loss falls (the negated slope over the window, per step),
      so domains still being learned gain weight (Skill-It / learnability style).
  The weights apply from two steps after the update (the losses are read one step late), are
  saved in the checkpoint so a resumed run reproduces them, and are logged as
  data/<domain>/weight and plotted to RUN_DIR/domain_weights.png.

  Attributes:
    method: 'none', 'excess_loss' or 'loss_slope'.
    every_steps: steps between updates.
    start_step: no update before this step.
    learning_rate: the exponentiated-gradient step size.
    smoothing: the share of the stage's own weights mixed into every update (keeps all domains
      sampled).
    reference_losses: {domain: loss} of a reference model, for 'excess_loss' (missing: 0).
  """

  method: str = "none"
  every_steps: int = 10
  start_step: int = 0
  learning_rate: float = 1.0
  smoothing: float = 0.1
  reference_losses: Mapping[str, float] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    object.__setattr__(self, "reference_losses", dict(self.reference_losses))
    if self.method not in REWEIGHT_METHODS:
      raise ValueError(f"ReweightConfig.method={self.method!r}; choose one of "
                       f"{REWEIGHT_METHODS}.")
    if self.every_steps < 1 or not 0 <= self.smoothing <= 1 or self.learning_rate < 0:
      raise ValueError(f"bad {self}: need every_steps >= 1, 0 <= smoothing <= 1, "
                       "learning_rate >= 0.")

  @property
  def enabled(self) -> bool:
    return self.method != "none"


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where tokens come from, how they are mixed over training, packed and shuffled.

  Attributes:
    domains: the mixture's domains: embedded-corpus domains ('prose', 'code') or names of `tasks`.
    tasks: FileTask specs (pretrainx.data.tasks) for user data; prepare their token stores first
      with `python -m pretrainx data prepare NAME --gin_file=...`.
    stages: the mixture schedule, Stage(start_step, weights, objective, metadata_prefix,
      control_tokens) in order; empty means one stage of natural proportions (by training tokens).
    packing: 'pack' (whole pieces per row, padded) or 'concat' (concatenate and split).
    objective: UL2 denoisers, metadata template and control-token thresholds.
    store_dir: where token stores live (a local directory, gs://... or s3://...); '' means
      $PRETRAINX_DATA_DIR or ~/.cache/pretrainx/stores.
    validation_fraction: share of each embedded-corpus domain's bytes held out for evaluation.
    vocabulary: any object with encode/decode/vocab_size/eos_id/pad_id/name (bytes by default).
    seed: shuffle and mixture seed; the batch at step k depends on (seed, stages, k) only.
    prefetch: batches prepared ahead of the training step by grain's reader threads.
    packing_order: 'shuffle' (documents packed in a random order) or 'neighbours' (in-context
      pretraining: each document is packed next to its nearest neighbours by a hashed n-gram
      embedding).
    cross_document_attention: let the pieces of a row attend to each other (one segment per
      row, positions running through it); False keeps packed documents apart.
    reweight: online domain reweighting (ReweightConfig).
  """

  domains: tuple[str, ...] = DOMAINS
  tasks: tuple[Any, ...] = ()
  stages: tuple[Stage, ...] = ()
  packing: str = "pack"
  objective: ObjectiveConfig = ObjectiveConfig()
  store_dir: str = ""
  validation_fraction: float = 0.05
  vocabulary: Any = ByteVocabulary()
  seed: int = 0
  prefetch: int = 2
  packing_order: str = "shuffle"
  cross_document_attention: bool = False
  reweight: ReweightConfig = ReweightConfig()

  def __post_init__(self):
    for name in ("domains", "tasks", "stages"):  # gin gives lists; keep configs comparable
      object.__setattr__(self, name, tuple(getattr(self, name)))
    if self.packing not in PACKING_MODES:
      raise ValueError(f"DataConfig.packing={self.packing!r}; choose one of {PACKING_MODES}.")
    if not self.domains:
      raise ValueError("DataConfig.domains is empty; name at least one domain.")
    if self.packing_order not in PACKING_ORDERS:
      raise ValueError(f"DataConfig.packing_order={self.packing_order!r}; choose one of "
                       f"{PACKING_ORDERS}.")

  @property
  def store_root(self) -> str:
    return default_store_root() if not self.store_dir else storage.resolve(self.store_dir)

  @property
  def schedule_stages(self) -> tuple[Stage, ...]:
    return tuple(self.stages) or (Stage(),)

  @property
  def uses_prefix_lm(self) -> bool:
    return any(s.objective == "ul2" for s in self.schedule_stages)

  @property
  def uses_loss_weights(self) -> bool:
    """Batches carry `loss_weight` (float32 [batch, seq]) when a stage weights by score."""
    return any(sel.loss_weight for s in self.schedule_stages for sel in s.selections)
