"""A pre-norm transformer layer: x + attn(norm(x)), then x + mlp(norm(x)), with hidden dropout.

With ``fp32_residual_connection`` x stays fp32: the norms return the params dtype for the branches,
whose bias and dropout stay in that dtype; only the residual add is in fp32 (Megatron-LM's order).

Hidden dropout acts on the residual stream, which TP ranks hold identically, so it draws from the
default RNG (the same mask on every TP rank); under sequence parallelism each rank holds different
tokens and it draws from the tracker's per-TP-rank stream instead.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

from megatron_core.fusions import dropout, dropout_add
from megatron_core.fusions.kernels import find_kernel
from megatron_core.parallel_state import ParallelState, get_parallel_state
from megatron_core.transformer.config import TransformerConfig
from megatron_core.transformer.init import component_name
from megatron_core.transformer.spec import build_module


@dataclass
class TransformerLayerSubmodules:
    """Specs of the four parts of a layer (None builds an identity)."""

    input_layernorm: Any = None
    self_attention: Any = None
    pre_mlp_layernorm: Any = None
    mlp: Any = None


class TransformerLayer(torch.nn.Module):
    """One transformer layer; ``layer_number`` is global and 1-based, as in Megatron-LM."""

    def __init__(self, config: TransformerConfig, submodules: TransformerLayerSubmodules, layer_number: int,
                 parallel_state: ParallelState | None = None, prefix: str = "",
                 fused_kernels: bool = True) -> None:
        """``prefix``: this layer's name in the whole model (``decoder.layers.<layer_number - 1>``),
        passed on to its parts as the root of their seed names."""
        super().__init__()
        # A fused bias-dropout-add kernel where one is found (fused spec); the local spec passes False.
        self.bda_kernel = find_kernel("bias_dropout_add") if fused_kernels else None
        ps = get_parallel_state(parallel_state)
        self.config, self.layer_number, self.rng_tracker = config, layer_number, ps.rng_tracker
        h = config.hidden_size
        self.input_layernorm = build_module(submodules.input_layernorm, config=config, hidden_size=h)
        self.self_attention = build_module(submodules.self_attention, config=config, layer_number=layer_number,
                                           parallel_state=ps, prefix=component_name(prefix, "self_attention"))
        self.pre_mlp_layernorm = build_module(submodules.pre_mlp_layernorm, config=config, hidden_size=h)
        self.mlp = build_module(submodules.mlp, config=config, layer_number=layer_number, parallel_state=ps,
                                prefix=component_name(prefix, "mlp"))

    def _bias_dropout_add(self, out: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor) -> torch.Tensor:
        p = self.config.hidden_dropout
        if out.dtype != residual.dtype:
            return self._bias_dropout_add_to_fp32_stream(out, bias, residual, p)
        if self.training and p > 0:
            rng = self.rng_tracker.fork() if self.config.sequence_parallel else contextlib.nullcontext()
            kernel = self.bda_kernel
            with rng:
                if kernel is not None and kernel.applies(out, bias, residual):
                    return kernel.fn(out, bias, residual, p)
                if bias is not None:
                    out = out + bias
                return dropout_add(out, residual, p)
        if bias is not None:
            out = out + bias
        return residual + out

    def _bias_dropout_add_to_fp32_stream(self, out: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor,
                                         p: float) -> torch.Tensor:
        """``fp32_residual_connection``: the bias added and the dropout applied in the branch's dtype (bf16/fp16),
        then the sum added to the fp32 stream in fp32: ``residual + dropout(out + bias)``, Megatron-LM's
        ``bias_dropout_add`` (megatron/legacy/model/transformer.py), whose last add promotes to fp32. (Megatron-core
        0.16.1's ``_bias_dropout_add_func`` casts the residual down to the branch's dtype instead, so its stream
        is fp32 only up to the first layer's add.) The fused kernel adds in its input's dtype: not used here."""
        if bias is not None:
            out = out + bias
        if self.training and p > 0:
            with self.rng_tracker.fork() if self.config.sequence_parallel else contextlib.nullcontext():
                out = dropout(out, p)
        return residual + out

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                rotary_pos_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
                inference_context=None) -> torch.Tensor:
        """[s, b, h] -> [s, b, h] (s is this rank's sequence shard under sequence parallelism);
        ``inference_context``: the KV cache of incremental decoding (None in training)."""
        extra = {} if inference_context is None else {"inference_context": inference_context}
        out, bias = self.self_attention(self.input_layernorm(hidden_states), attention_mask, rotary_pos_emb, **extra)
        hidden_states = self._bias_dropout_add(out, bias, hidden_states)
        out, bias = self.mlp(self.pre_mlp_layernorm(hidden_states))
        return self._bias_dropout_add(out, bias, hidden_states)
