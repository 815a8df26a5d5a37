"""fp32 linear layers on the CPU through oneDNN's matmul instead of MKL's sgemm.

PyTorch's CPU ``F.linear``/``mm`` call MKL for fp32. oneDNN (bundled in every PyTorch CPU build;
``torch.ops.mkldnn._linear_pointwise`` is the op ``torch.compile``'s CPU backend emits for a linear)
JIT-compiles its kernels for the CPU it runs on. On this project's CI machine (AMD EPYC, AVX-512,
2 cores) it was 8-40% faster for the forward product and the input gradient at every GPT shape
measured, e.g. 2 threads, 2048 tokens: [256 -> 1024] 212 vs 179 GFLOP/s, [1024 -> 256] 217 vs 196,
grad_output @ weight for [1024 -> 256] 207 vs 145, the [256 -> 4096] output layer 146 vs 134; the
weight gradient ``grad_output^T @ input`` (a long reduction) stayed faster in MKL (180-199 vs
141-183 GFLOP/s through oneDNN), so it stays on ``mm``. In the GPT-2 bench step (A/B, 10-14 rounds):
4.0% (2 threads) and 5.8% (1 thread) less time per step. ``bench/bench_linear.py`` compares the two
per product on any machine.

Used for fp32 CPU tensors when the op exists (``torch.backends.mkldnn``) and the operands are a
well-formed linear (2-D weight matching x, no empty side, a unit-stride [out] bias or none);
everything else, and every tensor when ``MCORE_ONEDNN_LINEAR=0``, takes ``F.linear`` (its values,
its errors). Not differentiable twice, no forward-mode AD (F.linear is both). Values are the same product rounded by
another kernel, fp32 accumulation either way: against float64, at most 0.9-2.8 eps of sum |x w| for
2048 tokens and 256-4096 inputs (MKL 0.3-1.7; MKL blocks long reductions more), identical to MKL's
at the test suite's small shapes. oneDNN's fp32 matmul does not follow
``torch.set_float32_matmul_precision``.
"""
from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F


@functools.cache
def onednn_linear_available() -> bool:
    """oneDNN's linear op is in this PyTorch build and not switched off (``MCORE_ONEDNN_LINEAR=0``)."""
    if os.environ.get("MCORE_ONEDNN_LINEAR", "1") == "0":
        return False
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """fp32 CPU operands of a product oneDNN's op computes right: a 2-D weight with no empty side
    whose input features match x's last dimension; outside CPU autocast, with oneDNN enabled in
    torch. Anything else takes the torch op, which gives its own values or its own error (oneDNN's
    is "could not create a primitive descriptor")."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and weight.device.type == "cpu" and weight.dim() == 2 and x.dim() >= 1
            and x.shape[-1] == weight.shape[1] and weight.numel() > 0 and onednn_linear_available()
            and bool(torch.backends.mkldnn.enabled)  # torch's own off switch (torch.backends.mkldnn.flags)
            and not torch.is_autocast_enabled("cpu"))  # autocast casts F.linear, not this op


def _bias_applies(bias: torch.Tensor | None, weight: torch.Tensor) -> bool:
    """No bias, or an fp32 [out] one with unit stride: oneDNN reads ``out`` consecutive floats from
    the bias pointer whatever its shape and strides (a [1] or 0-d bias that F.linear broadcasts,
    a strided or expanded view: wrong values, reads past its storage)."""
    return bias is None or (bias.dtype == torch.float32 and bias.device.type == "cpu" and bias.dim() == 1
                            and bias.shape[0] == weight.shape[0] and bias.stride(0) == 1)


def onednn_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] @ weight [out, in]^T (+ bias [out]) through oneDNN, unchecked (see :func:`linear`
    for the operands it computes right); weight may be a strided view."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    """``F.linear`` with oneDNN for the output and the input gradient, ``mm`` for the weight's."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        # As F.linear's autograd: x only for a weight gradient, the weight only for x's (a frozen
        # weight's layer keeps no activation).
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight if ctx.needs_input_grad[0] else None)
        ctx.has_bias = bias is not None
        return onednn_product(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        x, weight = ctx.saved_tensors
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_input = onednn_product(grad_output, weight.t(), None)
        g2 = grad_output.reshape(-1, grad_output.shape[-1])
        if ctx.needs_input_grad[1]:
            grad_weight = g2.t().mm(x.reshape(-1, x.shape[-1]))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = g2.sum(dim=0)
        return grad_input, grad_weight, grad_bias


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``: x [..., in], weight [out, in], bias [out] -> [..., out]."""
    if _applies(x, weight) and _bias_applies(bias, weight):
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
            return _OneDNNLinear.apply(x, weight, bias)
        # No graph to record (generation, evaluation): the autograd Function's ~15 us a call was a
        # third of a [1, 256] x [256, 1024] product in a decode step (1 thread).
        return onednn_product(x, weight, bias)
    return F.linear(x, weight, bias)


def input_grad(grad_output: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """grad_output [..., out] @ weight [out, in] -> [..., in] (a linear layer's input gradient)."""
    if weight.dim() == 2 and _applies(grad_output, weight.t()):
        return onednn_product(grad_output, weight.t(), None)
    return grad_output.matmul(weight)
