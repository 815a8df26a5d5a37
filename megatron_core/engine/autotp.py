"""AutoTP: tensor parallelism for Hugging Face GPT-2 and Llama models the user did not write for it.

DeepSpeed's ``tensor_parallel.autotp_size`` swaps a model's linear layers for sharded ones. Here the
swap uses this library's layers (Megatron-LM's split, Shoeybi et al. 2019):

- attention: the QKV projection(s) become :class:`ColumnParallelLinear` (whole heads per rank;
  GPT-2's fused ``c_attn`` with stride 3 so each rank keeps its heads of Q, K and V), the output
  projection :class:`RowParallelLinear`; the attention module's head bookkeeping is divided by TP;
- MLP: ``c_fc`` / ``gate_proj`` / ``up_proj`` column-parallel, ``c_proj`` / ``down_proj`` row-parallel;
- the token embedding becomes :class:`VocabParallelEmbedding` and ``lm_head`` a column-parallel layer
  with ``gather_output`` (full logits for the model's own loss), tied to the embedding when HF ties them.

Each rank copies its shard of the HF weights, so the TP model computes what the original does.
Parameter names are unchanged; GPT-2's ``Conv1D`` weights ([in, out]) are stored transposed
([out, in], as ``nn.Linear``) and marked ``autotp_transpose`` so consolidation restores HF's layout.
Dropout under TP does not draw the same masks as one process (the tests use none).
"""

from __future__ import annotations

from typing import Any

import torch

from megatron_core.errors import ConfigError
from megatron_core.parallel_state import ParallelState
from megatron_core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from megatron_core.tensor_parallel.utils import shard_of_master


class AutoTPColumnLinear(ColumnParallelLinear):
    """A column-parallel layer that returns a tensor, as the ``nn.Linear`` it replaces."""

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ W_shard.T`` (+ bias), gathered over TP when ``gather_output``."""
        return super().forward(x, weight)[0]


class AutoTPRowLinear(RowParallelLinear):
    """A row-parallel layer that returns a tensor, as the ``nn.Linear`` it replaces."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The partial products summed over TP, plus the bias."""
        return super().forward(x)[0]


def _mark_transposed(param: torch.Tensor, transposed: bool) -> None:
    """Record that HF stores this weight as [in, out] (GPT-2's Conv1D), for consolidation."""
    vars(param)["autotp_transpose"] = transposed


def _linear_weight(module: Any) -> tuple[torch.Tensor, bool]:
    """The [out, in] weight of an ``nn.Linear`` or HF ``Conv1D`` (transposed: True for Conv1D)."""
    if isinstance(module, torch.nn.Linear):
        return module.weight.detach(), False
    return module.weight.detach().t(), True  # transformers' Conv1D: y = x @ W + b, W is [in, out]


def _keep_frozen(layer: torch.nn.Module, module: torch.nn.Module) -> None:
    """A weight or bias the user froze (``requires_grad=False``) stays frozen in the TP layer replacing it."""
    for name in ("weight", "bias"):
        new, old = getattr(layer, name, None), getattr(module, name, None)
        if isinstance(new, torch.nn.Parameter) and isinstance(old, torch.nn.Parameter):
            new.requires_grad_(old.requires_grad)


@torch.no_grad()
def _column(
    module: Any, parallel_state: ParallelState, stride: int = 1, gather_output: bool = False
) -> AutoTPColumnLinear:
    weight, transposed = _linear_weight(module)
    bias = getattr(module, "bias", None)
    out_features, in_features = weight.shape
    layer = AutoTPColumnLinear(
        in_features,
        out_features,
        bias=bias is not None,
        gather_output=gather_output,
        stride=stride,
        parallel_state=parallel_state,
    )
    tp, rank = parallel_state.tp_size, parallel_state.tp_rank
    layer.weight.copy_(shard_of_master(weight.float(), 0, stride, rank, tp))
    _mark_transposed(layer.weight, transposed)
    if bias is not None:
        layer.bias.copy_(shard_of_master(bias.detach().float(), 0, stride, rank, tp))
    _keep_frozen(layer, module)
    return layer


@torch.no_grad()
def _row(module: Any, parallel_state: ParallelState) -> AutoTPRowLinear:
    weight, transposed = _linear_weight(module)
    bias = getattr(module, "bias", None)
    out_features, in_features = weight.shape
    layer = AutoTPRowLinear(
        in_features, out_features, bias=bias is not None, input_is_parallel=True, parallel_state=parallel_state
    )
    layer.weight.copy_(shard_of_master(weight.float(), 1, 1, parallel_state.tp_rank, parallel_state.tp_size))
    _mark_transposed(layer.weight, transposed)
    if bias is not None:
        layer.bias.copy_(bias.detach().float())
    _keep_frozen(layer, module)
    return layer


@torch.no_grad()
def _embedding(module: torch.nn.Embedding, parallel_state: ParallelState) -> VocabParallelEmbedding:
    vocab, hidden = module.weight.shape
    if vocab % parallel_state.tp_size:
        raise ConfigError(
            f"tensor_parallel.autotp_size {parallel_state.tp_size} does not divide the vocabulary "
            f"({vocab}); resize the token embeddings to a multiple of it"
        )
    layer = VocabParallelEmbedding(vocab, hidden, parallel_state=parallel_state)
    layer.weight.copy_(
        shard_of_master(module.weight.detach().float(), 0, 1, parallel_state.tp_rank, parallel_state.tp_size)
    )
    _keep_frozen(layer, module)
    return layer


def _divide_heads(count: int, tp: int, what: str) -> int:
    if count % tp:
        raise ConfigError(f"tensor_parallel.autotp_size {tp} does not divide the model's {what} ({count})")
    return count // tp


def _gpt2(model: Any, parallel_state: ParallelState) -> None:
    tp = parallel_state.tp_size
    for block in model.transformer.h:
        attn = block.attn
        if getattr(attn, "is_cross_attention", False):
            raise ConfigError("AutoTP: GPT-2 cross-attention is not supported")
        attn.num_heads = _divide_heads(attn.num_heads, tp, "attention heads")
        attn.split_size = attn.split_size // tp
        attn.c_attn = _column(attn.c_attn, parallel_state, stride=3)
        attn.c_proj = _row(attn.c_proj, parallel_state)
        block.mlp.c_fc = _column(block.mlp.c_fc, parallel_state)
        block.mlp.c_proj = _row(block.mlp.c_proj, parallel_state)
    old = model.transformer.wte
    embedding = _embedding(old, parallel_state)
    model.transformer.wte = embedding
    _lm_head_from(model, old, embedding, parallel_state)


def _lm_head_from(
    model: Any, old: torch.nn.Embedding, embedding: VocabParallelEmbedding, parallel_state: ParallelState
) -> None:
    """``lm_head`` as a column-parallel layer gathering full logits, re-tied to the new embedding if it was tied."""
    tied = model.lm_head.weight is old.weight
    head = _column(model.lm_head, parallel_state, gather_output=True)
    if tied:
        del head.weight
        head.weight = embedding.weight
    model.lm_head = head


def _llama(model: Any, parallel_state: ParallelState) -> None:
    tp = parallel_state.tp_size
    config = model.config
    _divide_heads(config.num_attention_heads, tp, "attention heads")
    _divide_heads(config.num_key_value_heads, tp, "key/value heads")
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for name in ("q_proj", "k_proj", "v_proj"):
            setattr(attn, name, _column(getattr(attn, name), parallel_state))
        attn.o_proj = _row(attn.o_proj, parallel_state)
        mlp.gate_proj = _column(mlp.gate_proj, parallel_state)
        mlp.up_proj = _column(mlp.up_proj, parallel_state)
        mlp.down_proj = _row(mlp.down_proj, parallel_state)
    old = model.model.embed_tokens
    embedding = _embedding(old, parallel_state)
    model.model.embed_tokens = embedding
    _lm_head_from(model, old, embedding, parallel_state)


SUPPORTED = {"gpt2": _gpt2, "llama": _llama}


def apply_autotp(model: torch.nn.Module, parallel_state: ParallelState) -> torch.nn.Module:
    """Swap ``model``'s layers for TP-sharded ones in place (see the module docstring); returns it.

    Raises ConfigError for a model that is not a Hugging Face GPT-2 / Llama causal LM, or whose
    heads, key/value heads or vocabulary the TP size does not divide.
    """
    if parallel_state.tp_size == 1:
        return model
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED or not hasattr(model, "lm_head"):
        raise ConfigError(
            f"tensor_parallel.autotp_size > 1 supports Hugging Face causal LMs of type "
            f"{', '.join(SUPPORTED)}; this model is {model_type or type(model).__name__}"
        )
    SUPPORTED[model_type](model, parallel_state)
    return model
