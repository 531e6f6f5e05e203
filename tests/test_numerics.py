"""Outlier-safe options and the activation-kurtosis metric."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pretrainx.metrics import read_metrics
from pretrainx.config import ModelConfig
from pretrainx.model import Transformer
from pretrainx.flops import count_params
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


@pytest.mark.slow
def test_kurtosis_is_logged_per_layer(tiny_exp):
  result = loop.train(tiny_exp(run={"steps": 4, "log_every": 1, "sample_tokens": 0,
                                    "eval_batches": 1, "microbatches": 2,
                                    "global_batch_size": 16}))
  row = [r for r in read_metrics(result.paths.metrics) if "train/loss" in r][-1]
  layers = [row["train/kurtosis/layer_0"], row["train/kurtosis/layer_1"]]
  assert all(np.isfinite(layers)) and row["train/kurtosis/max"] == max(layers)


def test_precision_policies_set_the_three_dtypes_together():
  from pretrainx.config import Experiment, experiment_to_gin, parse_gin_text
  exp = Experiment().replace(precision={"policy": "bf16_pure"})
  assert (exp.model.param_dtype, exp.model.dtype, exp.optimizer.state_dtype) == (
      "bfloat16", "bfloat16", "bfloat16")
  # resolved once, when the Experiment is made: its gin text (config.gin, the checkpoint's
  # config) holds the dtypes the run uses and reads back to the same Experiment
  assert parse_gin_text(experiment_to_gin(exp)) == exp
  assert "ModelConfig.param_dtype = 'bfloat16'" in experiment_to_gin(exp)
  mixed = Experiment().replace(precision={"policy": "bf16_mixed"})
  assert (mixed.model.param_dtype, mixed.model.dtype, mixed.optimizer.state_dtype) == (
      "float32", "bfloat16", "float32")
  with pytest.raises(ValueError, match="PrecisionConfig.policy='fp8'"):
    Experiment().replace(precision={"policy": "fp8"})
  with pytest.raises(ValueError, match="ModelConfig.dtype='float16' is bound too"):
    Experiment().replace(model={"dtype": "float16"}, precision={"policy": "bf16_mixed"})


def test_stochastic_rounding_is_unbiased_and_keeps_tiny_updates():
  from pretrainx.optim import apply_updates_stochastic, stochastic_round_to_bf16
  x = jnp.full((100_000,), 1.0 + 0.3 * 2**-7, jnp.float32)  # 30% of the way to the next bf16
  r = stochastic_round_to_bf16(x, jax.random.key(0)).astype(jnp.float32)
  assert set(np.unique(np.asarray(r)).tolist()) == {1.0, 1.0 + 2**-7}
  assert float(r.mean()) == pytest.approx(float(x[0]), abs=2e-4)
  p = {"w": jnp.ones((4096,), jnp.bfloat16)}
  nearest, stochastic = p, p
  for i in range(200):  # 200 updates of 1e-4: each is below half a bf16 ulp at 1.0 (3.9e-3)
    u = {"w": jnp.full((4096,), 1e-4, jnp.float32)}
    nearest = jax.tree.map(lambda a, b: (a + b).astype(jnp.bfloat16), nearest, u)
    stochastic = apply_updates_stochastic(stochastic, u, jax.random.key(i))
  assert float(nearest["w"].astype(jnp.float32).mean()) == 1.0  # round-to-nearest loses them all
  assert float(stochastic["w"].astype(jnp.float32).mean()) == pytest.approx(1.02, abs=0.003)
  assert stochastic["w"].dtype == jnp.bfloat16


@pytest.mark.slow
def test_bf16_pure_training_with_stochastic_rounding_learns(tiny_exp):
  exp = tiny_exp(run={"steps": 30, "log_every": 1, "sample_tokens": 0, "eval_batches": 1,
                      "precision": "bf16_pure"},
                 optimizer={"stochastic_rounding": True})
  result = loop.train(exp)
  losses = [r["train/loss"] for r in read_metrics(result.paths.metrics) if "train/loss" in r]
  assert np.mean(losses[-5:]) < losses[0] - 1.0
  from pretrainx.checkpoint import Checkpointer
  meta = Checkpointer(result.paths.checkpoints, create=False).read_meta()
  assert "ModelConfig.param_dtype = 'bfloat16'" in meta["config_gin"]
