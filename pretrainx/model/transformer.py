"""The decoder-only language model: embedding, a stack of pre-norm blocks, final norm, logits.

`Transformer(cfg).apply({'params': p}, tokens, positions, segment_ids)` returns fp32 logits
[batch, seq, padded_vocab] with the padding ids masked to a large negative value.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from pretrainx.model.attention import Attention
from pretrainx.model.config import ModelConfig
from pretrainx.model.layers import (Embedding, RMSNorm, SwiGLU, dense_init, excess_kurtosis,
                                    param_with_axes)

_RESIDUAL_AXES = ("activation_batch", "activation_length", "activation_embed")
_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_with_no_batch_dims": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class DecoderBlock(nn.Module):
  """x + attn(norm(x)), then + mlp(norm(.)); signature fits nn.scan (carry, None)."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array):
    x = nn.with_logical_constraint(x, _RESIDUAL_AXES)  # x: [batch, seq, embed]
    h = x + Attention(self.cfg, name="attention")(RMSNorm(self.cfg, name="input_norm")(x),
                                                  positions, segment_ids)
    out = h + SwiGLU(self.cfg, name="mlp")(RMSNorm(self.cfg, name="post_attention_norm")(h))
    if self.cfg.sow_kurtosis and self.is_mutable_collection("intermediates"):
      self.sow("intermediates", "kurtosis", excess_kurtosis(out),
               reduce_fn=lambda _, new: new, init_fn=lambda: jnp.zeros((), jnp.float32))
    return nn.with_logical_constraint(out, _RESIDUAL_AXES), None


def _block_stack(cfg: ModelConfig):
  block = DecoderBlock
  if cfg.remat_policy != "none":
    block = nn.remat(block, policy=_REMAT_POLICIES[cfg.remat_policy], prevent_cse=not cfg.scan_layers)
  if cfg.scan_layers:
    return nn.scan(block, variable_axes={"params": 0, "intermediates": 0},
                   split_rngs={"params": True},
                   in_axes=(nn.broadcast, nn.broadcast), length=cfg.num_layers,
                   metadata_params={nn.PARTITION_NAME: "layers"})(cfg, name="layers")
  return [block(cfg, name=f"layers_{i}") for i in range(cfg.num_layers)]


class Transformer(nn.Module):
  """Llama-style LM: tokens [batch, seq] -> logits [batch, seq, padded_vocab] (fp32)."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None) -> jax.Array:
    cfg = self.cfg
    batch, seq = tokens.shape
    if seq > cfg.max_seq_len:
      raise ValueError(
          f"sequence length {seq} exceeds the model's max_seq_len={cfg.max_seq_len}; shorten "
          "RunConfig.seq_len or raise ModelConfig.max_seq_len.")
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
    if segment_ids is None:
      segment_ids = jnp.ones((batch, seq), jnp.int32)

    embed = Embedding(cfg, name="embed")
    x = embed(tokens)
    if cfg.embed_projection:
      identity = lambda _, shape, dtype: jnp.eye(*shape, dtype=dtype)
      w = param_with_axes(self, "embed_projection", identity, (cfg.embed_dim, cfg.embed_dim),
                          ("embed", "embed_out"), cfg.storage_dtype)
      x = jnp.einsum("bsd,de->bse", x, w.astype(cfg.compute_dtype))
    x = nn.with_logical_constraint(x, _RESIDUAL_AXES)
    blocks = _block_stack(cfg)
    if cfg.scan_layers:
      x, _ = blocks(x, positions, segment_ids)
    else:
      for block in blocks:
        x, _ = block(x, positions, segment_ids)
    x = RMSNorm(cfg, name="final_norm")(x)

    if cfg.tie_embeddings:
      logits = embed.attend(x)
    else:
      w = param_with_axes(self, "lm_head", dense_init((0,), (1,)),
                          (cfg.embed_dim, cfg.padded_vocab_size), ("embed", "vocab"),
                          cfg.storage_dtype)
      logits = jnp.einsum("bsd,dv->bsv", x, w.astype(cfg.compute_dtype))
    logits = logits.astype(jnp.float32)
    if cfg.padded_vocab_size != cfg.vocab_size:
      valid = jnp.arange(cfg.padded_vocab_size) < cfg.vocab_size
      logits = jnp.where(valid, logits, -1e9)
    return nn.with_logical_constraint(
        logits, ("activation_batch", "activation_length", "activation_vocab"))


def sown_kurtosis(intermediates: dict, num_layers: int) -> jax.Array:
  """The per-layer excess kurtosis the blocks sowed -> [num_layers], scanned or unrolled."""
  if "layers" in intermediates:
    return intermediates["layers"]["kurtosis"]
  return jnp.stack([intermediates[f"layers_{i}"]["kurtosis"] for i in range(num_layers)])
