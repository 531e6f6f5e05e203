"""Sampling text from a trained model: temperature and top-k over a fixed-length token buffer.

Each new token reruns the causal model over the buffer (positions after the cursor cannot affect
it), inside one jitted fori_loop: simple and exact for the short samples quickstart and the CLI make.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


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


def generate(model: nn.Module, params: Any, prompt: np.ndarray, max_new_tokens: int, *,
             rng: jax.Array, temperature: float = 0.8, top_k: int | None = 40,
             eos_id: int | None = None) -> np.ndarray:
  """Continues `prompt` (int ids [prompt_len]) by up to max_new_tokens; returns only the new ids,
  cut at the first eos."""
  prompt = np.asarray(prompt, np.int32).reshape(-1)
  max_len = model.cfg.max_seq_len
  if len(prompt) == 0:
    raise ValueError("the prompt is empty; give at least one token.")
  if len(prompt) >= max_len:
    raise ValueError(f"prompt of {len(prompt)} tokens leaves no room within max_seq_len={max_len}.")
  total = min(max_len, len(prompt) + max_new_tokens)
  buffer = np.zeros((1, total), np.int32)
  buffer[0, :len(prompt)] = prompt

  @jax.jit
  def run(params, buffer, rng):
    def body(t, carry):
      buf, key = carry
      key, sub = jax.random.split(key)
      logits = model.apply({"params": params}, buf)  # [1, total, vocab]
      token = sample_logits(logits[:, t - 1], sub, temperature, top_k)
      return buf.at[:, t].set(token.astype(jnp.int32)), key
    return jax.lax.fori_loop(len(prompt), total, body, (buffer, rng))[0]

  out = np.asarray(jax.device_get(run(params, jnp.asarray(buffer), rng)))[0, len(prompt):]
  if eos_id is not None and (out == eos_id).any():
    out = out[: int(np.argmax(out == eos_id))]
  return out
