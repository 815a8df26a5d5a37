"""Rotary position embedding in the rotate-half convention (Hugging Face Llama, Megatron non-interleaved).

Channel ``i`` of the rotated part pairs with channel ``i + rotary_dim / 2``; Hugging Face's Llama
q/k projection weights are stored for this convention, so they load without permutation.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from megatron_core.fusions.kernels import Kernel

if TYPE_CHECKING:
    from megatron_core.transformer.config import TransformerConfig


class RotaryEmbedding(torch.nn.Module):
    """cos/sin tables for the positions of a batch, for the first ``rotary_dim`` channels of a head."""

    inv_freq: torch.Tensor  # [rotary_dim / 2] buffer; declared so that attribute reads are typed as a Tensor

    def __init__(self, rotary_dim: int, base: float = 10000.0, rope_scaling_factor: float | None = None,
                 seq_len_interpolation_factor: float | None = None) -> None:
        """``rope_scaling_factor``: Llama 3.x's frequency scaling (:func:`llama3_scaled`), None for none;
        ``seq_len_interpolation_factor``: positions divided by it (linear interpolation), None for none."""
        super().__init__()
        if rotary_dim % 2 != 0:
            raise ValueError(f"rotary_dim must be even, got {rotary_dim}")
        self.rotary_dim, self.base = rotary_dim, base
        exponent = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
        inv_freq = 1.0 / (base ** exponent)
        if rope_scaling_factor is not None:
            inv_freq = llama3_scaled(inv_freq, rope_scaling_factor)
        if seq_len_interpolation_factor is not None:
            inv_freq = inv_freq / seq_len_interpolation_factor  # (p / f) * w = p * (w / f): Hugging Face's "linear"
        # Not persistent: derived from the config, so checkpoints do not carry it.
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``position_ids`` [b, s] -> (cos, sin), each [s, b, 1, rotary_dim] in fp32."""
        freqs = position_ids.t().float().unsqueeze(-1) * self.inv_freq.float()  # [s, b, rotary_dim / 2]
        emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(2)
        return emb.cos(), emb.sin()


LLAMA3_LOW_FREQ_FACTOR, LLAMA3_HIGH_FREQ_FACTOR, LLAMA3_ORIGINAL_POSITIONS = 1.0, 4.0, 8192
"""Llama 3.1's RoPE scaling constants, which Megatron-LM's ``--use-rope-scaling`` fixes (only the factor is a flag)."""


def llama3_scaled(inv_freq: torch.Tensor, factor: float, low_freq_factor: float = LLAMA3_LOW_FREQ_FACTOR,
                  high_freq_factor: float = LLAMA3_HIGH_FREQ_FACTOR,
                  original_positions: int = LLAMA3_ORIGINAL_POSITIONS) -> torch.Tensor:
    """Llama 3.x's frequency scaling of ``inv_freq`` [rotary_dim / 2] (Hugging Face's ``rope_type`` "llama3",
    ``_compute_llama3_parameters``; Megatron-LM's ``RotaryEmbedding._apply_scaling``).

    A frequency whose wavelength 2 pi / w exceeds ``original_positions / low_freq_factor`` is divided by
    ``factor``; one below ``original_positions / high_freq_factor`` is kept; in between the two are mixed
    by ``s = (original_positions / wavelength - low) / (high - low)``: ``(1 - s) w / factor + s w``.
    """
    wavelength = 2 * math.pi / inv_freq
    low_wavelength = original_positions / low_freq_factor
    high_wavelength = original_positions / high_freq_factor
    scaled = torch.where(wavelength > low_wavelength, inv_freq / factor, inv_freq)
    smooth = (original_positions / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
    mixed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelength >= high_wavelength) & (wavelength <= low_wavelength)
    return torch.where(medium, mixed, scaled)


def rotary_embedding(config: TransformerConfig) -> RotaryEmbedding:
    """The :class:`RotaryEmbedding` of ``config`` (dimension, base, Llama 3.x scaling, interpolation)."""
    return RotaryEmbedding(config.rotary_dim, config.rotary_base,
                           config.rope_scaling_factor if config.rope_scaling else None,
                           config.seq_len_interpolation_factor)


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
