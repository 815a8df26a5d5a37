"""Gradient synchronisation across data-parallel and model-parallel ranks."""
from megatron_core.distributed.bucket import Bucket
from megatron_core.distributed.comm_log import CommLog
from megatron_core.distributed.distributed_data_parallel import DistributedDataParallel, no_sync_func
from megatron_core.distributed.distributed_data_parallel_config import DistributedDataParallelConfig
from megatron_core.distributed.finalize_model_grads import finalize_model_grads
from megatron_core.distributed.param_and_grad_buffer import ParamAndGradBuffer

__all__ = [
    "Bucket",
    "CommLog",
    "DistributedDataParallel",
    "DistributedDataParallelConfig",
    "ParamAndGradBuffer",
    "finalize_model_grads",
    "no_sync_func",
]
