"""Optimizers: mixed precision with fp32 main parameters, loss scaling, global-norm clipping, ZeRO-1/2.

Build one with :func:`get_megatron_optimizer`; the training loop then calls ``zero_grad()``, runs
the schedule with ``grad_scale_func=optimizer.scale_loss``, and calls ``step()``.
"""
from __future__ import annotations

import torch

from megatron_core.distributed.distributed_data_parallel import DistributedDataParallel
from megatron_core.optimizer.clip_grads import clip_by_total_norm, count_zeros, counted_in_norm, global_l2_norm
from megatron_core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron_core.optimizer.grad_scaler import ConstantGradScaler, DynamicGradScaler
from megatron_core.optimizer.memory import MemoryFootprint, memory_footprint
from megatron_core.optimizer.optimizer import MegatronOptimizer, ReplicatedOptimizer
from megatron_core.optimizer.optimizer_config import OptimizerConfig
from megatron_core.parallel_state import ParallelState, get_parallel_state


def _check_dtypes(config: OptimizerConfig, model_chunks: list[torch.nn.Module]) -> None:
    dtypes = {p.dtype for chunk in model_chunks for p in chunk.parameters() if p.requires_grad}
    if torch.float16 in dtypes and not config.fp16:
        raise ValueError("the model has fp16 parameters but OptimizerConfig.fp16 (--fp16) is off: fp16 needs loss "
                         "scaling; set fp16=True")
    if torch.bfloat16 in dtypes and not config.bf16:
        raise ValueError("the model has bf16 parameters but OptimizerConfig.bf16 (--bf16) is off; set bf16=True")


def get_megatron_optimizer(config: OptimizerConfig, model_chunks: list[torch.nn.Module],
                           parallel_state: ParallelState | None = None,
                           model_param_groups: list[dict] | None = None) -> MegatronOptimizer:
    """One optimizer over all of this rank's model chunks (virtual pipeline stages included).

    ``model_param_groups``: torch-style groups over the model's parameters with their ``weight_decay``
    (the DeepSpeed-style engine passes the user's); None is Megatron-LM's split (no decay on 1-D
    parameters). See :func:`~megatron_core.optimizer.optimizer.build_torch_optimizer`.

    :class:`DistributedOptimizer` (ZeRO-1/2) when the chunks are wrapped in ``DistributedDataParallel``
    with ``zero_stage >= 1``, else :class:`ReplicatedOptimizer`. Raises ValueError when some chunks
    are sharded and others are not, or when parameter dtypes and the precision flags disagree.
    """
    parallel_state = get_parallel_state(parallel_state)
    chunks = list(model_chunks) if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    _check_dtypes(config, chunks)
    sharded = [isinstance(c, DistributedDataParallel) and c.ddp_config.zero_stage >= 1 for c in chunks]
    if any(sharded) and not all(sharded):
        raise ValueError("some model chunks are wrapped with DistributedDataParallelConfig(zero_stage >= 1) and "
                         "others are not; wrap every chunk with the same zero_stage")
    if all(sharded):
        return DistributedOptimizer(config, chunks, parallel_state, model_param_groups)
    if config.optimizer_cpu_offload:
        raise ValueError("--optimizer-cpu-offload / --nvme-offload-path offload the distributed optimizer's shard: "
                         "set --use-distributed-optimizer or --zero-stage 1, 2 or 3")
    return ReplicatedOptimizer(config, chunks, parallel_state, model_param_groups)


__all__ = [
    "ConstantGradScaler",
    "DistributedOptimizer",
    "DynamicGradScaler",
    "MegatronOptimizer",
    "MemoryFootprint",
    "OptimizerConfig",
    "ReplicatedOptimizer",
    "clip_by_total_norm",
    "count_zeros",
    "counted_in_norm",
    "get_megatron_optimizer",
    "global_l2_norm",
    "memory_footprint",
]
