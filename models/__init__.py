"""Ready architectures a user picks by name: GPT-2 and Llama sizes over the library's family configs.

An app-level folder, importable from the checkout (as Megatron-LM's top-level builders are); it is
not installed. Everything it uses lives in ``megatron_core.models``: ``GPTModel``, the layer specs
and the family configs ``gpt2_config`` / ``llama_config``. A new architecture goes here as a
function returning a ``TransformerConfig`` (and, if its layers differ, a ``ModuleSpec``).

    from models import ARCHITECTURES
    config = ARCHITECTURES["llama2-7b"](num_layers=4)   # overrides go to the family config
"""
from __future__ import annotations

from collections.abc import Callable
from functools import partial

from megatron_core.models.presets import gpt2_config, llama_config
from megatron_core.transformer.config import TransformerConfig

# Sizes from the published model cards (GPT-2: Radford et al. 2019; Llama 2: Touvron et al. 2023;
# Llama 3: Meta 2024). Each value takes keyword overrides (e.g. ``num_layers=2`` for a smoke test).
ARCHITECTURES: dict[str, Callable[..., TransformerConfig]] = {
    "gpt2-small": partial(gpt2_config, num_layers=12, hidden_size=768, num_attention_heads=12),
    "gpt2-medium": partial(gpt2_config, num_layers=24, hidden_size=1024, num_attention_heads=16),
    "gpt2-large": partial(gpt2_config, num_layers=36, hidden_size=1280, num_attention_heads=20),
    "gpt2-xl": partial(gpt2_config, num_layers=48, hidden_size=1600, num_attention_heads=25),
    "llama2-7b": partial(llama_config, num_layers=32, hidden_size=4096, num_attention_heads=32),
    "llama2-13b": partial(llama_config, num_layers=40, hidden_size=5120, num_attention_heads=40),
    "llama2-70b": partial(llama_config, num_layers=80, hidden_size=8192, num_attention_heads=64,
                          num_query_groups=8, ffn_hidden_size=28672),
    "llama3-8b": partial(llama_config, num_layers=32, hidden_size=4096, num_attention_heads=32,
                         num_query_groups=8, ffn_hidden_size=14336,
                         rotary_base=500000.0),
}

__all__ = ["ARCHITECTURES"]
