"""Attention kernels for pretrainx: each kernel sits beside a pure-JAX reference it is tested against.

This package imports nothing from `pretrainx`. `reference_attention` is the softmax ground truth;
`flash_attention` (fused softmax), `linear_attention` (chunked causal linear) and
`hybrid_attention` (LoLCATs sliding window + linear) are the kernels.
"""

from pallas_kernels.flash_attention import blockwise_attention_jax, flash_attention
from pallas_kernels.hybrid_attention import hybrid_attention, reference_hybrid_attention
from pallas_kernels.linear_attention import linear_attention
from pallas_kernels.reference import reference_attention

__all__ = ["blockwise_attention_jax", "flash_attention", "hybrid_attention", "linear_attention",
           "reference_attention", "reference_hybrid_attention"]
