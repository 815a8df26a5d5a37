"""Dropout with a cheaper CPU mask.

On CPU, ``F.dropout`` draws one Bernoulli sample per element (about 5 ns each), which costs a
training step more than the attention softmax. Here the mask compares 15-bit uniform integers
(``int16.random_()``, about 2 ns each) with ``round(p * 2**15)``, and the kept values are scaled by
the exact inverse keep rate, so the output is unbiased; the drop probability is ``p`` rounded to a
multiple of 2**-15. The mask is kept as bool (1 byte per element instead of 4). Other devices use
``F.dropout`` (already a fused kernel there). Draws come from the default generator, so the RNG
tracker's ``fork()`` and recompute's RNG replay apply unchanged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_LEVELS = 1 << 15  # int16.random_() is uniform on [0, 2**15)


class _MaskedScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x.mul(keep).mul_(scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        keep, = ctx.saved_tensors
        return grad.mul(keep).mul_(ctx.scale), None, None


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """Zero each element with probability ``p`` and scale the rest so the mean is unchanged."""
    if not training or p == 0.0:
        return x
    if not 0.0 < p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    if x.device.type != "cpu":
        return F.dropout(x, p, training=True)
    threshold = round(p * _LEVELS)
    keep = torch.empty(x.shape, dtype=torch.int16, device=x.device).random_() >= threshold
    return _MaskedScale.apply(x, keep, _LEVELS / (_LEVELS - threshold))
