"""Model architecture flags (Megatron-LM's "network size" and "regularization" groups)."""
from __future__ import annotations

import argparse

ROPE_SCALING_FACTOR = 8.0  # Llama 3.x's; validate_args reads it to tell a given factor from the default


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Shape, attention, normalization, embeddings, dropout and initialisation."""
    g = parser.add_argument_group("model", "transformer shape and architecture")
    g.add_argument("--num-layers", type=int, default=None, help="transformer layers")
    g.add_argument("--hidden-size", type=int, default=None, help="transformer hidden size")
    g.add_argument("--ffn-hidden-size", type=int, default=None,
                   help="MLP hidden size (default 4 x hidden size)")
    g.add_argument("--num-attention-heads", type=int, default=None, help="attention heads")
    g.add_argument("--kv-channels", type=int, default=None,
                   help="per-head size (default hidden size / heads)")
    g.add_argument("--group-query-attention", action="store_true", help="use --num-query-groups key/value heads")
    g.add_argument("--num-query-groups", type=int, default=1, help="key/value heads under grouped-query attention")
    g.add_argument("--seq-length", type=int, default=None, help="tokens per sample")
    g.add_argument("--max-position-embeddings", type=int, default=None,
                   help="positions the embedding table holds (default --seq-length)")
    g.add_argument("--position-embedding-type", default="learned_absolute",
                   choices=["learned_absolute", "rope", "none"])
    g.add_argument("--rotary-base", type=int, default=10000, help="RoPE base period")
    g.add_argument("--rotary-percent", type=float, default=1.0, help="fraction of each head RoPE rotates")
    g.add_argument("--use-rope-scaling", action="store_true",
                   help="Llama 3.x's RoPE frequency scaling (Hugging Face's rope_type llama3)")
    g.add_argument("--rope-scaling-factor", "--rotary-scaling-factor", type=float, default=ROPE_SCALING_FACTOR,
                   help="with --use-rope-scaling: the scaling factor (8 for Llama 3.1, 32 for Llama 3.2)")
    g.add_argument("--rotary-seq-len-interpolation-factor", type=float, default=None,
                   help="divide RoPE positions by this (linear position interpolation; Hugging Face's rope_type "
                        "linear)")
    g.add_argument("--normalization", default="LayerNorm", choices=["LayerNorm", "RMSNorm"])
    g.add_argument("--norm-epsilon", type=float, default=1e-5)
    g.add_argument("--apply-layernorm-1p", action="store_true",
                   help="zero-centred norm weights, applied as 1 + weight (LayerNorm and RMSNorm)")
    g.add_argument("--swiglu", action="store_true", help="SwiGLU MLP instead of GeLU")
    g.add_argument("--openai-gelu", action="store_true", help="tanh-approximate GeLU (GPT-2's)")
    g.add_argument("--add-qkv-bias", action="store_true", help="QKV bias even with --disable-bias-linear")
    g.add_argument("--qk-layernorm", action="store_true",
                   help="a --normalization norm over each head's queries and keys (OLMo 2, Qwen3)")
    g.add_argument("--disable-bias-linear", action="store_false", dest="add_bias_linear",
                   help="no biases in the linear layers")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true",
                   help="separate input embedding and output layer weights")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                   help="pad the vocabulary to a multiple of this times the TP size")
    g.add_argument("--attention-backend", default="auto", choices=["auto", "flash", "fused", "unfused", "local"])
    g.add_argument("--init-method-std", type=float, default=0.02, help="std of the normal weight init")
    g.add_argument("--hidden-dropout", type=float, default=0.1)
    g.add_argument("--attention-dropout", type=float, default=0.1)
    g.add_argument("--use-cpu-initialization", action="store_true",
                   help="accepted for compatibility: weights are always drawn on the CPU here")
