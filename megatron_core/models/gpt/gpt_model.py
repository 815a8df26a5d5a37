"""GPTModel: embedding, transformer block and output layer of one (virtual) pipeline stage.

A stage builds only its part: the embedding on the first stage (``pre_process``), the final norm,
output layer and loss on the last (``post_process``). With tied embeddings on a single stage the
output layer uses the word embedding Parameter itself; on separate first and last stages the last
stage holds its own copy, drawn from the same seed and marked ``shared_embedding`` so that
``finalize_model_grads`` sums the two gradients. The word embedding and the output weight (the tied
copy included) are tagged ``is_embedding_or_output_parameter``, Megatron-LM's mark for ``--decoupled-lr``.
"""
from __future__ import annotations

import torch

from megatron_core.fusions.fused_layer_norm import check_zero_centered_norms
from megatron_core.fusions.kernels import find_kernel
from megatron_core.models.gpt.embedding import LanguageModelEmbedding
from megatron_core.parallel_state import ParallelState, get_parallel_state
from megatron_core.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron_core.tensor_parallel.layers import ColumnParallelLinear
from megatron_core.tensor_parallel.utils import pad_vocab_size
from megatron_core.transformer.config import TransformerConfig
from megatron_core.transformer.init import component_name, skip_init
from megatron_core.transformer.layer_specs import get_gpt_layer_spec
from megatron_core.transformer.rope import rotary_embedding
from megatron_core.transformer.spec import ModuleSpec
from megatron_core.transformer.transformer_block import TransformerBlock

EMBEDDING = "embedding"  # the attribute (and seed-name prefix) of the embedding
# Read (with getattr) by grad clipping, the DDP buffers, finalize_model_grads and checkpointing.
SHARED_EMBEDDING = "shared_embedding"
# Read (with getattr) by the optimizer: Megatron-LM's tag for --decoupled-lr's group.
EMBEDDING_OR_OUTPUT = "is_embedding_or_output_parameter"


def _mark(param: torch.Tensor, tag: str) -> None:
    # Tensors take ad-hoc attributes at run time (Megatron-LM tags parameters this way), but torch's
    # stubs declare none, so the tag is set through setattr with a named attribute.
    setattr(param, tag, True)


class GPTModel(torch.nn.Module):
    """Decoder-only language model chunk; activations inside are [sequence, batch, hidden]."""

    def __init__(self, config: TransformerConfig, vocab_size: int, max_sequence_length: int,
                 pre_process: bool = True, post_process: bool = True,
                 share_embeddings_and_output_weights: bool | None = None,
                 parallel_state: ParallelState | None = None, vp_stage: int | None = None,
                 transformer_layer_spec: ModuleSpec | None = None, make_vocab_size_divisible_by: int = 128) -> None:
        super().__init__()
        ps = get_parallel_state(parallel_state)
        config.validate_parallel(ps.tp_size, ps.pp_size, ps.vpp_size)
        self.config, self.parallel_state, self.vp_stage = config, ps, vp_stage
        self.pre_process, self.post_process = pre_process, post_process
        self.vocab_size, self.max_sequence_length = vocab_size, max_sequence_length
        # Idempotent: a vocabulary already padded by the caller stays as it is.
        self.padded_vocab_size = pad_vocab_size(vocab_size, make_vocab_size_divisible_by, ps.tp_size)
        tied = config.share_embeddings_and_output_weights if share_embeddings_and_output_weights is None \
            else share_embeddings_and_output_weights
        self.share_embeddings_and_output_weights = tied

        if pre_process:
            self.embedding = LanguageModelEmbedding(config, self.padded_vocab_size, max_sequence_length, ps,
                                                    prefix=EMBEDDING)
            _mark(self.embedding.word_embeddings.weight, EMBEDDING_OR_OUTPUT)
            if tied and not post_process:
                _mark(self.embedding.word_embeddings.weight, SHARED_EMBEDDING)
        self.rotary_pos_emb = rotary_embedding(config) if config.position_embedding_type == "rope" else None
        self.decoder = TransformerBlock(config, transformer_layer_spec or get_gpt_layer_spec(config.qk_layernorm),
                                        pre_process=pre_process, post_process=post_process, parallel_state=ps,
                                        vp_stage=vp_stage, prefix="decoder")
        if config.layernorm_zero_centered_gamma:
            check_zero_centered_norms(self.decoder)
        if post_process:
            self._build_output_layer(ps, tied)
        # Triton's cross entropy keeps the logits only (no fp32 copy, no softmax) where CUDA+Triton exist.
        self.cross_entropy_kernel = find_kernel("vocab_parallel_cross_entropy") if post_process else None

    def _build_output_layer(self, parallel_state: ParallelState, tied: bool) -> None:
        config = self.config
        same_param = tied and self.pre_process
        # Tied on another stage: the same seeded draw as the word embedding, so both start equal.
        init = skip_init if same_param else config.init_method(
            component_name(EMBEDDING, "word_embeddings.weight") if tied else "output_layer.weight")
        self.output_layer = ColumnParallelLinear(
            config.hidden_size, self.padded_vocab_size, bias=False, gather_output=False, init_method=init,
            sequence_parallel=config.sequence_parallel, params_dtype=config.params_dtype, parallel_state=parallel_state)
        if same_param:
            # forward passes the word embedding Parameter instead (what ``weight = None`` does on a Module)
            self.output_layer.register_parameter("weight", None)
        else:
            _mark(self.output_layer.weight, EMBEDDING_OR_OUTPUT)
            if tied:
                _mark(self.output_layer.weight, SHARED_EMBEDDING)

    def shared_embedding_or_output_weight(self) -> torch.Tensor | None:
        """The word embedding on the first stage, else the output layer's weight (None without either)."""
        if self.pre_process:
            return self.embedding.word_embeddings.weight
        if self.post_process:
            return self.output_layer.weight
        return None

    def set_input_tensor(self, input_tensor: torch.Tensor | list | None) -> None:
        """A non-first stage's input [s, b, h] (a one-element list is accepted, as Megatron-LM passes it)."""
        tensor: torch.Tensor | None
        if isinstance(input_tensor, (list, tuple)):
            if len(input_tensor) != 1:
                raise ValueError(f"GPTModel takes one input tensor, got {len(input_tensor)}")
            tensor = input_tensor[0]
        else:
            tensor = input_tensor
        self.decoder.set_input_tensor(tensor)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                inference_context=None) -> torch.Tensor:
        """Per-token loss [b, s] (with ``labels``) or logits [b, s, padded_vocab / TP] on the last stage,
        hidden states [s, b, h] elsewhere. ``attention_mask``: bool [b or 1, 1, s, s], True = masked;
        None means causal. ``inference_context``: a KV cache
        (:class:`~megatron_core.inference.context.InferenceContext`); ``input_ids`` are then the new
        tokens only and ``position_ids`` must give their positions (the caller advances the cache)."""
        hidden = self.embedding(input_ids, position_ids) if self.pre_process else None
        rotary = None
        if self.rotary_pos_emb is not None:
            if position_ids is None:
                if input_ids is None:
                    raise ValueError("RoPE needs position_ids on a pipeline stage that gets no input_ids")
                position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
            rotary = self.rotary_pos_emb(position_ids)
        extra = {} if inference_context is None else {"inference_context": inference_context}
        hidden = self.decoder(hidden, attention_mask, rotary, **extra)
        if not self.post_process:
            return hidden
        weight = self.embedding.word_embeddings.weight if self.output_layer.weight is None else None
        logits, _ = self.output_layer(hidden, weight=weight)  # [s, b, V / TP]
        if labels is None:
            return logits.transpose(0, 1)  # a view: call .contiguous() before .view()
        return self._per_token_loss(logits, labels.t().contiguous()).t().contiguous()

    def _per_token_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """fp32 cross entropy of [s, b, V / TP] logits against [s, b] labels (-100: ignored, loss 0)."""
        kernel = self.cross_entropy_kernel
        if kernel is not None and kernel.applies(logits, labels):
            return kernel.fn(logits, labels, self.parallel_state.tp_group)
        return vocab_parallel_cross_entropy(logits, labels, self.parallel_state.tp_group)
