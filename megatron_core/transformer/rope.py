"""Rotary position embedding in the rotate-half convention (Hugging Face Llama, Megatron non-interleaved).

Channel ``i`` of the rotated part pairs with channel ``i + rotary_dim / 2``; Hugging Face's Llama
q/k projection weights are stored for this convention, so they load without permutation.
"""
from __future__ import annotations

import torch

from megatron_core.fusions.kernels import Kernel


class RotaryEmbedding(torch.nn.Module):
    """cos/sin tables for the positions of a batch, for the first ``rotary_dim`` channels of a head."""

    inv_freq: torch.Tensor  # [rotary_dim / 2] buffer; declared so that attribute reads are typed as a Tensor

    def __init__(self, rotary_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        if rotary_dim % 2 != 0:
            raise ValueError(f"rotary_dim must be even, got {rotary_dim}")
        self.rotary_dim, self.base = rotary_dim, base
        exponent = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
        # Not persistent: derived from the config, so checkpoints do not carry it.
        self.register_buffer("inv_freq", 1.0 / (base ** exponent), persistent=False)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``position_ids`` [b, s] -> (cos, sin), each [s, b, 1, rotary_dim] in fp32."""
        freqs = position_ids.t().float().unsqueeze(-1) * self.inv_freq.float()  # [s, b, rotary_dim / 2]
        emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(2)
        return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None,
                         kernel: Kernel | None = None) -> torch.Tensor:
    """Rotate the first ``rotary_dim`` channels of ``x`` [s, b, heads, head_dim]; the rest pass through.

    ``kernel``: a fused ``rope`` kernel (``find_kernel("rope")``), used when it applies to ``x``.
    """
    if rotary is None:
        return x
    cos, sin = rotary
    if kernel is not None and kernel.applies(x, cos, sin):
        return kernel.fn(x, cos, sin)
    rot_dim = cos.shape[-1]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    if rot_dim == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    rot, rest = x[..., :rot_dim], x[..., rot_dim:]
    return torch.cat((rot * cos + _rotate_half(rot) * sin, rest), dim=-1)
