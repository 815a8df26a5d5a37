"""Self-attention with a fused QKV projection laid out per query group.

The QKV weight stacks, for each key/value group g, the query heads of g, then g's key head, then
g's value head: [q_g0 (heads/groups x d); k_g0 (d); v_g0 (d); q_g1; ...]. A contiguous TP split
of the output features therefore hands each rank whole groups with their matching queries.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from megatron_core.fusions.fused_softmax import causal_mask
from megatron_core.fusions.kernels import find_kernel
from megatron_core.parallel_state import ParallelState, get_parallel_state
from megatron_core.tensor_parallel.random import checkpoint
from megatron_core.tensor_parallel.utils import divide, set_sequence_parallel_attribute
from megatron_core.transformer.config import TransformerConfig, resolved
from megatron_core.transformer.enums import AttnMaskType
from megatron_core.transformer.init import component_name
from megatron_core.transformer.rope import apply_rotary_pos_emb
from megatron_core.transformer.spec import build_module


@dataclass
class SelfAttentionSubmodules:
    """Specs of the parts of self-attention (``q_layernorm``/``k_layernorm``: optional per-head norms)."""

    linear_qkv: Any = None
    core_attention: Any = None
    linear_proj: Any = None
    q_layernorm: Any = None
    k_layernorm: Any = None


class SelfAttention(torch.nn.Module):
    """QKV projection (column-parallel), RoPE, core attention, output projection (row-parallel)."""

    def __init__(self, config: TransformerConfig, submodules: SelfAttentionSubmodules, layer_number: int,
                 attn_mask_type: AttnMaskType = AttnMaskType.causal,
                 parallel_state: ParallelState | None = None, prefix: str = "",
                 fused_kernels: bool = True) -> None:
        """``prefix``: this module's name in the whole model, the root of its weights' seed names
        (see :func:`megatron_core.transformer.init.component_name`)."""
        super().__init__()
        # A fused RoPE kernel where one is found (fused spec); the local spec passes False.
        self.rope_kernel = find_kernel("rope") if fused_kernels else None
        ps = get_parallel_state(parallel_state)
        self.config, self.layer_number, self.rng_tracker = config, layer_number, ps.rng_tracker
        tp = ps.tp_size
        self.heads_per_rank = divide(config.num_attention_heads, tp, "num_attention_heads")
        groups = resolved(config.num_query_groups, "num_query_groups")
        self.groups_per_rank = divide(groups, tp, "num_query_groups")
        self.heads_per_group = config.num_attention_heads // groups
        self.head_dim = resolved(config.kv_channels, "kv_channels")
        self.selective_recompute = config.recompute_granularity == "selective"
        common = dict(sequence_parallel=config.sequence_parallel, params_dtype=config.params_dtype,
                      parallel_state=ps)
        self.linear_qkv = build_module(
            submodules.linear_qkv, config.hidden_size, config.query_projection_size + 2 * config.kv_projection_size,
            bias=config.qkv_bias, gather_output=False,
            init_method=config.init_method(component_name(prefix, "linear_qkv.weight")), **common)
        self.core_attention = build_module(submodules.core_attention, config=config, layer_number=layer_number,
                                           attn_mask_type=attn_mask_type, parallel_state=ps)
        self.linear_proj = build_module(
            submodules.linear_proj, config.query_projection_size, config.hidden_size, bias=config.add_bias_linear,
            input_is_parallel=True,
            init_method=config.output_init_method(component_name(prefix, "linear_proj.weight")), **common)
        self.q_layernorm = build_module(submodules.q_layernorm, config=config, hidden_size=self.head_dim)
        self.k_layernorm = build_module(submodules.k_layernorm, config=config, hidden_size=self.head_dim)
        for param in [*self.q_layernorm.parameters(), *self.k_layernorm.parameters()]:
            # Replicated over TP, but each rank normalises only its own heads: the gradient is partial
            # whatever the sequence layout, so finalize_model_grads must sum it over TP.
            set_sequence_parallel_attribute(param, tp > 1)

    def split_qkv(self, mixed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[s, b, groups * (heads/groups + 2) * d] -> q [s, b, heads, d], k and v [s, b, groups, d]."""
        s, b = mixed.shape[:2]
        d, hpg = self.head_dim, self.heads_per_group
        mixed = mixed.view(s, b, self.groups_per_rank, (hpg + 2) * d)
        q, k, v = mixed.split([hpg * d, d, d], dim=-1)
        return q.reshape(s, b, self.heads_per_rank, d), k, v

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                rotary_pos_emb: tuple[torch.Tensor, torch.Tensor] | None = None, inference_context=None):
        """[s, b, h] (sequence-split under SP) -> (output, bias or None) like the parallel linears.

        With ``inference_context`` (:class:`~megatron_core.inference.context.InferenceContext`) the new
        keys/values are appended to its cache and the queries attend over every cached position."""
        mixed, _ = self.linear_qkv(hidden_states)
        q, k, v = self.split_qkv(mixed)
        q, k = self.q_layernorm(q), self.k_layernorm(k)
        q = apply_rotary_pos_emb(q, rotary_pos_emb, self.rope_kernel)
        k = apply_rotary_pos_emb(k, rotary_pos_emb, self.rope_kernel)
        if inference_context is not None:
            k, v = inference_context.append(self.layer_number, k, v)
            if attention_mask is None:
                # Queries are the last s_new of s_k positions: a bottom-right aligned causal mask.
                attention_mask = causal_mask(q.shape[0], k.shape[0], q.device)
        if self.selective_recompute and self.training:
            # Recompute the s^2 part in backward; the tracker states make dropout replay exactly.
            context = checkpoint(self.core_attention, self.rng_tracker, q, k, v, attention_mask)
        else:
            context = self.core_attention(q, k, v, attention_mask)
        return self.linear_proj(context)
