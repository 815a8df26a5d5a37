"""GPT: ``GPTModel`` and a helper that builds one rank's model chunks for its pipeline stages."""
from __future__ import annotations

from typing import Any

from megatron_core.models.gpt.embedding import LanguageModelEmbedding
from megatron_core.models.gpt.gpt_model import GPTModel
from megatron_core.parallel_state import ParallelState, get_parallel_state
from megatron_core.transformer.config import TransformerConfig


def build_gpt_model_chunks(config: TransformerConfig, vocab_size: int, max_sequence_length: int,
                           parallel_state: ParallelState | None = None, **kwargs: Any) -> list[GPTModel]:
    """One GPTModel per virtual pipeline stage of this rank (one chunk without virtual stages), with
    ``pre_process`` / ``post_process`` set from the stage's position; ``kwargs`` go to GPTModel."""
    parallel_state = get_parallel_state(parallel_state)
    stages = [None] if parallel_state.vpp_size is None else list(range(parallel_state.vpp_size))
    return [GPTModel(config, vocab_size, max_sequence_length, pre_process=parallel_state.is_pipeline_first_stage(vp),
                     post_process=parallel_state.is_pipeline_last_stage(vp), parallel_state=parallel_state,
                     vp_stage=vp, **kwargs)
            for vp in stages]


__all__ = ["GPTModel", "LanguageModelEmbedding", "build_gpt_model_chunks"]
