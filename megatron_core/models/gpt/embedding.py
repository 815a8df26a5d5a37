"""Word (vocab-parallel) plus optional learned position embeddings, emitted as [s, b, h].

Under sequence parallelism the word embedding is reduce-scattered straight to this rank's sequence
shard and the position embedding is sliced to the same shard; each rank then sees only its tokens,
so the position table's gradient is partial and it is marked ``sequence_parallel``.
"""
from __future__ import annotations

import contextlib

import torch

from megatron_core import device as device_mod
from megatron_core.fusions.fused_dropout import dropout
from megatron_core.parallel_state import ParallelState, get_parallel_state
from megatron_core.tensor_parallel.layers import VocabParallelEmbedding
from megatron_core.transformer.config import TransformerConfig
from megatron_core.transformer.init import component_name

# The parameter tag for weights whose gradients are partial sums over the sequence-parallel shards.
_SEQUENCE_PARALLEL = "sequence_parallel"


class LanguageModelEmbedding(torch.nn.Module):
    """Token ids [b, s] (and position ids) -> hidden states [s, b, h] with embedding dropout."""

    def __init__(self, config: TransformerConfig, vocab_size: int, max_sequence_length: int,
                 parallel_state: ParallelState | None = None, prefix: str = "") -> None:
        """``prefix``: this module's name in the whole model (``embedding`` in GPTModel), the root of
        its weights' seed names."""
        super().__init__()
        ps = get_parallel_state(parallel_state)
        self.config, self.rng_tracker = config, ps.rng_tracker
        self.tp_rank, self.tp_size = ps.tp_rank, ps.tp_size
        self.sequence_parallel = config.sequence_parallel
        self.word_embeddings = VocabParallelEmbedding(
            vocab_size, config.hidden_size,
            init_method=config.init_method(component_name(prefix, "word_embeddings.weight")),
            reduce_scatter_embeddings=config.sequence_parallel, params_dtype=config.params_dtype, parallel_state=ps)
        self.position_embeddings = None
        if config.position_embedding_type == "learned_absolute":
            weight = torch.empty(max_sequence_length, config.hidden_size, dtype=torch.float32)
            config.init_method(component_name(prefix, "position_embeddings.weight"))(weight)
            self.position_embeddings = torch.nn.Embedding(
                max_sequence_length, config.hidden_size, _weight=weight.to(config.params_dtype),
                device=device_mod.current_device())
            # Tensors take ad-hoc attributes at run time (read by finalize_model_grads), but torch's stubs
            # declare none, so the tag is set through setattr with a named attribute.
            setattr(self.position_embeddings.weight, _SEQUENCE_PARALLEL, config.sequence_parallel)
        self.max_sequence_length = max_sequence_length

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids [b, s] -> embeddings [s, b, h] ([s / tp, b, h] under sequence parallelism), after dropout;
        in the params dtype, or fp32 with ``config.fp32_residual_connection``."""
        words = self.word_embeddings(input_ids)  # [b, s, h], or [s / tp, b, h] under SP
        if self.sequence_parallel:
            hidden = words
            if self.position_embeddings is not None:
                positions = self.position_embeddings(self._positions(input_ids, position_ids)).transpose(0, 1)
                shard = positions.shape[0] // self.tp_size
                hidden = hidden + positions[self.tp_rank * shard:(self.tp_rank + 1) * shard]
        else:
            if self.position_embeddings is not None:
                words = words + self.position_embeddings(self._positions(input_ids, position_ids))
            hidden = words.transpose(0, 1).contiguous()
        if self.config.fp32_residual_connection:  # the residual stream starts here (Megatron-LM casts here too)
            hidden = hidden.float()
        p = self.config.hidden_dropout
        if self.training and p > 0:
            rng = self.rng_tracker.fork() if self.sequence_parallel else contextlib.nullcontext()
            with rng:
                hidden = dropout(hidden, p)
        return hidden

    def _positions(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor:
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        if input_ids.shape[1] > self.max_sequence_length:
            raise ValueError(f"sequence length {input_ids.shape[1]} exceeds --max-position-embeddings "
                             f"{self.max_sequence_length}")
        return position_ids
