"""TransformerConfig presets for GPT-2-style and Llama-style models.

Each returns a config whose architecture fields match the family (norm, activation, biases,
position embedding, tying); shapes and anything else are keyword overrides.
"""
from __future__ import annotations

from typing import Any

from megatron_core.transformer.config import TransformerConfig


def gpt2_config(num_layers: int = 12, hidden_size: int = 768, num_attention_heads: int = 12,
                **overrides: Any) -> TransformerConfig:
    """GPT-2: LayerNorm (eps 1e-5), tanh-approximate GeLU, 4h MLP, biases, learned positions, tied output."""
    # Field values of several types (ints, floats, strings, bools) for TransformerConfig's keywords.
    values: dict[str, Any] = dict(
        num_layers=num_layers, hidden_size=hidden_size, num_attention_heads=num_attention_heads,
        ffn_hidden_size=4 * hidden_size, normalization="LayerNorm", layernorm_epsilon=1e-5,
        activation="gelu_tanh", add_bias_linear=True, position_embedding_type="learned_absolute",
        share_embeddings_and_output_weights=True, hidden_dropout=0.1, attention_dropout=0.1)
    values.update(overrides)
    return TransformerConfig(**values)


def llama_ffn_hidden_size(hidden_size: int, multiple_of: int = 256, ffn_dim_multiplier: float | None = None) -> int:
    """Llama's MLP width: 2/3 of 4h (times an optional multiplier), rounded up to ``multiple_of``."""
    inner = int(2 * 4 * hidden_size / 3)
    if ffn_dim_multiplier is not None:
        inner = int(ffn_dim_multiplier * inner)
    return multiple_of * ((inner + multiple_of - 1) // multiple_of)


def llama_config(num_layers: int = 32, hidden_size: int = 4096, num_attention_heads: int = 32,
                 num_query_groups: int | None = None, ffn_hidden_size: int | None = None,
                 **overrides: Any) -> TransformerConfig:
    """Llama: RMSNorm (eps 1e-5), SwiGLU, no biases, RoPE (base 10000), untied output, no dropout.

    ``num_query_groups`` < heads gives grouped-query attention (Llama-2 70B, Llama-3); Llama-3 also
    sets ``rotary_base=500000``.
    """
    values: dict[str, Any] = dict(
        num_layers=num_layers, hidden_size=hidden_size, num_attention_heads=num_attention_heads,
        num_query_groups=num_query_groups,
        ffn_hidden_size=ffn_hidden_size or llama_ffn_hidden_size(hidden_size),
        normalization="RMSNorm", layernorm_epsilon=1e-5, activation="swiglu", add_bias_linear=False,
        position_embedding_type="rope", rotary_base=10000.0, rotary_percent=1.0,
        share_embeddings_and_output_weights=False, hidden_dropout=0.0, attention_dropout=0.0)
    values.update(overrides)
    return TransformerConfig(**values)
