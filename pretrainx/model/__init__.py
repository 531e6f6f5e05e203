"""The model layer: Flax Linen modules of the decoder LM, configured by ModelConfig."""

from pretrainx.model.config import ModelConfig, count_params
from pretrainx.model.transformer import Transformer

__all__ = ["ModelConfig", "Transformer", "count_params"]
