"""LayerNorm and RMSNorm with a torch path and a fused-kernel slot.

The torch path is ``F.layer_norm`` / ``F.rms_norm`` (computed in fp32 for low-precision inputs, as
Hugging Face's Llama RMSNorm does). Under sequence parallelism each TP rank normalises only its
own tokens, so the weights' gradients are partial: they carry ``sequence_parallel = True`` for
``finalize_model_grads`` to all-reduce them over TP.

``zero_centered_gamma`` (Megatron-LM's ``--apply-layernorm-1p``, TransformerConfig
``layernorm_zero_centered_gamma``): the weight is stored centred on zero (initialised to zeros) and
applied as ``1 + weight``, on every path: the kernels and the torch path are all handed ``1 + weight``,
as Megatron-core's ``FusedLayerNorm`` and Transformer Engine's ``zero_centered_gamma`` do.

An fp32 input with low-precision weights (the residual stream of ``fp32_residual_connection``) is
normalised in fp32 and returned in the weights' dtype, as apex's mixed-dtype fused layer norm that
Megatron-LM uses there: the norm is where the stream goes back to the compute dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from typing_extensions import override

from megatron_core import device as device_mod
from megatron_core.errors import ConfigError
from megatron_core.fusions.kernels import Kernel, find_kernel
from megatron_core.tensor_parallel.utils import set_sequence_parallel_attribute

_AUTO = object()


def _gamma(hidden_size: int, params_dtype: torch.dtype, zero_centered_gamma: bool) -> torch.nn.Parameter:
    """The norm weight: ones, or zeros when it is stored zero-centred (applied as 1 + weight)."""
    fill = torch.zeros if zero_centered_gamma else torch.ones
    return torch.nn.Parameter(fill(hidden_size, dtype=params_dtype, device=device_mod.current_device()))


def _applied(weight: torch.Tensor, zero_centered_gamma: bool) -> torch.Tensor:
    """The weight a norm multiplies by: ``1 + weight`` when it is stored zero-centred (in the weight's dtype,
    as Megatron-core's FusedLayerNorm adds it), else ``weight``."""
    return weight + 1 if zero_centered_gamma else weight


class LayerNorm(torch.nn.Module):
    """y = (x - mean) / sqrt(var + eps) * weight + bias over the last dimension (``1 + weight`` with
    ``zero_centered_gamma``)."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, *, sequence_parallel: bool = False,
                 params_dtype: torch.dtype = torch.float32, bias: bool = True, kernel=_AUTO,
                 zero_centered_gamma: bool = False) -> None:
        super().__init__()
        self.hidden_size, self.eps, self.zero_centered_gamma = hidden_size, eps, zero_centered_gamma
        dev = device_mod.current_device()
        self.weight = _gamma(hidden_size, params_dtype, zero_centered_gamma)
        set_sequence_parallel_attribute(self.weight, sequence_parallel)
        if bias:
            self.bias = torch.nn.Parameter(torch.zeros(hidden_size, dtype=params_dtype, device=dev))
            set_sequence_parallel_attribute(self.bias, sequence_parallel)
        else:
            self.register_parameter("bias", None)
        self.kernel: Kernel | None = find_kernel("layer_norm") if kernel is _AUTO else kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``x`` [..., hidden_size] over its last dimension; same shape out, in the weight's dtype
        (an fp32 ``x`` with low-precision weights is normalised in fp32 and cast once at the end)."""
        if x.dtype == torch.float32 and self.weight.dtype != torch.float32:  # the fp32 residual stream
            bias = None if self.bias is None else self.bias.float()
            return F.layer_norm(x.float(), (self.hidden_size,), _applied(self.weight.float(), self.zero_centered_gamma),
                                bias, self.eps).to(self.weight.dtype)
        weight = _applied(self.weight, self.zero_centered_gamma)
        if self.kernel is not None and self.kernel.applies(x, weight, self.bias, self.eps):
            return self.kernel.fn(x, weight, self.bias, self.eps)
        return F.layer_norm(x, (self.hidden_size,), weight, self.bias, self.eps)

    @override
    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}" + (", zero_centered_gamma" if self.zero_centered_gamma else "")


class RMSNorm(torch.nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight over the last dimension (``1 + weight`` with
    ``zero_centered_gamma``, the form of Gemma's RMSNorm)."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, *, sequence_parallel: bool = False,
                 params_dtype: torch.dtype = torch.float32, kernel=_AUTO, zero_centered_gamma: bool = False) -> None:
        super().__init__()
        self.hidden_size, self.eps, self.zero_centered_gamma = hidden_size, eps, zero_centered_gamma
        self.weight = _gamma(hidden_size, params_dtype, zero_centered_gamma)
        set_sequence_parallel_attribute(self.weight, sequence_parallel)
        self.kernel: Kernel | None = find_kernel("rms_norm") if kernel is _AUTO else kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``x`` [..., hidden_size] over its last dimension; same shape out, in the weight's dtype
        (an fp32 ``x`` with low-precision weights is normalised and scaled in fp32, cast once at the end)."""
        if x.dtype == torch.float32 and self.weight.dtype != torch.float32:  # the fp32 residual stream
            return F.rms_norm(x.float(), (self.hidden_size,), _applied(self.weight.float(), self.zero_centered_gamma),
                              self.eps).to(self.weight.dtype)
        weight = _applied(self.weight, self.zero_centered_gamma)
        if self.kernel is not None and self.kernel.applies(x, weight, self.eps):
            return self.kernel.fn(x, weight, self.eps)
        if x.dtype == torch.float32:
            return F.rms_norm(x, (self.hidden_size,), weight, self.eps)
        # Normalise in fp32 and scale in the input dtype, as Llama's reference RMSNorm does.
        normed = F.rms_norm(x.float(), (self.hidden_size,), None, self.eps).to(x.dtype)
        return normed * weight

    @override
    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}" + (", zero_centered_gamma" if self.zero_centered_gamma else "")


def build_norm(config, hidden_size: int, eps: float | None = None, kernel=_AUTO) -> torch.nn.Module:
    """The norm ``config.normalization`` names (``LayerNorm`` or ``RMSNorm``), with its epsilon,
    sequence-parallel marking, params dtype and zero-centred gamma taken from ``config``."""
    eps = config.layernorm_epsilon if eps is None else eps
    common = dict(sequence_parallel=config.sequence_parallel, params_dtype=config.params_dtype, kernel=kernel,
                  zero_centered_gamma=config.layernorm_zero_centered_gamma)
    if config.normalization == "LayerNorm":
        return LayerNorm(hidden_size, eps, **common)
    if config.normalization == "RMSNorm":
        return RMSNorm(hidden_size, eps, **common)
    raise ValueError(f"TransformerConfig.normalization={config.normalization!r} is not supported; "
                     f"use 'LayerNorm' or 'RMSNorm'")


def check_zero_centered_norms(model: torch.nn.Module) -> None:
    """ConfigError naming the first norm of ``model`` that does not apply ``1 + weight`` when the model's
    norms are meant to (``layernorm_zero_centered_gamma``, ``--apply-layernorm-1p``): a norm of a custom
    ``--spec`` built from ``torch.nn.LayerNorm``/``RMSNorm``, or one whose ``zero_centered_gamma`` is off.
    Such a norm would train its weight from zeros as the scale itself, and the checkpoint, which records the
    flag for the whole model, would be exported to Hugging Face as ``1 + weight``. (Megatron-core's
    WrappedTorchNorm refuses the flag the same way.)"""
    for name, module in model.named_modules():
        applies = getattr(module, "zero_centered_gamma", None)
        if applies is None and isinstance(module, (torch.nn.LayerNorm, torch.nn.RMSNorm)):
            applies = False
        if applies is False:
            raise ConfigError(f"--apply-layernorm-1p (layernorm_zero_centered_gamma): the norm decoder.{name} "
                              f"({type(module).__name__}) does not apply 1 + weight; build it with "
                              f"megatron_core.fusions.fused_layer_norm.build_norm (it takes the flag from the config) "
                              f"or drop the flag")
