"""Distributed checkpoints on ``torch.distributed.checkpoint`` that load under any parallel layout."""
from megatron_core.dist_checkpointing.serialization import (
    SaveRequest,
    is_dist_checkpoint,
    load_dist_checkpoint,
    read_common,
    save_dist_checkpoint,
)

__all__ = ["SaveRequest", "is_dist_checkpoint", "load_dist_checkpoint", "read_common", "save_dist_checkpoint"]
