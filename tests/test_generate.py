"""Sampling: greedy decoding equals the argmax of a full forward pass; top-k limits choices."""

import jax
import jax.numpy as jnp
import numpy as np

from pretrainx.generate import generate, sample_logits
from pretrainx.model import ModelConfig, Transformer


def test_greedy_generation_matches_forward_argmax():
  cfg = ModelConfig(embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64,
                    max_seq_len=32)
  model = Transformer(cfg)
  params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  prompt = np.array([10, 20, 30], np.int32)
  out = generate(model, params, prompt, 6, rng=jax.random.key(1), temperature=0.0)
  assert out.shape == (6,)
  seq = list(prompt)
  for _ in range(6):
    logits = model.apply({"params": params}, jnp.array([seq]))
    seq.append(int(jnp.argmax(logits[0, -1])))
  assert list(out) == seq[3:]


def test_top_k_only_picks_among_the_k_best():
  logits = jnp.tile(jnp.arange(10.0)[None], (512, 1))
  picks = sample_logits(logits, jax.random.key(0), temperature=5.0, top_k=3)
  assert set(np.asarray(picks).tolist()) == {7, 8, 9}
