"""Elementwise fusions for the CPU compiled by ``torch.compile`` (inductor's C++ backend).

Megatron-LM fuses its bias-GeLU with ``torch.compile`` (``megatron/core/jit.py``'s ``jit_fuser``);
on the CPU eager PyTorch runs each elementwise op as its own pass and has no fused activation
backward. GPT-2's tanh-approximate GeLU is the case that pays: torch's vectorised ``tanh`` is slow
on the CI machine's AMD EPYC (2.7 ms for 2M fp32 elements at 2 threads, ``sigmoid`` 0.5 ms), and
``F.gelu(approximate="tanh")`` plus its backward took 3.9 ms on [2048, 1024] (7.7 ms at 1 thread).
Written as ``x * sigmoid(2k (x + 0.044715 x^3))`` (the same function: ``0.5 (1 + tanh(z)) =
sigmoid(2z)``, k = sqrt(2/pi)), forward and input gradient compiled into one loop each: 2.8 ms
(3.7 ms at 1 thread). SwiGLU (Llama's MLP), eager one pass for silu, one for the product and
several in backward: on [256, 8, 2 x 688] 4.3 -> 2.9 ms (6.6 -> 4.8 ms at 1 thread). Both keep only
their input for backward, as the eager ops keep (SwiGLU's eager graph also keeps silu(gate)). In the
GPT-2 bench step (``bench/bench_mfu.py``'s shape, A/B step by step): 1.9% less time at 1 thread,
level at 2 threads (0.998-1.002), though the profiler shows the GeLU's time falling from 15.4 to
9.9 ms per step there.

Used only where compiling pays: CPU tensors of at least :data:`MIN_NUMEL` elements that need a
gradient (a training step), fp32 or bf16, and only when inductor finds its C++ compiler
(``device.cpu_compiler_available``) and ``MCORE_COMPILED_FUSIONS`` is not ``0``. A compile takes
4-18 s once per process (one dynamic-shape graph per dtype and rank of the input), which a test's
tiny tensors would never earn back. Before the first use, forward and backward are compiled on a
small probe; if either fails the fusion logs one line and every call takes the eager op.

Values: fp32, against float64 on randn x 3, forward within 4e-7 of F.gelu's result (torch's
own error 4e-7) and the input gradient within 3.7e-6 (torch's 7e-7, gradients up to about 4): a
few ulps of the gradient, from the sigmoid form and the compiler's exp.
"""
from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from megatron_core import device

logger = logging.getLogger(__name__)

MIN_NUMEL = 1 << 20
"""Smallest input (elements) the compiled fusions take; below it the eager op is cheaper overall."""

FUSED_DTYPES = (torch.float32, torch.bfloat16)
"""The dtypes the compiled fusions take (fp16 on the CPU stays eager)."""

_TWO_K = 2.0 * math.sqrt(2.0 / math.pi)
_GELU_C = 0.044715  # GPT-2's (Hendrycks and Gimpel 2016) cubic coefficient


def compiled_fusions_enabled() -> bool:
    """Inductor can compile for the CPU here and ``MCORE_COMPILED_FUSIONS=0`` did not switch it off."""
    return os.environ.get("MCORE_COMPILED_FUSIONS", "1") != "0" and device.cpu_compiler_available()


def gelu_tanh_sigmoid_form(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's GeLU, 0.5 x (1 + tanh(k (x + 0.044715 x^3))), as x * sigmoid(2k (x + 0.044715 x^3))."""
    return x * torch.sigmoid(_TWO_K * (x + _GELU_C * x * x * x))


def _gelu_tanh_backward(x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """d/dx of x s, s = sigmoid(z), z = 2k (x + c x^3): s + x s (1 - s) 2k (1 + 3c x^2), times dy."""
    s = torch.sigmoid(_TWO_K * (x + _GELU_C * x * x * x))
    return dy * (s + x * s * (1.0 - s) * (_TWO_K * (1.0 + 3.0 * _GELU_C * x * x)))


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's tanh-approximate GeLU, torch's eager op (the MLP's activation without the fusion)."""
    return F.gelu(x, approximate="tanh")


class _Fused(torch.autograd.Function):
    """A fusion's compiled forward and backward; keeps only the input for backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, fusion: CompiledFusion) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.fusion = fusion
        return fusion.compiled_forward(x)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, = ctx.saved_tensors
        return ctx.fusion.compiled_backward(x, dy), None


class CompiledFusion:
    """An elementwise op whose forward ``fn(x)`` and input gradient ``backward(x, dy)`` are each
    compiled (dynamic shapes) into one loop; only ``x`` is kept for backward, as the eager op keeps.

    The autograd graph is this module's (a Function calling the two compiled graphs), not
    AOTAutograd's: its partitioner kept the sigmoid and more for backward, up to 3 tensors of x's
    size per call instead of 1. The first call for each (dtype, rank) compiles both on a small probe
    and checks nothing raised; if anything did, one warning is logged and ``eager`` is used for good.
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor],
                 backward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 eager: Callable[[torch.Tensor], torch.Tensor], name: str) -> None:
        self.name = name
        self._fn, self._backward, self._eager = fn, backward, eager
        self.compiled_forward: Callable[[torch.Tensor], torch.Tensor] = fn
        self.compiled_backward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = backward
        self._built = False
        self._ready: dict[tuple[torch.dtype, int], bool] = {}

    def _probe(self, dtype: torch.dtype, ndim: int) -> bool:
        try:
            if not self._built:
                # Built on first use: torch.compile imports dynamo (about 2 s), which a run whose
                # tensors never reach MIN_NUMEL should not pay. One compile worker: inductor's
                # default pool starts a process per core, which forked ranks do not need.
                options: dict[str, str | int | bool | Callable[..., Any]] = {"compile_threads": 1}
                self.compiled_forward = torch.compile(self._fn, dynamic=True, options=options)
                self.compiled_backward = torch.compile(self._backward, dynamic=True, options=options)
                self._built = True
            # Distinct sizes: equal ones would be "duck-sized" into one symbol and recompiled later.
            x = torch.ones(tuple(range(2, 2 + ndim)), dtype=dtype)
            with torch.no_grad():
                y = self.compiled_forward(x)
                self.compiled_backward(x, torch.ones_like(y))
        except Exception as exc:  # noqa: BLE001 - any compile failure means: use the eager op
            logger.warning("torch.compile of %s failed (%s: %s); using the eager op",
                           self.name, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            return False
        return True

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``fn(x)`` compiled (``eager(x)`` if this dtype and rank failed to compile); x's shape."""
        key = (x.dtype, x.dim())
        if key not in self._ready:
            self._ready[key] = self._probe(*key)
        if self._ready[key]:
            return _Fused.apply(x, self)
        return self._eager(x)


def fusion_applies(x: torch.Tensor) -> bool:
    """A CPU fp32/bf16 tensor of at least :data:`MIN_NUMEL` elements, in a step that needs its gradient."""
    return (x.device.type == "cpu" and x.dtype in FUSED_DTYPES and x.numel() >= MIN_NUMEL
            and x.requires_grad and torch.is_grad_enabled())


def gelu_tanh_fusion() -> CompiledFusion:
    """The compiled tanh-GeLU (forward and backward one loop each)."""
    return CompiledFusion(gelu_tanh_sigmoid_form, _gelu_tanh_backward, gelu_tanh, "gelu_tanh")


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU of [..., 2f] -> [..., f]: silu(gate) * up, gate the first half (Megatron-LM's order)."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def _swiglu_backward(x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """[d gate; d up] of silu(gate) * up: dy up s (1 + gate (1 - s)), s = sigmoid(gate); dy silu(gate)."""
    gate, up = x.chunk(2, dim=-1)
    s = torch.sigmoid(gate)
    return torch.cat([dy * up * s * (1.0 + gate * (1.0 - s)), dy * gate * s], dim=-1)


def swiglu_fusion() -> CompiledFusion:
    """The compiled SwiGLU: 3.6 ms against 6.1-8.2 ms forward and backward on [256, 8, 2 x 688], one thread."""
    return CompiledFusion(swiglu, _swiglu_backward, swiglu, "swiglu")
