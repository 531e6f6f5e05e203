"""The decoder-only LM as Flax Linen modules (its ModelConfig lives in pretrainx.config)."""

from pretrainx.model.transformer import Transformer, param_shapes

__all__ = ["Transformer", "param_shapes"]
