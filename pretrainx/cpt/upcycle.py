"""Dense -> mixture-of-experts as pure functions on params: sparse upcycling (Komatsuzaki et al.:
every expert starts as a copy of the layer's MLP, so the upcycled model computes the dense
model's function at step 0) and Lifelong-MoE expansion (more experts appended to an MoE, the old
ones kept and, with TuneConfig.frozen_experts, frozen).

`upcycle_sharded` runs the surgery as one jitted program whose outputs land in the run's param
shardings: each device computes only its own slice of the experts, so the num_experts copies of
an MLP are never materialised whole on a host or a device.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from pretrainx.config import ModelConfig
from pretrainx.model.layers import dense_init

Params = Any  # nested dict of unboxed arrays, as TrainState.params holds
EXPERT_WEIGHTS = ("gate_proj", "up_proj", "down_proj")


def needs_upcycling(src: ModelConfig, cfg: ModelConfig) -> bool:
  """Whether a source built as `src` must be turned into `cfg`'s experts."""
  return any(src.for_layer(i).moe != cfg.for_layer(i).moe for i in range(cfg.num_layers))


def _blocks(params: Params, cfg: ModelConfig) -> list[Params]:
  """The per-layer param dicts, from either layout."""
  if "layers" in params:
    return [jax.tree.map(lambda x, i=i: x[i], params["layers"]) for i in range(cfg.num_layers)]
  return [params[f"layers_{i}"] for i in range(cfg.num_layers)]


def _fresh(init, key, shape, dtype):
  return init(key, shape, jnp.float32).astype(dtype)


def _fresh_router(cfg: ModelConfig, key: jax.Array, dtype) -> jax.Array:
  """A layer's new [embed, experts] router. Drawn outside jit: jax.random.normal's last bits
  differ when XLA fuses it into a larger program, and these are small."""
  return _fresh(jax.nn.initializers.normal(cfg.init_std), jax.random.split(key, 4)[0],
                (cfg.embed_dim, cfg.moe.num_experts), dtype)


def _upcycle_block(block: Params, src: ModelConfig, cfg: ModelConfig, layer: int,
                   key: jax.Array, fresh_router: jax.Array | None = None) -> Params:
  """One layer of `src` -> the same layer of `cfg` (cfg.for_layer already applied to both)."""
  if src.moe == cfg.moe:
    return block
  if not cfg.moe.enabled:
    raise ValueError(f"layer {layer} is an MoE layer in the source but dense in this run; "
                     "pretrainx does not merge experts back into one MLP. Keep the source's "
                     "MoeConfig (num_experts, every).")
  out = {k: v for k, v in block.items() if k not in ("mlp", "moe")}
  e, d, m = cfg.moe.num_experts, cfg.embed_dim, cfg.expert_mlp_dim
  dtype = jax.tree.leaves(block)[0].dtype
  keys = jax.random.split(key, 4)
  if fresh_router is None:
    fresh_router = _fresh_router(cfg, key, dtype)
  if "mlp" in block:  # sparse upcycling: every expert a copy of the dense MLP
    if src.mlp_dim != m:
      raise ValueError(f"cannot upcycle layer {layer}: its MLP is {src.mlp_dim} wide but "
                       f"MoeConfig.expert_mlp_dim={m}; leave expert_mlp_dim unset (None) so each "
                       "expert is a copy of the MLP.")
    moe = {name: jnp.broadcast_to(block["mlp"][name], (e, *block["mlp"][name].shape))
           for name in EXPERT_WEIGHTS}
    moe["router"] = fresh_router
  elif "moe" in block:  # Lifelong-MoE: keep the old experts, append new ones
    old = src.moe.num_experts
    if e < old or src.expert_mlp_dim != m or src.shared_mlp_dim != cfg.shared_mlp_dim:
      raise ValueError(
          f"cannot grow layer {layer}'s experts: the source has {old} experts of width "
          f"{src.expert_mlp_dim} (shared {src.shared_mlp_dim}), this run {e} of width {m} "
          f"(shared {cfg.shared_mlp_dim}); new experts may only be added, at the same widths.")
    shapes = {"gate_proj": (e - old, d, m), "up_proj": (e - old, d, m),
              "down_proj": (e - old, m, d)}
    moe = {name: jnp.concatenate([block["moe"][name], _fresh(
        dense_init((1,), (2,), (0,)), k, shapes[name], dtype)])
           for name, k in zip(EXPERT_WEIGHTS, keys[1:])}
    moe["router"] = jnp.concatenate([block["moe"]["router"], fresh_router[:, old:]], axis=1)
    moe.update({k: v for k, v in block["moe"].items() if k not in moe})
    out["moe"] = moe
    return out
  else:
    raise ValueError(f"layer {layer} of the source has no MLP to upcycle (its params are "
                     f"{sorted(block)}); upcycling copies a dense SwiGLU MLP ('mlp') into every "
                     "expert.")
  if cfg.shared_mlp_dim:  # shared experts start with a zero output: the function is unchanged
    ks = jax.random.split(keys[1], 3)
    moe["shared"] = {
        "gate_proj": _fresh(dense_init((0,), (1,)), ks[0], (d, cfg.shared_mlp_dim), dtype),
        "up_proj": _fresh(dense_init((0,), (1,)), ks[1], (d, cfg.shared_mlp_dim), dtype),
        "down_proj": jnp.zeros((cfg.shared_mlp_dim, d), dtype)}
    if cfg.moe.shared_gate:
      moe["shared_gate"] = _fresh(dense_init((0,), (1,)), ks[2], (d, 1), dtype)
  out["moe"] = moe
  return out


def upcycle(params: Params, src: ModelConfig, cfg: ModelConfig, rng: jax.Array,
            routers: dict[int, jax.Array] | None = None) -> Params:
  """Params of Transformer(src) -> params of Transformer(cfg), whose MLPs are (more) experts.

  Dense MLPs are copied into every expert and get a fresh router; with MoeConfig.norm_topk the
  top-k weights sum to one, so the upcycled model computes the dense model's function exactly
  (new shared experts start with a zero down projection). An MoE layer with fewer experts keeps
  them and its router columns and gets fresh ones for the added experts. The layer layout
  (scanned or not) follows cfg. `routers` ({layer: fresh router}, from fresh_routers) are used
  in place of drawing them here.
  """
  fixed = {f: getattr(src, f) for f in ("embed_dim", "num_layers")}
  if fixed != {f: getattr(cfg, f) for f in fixed}:
    raise ValueError(f"cannot upcycle: the source has {fixed}, this run embed_dim="
                     f"{cfg.embed_dim}, num_layers={cfg.num_layers}.")
  if cfg.moe.enabled and not cfg.moe.norm_topk and not src.moe.enabled:
    logging.warning("MoeConfig.norm_topk=False: the upcycled experts' weights do not sum to one, "
                    "so at step 0 the model scales each MLP output by its top-k probability mass.")
  keys = jax.random.split(rng, cfg.num_layers)
  routers = routers or {}
  blocks = [_upcycle_block(b, src.for_layer(i), cfg.for_layer(i), i, keys[i], routers.get(i))
            for i, b in enumerate(_blocks(params, src))]
  out = {k: v for k, v in params.items() if not re.fullmatch(r"layers(_\d+)?", k)}
  if cfg.scan_layers:
    out["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)
  else:
    out.update({f"layers_{i}": b for i, b in enumerate(blocks)})
  return out


def fresh_routers(params: Params, src: ModelConfig, cfg: ModelConfig, rng: jax.Array
                  ) -> dict[int, jax.Array]:
  """{layer: the new router upcycle() draws for it}, for every layer that gets experts."""
  dtype = jax.tree.leaves(params)[0].dtype
  keys = jax.random.split(rng, cfg.num_layers)
  return {i: _fresh_router(cfg.for_layer(i), keys[i], dtype) for i in range(cfg.num_layers)
          if src.for_layer(i).moe != cfg.for_layer(i).moe and cfg.for_layer(i).moe.enabled}


def upcycle_sharded(params: Params, src: ModelConfig, cfg: ModelConfig, rng: jax.Array,
                    out_shardings: Any) -> Params:
  """upcycle() compiled with `out_shardings` (the shardings of Transformer(cfg)'s params on the
  run's mesh): the same values, bit for bit, with the experts built shard by shard on the
  devices. Only the small routers are drawn beforehand (see _fresh_router)."""
  routers = fresh_routers(params, src, cfg, rng)
  return upcycle_program(src, cfg, out_shardings)(params, rng, routers)


def upcycle_program(src: ModelConfig, cfg: ModelConfig, out_shardings: Any):
  """The jitted (params, rng, routers) -> upcycled params that upcycle_sharded runs."""
  return jax.jit(lambda p, k, r: upcycle(p, src, cfg, k, r), out_shardings=out_shardings)


def frozen_expert_mask(params: Params, frozen: int) -> Params:
  """A mask (pretrainx.cpt.peft.masked_optimizer) that freezes the first `frozen` experts of every
  MoE layer and their router columns; every other param trains."""

  def leaf(path, x):
    names = [getattr(k, "key", str(k)) for k in path]
    if len(names) < 2 or names[-2] != "moe":
      return True
    stacked = names[0] == "layers"
    if names[-1] in EXPERT_WEIGHTS:  # [layers?, experts, in, out]
      axis, n = int(stacked), x.shape[int(stacked)]
    elif names[-1] == "router":  # [layers?, embed, experts]
      axis, n = x.ndim - 1, x.shape[-1]
    else:
      return True
    shape = [1] * x.ndim
    shape[axis] = n
    return (np.arange(n) >= frozen).reshape(shape)

  return jax.tree_util.tree_map_with_path(leaf, params)
