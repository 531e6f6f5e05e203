"""ModelConfig: every architectural choice of the decoder LM, as one frozen dataclass.

Presets (tiny, quickstart, Llama 125M/1B/7B/70B) live as gin files in gin_configs/models/; this
module only holds the fields, their defaults and the derived quantities (head_dim, padded vocab).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
REMAT_POLICIES = ("none", "full", "dots", "dots_with_no_batch_dims")


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
    rope_theta: RoPE base frequency.
    tie_embeddings: output projection shares the input embedding.
    dtype / param_dtype: compute and storage dtypes ('float32', 'bfloat16').
    remat_policy: 'none', 'full', 'dots' or 'dots_with_no_batch_dims' (jax.checkpoint policies).
    scan_layers: stack the blocks with nn.scan (fast compiles for deep models).
    attention_impl: name understood by pretrainx.model.attention.ATTENTION_IMPLS.
    norm_scale: 'channel' (a gain per channel) or 'scalar' (single-scale RMSNorm: one learned
      scalar per norm, which removes the per-channel gains that grow activation outliers).
    embed_projection: a learned [embed, embed] projection after the token embedding (identity at
      init), as outlier-safe pretraining uses.
    sow_kurtosis: record the excess kurtosis of each block's output ('intermediates' collection).
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
  attention_impl: str = "reference"
  vocab_multiple: int = 128
  norm_scale: str = "channel"
  embed_projection: bool = False
  sow_kurtosis: bool = True

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

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim if self.head_dim is not None else self.embed_dim // self.num_heads

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


def count_params(cfg: ModelConfig) -> dict[str, int]:
  """Parameter counts from the config alone (unpadded vocab), split as scaling laws need them.

  Returns {'total', 'embedding', 'non_embedding'}; an untied output projection counts as
  non-embedding (it is a matmul every token pays for), the input embedding table does not.
  """
  d, hd = cfg.embed_dim, cfg.resolved_head_dim
  attn = d * hd * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
  mlp = 3 * d * cfg.mlp_dim
  norm = d if cfg.norm_scale == "channel" else 1
  per_layer = attn + mlp + 2 * norm
  embedding = cfg.vocab_size * d
  lm_head = 0 if cfg.tie_embeddings else cfg.vocab_size * d
  projection = d * d if cfg.embed_projection else 0
  non_embedding = cfg.num_layers * per_layer + norm + lm_head + projection
  return {"total": embedding + non_embedding, "embedding": embedding,
          "non_embedding": non_embedding}
