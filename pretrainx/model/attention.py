"""Grouped-query self-attention layer and the one dispatch point for attention implementations.

The layer projects, applies RoPE and calls `dot_product_attention(..., impl=name)`; the name picks a
function from ATTENTION_IMPLS ('reference' here; the kernels add 'flash', 'linear', 'hybrid').
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from pallas_kernels.reference import reference_attention
from pretrainx.model.config import ModelConfig
from pretrainx.model.layers import apply_rope, dense_init, param_with_axes

# name -> fn(q, k, v, *, causal, q_segment_ids, kv_segment_ids) -> [batch, seq, heads, head_dim]
ATTENTION_IMPLS: dict[str, Callable[..., jax.Array]] = {"reference": reference_attention}


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None,
                          *, impl: str = "reference", causal: bool = True) -> jax.Array:
  """Causal attention within segments, by the named implementation.

  q: [batch, seq, heads, head_dim]; k, v: [batch, seq, kv_heads, head_dim]; segment_ids: [batch, seq].
  """
  try:
    fn = ATTENTION_IMPLS[impl]
  except KeyError:
    raise ValueError(
        f"unknown attention_impl {impl!r}; available: {sorted(ATTENTION_IMPLS)}.") from None
  return fn(q, k, v, causal=causal, q_segment_ids=segment_ids, kv_segment_ids=segment_ids)


class Attention(nn.Module):
  """Multi-head attention with grouped key/value heads and rotary positions."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """x: [batch, seq, embed]; positions, segment_ids: [batch, seq] -> [batch, seq, embed]."""
    cfg = self.cfg
    d, h, kvh, hd = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
    dt, pdt = cfg.compute_dtype, cfg.storage_dtype
    w_q = param_with_axes(self, "q_proj", dense_init((0,), (1, 2)), (d, h, hd),
                          ("embed", "heads", "head_dim"), pdt)
    w_k = param_with_axes(self, "k_proj", dense_init((0,), (1, 2)), (d, kvh, hd),
                          ("embed", "kv_heads", "head_dim"), pdt)
    w_v = param_with_axes(self, "v_proj", dense_init((0,), (1, 2)), (d, kvh, hd),
                          ("embed", "kv_heads", "head_dim"), pdt)
    w_o = param_with_axes(self, "o_proj", dense_init((0, 1), (2,)), (h, hd, d),
                          ("heads", "head_dim", "embed"), pdt)

    q = jnp.einsum("bsd,dhk->bshk", x, w_q.astype(dt))  # [batch, seq, heads, head_dim]
    k = jnp.einsum("bsd,dhk->bshk", x, w_k.astype(dt))  # [batch, seq, kv_heads, head_dim]
    v = jnp.einsum("bsd,dhk->bshk", x, w_v.astype(dt))
    q = apply_rope(q, positions, cfg.rope_theta)
    k = apply_rope(k, positions, cfg.rope_theta)
    axes_q = ("activation_batch", "activation_length", "activation_heads", None)
    axes_kv = ("activation_batch", "activation_length", "activation_kv_heads", None)
    q = nn.with_logical_constraint(q, axes_q)
    k = nn.with_logical_constraint(k, axes_kv)
    v = nn.with_logical_constraint(v, axes_kv)
    out = dot_product_attention(q, k, v, segment_ids, impl=cfg.attention_impl)
    out = nn.with_logical_constraint(out, axes_q)
    return jnp.einsum("bshk,hkd->bsd", out, w_o.astype(dt))
