"""LayerNorm and RMSNorm with a torch path and a fused-kernel slot.

The torch path is ``F.layer_norm`` / ``F.rms_norm`` (computed in fp32 for low-precision inputs, as
Hugging Face's Llama RMSNorm does). Under sequence parallelism each TP rank normalises only its
own tokens, so the weights' gradients are partial: they carry ``sequence_parallel = True`` for
``finalize_model_grads`` to all-reduce them over TP.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from typing_extensions import override

from megatron_core import device as device_mod
from megatron_core.fusions.kernels import Kernel, find_kernel
from megatron_core.tensor_parallel.utils import set_sequence_parallel_attribute

_AUTO = object()


class LayerNorm(torch.nn.Module):
    """y = (x - mean) / sqrt(var + eps) * weight + bias over the last dimension."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, *, sequence_parallel: bool = False,
                 params_dtype: torch.dtype = torch.float32, bias: bool = True, kernel=_AUTO) -> None:
        super().__init__()
        self.hidden_size, self.eps = hidden_size, eps
        dev = device_mod.current_device()
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=params_dtype, device=dev))
        set_sequence_parallel_attribute(self.weight, sequence_parallel)
        if bias:
            self.bias = torch.nn.Parameter(torch.zeros(hidden_size, dtype=params_dtype, device=dev))
            set_sequence_parallel_attribute(self.bias, sequence_parallel)
        else:
            self.register_parameter("bias", None)
        self.kernel: Kernel | None = find_kernel("layer_norm") if kernel is _AUTO else kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``x`` [..., hidden_size] over its last dimension; same shape and dtype out."""
        if self.kernel is not None and self.kernel.applies(x, self.weight, self.bias, self.eps):
            return self.kernel.fn(x, self.weight, self.bias, self.eps)
        return F.layer_norm(x, (self.hidden_size,), self.weight, self.bias, self.eps)

    @override
    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}"


class RMSNorm(torch.nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight over the last dimension."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, *, sequence_parallel: bool = False,
                 params_dtype: torch.dtype = torch.float32, kernel=_AUTO) -> None:
        super().__init__()
        self.hidden_size, self.eps = hidden_size, eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=params_dtype,
                                                    device=device_mod.current_device()))
        set_sequence_parallel_attribute(self.weight, sequence_parallel)
        self.kernel: Kernel | None = find_kernel("rms_norm") if kernel is _AUTO else kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``x`` [..., hidden_size] over its last dimension; same shape and dtype out."""
        if self.kernel is not None and self.kernel.applies(x, self.weight, self.eps):
            return self.kernel.fn(x, self.weight, self.eps)
        if x.dtype == torch.float32:
            return F.rms_norm(x, (self.hidden_size,), self.weight, self.eps)
        # Normalise in fp32 and scale in the input dtype, as Llama's reference RMSNorm does.
        normed = F.rms_norm(x.float(), (self.hidden_size,), None, self.eps).to(x.dtype)
        return normed * self.weight

    @override
    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}"


def build_norm(config, hidden_size: int, eps: float | None = None, kernel=_AUTO) -> torch.nn.Module:
    """The norm ``config.normalization`` names (``LayerNorm`` or ``RMSNorm``), with its epsilon,
    sequence-parallel marking and params dtype taken from ``config``."""
    eps = config.layernorm_epsilon if eps is None else eps
    common = dict(sequence_parallel=config.sequence_parallel, params_dtype=config.params_dtype, kernel=kernel)
    if config.normalization == "LayerNorm":
        return LayerNorm(hidden_size, eps, **common)
    if config.normalization == "RMSNorm":
        return RMSNorm(hidden_size, eps, **common)
    raise ValueError(f"TransformerConfig.normalization={config.normalization!r} is not supported; "
                     f"use 'LayerNorm' or 'RMSNorm'")
