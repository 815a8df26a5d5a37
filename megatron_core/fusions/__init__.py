"""Fusable operations: scaled-masked softmax, LayerNorm/RMSNorm and dropout.

Each op has a pure-torch implementation that is always available and a slot for a fused kernel
(see :mod:`megatron_core.fusions.kernels`) that is used when one is found on this machine and accepts the tensors.
"""
from megatron_core.fusions.fused_dropout import dropout, dropout_add
from megatron_core.fusions.fused_layer_norm import LayerNorm, RMSNorm, build_norm
from megatron_core.fusions.fused_softmax import FusedScaleMaskSoftmax, scaled_masked_softmax
from megatron_core.fusions.kernels import Kernel, available_kernels, find_kernel

__all__ = ["FusedScaleMaskSoftmax", "Kernel", "LayerNorm", "RMSNorm", "available_kernels", "build_norm", "dropout",
           "dropout_add", "find_kernel", "scaled_masked_softmax"]
