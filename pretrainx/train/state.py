"""TrainState, the pytree a step maps to the next, and its sharded creation.

Sharded init follows eval_shape -> logical partition specs -> NamedShardings -> jitted init with
out_shardings, so no parameter is ever materialised unsharded.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pretrainx.ema import ema_init
from pretrainx.sharding import logical_to_shardings, mesh_scope
from pretrainx.train.guard import GuardState
from pretrainx.config import TuneConfig
from pretrainx.train.tuning import with_adapters


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: steps taken so far (skipped bad steps included)
  params: Any
  opt_state: Any
  guard: GuardState  # running loss statistics and bad-step counters
  ema: Any = None  # float32 moving average of params (EmaConfig), or None when off


def new_state(params: Any, optimizer: optax.GradientTransformation, *, opt_state: Any = None,
              step: int = 0, ema: bool = False) -> TrainState:
  """A state at `step` around `params` (call inside jit with out_shardings: every leaf gets its
  own buffer, which donation needs)."""
  return TrainState(step=jnp.asarray(step, jnp.int32), params=params,
                    opt_state=optimizer.init(params) if opt_state is None else opt_state,
                    guard=GuardState.create(), ema=ema_init(params) if ema else None)


def _boxed_params(model: nn.Module, rng: jax.Array, seq_len: int,
                  tune: TuneConfig = TuneConfig()) -> Any:
  tokens = jnp.zeros((1, seq_len), jnp.int32)
  init_rng, adapter_rng = jax.random.split(rng)
  return with_adapters(model.init(init_rng, tokens)["params"], tune, adapter_rng)


def abstract_params(model: nn.Module, seq_len: int, tune: TuneConfig = TuneConfig()) -> Any:
  """The state's params as ShapeDtypeStructs (model params, or {'base', 'lora'} with LoRA)."""
  boxed = jax.eval_shape(lambda r: _boxed_params(model, r, seq_len, tune), jax.random.key(0))
  return jax.tree.map(lambda x: x.value if isinstance(x, nn.Partitioned) else x, boxed,
                      is_leaf=lambda x: isinstance(x, nn.Partitioned))


def state_shardings(model: nn.Module, optimizer: optax.GradientTransformation, mesh: Mesh,
                    rules, seq_len: int, ema: bool = False, tune: TuneConfig = TuneConfig()
                    ) -> tuple[TrainState, TrainState]:
  """(abstract state, shardings), both TrainState-shaped, from shapes alone (nothing allocated).

  With `ema`, the state also holds a float32 params-shaped EMA sharded like the params."""
  boxed = jax.eval_shape(lambda rng: _boxed_params(model, rng, seq_len, tune), jax.random.key(0))
  param_shardings = logical_to_shardings(boxed, mesh, rules)
  abstract_params = jax.tree.map(lambda x: x.value if isinstance(x, nn.Partitioned) else x, boxed,
                                 is_leaf=lambda x: isinstance(x, nn.Partitioned))
  abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
  replicated = NamedSharding(mesh, PartitionSpec())
  opt_shardings = _optimizer_state_shardings(abstract_opt, abstract_params, param_shardings,
                                             replicated)
  abstract_guard = jax.eval_shape(GuardState.create)
  abstract_ema = jax.eval_shape(ema_init, abstract_params) if ema else None
  abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract_params,
                        opt_state=abstract_opt, guard=abstract_guard, ema=abstract_ema)
  shardings = TrainState(step=replicated, params=param_shardings, opt_state=opt_shardings,
                         guard=jax.tree.map(lambda _: replicated, abstract_guard),
                         ema=param_shardings if ema else None)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
  return abstract, shardings


def _dict_path(path) -> tuple[str, ...]:
  """The trailing run of dict keys of a key path: where a moment sits inside its params tree."""
  keys = []
  for k in reversed(path):
    if not isinstance(k, jax.tree_util.DictKey):
      break
    keys.append(str(k.key))
  return tuple(reversed(keys))


def _optimizer_state_shardings(abstract_opt, abstract_params, param_shardings, replicated):
  """Optimizer-state leaves shaped like a param (Adam moments, momenta) shard like that param;
  everything else (counts, Adafactor's factored statistics) is small and replicated."""
  by_path = {}
  for (path, leaf), sharding in zip(jax.tree_util.tree_flatten_with_path(abstract_params)[0],
                                    jax.tree.leaves(param_shardings)):
    by_path[_dict_path(path)] = (leaf.shape, sharding)

  def pick(path, leaf):
    shape, sharding = by_path.get(_dict_path(path), (None, None))
    return sharding if shape == leaf.shape else replicated

  return jax.tree_util.tree_map_with_path(pick, abstract_opt)


def create_train_state(model: nn.Module, optimizer: optax.GradientTransformation, mesh: Mesh,
                       rules, seed: int, seq_len: int, ema: bool = False,
                       tune: TuneConfig = TuneConfig()) -> tuple[TrainState, TrainState]:
  """Initialises parameters and optimizer state directly into their shardings."""
  _, shardings = state_shardings(model, optimizer, mesh, rules, seq_len, ema, tune)

  def init(rng):
    params = nn.unbox(_boxed_params(model, rng, seq_len, tune))
    return new_state(params, optimizer, ema=ema)

  with mesh_scope(mesh, rules):
    state = jax.jit(init, out_shardings=shardings)(jax.random.key(seed))
  return state, shardings
