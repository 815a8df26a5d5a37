"""LlamaForCausalLM <-> GPTModel weights and configs.

Hugging Face's q/k projections are stored for the rotate-half RoPE convention, which is the one
``megatron_core.transformer.rope`` implements, so they are copied as they are. The separate q/k/v
projections are interleaved per query group into our fused QKV weight, and gate/up are stacked
into fc1 as [gate; up].
"""
from __future__ import annotations

from typing import Any

import torch

from megatron_core.checkpoint.hf_errors import UnsupportedModel
from megatron_core.checkpoint.hf_io import norm_weight_to_core, norm_weight_to_hf
from megatron_core.transformer.config import TransformerConfig, resolved
from megatron_core.transformer.rope import LLAMA3_HIGH_FREQ_FACTOR, LLAMA3_LOW_FREQ_FACTOR, LLAMA3_ORIGINAL_POSITIONS

ARCHITECTURE = "LlamaForCausalLM"


_LLAMA3_CONSTANTS = {"low_freq_factor": LLAMA3_LOW_FREQ_FACTOR, "high_freq_factor": LLAMA3_HIGH_FREQ_FACTOR,
                     "original_max_position_embeddings": LLAMA3_ORIGINAL_POSITIONS}


def _rope(hf: Any) -> dict[str, Any]:
    """The TransformerConfig RoPE fields of a LlamaConfig: its theta, and its ``rope_type`` "llama3" (Llama
    3.x, with Megatron-LM's fixed constants) or "linear" scaling; any other type is UnsupportedModel."""
    params = {**(getattr(hf, "rope_scaling", None) or {}), **(getattr(hf, "rope_parameters", None) or {})}
    rope_type = params.get("rope_type", params.get("type")) or "default"
    fields: dict[str, Any] = {"rotary_base": float(params.get("rope_theta", getattr(hf, "rope_theta", 10000.0)))}
    if rope_type == "llama3":
        odd = {k: params.get(k) for k, v in _LLAMA3_CONSTANTS.items() if params.get(k) != v}
        if odd:
            raise UnsupportedModel(f"Llama 3 RoPE scaling with {odd} is not supported (Megatron-LM's "
                                   f"--use-rope-scaling fixes {_LLAMA3_CONSTANTS})")
        fields.update(rope_scaling=True, rope_scaling_factor=float(params["factor"]))
    elif rope_type == "linear":
        fields["seq_len_interpolation_factor"] = float(params["factor"])
    elif rope_type != "default":
        raise UnsupportedModel(f"Llama RoPE type {rope_type!r} ({params}) is not supported (default, llama3 or linear)")
    return fields


def _rope_parameters(config: TransformerConfig) -> dict[str, Any]:
    """Hugging Face's ``rope_parameters`` of ``config`` (see :func:`_rope`)."""
    if config.rope_scaling:
        return {"rope_type": "llama3", "rope_theta": config.rotary_base, "factor": config.rope_scaling_factor,
                **_LLAMA3_CONSTANTS}
    if config.seq_len_interpolation_factor is not None:
        return {"rope_type": "linear", "rope_theta": config.rotary_base, "factor": config.seq_len_interpolation_factor}
    return {"rope_type": "default", "rope_theta": config.rotary_base}


def config_from_hf(hf: Any) -> tuple[TransformerConfig, int, int]:
    """``(TransformerConfig, vocab_size, max_position_embeddings)`` of a LlamaConfig."""
    if hf.hidden_act != "silu":
        raise UnsupportedModel(f"Llama hidden_act={hf.hidden_act!r} is not supported (only 'silu' / SwiGLU)")
    attention_bias, mlp_bias = bool(getattr(hf, "attention_bias", False)), bool(getattr(hf, "mlp_bias", False))
    if attention_bias != mlp_bias:
        raise UnsupportedModel(f"Llama with attention_bias={attention_bias} and mlp_bias={mlp_bias} is not "
                               f"supported: biases are all on or all off (add_bias_linear)")
    if getattr(hf, "pretraining_tp", 1) not in (None, 1):
        raise UnsupportedModel(f"Llama pretraining_tp={hf.pretraining_tp} is not supported (use 1)")
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    config = TransformerConfig(
        num_layers=hf.num_hidden_layers, hidden_size=hf.hidden_size, num_attention_heads=hf.num_attention_heads,
        num_query_groups=hf.num_key_value_heads or hf.num_attention_heads, kv_channels=head_dim,
        ffn_hidden_size=hf.intermediate_size, normalization="RMSNorm", layernorm_epsilon=hf.rms_norm_eps,
        activation="swiglu", add_bias_linear=attention_bias, position_embedding_type="rope",
        rotary_percent=1.0, **_rope(hf),
        share_embeddings_and_output_weights=bool(getattr(hf, "tie_word_embeddings", False)),
        hidden_dropout=0.0, attention_dropout=float(getattr(hf, "attention_dropout", 0.0) or 0.0),
        init_method_std=hf.initializer_range)
    return config, hf.vocab_size, hf.max_position_embeddings


def config_to_hf(config: TransformerConfig, vocab_size: int, max_position_embeddings: int,
                 special_token_ids: dict[str, int | None] | None = None) -> Any:
    """The LlamaConfig of a Llama-shaped TransformerConfig (clear error for anything Llama cannot hold).

    ``special_token_ids`` (``bos_token_id``/``eos_token_id``/``pad_token_id``) go into the constructor:
    set afterwards, transformers would first validate its defaults (bos 1, eos 2) against the
    vocabulary and could warn.
    """
    from transformers import LlamaConfig  # noqa: PLC0415
    problems = []
    if config.normalization != "RMSNorm":
        problems.append(f"normalization={config.normalization}")
    if config.activation != "swiglu":
        problems.append(f"activation={config.activation}")
    if config.position_embedding_type != "rope" or config.rotary_percent != 1.0:
        problems.append(
            f"position_embedding_type={config.position_embedding_type} rotary_percent={config.rotary_percent}"
        )
    if config.add_qkv_bias and not config.add_bias_linear:
        problems.append("add_qkv_bias without add_bias_linear")
    if config.qk_layernorm:
        problems.append("qk_layernorm")
    if config.rope_scaling and config.seq_len_interpolation_factor is not None:
        problems.append("both Llama 3 RoPE scaling and linear position interpolation")
    if problems:
        raise UnsupportedModel(f"LlamaForCausalLM cannot hold a model with {', '.join(problems)}; keep it as a "
                               f"Megatron checkpoint (tools/run_text_generation.py and the server load it)")
    ids = special_token_ids or {}
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=config.hidden_size,
        intermediate_size=resolved(config.ffn_hidden_size, "ffn_hidden_size"),
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_query_groups, head_dim=config.kv_channels, hidden_act="silu",
        max_position_embeddings=max_position_embeddings, initializer_range=config.init_method_std,
        rms_norm_eps=config.layernorm_epsilon, tie_word_embeddings=config.share_embeddings_and_output_weights,
        rope_parameters=_rope_parameters(config),
        attention_bias=config.add_bias_linear, mlp_bias=config.add_bias_linear,
        attention_dropout=config.attention_dropout, architectures=[ARCHITECTURE],
        bos_token_id=ids.get("bos_token_id"), eos_token_id=ids.get("eos_token_id"),
        pad_token_id=ids.get("pad_token_id"))


def _qkv_to_core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: TransformerConfig) -> torch.Tensor:
    """Separate [heads * d, ...], [groups * d, ...] x2 -> per group [q heads of g; k_g; v_g]."""
    g, d = resolved(config.num_query_groups, "num_query_groups"), resolved(config.kv_channels, "kv_channels")
    rest = q.shape[1:]
    q = q.reshape(g, -1, *rest)
    k, v = k.reshape(g, d, *rest), v.reshape(g, d, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest).contiguous()


def _qkv_to_hf(qkv: torch.Tensor, config: TransformerConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g, d = resolved(config.num_query_groups, "num_query_groups"), resolved(config.kv_channels, "kv_channels")
    per_group = config.num_attention_heads // g * d
    rest = qkv.shape[1:]
    q, k, v = qkv.reshape(g, per_group + 2 * d, *rest).split([per_group, d, d], dim=1)
    return (q.reshape(-1, *rest).contiguous(), k.reshape(-1, *rest).contiguous(), v.reshape(-1, *rest).contiguous())


def state_to_core(hf: dict[str, torch.Tensor], config: TransformerConfig) -> dict[str, torch.Tensor]:
    """Full GPTModel state dict from a LlamaForCausalLM state dict; the RMSNorm weights minus 1 when ``config``
    keeps zero-centred gammas (``layernorm_zero_centered_gamma``)."""
    zc = config.layernorm_zero_centered_gamma
    out = {"embedding.word_embeddings.weight": hf["model.embed_tokens.weight"],
           "decoder.final_layernorm.weight": norm_weight_to_core(hf["model.norm.weight"], zc)}
    bias = config.add_bias_linear
    for i in range(config.num_layers):
        h, c = f"model.layers.{i}.", f"decoder.layers.{i}."
        out[f"{c}input_layernorm.weight"] = norm_weight_to_core(hf[f"{h}input_layernorm.weight"], zc)
        out[f"{c}pre_mlp_layernorm.weight"] = norm_weight_to_core(hf[f"{h}post_attention_layernorm.weight"], zc)
        a = f"{h}self_attn."
        out[f"{c}self_attention.linear_qkv.weight"] = _qkv_to_core(
            hf[f"{a}q_proj.weight"], hf[f"{a}k_proj.weight"], hf[f"{a}v_proj.weight"], config)
        out[f"{c}self_attention.linear_proj.weight"] = hf[f"{a}o_proj.weight"]
        m = f"{h}mlp."
        out[f"{c}mlp.linear_fc1.weight"] = torch.cat([hf[f"{m}gate_proj.weight"], hf[f"{m}up_proj.weight"]])
        out[f"{c}mlp.linear_fc2.weight"] = hf[f"{m}down_proj.weight"]
        if bias:
            out[f"{c}self_attention.linear_qkv.bias"] = _qkv_to_core(
                hf[f"{a}q_proj.bias"], hf[f"{a}k_proj.bias"], hf[f"{a}v_proj.bias"], config)
            out[f"{c}self_attention.linear_proj.bias"] = hf[f"{a}o_proj.bias"]
            out[f"{c}mlp.linear_fc1.bias"] = torch.cat([hf[f"{m}gate_proj.bias"], hf[f"{m}up_proj.bias"]])
            out[f"{c}mlp.linear_fc2.bias"] = hf[f"{m}down_proj.bias"]
    if not config.share_embeddings_and_output_weights:
        out["output_layer.weight"] = hf["lm_head.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def state_to_hf(core: dict[str, torch.Tensor], config: TransformerConfig) -> dict[str, torch.Tensor]:
    """LlamaForCausalLM state dict (tied ``lm_head`` left out, as ``save_pretrained`` does); zero-centred
    RMSNorm weights (``layernorm_zero_centered_gamma``) are written as the 1 + weight they apply."""
    zc = config.layernorm_zero_centered_gamma
    out = {"model.embed_tokens.weight": core["embedding.word_embeddings.weight"],
           "model.norm.weight": norm_weight_to_hf(core["decoder.final_layernorm.weight"], zc)}
    bias = config.add_bias_linear
    for i in range(config.num_layers):
        h, c = f"model.layers.{i}.", f"decoder.layers.{i}."
        out[f"{h}input_layernorm.weight"] = norm_weight_to_hf(core[f"{c}input_layernorm.weight"], zc)
        out[f"{h}post_attention_layernorm.weight"] = norm_weight_to_hf(core[f"{c}pre_mlp_layernorm.weight"], zc)
        a, m = f"{h}self_attn.", f"{h}mlp."
        q, k, v = _qkv_to_hf(core[f"{c}self_attention.linear_qkv.weight"], config)
        out[f"{a}q_proj.weight"], out[f"{a}k_proj.weight"], out[f"{a}v_proj.weight"] = q, k, v
        out[f"{a}o_proj.weight"] = core[f"{c}self_attention.linear_proj.weight"]
        gate, up = core[f"{c}mlp.linear_fc1.weight"].chunk(2, dim=0)
        out[f"{m}gate_proj.weight"], out[f"{m}up_proj.weight"] = gate, up
        out[f"{m}down_proj.weight"] = core[f"{c}mlp.linear_fc2.weight"]
        if bias:
            q, k, v = _qkv_to_hf(core[f"{c}self_attention.linear_qkv.bias"], config)
            out[f"{a}q_proj.bias"], out[f"{a}k_proj.bias"], out[f"{a}v_proj.bias"] = q, k, v
            out[f"{a}o_proj.bias"] = core[f"{c}self_attention.linear_proj.bias"]
            gate, up = core[f"{c}mlp.linear_fc1.bias"].chunk(2, dim=0)
            out[f"{m}gate_proj.bias"], out[f"{m}up_proj.bias"] = gate, up
            out[f"{m}down_proj.bias"] = core[f"{c}mlp.linear_fc2.bias"]
    if not config.share_embeddings_and_output_weights:
        out["lm_head.weight"] = core["output_layer.weight"]
    return {k: v.contiguous() for k, v in out.items()}
