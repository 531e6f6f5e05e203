"""Outlier-safe options and the activation-kurtosis metric."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pretrainx.metrics import read_metrics
from pretrainx.model import ModelConfig, Transformer, count_params
from pretrainx.model.layers import excess_kurtosis
from pretrainx.train import loop


@pytest.mark.parametrize("sample,expected", [
    (lambda k: jax.random.normal(k, (400_000,)), 0.0),
    (lambda k: jax.random.uniform(k, (400_000,)), -1.2),
    (lambda k: jax.random.laplace(k, (400_000,)), 3.0),
])
def test_excess_kurtosis_of_known_distributions(sample, expected):
  assert float(excess_kurtosis(sample(jax.random.key(0)))) == pytest.approx(expected, abs=0.1)


def test_single_scale_norm_and_embedding_projection():
  cfg = ModelConfig(embed_dim=32, num_heads=4, num_kv_heads=2, mlp_dim=64, norm_scale="scalar",
                    embed_projection=True)
  params = Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  params = jax.tree.map(lambda b: b.value, params, is_leaf=lambda b: hasattr(b, "value"))
  assert params["final_norm"]["scale"].shape == ()
  assert params["layers"]["input_norm"]["scale"].shape == (2,)  # one scalar per scanned layer
  np.testing.assert_array_equal(params["embed_projection"], np.eye(32))
  n = sum(x.size for x in jax.tree.leaves(params))
  assert n == count_params(cfg)["total"] + (cfg.padded_vocab_size - cfg.vocab_size) * 32
  with pytest.raises(ValueError, match="norm_scale='per-head'"):
    ModelConfig(norm_scale="per-head")


def test_kurtosis_is_logged_per_layer(tiny_exp):
  result = loop.train(tiny_exp(run={"steps": 4, "log_every": 1, "sample_tokens": 0,
                                    "eval_batches": 1, "microbatches": 2,
                                    "global_batch_size": 16}))
  row = [r for r in read_metrics(result.paths.metrics) if "train/loss" in r][-1]
  layers = [row["train/kurtosis/layer_0"], row["train/kurtosis/layer_1"]]
  assert all(np.isfinite(layers)) and row["train/kurtosis/max"] == max(layers)
