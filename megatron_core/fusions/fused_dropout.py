"""Dropout with a cheaper CPU mask.

On CPU, ``F.dropout`` draws one Bernoulli sample per element (about 5 ns each), which costs a
training step more than the attention softmax. Here the mask compares uniform 16-bit integers with
``round(p * 2**16) - 2**15``, and the kept values are scaled by the exact inverse keep rate, so the
output is unbiased; the drop probability is ``p`` rounded to a multiple of 2**-16. The integers are
full-range 64-bit draws viewed as four int16 each (a 64-bit draw costs about one int16 draw: on
[32, 256, 256] 1.7 ms vs 5.0 ms for ``int16.random_()``, one thread), made by NumPy's PCG64DXSM
seeded with one 64-bit draw from torch's default generator: 1.0 ms against torch's Mersenne
Twister's 1.7 ms for those 2**19 words. The default generator advances by that one draw, so the
RNG tracker's ``fork()`` and recompute's RNG replay apply unchanged. The mask is kept as bool
(1 byte per element instead of 4). Other devices use ``F.dropout`` (already a fused kernel there).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

_LEVELS = 1 << 16  # int16 values of full-range 64-bit draws: uniform on [-2**15, 2**15)
_INT64_MIN = -(1 << 63)
_UINT64_MAX = (1 << 64) - 1


def masked_scale(x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
    """x * keep * scale for a bool ``keep`` of x's shape."""
    # addcmul with the bool mask viewed as uint8 took 0.84 ms on [32, 256, 256] fp32 against 2.6 ms for
    # x.mul(bool).mul_(scale) (measured, one thread); same values (x * 1 or x * 0, then * scale). The
    # uint8 operand still gets a temporary float copy from TensorIterator's type promotion on the CPU.
    return torch.addcmul(x.new_zeros(()), x, keep.view(torch.uint8), value=scale)


class _MaskedScale(torch.autograd.Function):
    """x * keep * scale, plus ``residual`` when given (one addcmul either way)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: torch.Tensor, scale: float,
                residual: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(keep)
        ctx.scale, ctx.has_residual = scale, residual is not None
        if residual is None:
            return masked_scale(x, keep, scale)
        return torch.addcmul(residual, x, keep.view(torch.uint8), value=scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        keep, = ctx.saved_tensors
        return masked_scale(grad, keep, ctx.scale), None, None, grad if ctx.has_residual else None


def cpu_rounds_to_one(p: float) -> bool:
    """True when the CPU mask would drop everything: ``p`` rounds to 1 at its 2**-16 resolution."""
    return round(p * _LEVELS) == _LEVELS


def keep_threshold(p: float) -> tuple[int, float]:
    """``(t, scale)`` for a mask that keeps a uniform 16-bit draw ``u`` in [0, 2**16) when ``u >= t``:
    ``t = round(p * 2**16)`` and ``scale = 2**16 / (2**16 - t)``, the exact inverse keep rate. Shared by
    the CPU mask and the Triton bias-dropout-add, so both drop with the same probability.
    Raises ValueError when ``p`` rounds to 1 at this resolution (everything dropped)."""
    if cpu_rounds_to_one(p):
        raise ValueError(f"dropout probability {p} rounds to 1 at the mask's resolution of 2**-16")
    threshold = round(p * _LEVELS)
    return threshold, _LEVELS / (_LEVELS - threshold)


def keep_mask(shape: torch.Size | tuple[int, ...], p: float, device: torch.device) -> tuple[torch.Tensor, float]:
    """A bool mask of ``shape``, True with probability 1 - p, and 1 / that probability: on the CPU
    from 16-bit draws (p rounded to 2**-16), elsewhere from torch's Bernoulli sampler."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"dropout probability for a mask must be in (0, 1), got {p}")
    if device.type != "cpu":
        return torch.empty(shape, device=device).bernoulli_(1.0 - p).bool(), 1.0 / (1.0 - p)
    threshold, scale = keep_threshold(p)
    n = math.prod(shape)
    seed = int(torch.empty((), dtype=torch.int64).random_(_INT64_MIN, None)) & _UINT64_MAX
    draws = torch.from_numpy(np.random.PCG64DXSM(seed).random_raw((n + 3) // 4).view(np.int64))
    keep = draws.view(torch.int16)[:n].view(shape) >= threshold - _LEVELS // 2
    return keep, scale


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """Zero each element with probability ``p`` and scale the rest so the mean is unchanged."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, training=True)
    keep, scale = keep_mask(x.shape, p, x.device)
    return _MaskedScale.apply(x, keep, scale, None)


def dropout_add(x: torch.Tensor, residual: torch.Tensor, p: float) -> torch.Tensor:
    """``residual + dropout(x, p)`` (training), the mask drawn as :func:`dropout` draws it; on the CPU
    the add rides in the masking pass (one pass over [s, b, h] fewer than dropout then add)."""
    if p == 0.0:
        return residual + x
    if x.device.type != "cpu":
        return residual + F.dropout(x, p, training=True)
    keep, scale = keep_mask(x.shape, p, x.device)
    return _MaskedScale.apply(x, keep, scale, residual)
