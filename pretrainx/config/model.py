"""ModelConfig: every architectural choice of the decoder LM, as one frozen dataclass.

Presets (tiny, quickstart, Llama 125M/1B/7B/70B) live as gin files in gin_configs/models/; this
module only holds the fields, their defaults and the derived quantities (head_dim, padded vocab).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from pallas_kernels.linear_attention import FEATURE_MAPS

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


REMAT_POLICIES = ("none", "full", "dots", "dots_with_no_batch_dims")


ATTENTION_IMPLS = ("reference", "flash", "linear", "hybrid")


ROPE_SCALINGS = (None, "linear", "ntk", "yarn", "llama3", "dynamic")


MOE_IMPLS = ("auto", "ragged", "einsum")


@dataclasses.dataclass(frozen=True)
class MoeConfig:
  """Mixture-of-experts MLPs (ModelConfig.moe); num_experts=0 keeps every MLP dense.

  Each token's router picks top_k of num_experts SwiGLU experts; their outputs are summed with
  the router's softmax probabilities as weights (renormalised over the top k with norm_topk, as
  Mixtral does; Qwen2-MoE's norm_topk_prob=False keeps them). See pretrainx.model.moe.

  Attributes:
    num_experts: routed experts per MoE layer (0: a dense model).
    top_k: experts each token is sent to (<= num_experts).
    expert_mlp_dim: hidden width of each expert; None: ModelConfig.mlp_dim (what upcycling from
      a dense model needs).
    shared_experts: always-on experts every token also passes through (DeepSeek/Qwen2-MoE); they
      are one SwiGLU of width shared_mlp_dim.
    shared_mlp_dim: the shared experts' total width; None: shared_experts * expert_mlp_dim.
    shared_gate: scale the shared experts' output by sigmoid(x @ w) per token (Qwen2-MoE).
    every: layer i is an MoE layer when (i + 1) % every == 0 (1: all; 2: every second one, the
      rest dense; Qwen2-MoE's decoder_sparse_step). every > 1 needs scan_layers=False.
    capacity_factor: each expert takes at most ceil(capacity_factor * tokens * top_k /
      num_experts) of one device's tokens (GShard groups); later ones are dropped (their weight
      is zero, the residual carries them). 0: dropless.
    norm_topk: renormalise the top-k probabilities to sum to 1.
    balance_loss: weight of the Switch load-balancing loss num_experts * sum_e f_e * p_e (f_e:
      the fraction of routed slots that go to e, p_e: e's mean router probability).
    router_z_loss: weight of the router z-loss mean(logsumexp(router logits)^2) (ST-MoE).
    impl: the grouped matmul: 'ragged' (tokens sorted by expert, jax.lax.ragged_dot), 'einsum'
      (every expert on every received row, masked: exact, plain, E/k x the FLOPs) or 'auto'
      (ragged: on TPU/GPU a grouped matmul; on CPU jax masks it into a dense product, still
      1.3-1.5x faster than einsum in bench/moe.py).
  """

  num_experts: int = 0
  top_k: int = 2
  expert_mlp_dim: int | None = None
  shared_experts: int = 0
  shared_mlp_dim: int | None = None
  shared_gate: bool = False
  every: int = 1
  capacity_factor: float = 0.0
  norm_topk: bool = True
  balance_loss: float = 0.01
  router_z_loss: float = 0.001
  impl: str = "auto"

  def __post_init__(self):
    if self.num_experts < 0 or self.shared_experts < 0:
      raise ValueError("MoeConfig.num_experts and shared_experts must be >= 0.")
    if not self.enabled:
      return
    if not 1 <= self.top_k <= self.num_experts:
      raise ValueError(f"MoeConfig.top_k={self.top_k} must be between 1 and num_experts="
                       f"{self.num_experts}; lower top_k or add experts.")
    if self.every < 1:
      raise ValueError(f"MoeConfig.every={self.every}; use 1 (every layer is MoE) or more.")
    if self.capacity_factor < 0:
      raise ValueError(f"MoeConfig.capacity_factor={self.capacity_factor}; use 0 (dropless) or "
                       "a positive factor such as 1.25.")
    if self.impl not in MOE_IMPLS:
      raise ValueError(f"MoeConfig.impl={self.impl!r}; choose one of {MOE_IMPLS}.")
    for name in ("expert_mlp_dim", "shared_mlp_dim"):
      if getattr(self, name) is not None and getattr(self, name) < 1:
        raise ValueError(f"MoeConfig.{name}={getattr(self, name)}; use a positive width or None.")

  @property
  def enabled(self) -> bool:
    return self.num_experts > 0


def ntk_theta(theta: float, factor: float, head_dim: int) -> float:
  """The base of NTK-aware scaling: theta * factor ** (d / (d - 2)), d = head_dim."""
  return theta * factor ** (head_dim / (head_dim - 2))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A Llama-style decoder-only transformer.

  Attributes:
    vocab_size: ids the vocabulary produces; the embedding is padded to `vocab_multiple` so that
      it shards evenly, and the padded logits are masked out.
    embed_dim: width of the residual stream.
    num_layers / num_heads / num_kv_heads: depth, query heads, key-value heads (GQA when fewer).
    head_dim: per-head width; None means embed_dim // num_heads.
    mlp_dim: hidden width of the SwiGLU MLP.
    max_seq_len: longest sequence the model accepts.
    tie_embeddings: output projection shares the input embedding.
    dtype / param_dtype: compute and storage dtypes ('float32', 'bfloat16').
    remat_policy: 'none', 'full', 'dots' or 'dots_with_no_batch_dims' (jax.checkpoint policies).
    scan_layers: stack the blocks with nn.scan (fast compiles for deep models).
    scan_unroll: blocks each iteration of that scan runs (nn.scan's unroll); num_layers or more
      unrolls the stack fully but keeps its stacked [layers, ...] parameters. That runs shallow
      models faster on CPU: no while loop, and no per-iteration slicing and stacking.
    attention_impl: 'reference' (materialised softmax), 'flash' (blockwise softmax kernel),
      'linear' (causal linear attention, O(1)-memory decoding) or 'hybrid' (LoLCATs: sliding-window
      softmax + linear attention for older keys); see pretrainx.model.attention.
    linear_feature: feature map of 'linear'/'hybrid', one of pallas_kernels.linear_attention
      .FEATURE_MAPS ('hedgehog' is learned: per-head [head_dim, linear_feature_dim] weights).
    linear_feature_dim: F of the hedgehog map (phi has 2 * F features).
    linear_decay: a learned per-head decay gamma in (0, 1) for 'linear' (RetNet/GLA style);
      'hybrid' refuses it, 'reference'/'flash' ignore it.
    linear_chunk: chunk length of the chunked linear-attention scan.
    attention_window: 'hybrid' only: softmax keys per query (itself included); <= max_seq_len.
    sliding_window: 'reference'/'flash' only: softmax keys per query, itself included (query i
      sees keys j with i - sliding_window < j <= i, Mistral's `sliding_window`); None: every
      earlier key. Not 'hybrid''s window (that is attention_window, with linear attention beyond).
    layer_attention_impls: one attention_impl per layer, overriding attention_impl (e.g. a model
      linearized in some layers only); empty: every layer uses attention_impl. Needs
      scan_layers=False (scanned layers share one structure).
    kernel_interpret: run Pallas kernels in interpret mode (CPU tests); otherwise a backend that
      cannot lower Pallas uses the pure-JAX path of the same computation, with one warning.
    flash_block_q / flash_block_k: block sizes of the 'flash' kernel (None: the kernel's defaults).
    context_load_balance: when MeshConfig.context splits the sequence, reorder it so that every
      device holds an early and a late chunk (zigzag) and does the same causal-attention work;
      the sequence length must then be a multiple of 2 x context (else of context).
    norm_scale: 'channel' (a gain per channel) or 'scalar' (single-scale RMSNorm: one learned
      scalar per norm, which removes the per-channel gains that grow activation outliers).
    embed_projection: a learned [embed, embed] projection after the token embedding (identity at
      init), as outlier-safe pretraining uses.
    sow_kurtosis: record the excess kurtosis of each block's output ('intermediates' collection).
    qkv_bias: learned biases on the query/key/value projections (Qwen2); no bias on o_proj.
    rope_theta: RoPE base frequency. Adjusted base frequency (ABF, as Llama 3 and Code Llama
      extend their context) is no scaling type: it is simply a bigger rope_theta.
    rope_scaling: how the RoPE frequencies are scaled for contexts beyond rope_original_max_len
      (the frequency math is pretrainx.model.layers.rope_frequencies, Hugging Face's exactly):
      None        plain RoPE;
      'linear'    position interpolation: positions / rope_scaling_factor (HF 'linear');
      'ntk'       NTK-aware base change, rope_theta * factor ** (head_dim / (head_dim - 2)), for
                  every length; transformers has no such type, so exports write it as that
                  rope_theta with no rope_scaling (the same frequencies);
      'yarn'      YaRN (HF 'yarn'): frequencies that turn fewer than rope_yarn_beta_slow times
                  within rope_original_max_len are divided by the factor, those turning more
                  than rope_yarn_beta_fast times kept, a linear ramp over the dims between; q and
                  k are both scaled by the attention factor (a softmax temperature);
      'llama3'    Llama 3.1 (HF 'llama3'): wavelengths longer than rope_original_max_len /
                  rope_low_freq_factor are divided by the factor, those shorter than
                  rope_original_max_len / rope_high_freq_factor kept, the band between
                  interpolated smoothly;
      'dynamic'   dynamic NTK (HF 'dynamic'), for inference only (training refuses it): the base
                  grows with the length L = max(positions) + 1 of each forward pass (each decode
                  step), rope_theta * (factor * L / original - (factor - 1)) ** (d / (d - 2)) once
                  L > rope_original_max_len, plain RoPE up to it.
    rope_scaling_factor: the scaling factor (HF `factor`); > 0.
    rope_original_max_len: the context the model was pretrained with (HF
      original_max_position_embeddings), used by 'yarn', 'llama3' and 'dynamic' (for 'dynamic'
      HF reads max_position_embeddings instead: imports take that, exports write it there).
    rope_low_freq_factor / rope_high_freq_factor: 'llama3' only (HF low_freq_factor,
      high_freq_factor).
    rope_yarn_beta_fast / rope_yarn_beta_slow: 'yarn' only: the rotation counts (within
      rope_original_max_len) that bound the ramp between kept and interpolated frequencies (HF
      beta_fast=32, beta_slow=1).
    rope_yarn_mscale / rope_yarn_mscale_all_dim: 'yarn' only (HF mscale, mscale_all_dim): with
      both set (non-zero) and no rope_attention_factor, the attention factor is
      mscale(factor, rope_yarn_mscale) / mscale(factor, rope_yarn_mscale_all_dim), where
      mscale(s, m) = 0.1 * m * ln(s) + 1 (1 for s <= 1).
    rope_yarn_truncate: 'yarn' only (HF truncate): round the ramp's ends to whole dims.
    rope_attention_factor: 'yarn' only: the factor cos and sin are multiplied by (so the
      attention logits by its square); None: HF's default, 0.1 * ln(factor) + 1 (or the mscale
      ratio above).
    A run from a source (InitConfig.source) takes the source's rope_* fields unless it binds
    them, and may bind them differently (context extension; pretrainx.config.sources). Fields a
    scaling type does not use are ignored.
    moe: mixture-of-experts MLPs (MoeConfig; bound in gin as MoeConfig.num_experts = 8, ...).
    source_max_position_embeddings: the max_position_embeddings of the Hugging Face config.json
      this model was imported from (None: not imported); exports write it back, not max_seq_len.
  """

  vocab_size: int = 259
  embed_dim: int = 64
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int | None = None
  mlp_dim: int = 192
  max_seq_len: int = 256
  rope_theta: float = 10_000.0
  norm_eps: float = 1e-5
  tie_embeddings: bool = True
  init_std: float = 0.02
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat_policy: str = "none"
  scan_layers: bool = True
  scan_unroll: int = 1
  attention_impl: str = "reference"
  linear_feature: str = "hedgehog"
  linear_feature_dim: int = 32
  linear_decay: bool = False
  linear_chunk: int = 64
  attention_window: int = 64
  sliding_window: int | None = None
  layer_attention_impls: tuple[str, ...] = ()
  kernel_interpret: bool = False
  flash_block_q: int | None = None
  flash_block_k: int | None = None
  context_load_balance: bool = True
  vocab_multiple: int = 128
  norm_scale: str = "channel"
  embed_projection: bool = False
  sow_kurtosis: bool = True
  qkv_bias: bool = False
  rope_scaling: str | None = None
  rope_scaling_factor: float = 8.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_len: int = 8192
  rope_yarn_beta_fast: float = 32.0
  rope_yarn_beta_slow: float = 1.0
  rope_yarn_mscale: float | None = None
  rope_yarn_mscale_all_dim: float | None = None
  rope_yarn_truncate: bool = True
  rope_attention_factor: float | None = None
  moe: MoeConfig = MoeConfig()
  source_max_position_embeddings: int | None = None

  def __post_init__(self):
    if self.norm_scale not in ("channel", "scalar"):
      raise ValueError(f"ModelConfig.norm_scale={self.norm_scale!r}; use 'channel' or 'scalar'.")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in _DTYPES:
        raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r}; choose one of {sorted(_DTYPES)}.")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"ModelConfig.remat_policy={self.remat_policy!r}; choose one of {REMAT_POLICIES}.")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"ModelConfig.num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads}.")
    if self.head_dim is None and self.embed_dim % self.num_heads:
      raise ValueError(
          f"embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}; "
          "set ModelConfig.head_dim explicitly.")
    if self.resolved_head_dim % 2:
      raise ValueError(f"head_dim={self.resolved_head_dim} must be even for RoPE.")
    if self.scan_unroll < 1:
      raise ValueError(f"ModelConfig.scan_unroll={self.scan_unroll} must be at least 1 (blocks a "
                       "scan iteration runs; num_layers unrolls them all).")
    self._check_attention()
    self._check_rope()
    if self.source_max_position_embeddings is not None and self.source_max_position_embeddings < 1:
      raise ValueError(f"ModelConfig.source_max_position_embeddings="
                       f"{self.source_max_position_embeddings}; use a positive length or None.")
    if self.moe.enabled and self.moe.every > 1 and self.scan_layers:
      raise ValueError(f"MoeConfig.every={self.moe.every} mixes MoE and dense layers, which "
                       "scanned layers cannot (they share one structure); set "
                       "ModelConfig.scan_layers=False or MoeConfig.every=1.")

  def _check_rope(self):
    """One-line errors for rope_* fields no RoPE can be computed with."""
    kind = self.rope_scaling
    if kind not in ROPE_SCALINGS:
      raise ValueError(f"ModelConfig.rope_scaling={kind!r}; choose one of {ROPE_SCALINGS}.")
    if not self.rope_theta > 0:
      raise ValueError(f"ModelConfig.rope_theta={self.rope_theta}; use a positive base "
                       "frequency such as 10000.0.")
    if kind is None:
      return
    if not self.rope_scaling_factor > 0:
      raise ValueError(f"rope_scaling={kind!r} needs ModelConfig.rope_scaling_factor > 0 (e.g. 4.0 "
                       f"for a 4x longer context); got {self.rope_scaling_factor}.")
    if kind in ("yarn", "llama3", "dynamic") and self.rope_original_max_len < 1:
      raise ValueError(f"rope_scaling={kind!r} needs ModelConfig.rope_original_max_len >= 1 (the "
                       f"pretraining context); got {self.rope_original_max_len}.")
    if kind in ("ntk", "dynamic") and self.resolved_head_dim <= 2:
      raise ValueError(f"rope_scaling={kind!r} changes the base by a power d / (d - 2) of "
                       f"head_dim d, which needs head_dim > 2; got {self.resolved_head_dim}.")
    if kind == "llama3" and not 0 < self.rope_low_freq_factor < self.rope_high_freq_factor:
      raise ValueError(
          "rope_scaling='llama3' needs 0 < rope_low_freq_factor < rope_high_freq_factor; got "
          f"low={self.rope_low_freq_factor}, high={self.rope_high_freq_factor}.")
    if kind == "yarn":
      self._check_yarn()

  def _check_yarn(self):
    if not 0 < self.rope_yarn_beta_slow <= self.rope_yarn_beta_fast:
      raise ValueError(
          "rope_scaling='yarn' needs 0 < rope_yarn_beta_slow <= rope_yarn_beta_fast (HF: 1 and "
          f"32); got beta_slow={self.rope_yarn_beta_slow}, beta_fast={self.rope_yarn_beta_fast}.")
    if self.rope_attention_factor is not None and not self.rope_attention_factor > 0:
      raise ValueError(f"ModelConfig.rope_attention_factor={self.rope_attention_factor}; use a "
                       "positive factor or None (YaRN's default from the scaling factor).")
    for name in ("rope_yarn_mscale", "rope_yarn_mscale_all_dim"):
      if getattr(self, name) is not None and getattr(self, name) < 0:
        raise ValueError(f"ModelConfig.{name}={getattr(self, name)}; use a value >= 0 or None.")

  def _check_attention(self):
    """Validates the attention_impl fields (the ones a typo in a gin file would silently skip)."""
    object.__setattr__(self, "layer_attention_impls", tuple(self.layer_attention_impls))
    for impl in (self.attention_impl, *self.layer_attention_impls):
      if impl not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention_impl {impl!r}; choose one of "
                         f"{', '.join(ATTENTION_IMPLS)}.")
    if self.layer_attention_impls:
      if len(self.layer_attention_impls) != self.num_layers:
        raise ValueError(f"ModelConfig.layer_attention_impls has {len(self.layer_attention_impls)} "
                         f"entries for num_layers={self.num_layers}; give one per layer.")
      if self.scan_layers:
        raise ValueError("ModelConfig.layer_attention_impls (a different attention per layer) "
                         "needs scan_layers=False.")
    if self.linear_feature not in FEATURE_MAPS:
      raise ValueError(f"ModelConfig.linear_feature={self.linear_feature!r} is not a feature map; "
                       f"choose one of {', '.join(FEATURE_MAPS)}.")
    for name in ("linear_feature_dim", "linear_chunk", "attention_window"):
      if getattr(self, name) < 1:
        raise ValueError(f"ModelConfig.{name}={getattr(self, name)} must be a positive integer.")
    for name in ("flash_block_q", "flash_block_k"):
      if getattr(self, name) is not None and getattr(self, name) < 1:
        raise ValueError(f"ModelConfig.{name}={getattr(self, name)}; use a positive block size "
                         "or None for the kernel's default.")
    if "hybrid" in self.layer_impls and self.attention_window > self.max_seq_len:
      raise ValueError(
          f"ModelConfig.attention_window={self.attention_window} exceeds max_seq_len="
          f"{self.max_seq_len}; a window that long is plain softmax attention: lower the window or "
          "use attention_impl='reference' or 'flash'.")
    self._check_sliding_window()
    if self.linear_decay and "hybrid" in self.layer_impls:
      raise ValueError("ModelConfig.linear_decay=True is not supported by attention_impl='hybrid' "
                       "(its linear part has no decay); set linear_decay=False or use 'linear'.")

  def _check_sliding_window(self):
    if self.sliding_window is None:
      return
    if self.sliding_window < 1:
      raise ValueError(f"ModelConfig.sliding_window={self.sliding_window}; use a positive number "
                       "of keys per query or None (no window).")
    recurrent = sorted({i for i in self.layer_impls if i in ("linear", "hybrid")})
    if recurrent:
      raise ValueError(
          f"ModelConfig.sliding_window={self.sliding_window} applies to softmax attention "
          f"('reference', 'flash'), not attention_impl {recurrent}; set sliding_window=None "
          "('hybrid' has its own softmax window, attention_window).")

  @property
  def layer_impls(self) -> tuple[str, ...]:
    """The attention implementation of every layer."""
    return self.layer_attention_impls or (self.attention_impl,) * self.num_layers

  def for_layer(self, index: int) -> "ModelConfig":
    """The config layer `index` is built with: its own attention_impl, no per-layer list, and
    no experts when MoeConfig.every makes it a dense layer."""
    fields = {}
    if self.layer_attention_impls:
      fields.update(attention_impl=self.layer_attention_impls[index], layer_attention_impls=())
    if self.moe.enabled and not self.is_moe_layer(index):
      fields["moe"] = MoeConfig()
    return dataclasses.replace(self, **fields) if fields else self

  def is_moe_layer(self, index: int) -> bool:
    """Whether layer `index` has a mixture-of-experts MLP (MoeConfig.every)."""
    return self.moe.enabled and (index + 1) % self.moe.every == 0

  @property
  def expert_mlp_dim(self) -> int:
    """Hidden width of one routed expert."""
    return self.moe.expert_mlp_dim or self.mlp_dim

  @property
  def shared_mlp_dim(self) -> int:
    """Total hidden width of the shared experts (0: none)."""
    if not self.moe.shared_experts:
      return 0
    return self.moe.shared_mlp_dim or self.moe.shared_experts * self.expert_mlp_dim

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim if self.head_dim is not None else self.embed_dim // self.num_heads

  @property
  def rope_llama3(self) -> tuple[float, float, float, int] | None:
    """(factor, low_freq_factor, high_freq_factor, original_max_len) when rope_scaling='llama3'."""
    if self.rope_scaling != "llama3":
      return None
    return (self.rope_scaling_factor, self.rope_low_freq_factor, self.rope_high_freq_factor,
            self.rope_original_max_len)

  @property
  def rope_ntk_theta(self) -> float:
    """The base rope_scaling='ntk' amounts to, rope_theta * factor ** (d / (d - 2)) (d: head_dim):
    what a Hugging Face export of it writes as rope_theta."""
    return ntk_theta(self.rope_theta, self.rope_scaling_factor, self.resolved_head_dim)

  @property
  def padded_vocab_size(self) -> int:
    m = self.vocab_multiple
    return -(-self.vocab_size // m) * m

  @property
  def compute_dtype(self):
    return _DTYPES[self.dtype]

  @property
  def storage_dtype(self):
    return _DTYPES[self.param_dtype]
