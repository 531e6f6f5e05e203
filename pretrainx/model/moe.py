"""The mixture-of-experts MLP: a top-k softmax router, dropless or capacity-bounded dispatch to
SwiGLU experts, and expert parallelism over the 'expert' mesh axis.

Routing runs on the whole (sharded) batch. Dispatch runs per device under shard_map: a device
sorts its own (token, expert) pairs by the device that holds the expert, exchanges them with one
all_to_all over 'expert', runs its local experts as a grouped matmul (jax.lax.ragged_dot, or a
masked einsum), and sends the results back with a second all_to_all. The auxiliary losses
and the router statistics are sown into the 'intermediates' collection (see sown_moe).
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from pretrainx.config import ModelConfig
from pretrainx.model.layers import SwiGLU, dense_init, param_with_axes
from pretrainx.sharding import activation_axes, axes_size, current_mesh

# What each MoE layer sows (one scalar, or [experts] for the load); stacked over MoE layers.
SOWN = ("aux_loss", "balance_loss", "router_z_loss", "load", "dropped", "router_entropy")


def route(logits: jax.Array, top_k: int, norm_topk: bool
          ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """logits [tokens, experts] fp32 -> (weights [tokens, k] fp32, experts [tokens, k] int32,
  probs [tokens, experts]): the top-k softmax probabilities, renormalised with norm_topk."""
  probs = jax.nn.softmax(logits, axis=-1)
  weights, experts = jax.lax.top_k(probs, top_k)
  if norm_topk:
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  return weights, experts.astype(jnp.int32), probs


def router_statistics(logits: jax.Array, probs: jax.Array, experts: jax.Array,
                      num_experts: int) -> dict[str, jax.Array]:
  """Switch balance loss, ST-MoE router z-loss, per-expert load and router entropy (fp32).

  logits, probs: [tokens, experts]; experts: [tokens, k]. load[e] is the fraction of routed
  slots (token, k) sent to e before any drop (uniform: 1 / num_experts each).
  """
  load = jnp.mean(jax.nn.one_hot(experts, num_experts, dtype=jnp.float32), axis=(0, 1))
  importance = jnp.mean(probs, axis=0)  # mean router probability per expert
  entropy = -jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-9)), axis=-1)
  return {"balance_loss": num_experts * jnp.sum(load * importance),
          "router_z_loss": jnp.mean(jnp.square(jax.nn.logsumexp(logits, axis=-1))),
          "load": load, "router_entropy": jnp.mean(entropy)}


def expert_capacity(tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
  """Slots per expert for one device's `tokens` (capacity_factor 0: every pair fits)."""
  if capacity_factor <= 0:
    return tokens * top_k
  return min(tokens * top_k, math.ceil(capacity_factor * tokens * top_k / num_experts))


def grouped_swiglu(rows: jax.Array, ids: jax.Array, w_gate: jax.Array, w_up: jax.Array,
                   w_down: jax.Array, impl: str) -> jax.Array:
  """Each row through its expert's SwiGLU; ids == num local experts marks an empty row (-> 0).

  rows: [n, embed]; ids: [n] int32 in [0, experts]; w_gate, w_up: [experts, embed, mlp];
  w_down: [experts, mlp, embed] -> [n, embed].
  """
  experts = w_gate.shape[0]
  if impl == "einsum":  # every expert on every row, the row's own one selected: plain and exact
    select = jax.nn.one_hot(ids, experts, dtype=rows.dtype)  # [n, experts]; empty rows: 0
    gate = jnp.einsum("nd,edm->nem", rows, w_gate)
    up = jnp.einsum("nd,edm->nem", rows, w_up)
    return jnp.einsum("nem,emd,ne->nd", jax.nn.silu(gate) * up, w_down, select)
  order = jnp.argsort(ids, stable=True)  # rows grouped by expert, empty rows last
  sizes = jnp.bincount(ids, length=experts + 1)[:experts].astype(jnp.int32)
  grouped = rows[order]
  gate = jax.lax.ragged_dot(grouped, w_gate, sizes)
  up = jax.lax.ragged_dot(grouped, w_up, sizes)
  out = jax.lax.ragged_dot(jax.nn.silu(gate) * up, w_down, sizes)
  valid = (jnp.arange(rows.shape[0]) < jnp.sum(sizes))[:, None]
  return jnp.zeros_like(out).at[order].set(jnp.where(valid, out, 0))


def dispatch(x: jax.Array, experts: jax.Array, weights: jax.Array, w_gate: jax.Array,
             w_up: jax.Array, w_down: jax.Array, *, num_experts: int, capacity_factor: float,
             impl: str, expert_axis: str | None = None, exchange: bool = False,
             tensor_axis=None) -> tuple[jax.Array, jax.Array]:
  """One device's tokens through their experts -> (out [tokens, embed], kept [tokens, k]).

  x: [tokens, embed]; experts, weights: [tokens, k]; the w_* hold this device's experts
  (num_experts / size of expert_axis of them). Without expert_axis every expert is local. With
  it and `exchange` (the expert axis also splits the batch), pairs travel to the device holding
  their expert in fixed [devices, slots] buffers (all_to_all) and back; without `exchange` the
  tokens are the same on every device of the axis, each runs its own experts, and a psum adds
  the parts. With capacity_factor > 0 an expert keeps the first `expert_capacity` pairs of this
  device in token order and drops the rest. tensor_axis: the mesh axis the experts' hidden
  width is split over (a psum sums the partial down projections).
  """
  tokens, k = experts.shape
  ep = jax.lax.axis_size(expert_axis) if expert_axis else 1
  local = num_experts // ep
  pairs = tokens * k
  flat_e = experts.reshape(pairs)
  order = jnp.argsort(flat_e, stable=True)  # pairs by expert, then token order
  sorted_e, sorted_token = flat_e[order], order // k
  sizes = jnp.bincount(flat_e, length=num_experts)
  starts = jnp.cumsum(sizes) - sizes
  rank = jnp.arange(pairs) - starts[sorted_e]  # position of a pair within its expert
  cap = expert_capacity(tokens, k, num_experts, capacity_factor)
  keep = rank < cap  # [pairs], in sorted order
  rows = x[sorted_token]  # [pairs, embed]

  if expert_axis and exchange:
    slots = min(pairs, local * cap)  # per destination device
    kept = jnp.minimum(sizes, cap)
    before = jnp.cumsum(kept) - kept  # kept pairs of lower-numbered experts
    dest = sorted_e // local
    slot = dest * slots + before[sorted_e] - before[dest * local] + rank
    slot = jnp.where(keep, slot, ep * slots)  # out of range: dropped by the scatter
    send = jnp.zeros((ep * slots, x.shape[1]), x.dtype).at[slot].set(rows, mode="drop")
    send_ids = jnp.full((ep * slots,), local, jnp.int32).at[slot].set(
        sorted_e % local, mode="drop")
    exchange_fn = lambda a: jax.lax.all_to_all(a, expert_axis, 0, 0, tiled=True)
    out = grouped_swiglu(exchange_fn(send), exchange_fn(send_ids), w_gate, w_up, w_down, impl)
    if tensor_axis:
      out = jax.lax.psum(out, tensor_axis)
    back = exchange_fn(out)  # [ep * slots, embed], in the send layout
    pair_out = jnp.where(keep[:, None], back[jnp.minimum(slot, ep * slots - 1)], 0)
  else:
    first = jax.lax.axis_index(expert_axis) * local if expert_axis else 0
    mine = keep & (sorted_e >= first) & (sorted_e < first + local)
    ids = jnp.where(mine, sorted_e - first, local)
    pair_out = grouped_swiglu(rows, ids, w_gate, w_up, w_down, impl)
    if tensor_axis:
      pair_out = jax.lax.psum(pair_out, tensor_axis)
  w = weights.reshape(pairs)[order].astype(x.dtype)
  out = jnp.zeros_like(x).at[sorted_token].add(pair_out * w[:, None])
  if expert_axis and not exchange:
    out = jax.lax.psum(out, expert_axis)
  kept_pairs = jnp.zeros((pairs,), bool).at[order].set(keep).reshape(tokens, k)
  return out, kept_pairs


def _spec_axes(mesh, logical: str, dim: int):
  """The mesh axes `logical` maps to, if they split `dim` evenly (else None: replicated)."""
  axes = activation_axes(logical)
  return axes if axes is not None and dim % axes_size(mesh, axes) == 0 else None


class MoeMLP(nn.Module):
  """Top-k routed SwiGLU experts (+ shared experts): x [batch, seq, embed] -> same shape."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg, moe = self.cfg, self.cfg.moe
    e, d, m, dt = moe.num_experts, cfg.embed_dim, cfg.expert_mlp_dim, cfg.compute_dtype
    # A small router init (as Mixtral's): near-uniform routing at the start.
    router = param_with_axes(self, "router", nn.initializers.normal(cfg.init_std), (d, e),
                             ("embed", None), cfg.storage_dtype)
    init = dense_init((1,), (2,), (0,))  # [experts, in, out]: fan-in per expert
    w_gate = param_with_axes(self, "gate_proj", init, (e, d, m), ("experts", "embed", "mlp"),
                             cfg.storage_dtype)
    w_up = param_with_axes(self, "up_proj", init, (e, d, m), ("experts", "embed", "mlp"),
                           cfg.storage_dtype)
    w_down = param_with_axes(self, "down_proj", init, (e, m, d), ("experts", "mlp", "embed"),
                             cfg.storage_dtype)
    batch, seq, _ = x.shape
    logits = jnp.einsum("bsd,de->bse", x, router.astype(dt)).astype(jnp.float32)
    weights, experts, probs = route(logits.reshape(-1, e), moe.top_k, moe.norm_topk)
    weights, experts = weights.reshape(batch, seq, -1), experts.reshape(batch, seq, -1)
    out, kept = self._dispatch(x, experts, weights,
                               *(w.astype(dt) for w in (w_gate, w_up, w_down)))
    if cfg.shared_mlp_dim:
      shared = SwiGLU(dataclasses.replace(cfg, mlp_dim=cfg.shared_mlp_dim), name="shared")(x)
      if moe.shared_gate:
        w = param_with_axes(self, "shared_gate", dense_init((0,), (1,)), (d, 1), ("embed", None),
                            cfg.storage_dtype)
        shared = shared * jax.nn.sigmoid(jnp.einsum("bsd,do->bso", x, w.astype(dt)))
      out = out + shared
    if self.is_mutable_collection("intermediates"):
      stats = router_statistics(logits.reshape(-1, e), probs, experts.reshape(-1, moe.top_k), e)
      stats["dropped"] = 1.0 - jnp.mean(kept.astype(jnp.float32))
      stats["aux_loss"] = (moe.balance_loss * stats["balance_loss"]
                           + moe.router_z_loss * stats["router_z_loss"])
      for name in SOWN:
        self.sow("intermediates", name, stats[name], reduce_fn=lambda _, new: new,
                 init_fn=lambda: jnp.zeros((), jnp.float32))
    return nn.with_logical_constraint(
        out, ("activation_batch", "activation_length", "activation_embed"))

  def _dispatch(self, x, experts, weights, w_gate, w_up, w_down):
    """dispatch() on each device's tokens under shard_map, or directly without a mesh."""
    moe, mesh = self.cfg.moe, current_mesh()
    kwargs = dict(num_experts=moe.num_experts, capacity_factor=moe.capacity_factor,
                  impl="ragged" if moe.impl == "auto" else moe.impl)
    batch, seq, d = x.shape
    if mesh is None:
      out, kept = dispatch(x.reshape(-1, d), experts.reshape(batch * seq, -1),
                           weights.reshape(batch * seq, -1), w_gate, w_up, w_down, **kwargs)
      return out.reshape(x.shape), kept
    expert_axis = activation_axes("experts")
    if expert_axis is not None and moe.num_experts % axes_size(mesh, expert_axis):
      raise ValueError(
          f"MoeConfig.num_experts={moe.num_experts} is not divisible by the {expert_axis!r} mesh "
          f"axis ({axes_size(mesh, expert_axis)} devices); use a multiple of it as the expert "
          "count or shrink MeshConfig.expert.")
    if expert_axis is not None and axes_size(mesh, expert_axis) == 1:
      expert_axis = None
    batch_axes = _spec_axes(mesh, "activation_batch", batch)
    length_axes = _spec_axes(mesh, "activation_length", seq)
    tensor_axis = _spec_axes(mesh, "mlp", w_gate.shape[-1])
    token_axes = [a for axes in (batch_axes, length_axes) if axes is not None
                  for a in ((axes,) if isinstance(axes, str) else axes)]
    exchange = expert_axis is not None and expert_axis in token_axes
    tokens = P(batch_axes, length_axes, None)
    experts_in, mlp_out = P(expert_axis, None, tensor_axis), P(expert_axis, tensor_axis, None)

    def local(x, experts, weights, w_gate, w_up, w_down):
      b, s, _ = x.shape
      out, kept = dispatch(x.reshape(b * s, d), experts.reshape(b * s, -1),
                           weights.reshape(b * s, -1), w_gate, w_up, w_down,
                           expert_axis=expert_axis, exchange=exchange, tensor_axis=tensor_axis,
                           **kwargs)
      return out.reshape(b, s, d), kept.reshape(b, s, -1)

    return jax.shard_map(local, in_specs=(tokens, tokens, tokens, experts_in, experts_in, mlp_out),
                         out_specs=(tokens, tokens), check_vma=False)(
                             x, experts, weights, w_gate, w_up, w_down)


def sown_moe(intermediates: dict) -> dict[str, jax.Array]:
  """The statistics the MoE layers sowed, each stacked over MoE layers ([moe_layers] or
  [moe_layers, experts] for 'load'), scanned or unrolled; {} for a dense model."""
  if "layers" in intermediates:
    found = intermediates["layers"].get("moe", {})
    return {name: found[name] for name in SOWN if name in found}
  blocks = sorted((k for k in intermediates if k.startswith("layers_")
                   and "moe" in intermediates[k]), key=lambda k: int(k.split("_")[1]))
  if not blocks:
    return {}
  return {name: jnp.stack([intermediates[k]["moe"][name] for k in blocks]) for name in SOWN}
