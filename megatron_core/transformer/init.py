"""Seeded, per-component weight initialisation.

Every weight draws its full (unsharded) value from its own CPU generator, seeded from the model's
``init_seed`` and the component's name (``layers.3.self_attention.linear_qkv.weight``), so the
value depends neither on the TP size (a rank keeps its shard of the full draw) nor on the
pipeline split or the order in which modules are built.
"""
from __future__ import annotations

import zlib

import torch

from megatron_core.tensor_parallel.utils import InitMethod

_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant: spreads nearby seeds far apart


def component_seed(init_seed: int, component: str) -> int:
    """A 63-bit seed for ``component``: stable across processes and Python versions (CRC32, not hash())."""
    return ((init_seed * _MIX) ^ (zlib.crc32(component.encode()) << 17) ^ zlib.crc32(component[::-1].encode())) \
        & 0x7FFF_FFFF_FFFF_FFFF


def seeded_normal_init(std: float, init_seed: int, component: str) -> InitMethod:
    """In-place N(0, std) init drawn from ``component``'s own generator."""
    seed = component_seed(init_seed, component)

    def init_(tensor: torch.Tensor) -> None:
        generator = torch.Generator(device="cpu").manual_seed(seed)
        with torch.no_grad():
            if tensor.device.type == "cpu":
                tensor.normal_(0.0, std, generator=generator)
            else:
                tensor.copy_(torch.empty(tensor.shape, dtype=tensor.dtype).normal_(0.0, std, generator=generator))
    return init_


def component_name(prefix: str, name: str) -> str:
    """``name`` under ``prefix`` (``"decoder.layers.0"`` + ``"mlp"``); a standalone module has prefix ``""``.

    The prefix of a module is its place in the whole, unsplit model: the path
    ``GPTModel.named_parameters()`` gives it with global layer numbers, so seed names equal parameter
    names whatever the pipeline split.
    """
    return f"{prefix}.{name}" if prefix else name


def skip_init(tensor: torch.Tensor) -> None:
    """No draw: for weights replaced right after construction (a tied output layer)."""
