"""Model FLOPs per iteration for the throughput in the log line.

PaLM's accounting (Chowdhery et al. 2022, appendix B): ``6 N + 12 L H Q T`` FLOPs per token for
forward and backward, where ``N`` counts the weights used in matrix multiplies (attention,
MLP and the output layer; not the embedding lookup), ``L`` layers, ``H`` heads, ``Q`` head size
and ``T`` the sequence length (the attention score and value products). Recomputed
activations are not counted: this is model FLOPs, as for MFU.
"""
from __future__ import annotations


def matmul_parameters(num_layers: int, hidden_size: int, ffn_hidden_size: int, num_attention_heads: int,
                      kv_channels: int, num_query_groups: int, swiglu: bool, padded_vocab_size: int) -> int:
    """Weights that take part in matrix multiplies (biases and norms are negligible and left out)."""
    q_width = num_attention_heads * kv_channels
    kv_width = 2 * num_query_groups * kv_channels
    attention = hidden_size * (q_width + kv_width) + q_width * hidden_size
    mlp = hidden_size * ffn_hidden_size * (2 if swiglu else 1) + ffn_hidden_size * hidden_size
    return num_layers * (attention + mlp) + padded_vocab_size * hidden_size


def flops_per_iteration(batch_size: int, seq_length: int, num_layers: int, hidden_size: int, ffn_hidden_size: int,
                        num_attention_heads: int, kv_channels: int, num_query_groups: int, swiglu: bool,
                        padded_vocab_size: int) -> float:
    """Forward plus backward FLOPs of one iteration over ``batch_size`` sequences."""
    n = matmul_parameters(num_layers, hidden_size, ffn_hidden_size, num_attention_heads, kv_channels,
                          num_query_groups, swiglu, padded_vocab_size)
    per_token = 6 * n + 12 * num_layers * num_attention_heads * kv_channels * seq_length
    return float(batch_size) * seq_length * per_token
