"""The feed-forward block: fc1 (column-parallel), activation, fc2 (row-parallel).

Under SwiGLU fc1 holds [gate; up] and is split with stride 2, so every TP rank holds matching
halves: rank r keeps gate rows r and up rows r of the same TP cut, and its activation is local.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from megatron_core.fusions.compiled import gelu_tanh, swiglu
from megatron_core.fusions.kernels import find_kernel
from megatron_core.parallel_state import ParallelState, get_parallel_state
from megatron_core.transformer.config import TransformerConfig, resolved
from megatron_core.transformer.init import component_name
from megatron_core.transformer.spec import build_module


def _squared_relu(x: torch.Tensor) -> torch.Tensor:
    """relu(x)^2 (So et al. 2021, "Primer"; Megatron-LM's ``--squared-relu``)."""
    return torch.pow(F.relu(x), 2)


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu, "gelu_tanh": gelu_tanh, "swiglu": swiglu, "silu": F.silu, "relu": F.relu,
    "squared_relu": _squared_relu}


@dataclass
class MLPSubmodules:
    """Specs of the two projections."""

    linear_fc1: Any = None
    linear_fc2: Any = None


class MLP(torch.nn.Module):
    """h -> ffn (x2 when gated) -> activation -> h, split over TP along the ffn dimension."""

    def __init__(self, config: TransformerConfig, submodules: MLPSubmodules, layer_number: int,
                 parallel_state: ParallelState | None = None, prefix: str = "",
                 fused_kernels: bool = True) -> None:
        """``prefix``: this module's name in the whole model, the root of its weights' seed names
        (see :func:`megatron_core.transformer.init.component_name`)."""
        super().__init__()
        ps = get_parallel_state(parallel_state)
        self.config = config
        gated = config.gated_linear_unit
        ffn_hidden_size = resolved(config.ffn_hidden_size, "ffn_hidden_size")
        common = dict(sequence_parallel=config.sequence_parallel, params_dtype=config.params_dtype,
                      parallel_state=ps)
        self.linear_fc1 = build_module(
            submodules.linear_fc1, config.hidden_size, ffn_hidden_size * (2 if gated else 1),
            bias=config.add_bias_linear, gather_output=False, stride=2 if gated else 1,
            init_method=config.init_method(component_name(prefix, "linear_fc1.weight")), **common)
        self.activation_func = ACTIVATIONS[config.activation]
        # A fused SwiGLU / tanh-GeLU kernel where one is found (fused spec); the local spec passes False.
        fusable = config.activation if config.activation in ("swiglu", "gelu_tanh") else None
        self.activation_kernel = find_kernel(fusable) if fused_kernels and fusable else None
        self.linear_fc2 = build_module(
            submodules.linear_fc2, ffn_hidden_size, config.hidden_size, bias=config.add_bias_linear,
            input_is_parallel=True,
            init_method=config.output_init_method(component_name(prefix, "linear_fc2.weight")), **common)

    def forward(self, hidden_states: torch.Tensor):
        """[s, b, h] -> (output, bias or None)."""
        intermediate, bias = self.linear_fc1(hidden_states)
        if bias is not None:
            intermediate = intermediate + bias
        kernel = self.activation_kernel
        if kernel is not None and kernel.applies(intermediate):
            return self.linear_fc2(kernel.fn(intermediate))
        return self.linear_fc2(self.activation_func(intermediate))
