"""The decoder-only LM as Flax Linen modules (its ModelConfig lives in pretrainx.config)."""

from pretrainx.model.transformer import Transformer

__all__ = ["Transformer"]
