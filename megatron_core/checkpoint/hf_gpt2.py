"""GPT2LMHeadModel <-> GPTModel weights and configs.

Hugging Face GPT-2 stores its linears as ``Conv1D`` with [in, out] weights (transposed against
``nn.Linear``) and its fused ``c_attn`` as [q (all heads); k; v]; ours is [out, in] laid out per
head as [q_h; k_h; v_h].
"""
from __future__ import annotations

from typing import Any

import torch

from megatron_core.checkpoint.hf_errors import UnsupportedModel
from megatron_core.checkpoint.hf_io import norm_weight_to_core, norm_weight_to_hf
from megatron_core.transformer.config import TransformerConfig, resolved

ARCHITECTURE = "GPT2LMHeadModel"
_ACT_FROM_HF = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu",
                "silu": "silu", "swish": "silu"}
_ACT_TO_HF = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu"}


def config_from_hf(hf: Any) -> tuple[TransformerConfig, int, int]:
    """``(TransformerConfig, vocab_size, max_position_embeddings)`` of a GPT2Config."""
    for flag, ok in (("add_cross_attention", False), ("scale_attn_by_inverse_layer_idx", False),
                     ("scale_attn_weights", True)):
        if getattr(hf, flag, ok) != ok:
            raise UnsupportedModel(f"GPT-2 with {flag}={getattr(hf, flag)} is not supported (expected {ok})")
    if hf.activation_function not in _ACT_FROM_HF:
        raise UnsupportedModel(f"GPT-2 activation_function={hf.activation_function!r} is not supported; "
                               f"supported: {', '.join(_ACT_FROM_HF)}")
    config = TransformerConfig(
        num_layers=hf.n_layer, hidden_size=hf.n_embd, num_attention_heads=hf.n_head,
        ffn_hidden_size=hf.n_inner or 4 * hf.n_embd, normalization="LayerNorm",
        layernorm_epsilon=hf.layer_norm_epsilon, activation=_ACT_FROM_HF[hf.activation_function],
        add_bias_linear=True, position_embedding_type="learned_absolute",
        share_embeddings_and_output_weights=bool(getattr(hf, "tie_word_embeddings", True)),
        hidden_dropout=hf.resid_pdrop, attention_dropout=hf.attn_pdrop, init_method_std=hf.initializer_range)
    return config, hf.vocab_size, hf.n_positions


def config_to_hf(config: TransformerConfig, vocab_size: int, max_position_embeddings: int,
                 special_token_ids: dict[str, int | None] | None = None) -> Any:
    """The GPT2Config of a GPT-2-shaped TransformerConfig (clear error for anything GPT-2 cannot hold).

    ``special_token_ids`` (``bos_token_id``/``eos_token_id``/``pad_token_id``) go into the constructor:
    set afterwards, transformers would first validate its defaults (GPT-2's 50256) against a smaller
    vocabulary and warn.
    """
    from transformers import GPT2Config  # noqa: PLC0415
    problems = []
    if config.normalization != "LayerNorm":
        problems.append(f"normalization={config.normalization}")
    if config.activation not in _ACT_TO_HF:
        problems.append(f"activation={config.activation}")
    if not config.add_bias_linear:
        problems.append("add_bias_linear=False")
    if config.position_embedding_type != "learned_absolute":
        problems.append(f"position_embedding_type={config.position_embedding_type}")
    if config.qk_layernorm:
        problems.append("qk_layernorm")
    if config.num_query_groups != config.num_attention_heads:
        problems.append(f"num_query_groups={config.num_query_groups}")
    if resolved(config.kv_channels, "kv_channels") * config.num_attention_heads != config.hidden_size:
        problems.append(f"kv_channels={config.kv_channels}")
    if problems:
        raise UnsupportedModel(f"GPT2LMHeadModel cannot hold a model with {', '.join(problems)}; keep it as a Megatron "
                               f"checkpoint (tools/run_text_generation.py and the server load it)")
    ids = special_token_ids or {}
    return GPT2Config(
        vocab_size=vocab_size, n_positions=max_position_embeddings, n_embd=config.hidden_size,
        n_layer=config.num_layers, n_head=config.num_attention_heads, n_inner=config.ffn_hidden_size,
        activation_function=_ACT_TO_HF[config.activation], resid_pdrop=config.hidden_dropout,
        embd_pdrop=config.hidden_dropout, attn_pdrop=config.attention_dropout,
        layer_norm_epsilon=config.layernorm_epsilon, initializer_range=config.init_method_std,
        tie_word_embeddings=config.share_embeddings_and_output_weights, architectures=[ARCHITECTURE],
        bos_token_id=ids.get("bos_token_id"), eos_token_id=ids.get("eos_token_id"),
        pad_token_id=ids.get("pad_token_id"))


def _qkv_to_core(t: torch.Tensor, heads: int) -> torch.Tensor:
    """[3 * heads * d, ...] as [q; k; v] -> per head [q_h; k_h; v_h]."""
    rest = t.shape[1:]
    return t.reshape(3, heads, -1, *rest).transpose(0, 1).reshape(t.shape).contiguous()


def _qkv_to_hf(t: torch.Tensor, heads: int) -> torch.Tensor:
    rest = t.shape[1:]
    return t.reshape(heads, 3, -1, *rest).transpose(0, 1).reshape(t.shape).contiguous()


def state_to_core(hf: dict[str, torch.Tensor], config: TransformerConfig) -> dict[str, torch.Tensor]:
    """Full GPTModel state dict from a GPT2LMHeadModel (or bare GPT2Model) state dict; the LayerNorm weights
    minus 1 when ``config`` keeps zero-centred gammas (``layernorm_zero_centered_gamma``)."""
    hf = {(k if k.startswith(("transformer.", "lm_head.")) else f"transformer.{k}"): v for k, v in hf.items()}
    heads, zc = config.num_attention_heads, config.layernorm_zero_centered_gamma
    out = {"embedding.word_embeddings.weight": hf["transformer.wte.weight"],
           "embedding.position_embeddings.weight": hf["transformer.wpe.weight"],
           "decoder.final_layernorm.weight": norm_weight_to_core(hf["transformer.ln_f.weight"], zc),
           "decoder.final_layernorm.bias": hf["transformer.ln_f.bias"]}
    for i in range(config.num_layers):
        h, c = f"transformer.h.{i}.", f"decoder.layers.{i}."
        for ours, theirs in (("input_layernorm", "ln_1"), ("pre_mlp_layernorm", "ln_2")):
            out[f"{c}{ours}.weight"] = norm_weight_to_core(hf[f"{h}{theirs}.weight"], zc)
            out[f"{c}{ours}.bias"] = hf[f"{h}{theirs}.bias"]
        out[f"{c}self_attention.linear_qkv.weight"] = _qkv_to_core(hf[f"{h}attn.c_attn.weight"].t(), heads)
        out[f"{c}self_attention.linear_qkv.bias"] = _qkv_to_core(hf[f"{h}attn.c_attn.bias"], heads)
        out[f"{c}self_attention.linear_proj.weight"] = hf[f"{h}attn.c_proj.weight"].t()
        out[f"{c}self_attention.linear_proj.bias"] = hf[f"{h}attn.c_proj.bias"]
        out[f"{c}mlp.linear_fc1.weight"] = hf[f"{h}mlp.c_fc.weight"].t()
        out[f"{c}mlp.linear_fc1.bias"] = hf[f"{h}mlp.c_fc.bias"]
        out[f"{c}mlp.linear_fc2.weight"] = hf[f"{h}mlp.c_proj.weight"].t()
        out[f"{c}mlp.linear_fc2.bias"] = hf[f"{h}mlp.c_proj.bias"]
    if not config.share_embeddings_and_output_weights:
        out["output_layer.weight"] = hf["lm_head.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def state_to_hf(core: dict[str, torch.Tensor], config: TransformerConfig) -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel state dict (tied ``lm_head`` left out, as ``save_pretrained`` does); zero-centred
    LayerNorm weights (``layernorm_zero_centered_gamma``) are written as the 1 + weight they apply."""
    heads, zc = config.num_attention_heads, config.layernorm_zero_centered_gamma
    out = {"transformer.wte.weight": core["embedding.word_embeddings.weight"],
           "transformer.wpe.weight": core["embedding.position_embeddings.weight"],
           "transformer.ln_f.weight": norm_weight_to_hf(core["decoder.final_layernorm.weight"], zc),
           "transformer.ln_f.bias": core["decoder.final_layernorm.bias"]}
    for i in range(config.num_layers):
        h, c = f"transformer.h.{i}.", f"decoder.layers.{i}."
        for ours, theirs in (("input_layernorm", "ln_1"), ("pre_mlp_layernorm", "ln_2")):
            out[f"{h}{theirs}.weight"] = norm_weight_to_hf(core[f"{c}{ours}.weight"], zc)
            out[f"{h}{theirs}.bias"] = core[f"{c}{ours}.bias"]
        out[f"{h}attn.c_attn.weight"] = _qkv_to_hf(core[f"{c}self_attention.linear_qkv.weight"], heads).t()
        out[f"{h}attn.c_attn.bias"] = _qkv_to_hf(core[f"{c}self_attention.linear_qkv.bias"], heads)
        out[f"{h}attn.c_proj.weight"] = core[f"{c}self_attention.linear_proj.weight"].t()
        out[f"{h}attn.c_proj.bias"] = core[f"{c}self_attention.linear_proj.bias"]
        out[f"{h}mlp.c_fc.weight"] = core[f"{c}mlp.linear_fc1.weight"].t()
        out[f"{h}mlp.c_fc.bias"] = core[f"{c}mlp.linear_fc1.bias"]
        out[f"{h}mlp.c_proj.weight"] = core[f"{c}mlp.linear_fc2.weight"].t()
        out[f"{h}mlp.c_proj.bias"] = core[f"{c}mlp.linear_fc2.bias"]
    if not config.share_embeddings_and_output_weights:
        out["lm_head.weight"] = core["output_layer.weight"]
    return {k: v.contiguous() for k, v in out.items()}
