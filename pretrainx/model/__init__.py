"""The model layer: Flax Linen modules of the decoder LM, configured by ModelConfig."""

from pretrainx.config import ModelConfig
from pretrainx.flops import count_params
from pretrainx.model.transformer import Transformer

__all__ = ["ModelConfig", "Transformer", "count_params"]
