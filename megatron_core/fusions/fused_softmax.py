"""Softmax of scaled, masked attention scores: the step a fused kernel replaces.

The torch path scales, masks and normalises in fp32 (optionally) and returns probabilities in
the scores' dtype. A fused kernel (see :mod:`megatron_core.fusions.kernels`) is used when one
was found and accepts the tensors.
"""
from __future__ import annotations

import torch

from megatron_core.fusions.kernels import Kernel, find_kernel

_AUTO = object()


def causal_mask(sq: int, sk: int, device: torch.device) -> torch.Tensor:
    """[1, 1, sq, sk] bool mask, True where a query may NOT attend (a key in its future)."""
    return torch.ones(sq, sk, dtype=torch.bool, device=device).triu_(sk - sq + 1).view(1, 1, sq, sk)


def softmax_dtype(scores_dtype: torch.dtype, softmax_in_fp32: bool) -> torch.dtype:
    """The dtype attention probabilities are computed in: fp32 for fp16/bf16 scores when
    ``softmax_in_fp32`` (Megatron-LM's ``--attention-softmax-in-fp32``), else the scores' own."""
    low_precision = scores_dtype in (torch.float16, torch.bfloat16)
    return torch.float32 if softmax_in_fp32 and low_precision else scores_dtype


def scaled_masked_softmax(scores: torch.Tensor, mask: torch.Tensor | None, scale: float,
                          softmax_in_fp32: bool = True) -> torch.Tensor:
    """softmax(scale * scores with masked positions removed) over the last dimension.

    ``mask`` is a bool tensor broadcastable to ``scores``, True where attention is not allowed.
    """
    dtype = scores.dtype
    x = scores.to(softmax_dtype(dtype, softmax_in_fp32))
    if scale != 1.0:
        x = x * scale
    if mask is not None:
        # finfo.min rather than -inf: a fully masked row gives a uniform row, not NaN.
        x = x.masked_fill(mask, torch.finfo(x.dtype).min)
    return torch.softmax(x, dim=-1).to(dtype)


class FusedScaleMaskSoftmax(torch.nn.Module):
    """Scale, mask (a given mask, else causal) and softmax attention scores [b, heads, sq, sk]."""

    def __init__(self, causal: bool = True, softmax_in_fp32: bool = True, kernel=_AUTO) -> None:
        super().__init__()
        self.causal, self.softmax_in_fp32 = causal, softmax_in_fp32
        self.kernel: Kernel | None = find_kernel("scaled_masked_softmax") if kernel is _AUTO else kernel

    def forward(self, scores: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
        """softmax(scores * scale, masked) over the last dimension, in the dtype of ``scores``.

        ``mask``: bool, broadcastable to ``scores`` [b, heads, sq, sk], True where attention is not
        allowed; None means causal (bottom-right aligned when sk > sq) or, for a non-causal module, none."""
        if mask is None and self.causal:
            mask = causal_mask(scores.shape[-2], scores.shape[-1], scores.device)
        if self.kernel is not None and self.kernel.applies(scores, mask, scale):
            return self.kernel.fn(scores, mask, scale)
        return scaled_masked_softmax(scores, mask, scale, self.softmax_in_fp32)
