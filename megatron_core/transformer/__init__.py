"""Transformer building blocks: config, module specs, attention, MLP, layer and block."""
from megatron_core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron_core.transformer.config import ConfigError, TransformerConfig
from megatron_core.transformer.dot_product_attention import DotProductAttention
from megatron_core.transformer.enums import AttnBackend, AttnMaskType
from megatron_core.transformer.layer_specs import (
    get_gpt_layer_fused_spec,
    get_gpt_layer_local_spec,
    get_gpt_layer_spec,
    get_gpt_layer_te_spec,
)
from megatron_core.transformer.mlp import MLP, MLPSubmodules
from megatron_core.transformer.rope import RotaryEmbedding, apply_rotary_pos_emb
from megatron_core.transformer.spec import IdentityOp, ModuleSpec, build_module
from megatron_core.transformer.transformer_block import TransformerBlock
from megatron_core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

__all__ = [
    "MLP",
    "AttnBackend",
    "AttnMaskType",
    "ConfigError",
    "DotProductAttention",
    "IdentityOp",
    "MLPSubmodules",
    "ModuleSpec",
    "RotaryEmbedding",
    "SelfAttention",
    "SelfAttentionSubmodules",
    "TransformerBlock",
    "TransformerConfig",
    "TransformerLayer",
    "TransformerLayerSubmodules",
    "apply_rotary_pos_emb",
    "build_module",
    "get_gpt_layer_fused_spec",
    "get_gpt_layer_local_spec",
    "get_gpt_layer_spec",
    "get_gpt_layer_te_spec",
]
