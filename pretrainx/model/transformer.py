"""The decoder-only language model: embedding, a stack of pre-norm blocks, final norm, logits.

`Transformer(cfg).apply({'params': p}, tokens, positions, segment_ids, prefix_mask)` returns fp32
logits [batch, seq, padded_vocab] with the padding ids masked to a large negative value. With
`decode=True` it continues each row from the per-layer state in the 'cache' collection (a KV cache
of `cache_len` slots for 'reference'/'flash' layers, constant-size recurrent state for 'linear'/
'hybrid'): apply with mutable=['cache'] (pretrainx.generate does this).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from pretrainx.model import context_parallel
from pretrainx.model.attention import Attention
from pretrainx.config import ModelConfig
from pretrainx.model.layers import (Embedding, RMSNorm, SwiGLU, dense_init, excess_kurtosis,
                                    PROJECTION, param_with_axes, project)
from pretrainx.model.moe import MoeMLP

_RESIDUAL_AXES = ("activation_batch", "activation_length", "activation_embed")
_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    # project()'s CPU form hides its dot in a custom VJP: its named output counts as a dot
    "dots": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.checkpoint_dots,
        jax.checkpoint_policies.save_only_these_names(PROJECTION)),
    "dots_with_no_batch_dims": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
        jax.checkpoint_policies.save_only_these_names(PROJECTION)),
}


class DecoderBlock(nn.Module):
  """x + attn(norm(x)), then + mlp(norm(.)); signature fits nn.scan (carry, None). The MLP is
  a mixture of experts ('moe') when cfg.moe is enabled (for_layer disables it in dense layers)."""

  cfg: ModelConfig
  decode: bool = False
  cache_len: int = 0  # KV-cache slots of a decoding softmax layer; 0: cfg.max_seq_len

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None,
               prefix_mask: jax.Array | None = None):
    x = nn.with_logical_constraint(x, _RESIDUAL_AXES)  # x: [batch, seq, embed]
    attention = Attention(self.cfg, decode=self.decode, cache_len=self.cache_len, name="attention")
    h = x + attention(RMSNorm(self.cfg, name="input_norm")(x), positions, segment_ids, prefix_mask)
    mlp = MoeMLP(self.cfg, name="moe") if self.cfg.moe.enabled else SwiGLU(self.cfg, name="mlp")
    out = h + mlp(RMSNorm(self.cfg, name="post_attention_norm")(h))
    if self.cfg.sow_kurtosis and self.is_mutable_collection("intermediates"):
      self.sow("intermediates", "kurtosis", excess_kurtosis(out),
               reduce_fn=lambda _, new: new, init_fn=lambda: jnp.zeros((), jnp.float32))
    return nn.with_logical_constraint(out, _RESIDUAL_AXES), None


def _block_stack(cfg: ModelConfig, decode: bool, cache_len: int):
  block = DecoderBlock
  if cfg.remat_policy != "none" and not decode:
    # A scan's body runs once per iteration, so XLA cannot merge its recomputation with the
    # forward; unrolled blocks (a Python loop, or scan_unroll > 1) need the barrier.
    rolled = cfg.scan_layers and cfg.scan_unroll == 1
    block = nn.remat(block, policy=_REMAT_POLICIES[cfg.remat_policy], prevent_cse=not rolled)
  if cfg.scan_layers:
    return nn.scan(block, variable_axes={"params": 0, "intermediates": 0, "cache": 0},
                   split_rngs={"params": True},
                   in_axes=(nn.broadcast, nn.broadcast, nn.broadcast), length=cfg.num_layers,
                   unroll=cfg.scan_unroll,
                   metadata_params={nn.PARTITION_NAME: "layers"})(cfg, decode, cache_len,
                                                                  name="layers")
  return [block(cfg.for_layer(i), decode, cache_len, name=f"layers_{i}")
          for i in range(cfg.num_layers)]


class Transformer(nn.Module):
  """Llama-style LM: tokens [batch, seq] -> logits [batch, seq, padded_vocab] (fp32).

  cache_len: slots of each softmax layer's KV cache when decoding (0: cfg.max_seq_len).
  """

  cfg: ModelConfig
  cache_len: int = 0

  @nn.compact
  def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None, prefix_mask: jax.Array | None = None, *,
               decode: bool = False) -> jax.Array:
    """tokens, positions, segment_ids: [batch, seq] int; prefix_mask: [batch, seq] bool, True on a
    bidirectional prefix (prefix-LM; 'reference'/'flash' only). segment_ids None: one document
    per row. decode: continue from the 'cache' state (needs explicit positions, per row: the
    RoPE position of each new token); softmax layers then read segment_ids 0 as padding that is
    cached as invalid (left-padded prompts), 'linear'/'hybrid' layers refuse segment_ids."""
    cfg = self.cfg
    batch, seq = tokens.shape
    if seq > cfg.max_seq_len:
      raise ValueError(
          f"sequence length {seq} exceeds the model's max_seq_len={cfg.max_seq_len}; shorten "
          "RunConfig.seq_len or raise ModelConfig.max_seq_len.")
    if positions is None:
      if decode:
        raise ValueError("decode=True needs explicit positions (the index of each new token).")
      positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
    if prefix_mask is not None:
      prefix_mask = prefix_mask.astype(bool)
    # Context parallelism: each device's part of the sequence is an early and a late chunk, so
    # that causal attention costs every device the same; the natural order is back for the logits.
    context = 1 if decode else context_parallel.context_size()
    balanced = context > 1 and cfg.context_load_balance
    if context > 1:
      context_parallel.check_split(seq, context, cfg.context_load_balance, cfg.layer_impls)
    if balanced:
      tokens, positions = (context_parallel.balance(x, context) for x in (tokens, positions))
      segment_ids, prefix_mask = (None if x is None else context_parallel.balance(x, context)
                                  for x in (segment_ids, prefix_mask))

    embed = Embedding(cfg, name="embed")
    x = embed(tokens)
    if cfg.embed_projection:
      identity = lambda _, shape, dtype: jnp.eye(*shape, dtype=dtype)
      w = param_with_axes(self, "embed_projection", identity, (cfg.embed_dim, cfg.embed_dim),
                          ("embed", "embed_out"), cfg.storage_dtype)
      x = project(x, w.astype(cfg.compute_dtype))
    x = nn.with_logical_constraint(x, _RESIDUAL_AXES)
    blocks = _block_stack(cfg, decode, self.cache_len)
    if cfg.scan_layers:
      x, _ = blocks(x, positions, segment_ids, prefix_mask)
    else:
      for block in blocks:
        x, _ = block(x, positions, segment_ids, prefix_mask)
    if balanced:
      x = nn.with_logical_constraint(context_parallel.restore(x, context), _RESIDUAL_AXES)
    x = RMSNorm(cfg, name="final_norm")(x)

    if cfg.tie_embeddings:
      logits = embed.attend(x)
    else:
      w = param_with_axes(self, "lm_head", dense_init((0,), (1,)),
                          (cfg.embed_dim, cfg.padded_vocab_size), ("embed", "vocab"),
                          cfg.storage_dtype)
      logits = project(x, w.astype(cfg.compute_dtype))  # [batch, seq, vocab]
    logits = logits.astype(jnp.float32)
    if cfg.padded_vocab_size != cfg.vocab_size:
      valid = jnp.arange(cfg.padded_vocab_size) < cfg.vocab_size
      logits = jnp.where(valid, logits, -1e9)
    return nn.with_logical_constraint(
        logits, ("activation_batch", "activation_length", "activation_vocab"))


def param_shapes(cfg: ModelConfig):
  """Transformer(cfg)'s params as boxed (nn.Partitioned, logical axes) ShapeDtypeStructs, from
  shapes alone: nothing is allocated. Their shapes do not depend on the sequence length."""
  return jax.eval_shape(lambda key: Transformer(cfg).init(key, jnp.zeros((1, 1), jnp.int32)),
                        jax.random.key(0))["params"]


def sown_kurtosis(intermediates: dict, num_layers: int) -> jax.Array:
  """The per-layer excess kurtosis the blocks sowed -> [num_layers], scanned or unrolled."""
  if "layers" in intermediates:
    return intermediates["layers"]["kurtosis"]
  return jnp.stack([intermediates[f"layers_{i}"]["kurtosis"] for i in range(num_layers)])
