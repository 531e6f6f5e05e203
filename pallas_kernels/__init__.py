"""Attention kernels for pretrainx: each kernel sits beside a pure-JAX reference it is tested against.

This package imports nothing from `pretrainx`. `reference_attention` is the softmax ground truth.
"""

from pallas_kernels.reference import reference_attention

__all__ = ["reference_attention"]
