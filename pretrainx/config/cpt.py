"""Continual pretraining: where a run starts from (InitConfig), what trains (TuneConfig, LoRA) and
how a softmax model is linearized (LinearizeConfig)."""

from __future__ import annotations

import dataclasses

NEW_EMBEDDINGS = ("mean", "focus", "random")  # pretrainx/cpt/vocab.py METHODS


@dataclasses.dataclass(frozen=True)
class InitConfig:
  """How a run starts when its run directory holds no checkpoint yet.

  Attributes:
    source: '' for random init; else a Hugging Face model directory (config.json + safetensors),
      a pretrainx run directory, its checkpoints/ directory, or a params export (`export`),
      local or in a bucket (gs://...; s3:// for Hugging Face directories).
    step: the checkpoint step of a pretrainx source (None: its newest).
    keep_optimizer: continue the source's optimizer state (same model and optimizer only).
    keep_step: continue the source's step counter, and so its place in the LR schedule.
    expand_every: Llama-Pro block expansion: after every this many source blocks insert a copy
      whose output projections are zero, so the grown model computes the same function (0: off).
    stack_factor: G_stack depth growth: repeat the source's whole layer stack this many times.
    grow_width: function-preserving width growth to this run's ModelConfig embed_dim, num_heads,
      num_kv_heads and mlp_dim (head_dim stays the source's): '' off, 'hypercloning' (integer
      multiples) or 'bert2bert' (embed an integer multiple, heads and mlp any larger size);
      applied before depth growth (pretrainx.cpt.width).
    grow_width_noise: std of the symmetry-breaking noise on the copied weights, as a fraction of
      each tensor's std; it sums to zero over the copies, so the function stays exact (0: none).
    extend_vocab_from: vocabulary extension: the tokenizer (tokenizer.json or its directory) the
      source was trained with, or 'source' for the source's own; DataConfig.vocabulary is its
      extension (`pretrainx vocab extend`: old ids unchanged) and ModelConfig.vocab_size is that
      of the run. The embedding and an untied output head get rows for the new ids ('': off).
    new_embeddings: how new rows start: 'mean' of the old-token pieces of each new token
      (FVT/OFA), 'focus' (a sparsemax-weighted mean over overlapping old tokens, FOCUS-style),
      or 'random' (the model's init); formulas in pretrainx/cpt/vocab.py.
    new_rows_only_steps: for this run's first this many steps only the new rows train (the
      other params get zero updates; their optimizer moments still warm up). 0: off.
  """

  source: str = ""
  step: int | None = None
  keep_optimizer: bool = False
  keep_step: bool = False
  expand_every: int = 0
  stack_factor: int = 1
  grow_width: str = ""
  grow_width_noise: float = 0.0
  extend_vocab_from: str = ""
  new_embeddings: str = "mean"
  new_rows_only_steps: int = 0

  def __post_init__(self):
    self._check_vocab_extension()
    if self.stack_factor < 1 or self.expand_every < 0:
      raise ValueError("InitConfig.stack_factor must be >= 1 and expand_every >= 0.")
    growth = self.stack_factor > 1 or self.expand_every > 0 or bool(self.grow_width)
    if growth and self.keep_optimizer:
      raise ValueError("InitConfig.keep_optimizer cannot be combined with growth (expand_every "
                       "/ stack_factor / grow_width): the optimizer state has the old shapes.")
    if self.grow_width not in ("", "hypercloning", "bert2bert") or self.grow_width_noise < 0:
      raise ValueError(f"InitConfig.grow_width={self.grow_width!r} / grow_width_noise="
                       f"{self.grow_width_noise}; use '', 'hypercloning' or 'bert2bert' and a "
                       "noise std >= 0.")

  def _check_vocab_extension(self):
    if self.new_embeddings not in NEW_EMBEDDINGS:
      raise ValueError(f"InitConfig.new_embeddings={self.new_embeddings!r}; choose one of "
                       f"{NEW_EMBEDDINGS}.")
    if self.new_rows_only_steps < 0:
      raise ValueError(f"InitConfig.new_rows_only_steps={self.new_rows_only_steps}; use 0 (off) "
                       "or a number of steps.")
    if self.extend_vocab_from and not self.source:
      raise ValueError("InitConfig.extend_vocab_from extends a source's vocabulary; set "
                       "InitConfig.source too.")
    if self.extend_vocab_from and self.keep_optimizer:
      raise ValueError("InitConfig.keep_optimizer cannot be combined with extend_vocab_from: the "
                       "optimizer state has the old vocabulary's shapes; unset keep_optimizer.")
    if self.new_rows_only_steps and not self.extend_vocab_from:
      raise ValueError("InitConfig.new_rows_only_steps trains the rows vocabulary extension adds; "
                       "set InitConfig.extend_vocab_from too.")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Low-rank adapters W + (alpha / rank) * A @ B on the params whose path matches a target.

  Factorisation convention: a kernel's dims split into leading layer axis (scanned blocks only,
  kept as a batch axis), input dims (those the layer contracts with its activations) and output
  dims. `o_proj` [heads, head_dim, embed] has inputs (heads, head_dim) and output (embed,); every
  other kernel has its first dim as input: q/k/v_proj [embed | heads, head_dim], gate/up_proj
  [embed | mlp], down_proj [mlp | embed]. Then A: [layers?, *in, rank], B: [layers?, rank, *out].

  Attributes:
    rank: r, the adapter rank (>= 1).
    alpha: the adapter output is scaled by alpha / rank.
    targets: regexes (re.search) over param paths; each must match at least one param with 2 or
      more non-layer dims (vectors such as norm scales, and biases, are never adapted).
    init_std: std of A's normal init; None means 1 / sqrt(fan_in) (fan_in = product of the input
      dims). B starts at zero, so the adapted model equals the base model at init.
  """

  rank: int = 8
  alpha: float = 16.0
  targets: tuple[str, ...] = (r"attention/(q|k|v|o)_proj",)
  init_std: float | None = None

  def __post_init__(self):
    if isinstance(self.targets, list):  # gin gives lists; keep configs comparable
      object.__setattr__(self, "targets", tuple(self.targets))
    if self.rank < 1:
      raise ValueError(f"LoraConfig.rank={self.rank}; use a positive integer rank.")
    if not self.targets or isinstance(self.targets, str):
      raise ValueError(f"LoraConfig.targets={self.targets!r}; give a tuple of one or more regexes "
                       "over param paths, e.g. (r'attention/(q|k|v|o)_proj',).")
    if self.init_std is not None and self.init_std <= 0:
      raise ValueError(f"LoraConfig.init_std={self.init_std}; use a positive std or None.")

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


@dataclasses.dataclass(frozen=True)
class TuneConfig:
  """What trains.

  Attributes:
    lora: low-rank adapters on the params LoraConfig.targets match; only they train.
    train: regexes over param paths ('layers/attention/q_proj'): only matching params train
      (empty: all).
    freeze: regexes of params that do not train.
    new_blocks_only: with InitConfig.expand_every, train only the inserted blocks (Llama-Pro).
    new_width_only: with InitConfig.grow_width, train only the copies width growth made: per
      tensor the entries at a copied embed channel, head or neuron; the source's own entries (and
      the tensors nothing grew) stay as loaded.
    frozen_experts: Lifelong-MoE: the first this many routed experts of every MoE layer and their
      router columns do not train (the experts a source had before more were added; 0: off).
  """

  lora: LoraConfig | None = None
  train: tuple[str, ...] = ()
  freeze: tuple[str, ...] = ()
  new_blocks_only: bool = False
  frozen_experts: int = 0
  new_width_only: bool = False

  def __post_init__(self):
    if self.frozen_experts < 0:
      raise ValueError(f"TuneConfig.frozen_experts={self.frozen_experts}; use 0 (off) or the "
                       "number of old experts to freeze.")
    for name in ("train", "freeze"):
      value = getattr(self, name)
      object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))
    if self.lora is not None and (self.train or self.freeze or self.new_blocks_only
                                  or self.frozen_experts or self.new_width_only):
      raise ValueError("TuneConfig.lora trains the adapters only; leave train, freeze, "
                       "new_blocks_only, frozen_experts and new_width_only unset with it.")
    if self.new_width_only and self.new_blocks_only:
      raise ValueError("TuneConfig.new_width_only and new_blocks_only each train only what one "
                       "growth made; set one of them.")


SOFTMAX_IMPLS = ("reference", "flash")


LINEARIZED_IMPLS = ("hybrid", "linear")


@dataclasses.dataclass(frozen=True)
class LinearizeConfig:
  """How to linearize a model and train it back (LoLCATs: attention transfer, then LoRA).

  Attributes:
    layers: indices of the layers to convert; None converts every softmax layer.
    attention_impl: what the converted layers use: 'hybrid' (LoLCATs) or 'linear'.
    window: softmax keys per query of 'hybrid' (ModelConfig.attention_window).
    feature_dim: F of each head's Hedgehog feature map (phi has 2F features).
    transfer_steps: stage 1 optimizer steps (attention transfer: only the feature maps and window
      factors train, to match each layer's softmax output; 0 skips the stage).
    transfer_lr: stage 1 AdamW learning rate (no weight decay).
    transfer_mode: 'joint' (all layers' MSE summed, one optimizer) or 'layerwise' (one layer
      after another, transfer_steps split between them).
    lora_steps: stage 2 optimizer steps (LoRA on the attention projections, next-token loss,
      everything else frozen; 0 skips the stage).
    lora_lr: stage 2 peak learning rate (the run's OptimizerConfig, schedule and all, otherwise).
    lora: the stage 2 adapters.
    eval_batches: validation batches per domain for the report (None: the whole split).
    sample_prompt / sample_tokens: the report's generation with the recurrent form.
  """

  layers: tuple[int, ...] | None = None
  attention_impl: str = "hybrid"
  window: int = 64
  feature_dim: int = 32
  transfer_steps: int = 100
  transfer_lr: float = 1e-2
  transfer_mode: str = "joint"
  lora_steps: int = 100
  lora_lr: float = 1e-3
  lora: LoraConfig = LoraConfig(rank=8, alpha=16.0, targets=(r"attention/(q|k|v|o)_proj",))
  eval_batches: int | None = 8
  sample_prompt: str = "def "
  sample_tokens: int = 64

  def __post_init__(self):
    if self.layers is not None:
      object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))
    if self.attention_impl not in LINEARIZED_IMPLS:
      raise ValueError(f"LinearizeConfig.attention_impl={self.attention_impl!r}; choose one of "
                       f"{LINEARIZED_IMPLS}.")
    if self.transfer_mode not in ("joint", "layerwise"):
      raise ValueError(f"LinearizeConfig.transfer_mode={self.transfer_mode!r}; choose 'joint' "
                       "or 'layerwise'.")
    for name in ("window", "feature_dim"):
      if getattr(self, name) < 1:
        raise ValueError(f"LinearizeConfig.{name}={getattr(self, name)} must be positive.")
    for name in ("transfer_steps", "lora_steps"):
      if getattr(self, name) < 0:
        raise ValueError(f"LinearizeConfig.{name}={getattr(self, name)} must be >= 0.")
