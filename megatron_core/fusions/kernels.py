"""Where fused kernels come from: probed once per op, used only when they apply.

A kernel is found by trying its providers in order (an import that fails means "not here"): the
CUDA extensions of apex / Megatron-LM where installed, then this package's Triton kernels
(``triton_norms``, ``triton_elementwise``, ``triton_cross_entropy``) when CUDA and Triton are both
present (``device.triton_available()``). The CPU kernels are the tanh-GeLU and SwiGLU compiled by
``torch.compile`` (``compiled.py``), for large tensors in a training step; on a CPU machine every
other op uses its torch path and pays nothing. A
provider returns a :class:`Kernel` whose ``applies(...)`` says whether it handles the given
tensors (device, dtype, shape); modules also take an explicit ``kernel=`` so tests and users can
plug one in without touching global state.
"""
from __future__ import annotations

import functools
import importlib
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


_MAX_ROW = 16384  # one Triton program holds a whole norm/softmax row in registers


def _triton(module: str, fn_name: str, applies: Callable[..., bool]) -> Callable[[], Kernel | None]:
    """A provider for ``megatron_core.fusions.<module>.<fn_name>`` (ImportError without Triton)."""
    def provider() -> Kernel | None:
        if not device.triton_available():
            raise ImportError("triton is not usable here")
        mod = importlib.import_module(f"megatron_core.fusions.{module}")
        return Kernel(getattr(mod, fn_name), applies, f"triton {module}.{fn_name}")
    return provider


def _compiled(name: str) -> Callable[[], Kernel | None]:
    """A provider for ``compiled.<name>_fusion`` (ImportError where torch.compile cannot build it)."""
    def provider() -> Kernel | None:
        from megatron_core.fusions import compiled  # noqa: PLC0415

        if not compiled.compiled_fusions_enabled():
            raise ImportError("torch.compile finds no C++ compiler here, or MCORE_COMPILED_FUSIONS=0")
        return Kernel(getattr(compiled, f"{name}_fusion")(), compiled.fusion_applies, f"torch.compile {name} (CPU)")
    return provider


_compiled_gelu_tanh, _compiled_swiglu = _compiled("gelu_tanh"), _compiled("swiglu")
_CPU_PROVIDERS = (_compiled_gelu_tanh, _compiled_swiglu)  # the others are CUDA kernels

_PROVIDERS: dict[str, tuple[Callable[[], Kernel | None], ...]] = {
    "layer_norm": (_apex_layer_norm, _triton("triton_norms", "layer_norm",
                                             lambda x, *rest: _on_cuda(x) and x.shape[-1] <= _MAX_ROW)),
    "rms_norm": (_apex_rms_norm, _triton("triton_norms", "rms_norm",
                                         lambda x, *rest: _on_cuda(x) and x.shape[-1] <= _MAX_ROW)),
    "scaled_masked_softmax": (_megatron_scaled_masked_softmax, _triton(
        "triton_norms", "scaled_masked_softmax",
        lambda scores, mask, scale: _on_cuda(scores, mask) and scores.dim() == 4 and scores.shape[-1] <= _MAX_ROW)),
    "rope": (_triton("triton_elementwise", "apply_rotary_pos_emb",
                     lambda x, cos, sin: _on_cuda(x, cos, sin) and x.dim() == 4),),
    "swiglu": (_triton("triton_elementwise", "swiglu", lambda x: _on_cuda(x)), _compiled_swiglu),
    "bias_dropout_add": (_triton("triton_elementwise", "bias_dropout_add",
                                 lambda x, bias, residual: _on_cuda(x, bias, residual)),),
    "gelu_tanh": (_compiled_gelu_tanh,),
    "vocab_parallel_cross_entropy": (_triton("triton_cross_entropy", "vocab_parallel_cross_entropy",
                                             lambda logits, target: _on_cuda(logits, target)),),
}


@functools.cache
def find_kernel(op: str) -> Kernel | None:
    """The first fused kernel for ``op`` that imports on this machine, or None (use torch)."""
    if op not in _PROVIDERS:
        raise ValueError(f"unknown fusable op {op!r}; expected one of {', '.join(_PROVIDERS)}")
    providers = [p for p in _PROVIDERS[op] if p in _CPU_PROVIDERS or device.cuda_available()]
    if not providers:
        return None  # only CUDA kernels for this op, and no CUDA here
    for provider in providers:
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
