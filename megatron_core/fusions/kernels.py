"""Where fused kernels come from: probed once per op, used only when they apply.

A kernel is found by trying its providers in order (an import that fails means "not here"); none
ships with this package, so on a CPU machine every op uses its torch path and pays nothing. A
provider returns a :class:`Kernel` whose ``applies(...)`` says whether it handles the given
tensors (device, dtype, shape); modules also take an explicit ``kernel=`` so tests and users can
plug one in without touching global state.
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import NamedTuple

import torch

from megatron_core import device

logger = logging.getLogger(__name__)


class Kernel(NamedTuple):
    """A fused implementation of one op and the predicate that says when it applies."""

    fn: Callable
    applies: Callable[..., bool]
    name: str


def _on_cuda(*tensors) -> bool:
    return all(t is None or t.is_cuda for t in tensors)


def _apex_layer_norm() -> Kernel | None:
    from apex.normalization.fused_layer_norm import fused_layer_norm_affine  # noqa: PLC0415

    def fn(x, weight, bias, eps):
        return fused_layer_norm_affine(x, weight, bias, weight.shape, eps)
    return Kernel(fn, lambda x, *rest: _on_cuda(x), "apex.fused_layer_norm_affine")


def _apex_rms_norm() -> Kernel | None:
    from apex.normalization.fused_layer_norm import fused_rms_norm_affine  # noqa: PLC0415

    def fn(x, weight, eps):
        return fused_rms_norm_affine(x, weight, weight.shape, eps)
    return Kernel(fn, lambda x, *rest: _on_cuda(x), "apex.fused_rms_norm_affine")


def _megatron_scaled_masked_softmax() -> Kernel | None:
    import scaled_masked_softmax_cuda  # noqa: PLC0415  (Megatron-LM's compiled extension)

    class _ScaledMaskedSoftmax(torch.autograd.Function):
        @staticmethod
        def forward(ctx, scores, mask, scale):
            scale_t = torch.tensor([scale])
            probs = scaled_masked_softmax_cuda.forward(scores, mask, scale_t[0])
            ctx.save_for_backward(probs, scale_t)
            return probs

        @staticmethod
        def backward(ctx, grad):
            probs, scale_t = ctx.saved_tensors
            return scaled_masked_softmax_cuda.backward(grad.contiguous(), probs, scale_t[0]), None, None

    def applies(scores, mask, scale):
        # The extension handles fp16/bf16 [b, np, sq, sk] scores with 16 < sk <= 4096, sk % 8 == 0.
        return (_on_cuda(scores) and scores.dtype in (torch.float16, torch.bfloat16) and mask is not None
                and scores.dim() == 4 and scores.shape[-1] % 8 == 0 and 16 < scores.shape[-1] <= 4096)
    return Kernel(_ScaledMaskedSoftmax.apply, applies, "scaled_masked_softmax_cuda")


_PROVIDERS: dict[str, tuple[Callable[[], Kernel | None], ...]] = {
    "layer_norm": (_apex_layer_norm,),
    "rms_norm": (_apex_rms_norm,),
    "scaled_masked_softmax": (_megatron_scaled_masked_softmax,),
}


@functools.cache
def find_kernel(op: str) -> Kernel | None:
    """The first fused kernel for ``op`` that imports on this machine, or None (use torch)."""
    if op not in _PROVIDERS:
        raise ValueError(f"unknown fusable op {op!r}; expected one of {', '.join(_PROVIDERS)}")
    if not device.cuda_available():
        return None  # every provider here is a CUDA kernel
    for provider in _PROVIDERS[op]:
        try:
            kernel = provider()
        except ImportError:
            continue
        if kernel is not None:
            logger.info("using fused kernel %s for %s", kernel.name, op)
            return kernel
    logger.info("no fused kernel for %s; using the torch implementation", op)
    return None


def available_kernels() -> dict[str, str]:
    """``{op: kernel name}`` of the fused kernels found on this machine."""
    found = {op: find_kernel(op) for op in _PROVIDERS}
    return {op: k.name for op, k in found.items() if k is not None}
