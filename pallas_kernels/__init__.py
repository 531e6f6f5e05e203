"""Attention kernels for pretrainx: each kernel sits beside a pure-JAX reference it is tested against.

This package imports nothing from `pretrainx`. `reference_attention` is the softmax ground truth;
the kernels live in their modules (named like their functions, so import them from there):
`flash_attention.flash_attention` (fused softmax), `linear_attention.linear_attention` (chunked
causal linear) and `hybrid_attention.hybrid_attention` (LoLCATs sliding window + linear).
"""

from pallas_kernels.reference import reference_attention

__all__ = ["reference_attention"]
