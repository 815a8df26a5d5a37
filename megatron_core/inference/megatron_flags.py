"""The flags of Megatron-LM's generation scripts, for ``run_text_generation.py`` and the server.

Megatron-LM builds the model from its flags and then loads the weights, so its scripts spell the
architecture out (``examples/inference/run_text_generation_server_345M.sh``: ``--num-layers 24
--hidden-size 1024 ...``; the Llama/Mistral ones of ``docs/llama_mistral.md`` add
``--group-query-attention --swiglu --normalization RMSNorm --position-embedding-type rope
--disable-bias-linear --untie-embeddings-and-output-weights ...``). Here the model comes from ``--load``,
so each architecture flag given is checked against the loaded model (one line naming the flag and the
checkpoint's value when they differ), and the run-time flags that change nothing here are accepted.
``--fp16`` / ``--bf16`` run the model in that dtype.
"""
from __future__ import annotations

import argparse
from typing import Any

import torch

from megatron_core.errors import ConfigError
from megatron_core.transformer.rope import rotary_embedding

# Megatron-LM's value flags -> (type, the TransformerConfig field; None: the model's position count).
_VALUE_FLAGS: dict[str, tuple[type, str | None]] = {
    "--num-layers": (int, "num_layers"), "--hidden-size": (int, "hidden_size"),
    "--num-attention-heads": (int, "num_attention_heads"), "--ffn-hidden-size": (int, "ffn_hidden_size"),
    "--num-query-groups": (int, "num_query_groups"), "--kv-channels": (int, "kv_channels"),
    "--max-position-embeddings": (int, None), "--normalization": (str, "normalization"),
    "--norm-epsilon": (float, "layernorm_epsilon"), "--position-embedding-type": (str, "position_embedding_type"),
    "--rotary-base": (float, "rotary_base"), "--rotary-percent": (float, "rotary_percent"),
    "--rope-scaling-factor": (float, "rope_scaling_factor"), "--rotary-scaling-factor": (float, "rope_scaling_factor"),
}
_INTERPOLATION = "--rotary-seq-len-interpolation-factor"  # a run's choice, as in training: applied, not checked
_CHOICES = {"--normalization": ["LayerNorm", "RMSNorm"],
            "--position-embedding-type": ["learned_absolute", "rope", "none"]}
# Switches that only configure a run (loading, fusions, dropout, batching): no effect on generation here.
_RUN_SWITCHES = ("--use-checkpoint-args", "--no-load-optim", "--no-load-rng", "--exit-on-missing-checkpoint",
                 "--no-masked-softmax-fusion", "--attention-softmax-in-fp32", "--use-mcore-models")
# Kernel choices of Megatron-LM's Llama launch and inference scripts (docs/llama_mistral.md: --transformer-impl
# transformer_engine): they pick how layers compute, not what the weights are; generation here uses its own layers.
_KERNEL_SWITCHES = ("--no-rope-fusion", "--no-gradient-accumulation-fusion", "--no-bias-swiglu-fusion",
                    "--no-bias-dropout-fusion", "--no-persist-layer-norm")
_BATCHING = "prompts are batched as given; the length limit is the model's --max-position-embeddings"
_EVAL = "generation runs the model in eval mode, without dropout"
_RUN_VALUES = {"--micro-batch-size": (int, _BATCHING), "--seq-length": (int, _BATCHING),
               "--out-seq-length": (int, _BATCHING), "--attention-dropout": (float, _EVAL),
               "--hidden-dropout": (float, _EVAL)}
# Parallel sizes of parallelisms generation does not have: Megatron-LM's scripts spell out 1 (off).
_ABSENT_PARALLELISMS = {"--context-parallel-size": "context", "--expert-model-parallel-size": "expert",
                        "--expert-tensor-parallel-size": "expert tensor"}
# Architecture switches: each must hold for the loaded model (see _switch_errors).
_SWITCHES = ("--group-query-attention", "--swiglu", "--use-rotary-position-embeddings", "--no-position-embedding",
             "--disable-bias-linear", "--add-qkv-bias", "--untie-embeddings-and-output-weights", "--use-rope-scaling",
             "--qk-layernorm", "--apply-layernorm-1p")


def add_megatron_args(p: argparse.ArgumentParser) -> None:
    """Add the flags of Megatron-LM's generation scripts (see the module doc)."""
    g = p.add_argument_group("Megatron-LM compatibility", "flags of Megatron-LM's generation scripts: the model's "
                             "architecture is checked against --load, run-time flags are accepted")
    for flag, (kind, _) in _VALUE_FLAGS.items():
        g.add_argument(flag, type=kind, default=None, choices=_CHOICES.get(flag),
                       help="checked: must equal the checkpoint's")
    for flag in _SWITCHES:
        g.add_argument(flag, action="store_true", help="checked: the checkpoint's model must have it")
    for flag, (kind, why) in _RUN_VALUES.items():
        g.add_argument(flag, type=kind, default=None, help=f"accepted: no effect here ({why})")
    for flag in _RUN_SWITCHES:
        g.add_argument(flag, action="store_true", help="accepted: the model, and nothing else, comes from --load")
    g.add_argument(_INTERPOLATION, type=float, default=None,
                   help="divide RoPE positions by this (linear interpolation: read a longer context than the "
                        "model was trained on); default: the checkpoint's")
    for flag, parallelism in _ABSENT_PARALLELISMS.items():
        g.add_argument(flag, type=int, default=None,
                       help=f"accepted with 1: generation has no {parallelism} parallelism")
    kernels = "accepted: picks kernels, not weights; generation runs this framework's layers, the same result"
    g.add_argument("--transformer-impl", default=None, choices=["local", "transformer_engine"], help=kernels)
    for flag in _KERNEL_SWITCHES:
        g.add_argument(flag, action="store_true", help=kernels)
    dtype = g.add_mutually_exclusive_group()
    dtype.add_argument("--fp16", action="store_true", help="run the model in fp16 (default: the checkpoint's fp32)")
    dtype.add_argument("--bf16", action="store_true", help="run the model in bf16 (default: the checkpoint's fp32)")


def _dest(flag: str) -> str:
    return flag[2:].replace("-", "_")


def _switch_errors(model: Any) -> dict[str, str | None]:
    """Each architecture switch -> None when the loaded model has it, else why it does not."""
    c = model.config
    return {
        "--group-query-attention": None,  # only says --num-query-groups is meant; that value is checked
        "--swiglu": None if c.activation == "swiglu" else f"the checkpoint's MLP activation is {c.activation}, "
                                                          f"not swiglu",
        "--use-rotary-position-embeddings": None if c.position_embedding_type == "rope" else
        f"the checkpoint's position embedding is {c.position_embedding_type}, not rope",
        "--no-position-embedding": None if c.position_embedding_type != "learned_absolute" else
        "the checkpoint has a learned position embedding",
        "--disable-bias-linear": None if not c.add_bias_linear else "the checkpoint's linear layers have biases",
        "--add-qkv-bias": None if c.add_qkv_bias or c.add_bias_linear else "the checkpoint's QKV layer has no bias",
        "--untie-embeddings-and-output-weights": None if not model.share_embeddings_and_output_weights else
        "the checkpoint ties its embedding and output layer",
        "--use-rope-scaling": None if c.rope_scaling else "the checkpoint's RoPE has no Llama 3.x scaling",
        "--qk-layernorm": None if c.qk_layernorm else "the checkpoint's attention has no query/key norms",
        "--apply-layernorm-1p": None if c.layernorm_zero_centered_gamma else
        "the checkpoint's norm weights are not zero-centred",
    }


def check_parallel_sizes(args: argparse.Namespace) -> None:
    """ConfigError for a context or expert parallel size other than 1 (before any process group is made)."""
    for flag, kind in _ABSENT_PARALLELISMS.items():
        value = getattr(args, _dest(flag))
        if value not in (None, 1):
            raise ConfigError(f"{flag} {value}: generation has no {kind} parallelism here; drop the flag or give 1")


def _interpolate(factor: float | None, model: Any) -> None:
    """Give the model's RoPE ``--rotary-seq-len-interpolation-factor`` (a training run may change it too)."""
    if factor is None or factor == model.config.seq_len_interpolation_factor:
        return
    if model.rotary_pos_emb is None:
        raise ConfigError(f"{_INTERPOLATION}: the checkpoint's model has no RoPE (position embedding "
                          f"{model.config.position_embedding_type}); drop the flag")
    if not factor > 0:
        raise ConfigError(f"{_INTERPOLATION} must be > 0, got {factor}")
    model.config.seq_len_interpolation_factor = factor
    model.rotary_pos_emb = rotary_embedding(model.config).to(model.rotary_pos_emb.inv_freq.device)


def check_and_cast(args: argparse.Namespace, model: Any) -> None:
    """ConfigError for an architecture flag that disagrees with the loaded ``model`` (a GPTModel chunk);
    ``--rotary-seq-len-interpolation-factor`` is applied to its RoPE, ``--fp16`` / ``--bf16`` cast it."""
    for flag, (_, field) in _VALUE_FLAGS.items():
        given = getattr(args, _dest(flag))
        saved = model.max_sequence_length if field is None else getattr(model.config, field)
        if given is not None and given != saved:
            raise ConfigError(f"{flag} {given} disagrees with the checkpoint's {saved}; drop the flag (the model's "
                              f"shape comes from --load)")
    for flag, why in _switch_errors(model).items():
        if getattr(args, _dest(flag)) and why is not None:
            raise ConfigError(f"{flag}: {why}; drop the flag (the model's architecture comes from --load)")
    _interpolate(args.rotary_seq_len_interpolation_factor, model)
    dtype = torch.float16 if args.fp16 else torch.bfloat16 if args.bf16 else None
    if dtype is not None:
        model.to(dtype)
        model.config.params_dtype = dtype  # pipeline stages receive hidden states in it
