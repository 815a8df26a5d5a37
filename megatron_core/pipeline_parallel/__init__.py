"""Pipeline parallelism: layer split, point-to-point communication and schedules."""
from megatron_core.pipeline_parallel.interleaved import (
    InterleavedSchedule,
    forward_backward_pipelining_with_interleaving,
)
from megatron_core.pipeline_parallel.p2p_communication import P2PCommunicator, pipeline_tensor_shape
from megatron_core.pipeline_parallel.schedules import (
    forward_backward_no_pipelining,
    forward_backward_pipelining_without_interleaving,
    get_forward_backward_func,
    one_forward_one_backward,
)
from megatron_core.pipeline_parallel.stage_errors import PipelineStageError

__all__ = [
    "InterleavedSchedule",
    "P2PCommunicator",
    "PipelineStageError",
    "forward_backward_no_pipelining",
    "forward_backward_pipelining_with_interleaving",
    "forward_backward_pipelining_without_interleaving",
    "get_forward_backward_func",
    "one_forward_one_backward",
    "pipeline_tensor_shape",
]
