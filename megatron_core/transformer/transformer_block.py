"""The stack of transformer layers one (virtual) pipeline stage owns, plus the final norm on the last.

Layers are numbered globally (``megatron_core.pipeline_parallel.layer_split``), so a stage's
layers get the same seeded weights as the same layers of an unsplit model. Full recompute
checkpoints groups of layers (``uniform``) or the first layers of the chunk (``block``).
"""
from __future__ import annotations

import torch

from megatron_core.errors import ConfigError
from megatron_core.fusions.fused_layer_norm import build_norm
from megatron_core.parallel_state import ParallelState, get_parallel_state
from megatron_core.pipeline_parallel.layer_split import layer_range
from megatron_core.tensor_parallel.random import checkpoint
from megatron_core.transformer.config import TransformerConfig
from megatron_core.transformer.dot_product_attention import DotProductAttention, SharedAdditiveMask
from megatron_core.transformer.init import component_name
from megatron_core.transformer.spec import ModuleSpec, build_module


class TransformerBlock(torch.nn.Module):
    """The layers of one pipeline chunk; the input comes from the embedding or ``set_input_tensor``."""

    def __init__(self, config: TransformerConfig, spec: ModuleSpec, pre_process: bool = True,
                 post_process: bool = True, parallel_state: ParallelState | None = None,
                 vp_stage: int | None = None, prefix: str = "") -> None:
        """``prefix``: the block's name in the whole model (``decoder`` in GPTModel). Layer ``i`` of
        this chunk gets ``<prefix>.layers.<global index>``, its name in the unsplit model, so the
        seeded weights do not depend on the pipeline split."""
        super().__init__()
        ps = get_parallel_state(parallel_state)
        self.config, self.rng_tracker = config, ps.rng_tracker
        self.pre_process, self.post_process = pre_process, post_process
        counts = config.layer_counts(ps.pp_size, ps.vpp_size)
        self.layer_offset, count = layer_range(counts, ps.pp_size, ps.pp_rank, vp_stage)
        self.layers = torch.nn.ModuleList(
            build_module(spec, config=config, layer_number=self.layer_offset + i + 1, parallel_state=ps,
                         prefix=component_name(prefix, f"layers.{self.layer_offset + i}"))
            for i in range(count))
        self.final_layernorm = build_norm(config, config.hidden_size) if post_process else None
        # One SDPA form of the attention mask per run of the layers, not one per layer (SharedAdditiveMask).
        self.shared_mask = SharedAdditiveMask()
        for module in self.layers.modules():
            if isinstance(module, DotProductAttention):
                module.shared_mask = self.shared_mask
        self.input_tensor: torch.Tensor | None = None

    def set_input_tensor(self, tensor: torch.Tensor | None) -> None:
        """The hidden states a non-first pipeline stage starts from (set by the schedule)."""
        self.input_tensor = tensor

    def _run(self, start: int, end: int, inference_context=None):
        extra = {} if inference_context is None else {"inference_context": inference_context}

        def run(hidden, attention_mask, cos, sin):
            rotary = None if cos is None else (cos, sin)
            with self.shared_mask.scope():
                for layer in self.layers[start:end]:
                    hidden = layer(hidden, attention_mask, rotary, **extra)
            return hidden
        return run

    def _checkpointed(self, hidden, attention_mask, cos, sin) -> torch.Tensor:
        n, k = len(self.layers), self.config.recompute_num_layers
        if k is None:
            raise ConfigError("recompute_granularity='full' needs recompute_num_layers (--recompute-num-layers)")
        if torch.is_grad_enabled() and not hidden.requires_grad:
            # A frozen embedding's output needs no gradient, and neither would the checkpoint Function's output
            # (the layers' weights are not its inputs): the layers inside would get no gradient. Megatron-LM's
            # TransformerBlock makes its input require a gradient for the same reason.
            hidden = hidden.detach().requires_grad_()
        if self.config.recompute_method == "uniform":
            for start in range(0, n, k):
                hidden = checkpoint(self._run(start, min(start + k, n)), self.rng_tracker, hidden,
                                    attention_mask, cos, sin)
            return hidden
        for i in range(min(k, n)):  # block: the first k layers of the chunk are recomputed, one at a time
            hidden = checkpoint(self._run(i, i + 1), self.rng_tracker, hidden, attention_mask, cos, sin)
        if k < n:  # the others in one run, so that they share one SDPA form of the mask (SharedAdditiveMask)
            hidden = self._run(k, n)(hidden, attention_mask, cos, sin)
        return hidden

    def forward(self, hidden_states: torch.Tensor | None, attention_mask: torch.Tensor | None = None,
                rotary_pos_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
                inference_context=None) -> torch.Tensor:
        """[s, b, h] -> [s, b, h]; on a non-first stage ``hidden_states`` is ignored for the input tensor.
        ``inference_context``: the KV cache of incremental decoding (None in training)."""
        if not self.pre_process:
            if self.input_tensor is None:
                raise RuntimeError("this pipeline stage has no input: call set_input_tensor(tensor) before forward")
            hidden_states = self.input_tensor
        cos, sin = rotary_pos_emb if rotary_pos_emb is not None else (None, None)
        if self.config.recompute_granularity == "full" and self.training and len(self.layers) > 0:
            hidden_states = self._checkpointed(hidden_states, attention_mask, cos, sin)
        else:
            hidden_states = self._run(0, len(self.layers), inference_context)(hidden_states, attention_mask, cos, sin)
        if self.final_layernorm is not None:
            hidden_states = self.final_layernorm(hidden_states)
        return hidden_states
