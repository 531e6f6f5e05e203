"""Parameter counts and FLOPs per token, this machine's measured matmul peak, and model FLOPs utilisation (MFU).

FLOPs/token = 6 * N + attention, where N counts the non-embedding params plus the output
projection (a tied head is still a matmul every token pays for); in a mixture-of-experts model N
counts the active params only (the router, top_k routed experts and the shared experts). Softmax attention ('reference',
'flash') costs 6 * L * seq * heads * head_dim (QK^T and AV, forward and backward, causal counted as
half); linear attention costs its state products plus the intra-chunk part, and 'hybrid' adds a
full window of softmax attention.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from pretrainx.config.model import ModelConfig


def count_params(cfg: ModelConfig) -> dict[str, int]:
  """Parameter counts from the config alone (unpadded vocab), split as scaling laws need them.

  Returns {'total', 'embedding', 'non_embedding', 'active_non_embedding'}; an untied output
  projection counts as non-embedding (it is a matmul every token pays for), the input embedding
  table does not. 'active_non_embedding' is what one token runs through: in MoE layers the router,
  top_k of the routed experts and the shared experts (equal to 'non_embedding' when dense).
  """
  d, hd = cfg.embed_dim, cfg.resolved_head_dim
  attn = d * hd * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
  if cfg.qkv_bias:
    attn += hd * (cfg.num_heads + 2 * cfg.num_kv_heads)
  mlp_total = mlp_active = 0
  for i in range(cfg.num_layers):
    total, active = mlp_params(cfg.for_layer(i))
    mlp_total, mlp_active = mlp_total + total, mlp_active + active
  norm = d if cfg.norm_scale == "channel" else 1
  extra = sum(attention_extra_params(cfg.for_layer(i)) for i in range(cfg.num_layers))
  embedding = cfg.vocab_size * d
  lm_head = 0 if cfg.tie_embeddings else cfg.vocab_size * d
  projection = d * d if cfg.embed_projection else 0
  rest = cfg.num_layers * (attn + 2 * norm) + extra + norm + lm_head + projection
  non_embedding = rest + mlp_total
  return {"total": embedding + non_embedding, "embedding": embedding,
          "non_embedding": non_embedding, "active_non_embedding": rest + mlp_active}


def mlp_params(cfg: ModelConfig) -> tuple[int, int]:
  """(total, active per token) params of one layer's MLP (pass cfg.for_layer(i))."""
  d = cfg.embed_dim
  if not cfg.moe.enabled:
    return 3 * d * cfg.mlp_dim, 3 * d * cfg.mlp_dim
  expert, moe = 3 * d * cfg.expert_mlp_dim, cfg.moe
  shared = 3 * d * cfg.shared_mlp_dim + (d if moe.shared_gate else 0)
  router = d * moe.num_experts
  return router + moe.num_experts * expert + shared, router + moe.top_k * expert + shared


def attention_extra_params(cfg: ModelConfig) -> int:
  """Per-layer parameters of 'linear'/'hybrid' beyond q/k/v/o: hedgehog maps, decay, mixing
  (for cfg.attention_impl; pass cfg.for_layer(i) for a model with layer_attention_impls)."""
  if cfg.attention_impl not in ("linear", "hybrid"):
    return 0
  n = 0
  if cfg.linear_feature == "hedgehog":  # one map for queries [heads], one for keys [kv_heads]
    n += (cfg.num_heads + cfg.num_kv_heads) * cfg.resolved_head_dim * cfg.linear_feature_dim
  if cfg.attention_impl == "hybrid":
    n += cfg.num_heads  # window factor
  if cfg.linear_decay:
    n += cfg.num_heads
  return n


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Training FLOPs (forward + backward) per token (active params only in an MoE model)."""
  n = count_params(cfg)["active_non_embedding"]
  if cfg.tie_embeddings:
    n += cfg.vocab_size * cfg.embed_dim
  attention = sum(attention_flops_per_head(cfg.for_layer(i), seq_len)
                  for i in range(cfg.num_layers))
  return 6.0 * n + cfg.num_heads * attention


def attention_flops_per_head(cfg: ModelConfig, seq_len: int) -> float:
  """Training FLOPs of one layer's attention (cfg.attention_impl), per query head and token."""
  hd = cfg.resolved_head_dim
  if cfg.attention_impl in ("reference", "flash"):  # keys per query: at most the sliding window
    return 6.0 * min(seq_len, cfg.sliding_window or seq_len) * hd
  feature = {"hedgehog": 2 * cfg.linear_feature_dim, "taylor": 1 + hd + hd * hd}.get(
      cfg.linear_feature, hd)
  chunk = min(cfg.linear_chunk, seq_len)
  # phi(k)^T v into the state and phi(q) against it (2 * 2 * F * hd), plus the causal half of
  # the [chunk, chunk] part (2 * chunk * (F + hd) / 2); x3 for forward + backward.
  linear = 3.0 * (4 * feature * hd + chunk * (feature + hd))
  if cfg.attention_impl == "hybrid":
    linear += 12.0 * min(cfg.attention_window, seq_len) * hd
  return linear


def measure_peak_flops(size: int | None = None, dtype=jnp.float32, iters: int = 10,
                       devices: list[jax.Device] | None = None) -> float:
  """FLOP/s per device of a jitted [size, size] @ [size, size] matmul chain run on every one of
  `devices` (default: this process's) at once, best of 3.

  At once, because fake CPU devices share the host's cores: one device alone would be timed
  with every core to itself, a peak the training step (all devices busy) can never reach."""
  devices = list(devices or jax.local_devices())
  size = size or (512 if devices[0].platform == "cpu" else 4096)
  mesh = jax.sharding.Mesh(np.array(devices), ("d",))
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d"))  # [devices * size, size]
  a = jax.device_put(jnp.ones((size, size), dtype) / size,
                     jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  x = jax.device_put(jnp.ones((len(devices) * size, size), dtype) / size, rows)

  @jax.jit
  def chain(x, a):  # each device multiplies its own rows: no communication
    return jax.lax.fori_loop(0, iters, lambda _, y: y @ a, x)

  chain(x, a).block_until_ready()
  best = float("inf")
  for _ in range(3):
    start = time.perf_counter()
    chain(x, a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2.0 * size**3 * iters / best


def machine_peak_flops(per_device: float) -> float:
  """Whole-job peak: every device of the job at the per-device peak measured with all of this
  host's devices busy."""
  return per_device * jax.device_count()


def mfu(tokens_per_second: float, flops_token: float, peak_flops: float) -> float:
  return tokens_per_second * flops_token / peak_flops if peak_flops > 0 else float("nan")
