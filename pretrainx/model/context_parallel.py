"""Context parallelism: the sequence split over the mesh axes that the logical rules give
'activation_length' (MeshConfig.context), in a causally load-balanced order.

With causal attention, the tokens late in a sequence see more keys than the early ones, so a
plain split would give the last device most of the work. The sequence is cut into 2 x C chunks
and device r holds chunks r and 2C-1-r ("zigzag", as Llama 3 and MaxText do), so every device
does the same work. The Transformer reorders its inputs this way on entry and restores the
natural order before the logits, so the loss, metrics and scorers see tokens where they were.
Attention (model.kernels.shard_attention) gathers the keys and values of the whole sequence and
masks by each token's index in the natural order (`layout`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pretrainx.sharding import activation_axes, axes_size, current_mesh


def context_size() -> int:
  """How many devices split the sequence under the current mesh and rules (1 outside a mesh)."""
  mesh = current_mesh()
  if mesh is None:
    return 1
  return axes_size(mesh, activation_axes("activation_length"))


def mesh_context_size(mesh, rules) -> int:
  """How many devices `rules` split the sequence over on `mesh` (before tracing anything)."""
  axes = dict(rules).get("activation_length")
  return axes_size(mesh, axes)


def seq_multiple(context: int, load_balance: bool) -> int:
  """What the sequence length must be a multiple of: 2C chunks when balanced, else C."""
  return context * (2 if load_balance and context > 1 else 1)


def check_split(seq_len: int, context: int, load_balance: bool, impls: tuple[str, ...]) -> None:
  """ValueError (one line, with the fix) when a sequence cannot be split over `context`."""
  if context <= 1:
    return
  multiple = seq_multiple(context, load_balance)
  if seq_len % multiple:
    how = (f"2 x context = {multiple} chunks (causal load balancing)" if load_balance
           else f"context = {context}")
    raise ValueError(f"sequence length {seq_len} cannot be split into {how}; use a sequence "
                     f"length that is a multiple of {multiple}, or change MeshConfig.context.")
  recurrent = sorted({i for i in impls if i in ("linear", "hybrid")})
  if recurrent:
    raise ValueError(
        f"attention_impl {', '.join(map(repr, recurrent))} cannot split a sequence over "
        f"MeshConfig.context={context}: its recurrent state runs along the whole sequence; use "
        "'flash' or 'reference' for context parallelism, or MeshConfig.context=1.")


def check_sequence(seq_len: int, context: int, cfg, where: str = "RunConfig.seq_len") -> None:
  """check_split for a ModelConfig `cfg`, and its explicit flash blocks (flash_block_q/k) must
  divide each device's part of the sequence (else every block row pads): one-line ValueErrors
  that name `where` the length comes from."""
  try:
    check_split(seq_len, context, cfg.context_load_balance, cfg.layer_impls)
  except ValueError as err:
    raise ValueError(f"{where}: {err}") from None
  if "flash" not in cfg.layer_impls:
    return
  local = seq_len // max(context, 1)
  for name in ("flash_block_q", "flash_block_k"):
    block = getattr(cfg, name)
    if block is not None and local % block:
      per = f" ({seq_len} / context {context})" if context > 1 else ""
      raise ValueError(f"{where}: sequence length {local}{per} is not a multiple of "
                       f"ModelConfig.{name}={block}; use a length that is, or a block that "
                       "divides it (None: the kernel's default).")


def layout(seq_len: int, context: int, load_balance: bool) -> np.ndarray:
  """[seq_len] int32: the natural-order index of each position of the split sequence; device r
  holds positions [r * seq_len / context, (r + 1) * seq_len / context)."""
  natural = np.arange(seq_len, dtype=np.int32)
  if context <= 1 or not load_balance:
    return natural
  return _balance(np, natural[None], context)[0]


def balance(x: jax.Array, context: int) -> jax.Array:
  """x [batch, seq, ...] in natural order -> zigzag order: device r's part is chunks r, 2C-1-r.

  Written as reshapes and a flip, so that GSPMD moves the chunks with collective permutes
  instead of gathering the sequence."""
  return _balance(jnp, x, context)


def _balance(xp, x, context: int):
  """`balance` with the array module xp (numpy for the static layout, jax.numpy in the model)."""
  b, s = x.shape[:2]
  chunks = x.reshape(b, 2 * context, s // (2 * context), *x.shape[2:])
  pairs = xp.stack([chunks[:, :context], xp.flip(chunks[:, context:], axis=1)], axis=2)
  return pairs.reshape(x.shape)  # [b, C, 2, chunk, ...] -> [b, seq, ...]


def restore(x: jax.Array, context: int) -> jax.Array:
  """The inverse of `balance`: zigzag order -> natural order."""
  b, s = x.shape[:2]
  pairs = x.reshape(b, context, 2, s // (2 * context), *x.shape[2:])
  chunks = jnp.concatenate([pairs[:, :, 0], jnp.flip(pairs[:, :, 1], axis=1)], axis=1)
  return chunks.reshape(x.shape)
