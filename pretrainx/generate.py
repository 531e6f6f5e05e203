"""Sampling text from a trained model: temperature and top-k, by one of two decoders.

Softmax models ('reference', 'flash') rerun the causal model over a fixed-length token buffer for
each new token (positions after the cursor cannot affect it): simple and exact for short samples.
'linear' and 'hybrid' models decode recurrently: the prompt fills per-layer state of constant size
(the flax 'cache' collection), then each step feeds one token. Both run in one jitted loop.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

RECURRENT_IMPLS = ("linear", "hybrid")


def sample_logits(logits: jax.Array, rng: jax.Array, temperature: float, top_k: int | None
                  ) -> jax.Array:
  """logits [batch, vocab] -> token ids [batch]; temperature 0 is greedy."""
  if temperature <= 0:
    return jnp.argmax(logits, axis=-1)
  logits = logits / temperature
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1)


def prefill(model: nn.Module, params: Any, tokens: jax.Array) -> tuple[jax.Array, Any]:
  """Runs a 'linear'/'hybrid' model over tokens [batch, t] from an empty state.

  Returns (logits of the last token [batch, vocab], cache): the cache's size does not depend on t.
  """
  batch, seq = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
  logits, variables = model.apply({"params": params}, tokens, positions, decode=True,
                                  mutable=["cache"])
  return logits[:, -1], variables["cache"]


def decode_step(model: nn.Module, params: Any, cache: Any, token: jax.Array, position: jax.Array
                ) -> tuple[jax.Array, Any]:
  """Feeds one token [batch] at `position` (int) -> (next logits [batch, vocab], new cache)."""
  positions = jnp.full((token.shape[0], 1), position, jnp.int32)
  logits, variables = model.apply({"params": params, "cache": cache}, token[:, None], positions,
                                  decode=True, mutable=["cache"])
  return logits[:, -1], variables["cache"]


def _buffer_decoder(model, prompt, total, temperature, top_k):
  """jittable (params, rng) -> new ids [total - len(prompt)], recomputing the whole buffer."""
  buffer = np.zeros((1, total), np.int32)
  buffer[0, :len(prompt)] = prompt

  def run(params, rng):
    def body(t, carry):
      buf, key = carry
      key, sub = jax.random.split(key)
      logits = model.apply({"params": params}, buf)  # [1, total, vocab]
      token = sample_logits(logits[:, t - 1], sub, temperature, top_k)
      return buf.at[:, t].set(token.astype(jnp.int32)), key
    buf = jax.lax.fori_loop(len(prompt), total, body, (jnp.asarray(buffer), rng))[0]
    return buf[0, len(prompt):]
  return run


def _recurrent_decoder(model, prompt, total, temperature, top_k):
  """jittable (params, rng) -> new ids, with constant-size state per layer (same rng stream)."""
  n = total - len(prompt)

  def run(params, rng):
    logits, cache = prefill(model, params, jnp.asarray(prompt)[None])

    def body(i, carry):
      logits, cache, key, out = carry
      key, sub = jax.random.split(key)
      token = sample_logits(logits, sub, temperature, top_k).astype(jnp.int32)  # [1]
      logits, cache = decode_step(model, params, cache, token, len(prompt) + i)
      return logits, cache, key, out.at[i].set(token[0])
    return jax.lax.fori_loop(0, n, body, (logits, cache, rng, jnp.zeros((n,), jnp.int32)))[3]
  return run


def generate(model: nn.Module, params: Any, prompt: np.ndarray, max_new_tokens: int, *,
             rng: jax.Array, temperature: float = 0.8, top_k: int | None = 40,
             eos_id: int | None = None, recurrent: bool | None = None) -> np.ndarray:
  """Continues `prompt` (int ids [prompt_len]) by up to max_new_tokens; returns only the new ids,
  cut at the first eos.

  recurrent: decode with constant-size per-layer state (every layer 'linear'/'hybrid'), or False
  to recompute the whole buffer each token (the chunked/parallel form); None picks recurrent
  where every layer allows it.
  """
  prompt = np.asarray(prompt, np.int32).reshape(-1)
  max_len = model.cfg.max_seq_len
  if len(prompt) == 0:
    raise ValueError("the prompt is empty; give at least one token.")
  if len(prompt) >= max_len:
    raise ValueError(f"prompt of {len(prompt)} tokens leaves no room within max_seq_len={max_len}.")
  total = min(max_len, len(prompt) + max_new_tokens)
  can_recur = all(impl in RECURRENT_IMPLS for impl in model.cfg.layer_impls)
  if recurrent and not can_recur:
    raise ValueError(f"recurrent decoding needs every layer 'linear' or 'hybrid'; this model has "
                     f"{sorted(set(model.cfg.layer_impls))}.")
  recurrent = can_recur if recurrent is None else recurrent
  decoder = (_recurrent_decoder if recurrent else _buffer_decoder)(
      model, prompt, total, temperature, top_k)
  out = np.asarray(jax.device_get(jax.jit(decoder)(params, rng)))
  if eos_id is not None and (out == eos_id).any():
    out = out[: int(np.argmax(out == eos_id))]
  return out
