"""Sampling text from a trained model: temperature and top-k, cached decoding, batched prompts.

`Transformer(decode=True)` keeps per-layer decoding state in the flax 'cache' collection: a KV
cache for softmax layers ('reference', 'flash'), constant-size recurrent state for 'linear' and
'hybrid' (pretrainx.model.attention). `generate_batch` fills that state with one prefill of the
prompts, then decodes in jitted chunks of tokens and returns to Python between chunks, where rows
end early (eos, a `stop` callback, their budget). Models whose every layer is softmax decode all
prompts as one left-padded batch (the padding is cached as invalid and never attended); models with
'linear'/'hybrid' layers decode one prompt at a time, as their state cannot skip padding.
`kv_cache=False` instead reruns the causal model over a fixed-length token buffer for each new
token (positions after the cursor cannot affect it): the slow reference the cached paths are
tested against. `generate` is the one-prompt form.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen import spmd

RECURRENT_IMPLS = ("linear", "hybrid")
# Batched prompts pad their width, and the KV cache its length, to a multiple of this: calls of
# similar sizes (lm-eval's batches) reuse one compiled prefill and chunk function.
_BUCKET = 16


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
  """Runs the model over tokens [batch, t] (one document per row) from an empty 'cache'.

  Returns (logits of the last token [batch, vocab], cache). 'linear'/'hybrid' layers' state does
  not depend on t; a softmax layer's KV cache has the model's cache_len slots.
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


# ----------------------------------------------------------------------------- cached decoding


def _freeze(x):
  return tuple(_freeze(v) for v in x) if isinstance(x, (list, tuple)) else x


def _trace_context() -> tuple:
  """What a trace depends on besides its arguments: the logical-axis rules and the mesh."""
  return _freeze(spmd.get_logical_axis_rules()), jax.sharding.get_abstract_mesh()


def _sample_rows(logits, keys, temperature, top_k):
  """logits [batch, vocab], keys [batch] (a stream per row) -> (ids [batch] int32, next keys)."""
  def one(row_logits, key):
    key, sub = jax.random.split(key)  # as _buffer_decoder advances its one stream
    return sample_logits(row_logits[None], sub, temperature, top_k)[0].astype(jnp.int32), key
  return jax.vmap(one)(logits, keys)


@functools.partial(jax.jit, static_argnames=("model", "context"))
def _prefill_cache(params, tokens, positions, segment_ids, *, model, context):
  """tokens, positions, segment_ids (or None) [batch, width] -> (last logits [batch, vocab], cache).

  Rows are left-padded: the last column is every row's last prompt token.
  """
  with nn.logical_axis_rules(list(context[0])):
    logits, variables = model.apply({"params": params}, tokens, positions, segment_ids,
                                    decode=True, mutable=["cache"])
  return logits[:, -1], variables["cache"]


@functools.partial(jax.jit, static_argnames=("model", "temperature", "top_k", "chunk", "context"),
                   donate_argnames=("cache",))
def _decode_chunk(params, cache, logits, positions, keys, steps, *, model, temperature, top_k,
                  chunk, context):
  """Samples `steps` (<= chunk, traced: one compile serves every chunk) tokens per row, feeding each
  back at its row's position.

  logits [batch, vocab] predict the next token; positions [batch] are its RoPE positions; keys
  [batch] the rows' rng streams. Returns (ids [batch, chunk], of which the first `steps` are
  new, cache, logits, positions, keys), ready for the next chunk.
  """
  def body(i, carry):
    cache, logits, positions, keys, ids = carry
    token, keys = _sample_rows(logits, keys, temperature, top_k)  # [batch]
    out, variables = model.apply({"params": params, "cache": cache}, token[:, None],
                                 positions[:, None], decode=True, mutable=["cache"])
    return variables["cache"], out[:, -1], positions + 1, keys, ids.at[:, i].set(token)

  ids = jnp.zeros((logits.shape[0], chunk), jnp.int32)
  with nn.logical_axis_rules(list(context[0])):
    cache, logits, positions, keys, ids = jax.lax.fori_loop(
        0, steps, body, (cache, logits, positions, keys, ids))
  return ids, cache, logits, positions, keys


def _take(got: list[int], new: np.ndarray, budget: int, eos_id: int | None,
          stop: Callable[[int, np.ndarray], bool] | None, row: int) -> bool:
  """Appends `new` ids to the row's `got` until the row ends (eos, excluded; its budget; `stop`
  true after a token, included); returns whether it has ended."""
  for token in new.tolist():
    if len(got) >= budget or (eos_id is not None and token == eos_id):
      return True
    got.append(token)
    if stop is not None and stop(row, np.asarray(got, np.int32)):
      return True
  return len(got) >= budget


def _decode_rows(model, params, prompts, budgets, keys, rows, *, temperature, top_k, eos_id, stop,
                 chunk, pad) -> list[np.ndarray]:
  """Prefills prompts (left-padded to one width) and decodes them together, chunk by chunk.

  pad: the model has only softmax layers (padding is masked out; the width rounds up to _BUCKET,
  within max_seq_len).
  """
  lengths = [len(p) for p in prompts]
  width, steps = max(lengths), max(budgets)
  if pad:
    width = max(width, min(-(-width // _BUCKET) * _BUCKET, model.cfg.max_seq_len))
  tokens = np.zeros((len(prompts), width), np.int32)  # [batch, width], pad id 0
  positions = np.zeros_like(tokens)
  segment_ids = np.zeros_like(tokens)  # 0 on the padding: cached as invalid
  for r, p in enumerate(prompts):
    tokens[r, width - len(p):] = p
    positions[r, width - len(p):] = np.arange(len(p))
    segment_ids[r, width - len(p):] = 1
  if any(impl not in RECURRENT_IMPLS for impl in model.cfg.layer_impls):
    # the KV cache holds the padding and every fed token (the last sampled one is fed too)
    model = model.clone(cache_len=width + -(-steps // _BUCKET) * _BUCKET)
  context = _trace_context()
  logits, cache = _prefill_cache(params, tokens, positions,
                                 None if min(lengths) == width else segment_ids,
                                 model=model, context=context)
  next_positions = jnp.asarray(lengths, jnp.int32)  # [batch]
  got: list[list[int]] = [[] for _ in prompts]
  done = [b <= 0 for b in budgets]
  produced = 0
  while not all(done):
    n = min(chunk, max(b for b, d in zip(budgets, done) if not d) - produced)
    ids, cache, logits, next_positions, keys = _decode_chunk(
        params, cache, logits, next_positions, keys, jnp.int32(n), model=model,
        temperature=float(temperature), top_k=top_k, chunk=chunk, context=context)
    ids = np.asarray(jax.device_get(ids))[:, :n]
    produced += n
    for r in range(len(prompts)):
      if not done[r]:
        done[r] = _take(got[r], ids[r], budgets[r], eos_id, stop, rows[r])
  return [np.asarray(g, np.int32) for g in got]


def _token_limit(model: nn.Module) -> tuple[int, str]:
  """The most tokens (prompt + new) one row may hold, and what sets it."""
  cfg, cache_len = model.cfg, getattr(model, "cache_len", 0)
  if cache_len and cache_len < cfg.max_seq_len:
    return cache_len, f"the model's cache_len={cache_len}"
  return cfg.max_seq_len, f"max_seq_len={cfg.max_seq_len}"


def _generate_rows(model, params, prompts, max_new_tokens, keys, *, temperature, top_k, eos_id,
                   stop, chunk, kv_cache) -> list[np.ndarray]:
  """generate_batch with one rng stream per prompt (keys [len(prompts)])."""
  prompts = [np.asarray(p, np.int32).reshape(-1) for p in prompts]
  limit, limited_by = _token_limit(model)
  for i, p in enumerate(prompts):
    if len(p) == 0:
      raise ValueError(f"prompt {i} is empty; give at least one token." if len(prompts) > 1 else
                       "the prompt is empty; give at least one token.")
    if len(p) >= limit:
      raise ValueError(f"prompt of {len(p)} tokens leaves no room within {limited_by}.")
  if chunk < 1:
    raise ValueError(f"chunk={chunk}; decode at least one token per chunk.")
  budgets = [max(0, min(max_new_tokens, limit - len(p))) for p in prompts]
  if not prompts:
    return []
  if kv_cache is False:  # the reference: recompute the whole buffer, whole budget, then cut
    out = []
    for i, (p, budget) in enumerate(zip(prompts, budgets)):
      ids = jax.jit(_buffer_decoder(model, p, len(p) + budget, temperature, top_k))(params, keys[i])
      got: list[int] = []
      _take(got, np.asarray(jax.device_get(ids)), budget, eos_id, stop, i)
      out.append(np.asarray(got, np.int32))
    return out
  kw = dict(temperature=temperature, top_k=top_k, eos_id=eos_id, stop=stop, chunk=chunk)
  if not any(impl in RECURRENT_IMPLS for impl in model.cfg.layer_impls):
    return _decode_rows(model, params, prompts, budgets, keys, list(range(len(prompts))), pad=True,
                        **kw)
  # recurrent state would absorb left padding: one prompt at a time
  return [_decode_rows(model, params, [p], [budget], keys[i:i + 1], [i], pad=False, **kw)[0]
          for i, (p, budget) in enumerate(zip(prompts, budgets))]


def generate_batch(model: nn.Module, params: Any, prompts: Sequence[np.ndarray],
                   max_new_tokens: int, *, rng: jax.Array, temperature: float = 0.0,
                   top_k: int | None = None, eos_id: int | None = None,
                   stop: Callable[[int, np.ndarray], bool] | None = None, chunk: int = 32,
                   kv_cache: bool | None = None) -> list[np.ndarray]:
  """Continues each prompt (int ids [prompt_len], lengths may differ); returns per prompt only the
  new ids: at most max_new_tokens, capped so that prompt + new ids fit the model's max_seq_len
  (and its cache_len, when set), cut before the first eos_id.

  stop(row_index, new_ids_so_far) -> bool, called after each new token of a running row, ends
  that row there (that token included), e.g. once a stop string appeared. Rows decode in jitted
  chunks of `chunk` tokens (compiled once per batch and cache shape; padded widths and cache
  lengths round up to multiples of 16, so similar calls share compiles) until every row has ended.
  Row i samples from its own stream jax.random.split(rng, len(prompts))[i]; temperature 0 is
  greedy (deterministic).

  kv_cache: None decodes with the 'cache' collection (softmax-only models: all prompts as one
  left-padded batch over a KV cache; models with 'linear'/'hybrid' layers: one prompt at a time);
  False recomputes the whole token buffer for every new token, one prompt at a time (slow, the
  reference); True is None.
  """
  prompts = list(prompts)
  keys = jax.random.split(rng, len(prompts)) if prompts else None
  return _generate_rows(model, params, prompts, max_new_tokens, keys, temperature=temperature,
                        top_k=top_k, eos_id=eos_id, stop=stop, chunk=chunk, kv_cache=kv_cache)


def generate(model: nn.Module, params: Any, prompt: np.ndarray, max_new_tokens: int, *,
             rng: jax.Array, temperature: float = 0.8, top_k: int | None = 40,
             eos_id: int | None = None, recurrent: bool | None = None,
             kv_cache: bool | None = None) -> np.ndarray:
  """Continues `prompt` (int ids [prompt_len]) by up to max_new_tokens; returns only the new ids,
  cut at the first eos. Samples from the one stream `rng` whichever the decoder.

  recurrent: True requires every layer 'linear'/'hybrid' (constant-size state); False recomputes
  the whole buffer each token (the chunked/parallel form), as does kv_cache=False; None (both)
  decodes with the 'cache' collection: a KV cache for softmax layers, recurrent state otherwise.
  """
  can_recur = all(impl in RECURRENT_IMPLS for impl in model.cfg.layer_impls)
  if recurrent and not can_recur:
    raise ValueError(f"recurrent decoding needs every layer 'linear' or 'hybrid'; this model has "
                     f"{sorted(set(model.cfg.layer_impls))}.")
  if recurrent and kv_cache is False:
    raise ValueError("recurrent=True decodes from the 'cache' state and kv_cache=False recomputes "
                     "the buffer; pass one of them.")
  cached = not (recurrent is False or kv_cache is False)
  return _generate_rows(model, params, [prompt], max_new_tokens, jnp.expand_dims(rng, 0),
                        temperature=temperature, top_k=top_k, eos_id=eos_id, stop=None,
                        chunk=32, kv_cache=None if cached else False)[0]
