"""GPT: ``GPTModel`` and a helper that builds one rank's model chunks for its pipeline stages."""
from __future__ import annotations

from typing import Any, Optional

from megatron_core.parallel_state import ParallelState, get_parallel_state
from megatron_core.transformer.config import TransformerConfig
from models.gpt.embedding import LanguageModelEmbedding
from models.gpt.gpt_model import GPTModel


def build_gpt_model_chunks(config: TransformerConfig, vocab_size: int, max_sequence_length: int,
                           ps: Optional[ParallelState] = None, **kwargs: Any) -> list[GPTModel]:
    """One GPTModel per virtual pipeline stage of this rank (one chunk without virtual stages), with
    ``pre_process`` / ``post_process`` set from the stage's position; ``kwargs`` go to GPTModel."""
    ps = get_parallel_state(ps)
    stages = [None] if ps.vpp_size is None else list(range(ps.vpp_size))
    return [GPTModel(config, vocab_size, max_sequence_length, pre_process=ps.is_pipeline_first_stage(vp),
                     post_process=ps.is_pipeline_last_stage(vp), parallel_state_=ps, vp_stage=vp, **kwargs)
            for vp in stages]


__all__ = ["GPTModel", "LanguageModelEmbedding", "build_gpt_model_chunks"]
