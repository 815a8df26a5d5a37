"""Helpers for tests: tiny Hugging Face models with random weights and loading them into GPTModel.

Nothing is downloaded: the models are built from small configs. ``load_hf_weights`` fills a
GPTModel chunk (any TP rank / pipeline stage) with its part of a Hugging Face model.
"""
from __future__ import annotations

from typing import Any

import torch

from megatron_core.checkpoint import hf_gpt2, hf_llama
from megatron_core.checkpoint.sharding import rank_state_dict
from megatron_core.transformer.config import TransformerConfig


def tiny_hf_gpt2(vocab_size: int = 256, hidden: int = 64, layers: int = 2, heads: int = 4, positions: int = 32,
                 seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A GPT2LMHeadModel with random weights and dropout off (eval mode, fp32)."""
    from transformers import GPT2Config, GPT2LMHeadModel  # noqa: PLC0415
    values = dict(vocab_size=vocab_size, n_positions=positions, n_embd=hidden, n_layer=layers, n_head=heads,
                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    values.update(overrides)
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(**values)).float().eval()


def tiny_hf_llama(vocab_size: int = 256, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                  ffn: int = 96, positions: int = 32, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A LlamaForCausalLM with random weights (grouped-query attention by default, eval mode, fp32)."""
    from transformers import LlamaConfig, LlamaForCausalLM  # noqa: PLC0415
    values = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=positions,
                  bos_token_id=0, eos_token_id=0)
    values.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**values)).float().eval()
    with torch.no_grad():  # HF initialises norms to one; random ones make the norm weights matter
        for name, param in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                param.add_(torch.randn_like(param) * 0.1)
    return model


def converter_for(hf_model: torch.nn.Module):
    """The ``tools.checkpoint`` module (hf_gpt2 / hf_llama) for a Hugging Face model."""
    return {"gpt2": hf_gpt2, "llama": hf_llama}[hf_model.config.model_type]


def core_config_of(hf_model: torch.nn.Module, **overrides: Any) -> tuple[TransformerConfig, int, int]:
    """``(TransformerConfig, vocab_size, max_positions)`` matching ``hf_model``; overrides applied."""
    config, vocab, positions = converter_for(hf_model).config_from_hf(hf_model.config)
    if overrides:
        config = TransformerConfig.from_dict({**config.to_dict(), **overrides})
    return config, vocab, positions


def hf_tensors_to_core(hf_model: torch.nn.Module, tensors: dict[str, torch.Tensor],
                       config: TransformerConfig) -> dict[str, torch.Tensor]:
    """Map any HF-keyed tensors (weights or gradients) to the full GPTModel layout."""
    return converter_for(hf_model).state_to_core(tensors, config)


def load_hf_weights(model: torch.nn.Module, hf_model: torch.nn.Module, make_vocab_size_divisible_by: int,
                    parallel_state: Any, vp_stage: int | None = None) -> None:
    """Copy this rank's part of ``hf_model``'s weights into the GPTModel chunk ``model`` (strict)."""
    config = model.config
    full = hf_tensors_to_core(hf_model, hf_model.state_dict(), config)
    state = rank_state_dict(full, config, model.vocab_size, make_vocab_size_divisible_by, parallel_state.tp_size,
                            parallel_state.tp_rank, parallel_state.pp_size, parallel_state.pp_rank,
                            parallel_state.vpp_size, vp_stage)
    model.load_state_dict(state, strict=True)
