"""Global gradient (and parameter) norm across TP, PP and DP ranks, clipping, and zero counting.

A gradient element enters the norm exactly once in the whole job: a parameter replicated over TP
(``tensor_model_parallel`` not set, e.g. a layernorm weight) is counted on TP rank 0 only; the
tied output weight (``shared_embedding`` off the first stage) is not counted, its first-stage twin
is; under ZeRO each DP rank holds a disjoint shard and the sums are added over DP as well.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist

from megatron_core import device as device_mod
from megatron_core.parallel_state import ParallelState


def counted_in_norm(param: torch.nn.Parameter, parallel_state: ParallelState) -> bool:
    """Whether this rank's copy of ``param`` is the one that counts in global norms."""
    if not getattr(param, "tensor_model_parallel", False) and parallel_state.tp_rank != 0:
        return False
    if getattr(param, "shared_embedding", False) and not parallel_state.is_pipeline_first_stage():
        return False
    return True


def _groups(parallel_state: ParallelState, sharded_over_dp: bool) -> list:
    groups = []
    if parallel_state.mp_size > 1:
        groups.append(parallel_state.mp_group)
    if sharded_over_dp and parallel_state.dp_size > 1:
        groups.append(parallel_state.dp_group)
    return groups


def global_l2_norm(tensors: Iterable[torch.Tensor], parallel_state: ParallelState, sharded_over_dp: bool) -> float:
    """L2 norm over the model of ``tensors`` (gradients, or the main parameters for ``--log-params-norm``),
    each element counted once in the whole job (see the module docstring), in fp32. Collective."""
    # On the compute device: NCCL only reduces device tensors.
    total = torch.zeros((), dtype=torch.float32, device=device_mod.current_device())
    for t in tensors:
        total += t.detach().float().pow(2).sum()
    for group in _groups(parallel_state, sharded_over_dp):
        dist.all_reduce(total, group=group)
    return math.sqrt(total.item())


def clip_by_total_norm(grads: Iterable[torch.Tensor], max_norm: float, total_norm: float) -> None:
    """Scale ``grads`` in place by ``max_norm / (total_norm + 1e-6)`` when that is below 1 (torch's rule)."""
    coeff = max_norm / (total_norm + 1.0e-6)
    if coeff < 1.0:
        for g in grads:
            g.mul_(coeff)


def count_zeros(grads: Iterable[torch.Tensor], parallel_state: ParallelState, sharded_over_dp: bool) -> int:
    """Number of zero gradient elements over the model (each element counted once)."""
    total = torch.zeros((), dtype=torch.float64, device=device_mod.current_device())
    for g in grads:
        total += (g == 0).sum()
    for group in _groups(parallel_state, sharded_over_dp):
        dist.all_reduce(total, group=group)
    return int(total.item())


def any_non_finite(grads: Iterable[torch.Tensor]) -> bool:
    """True when some local gradient holds an inf or a nan."""
    return any(not torch.isfinite(g).all() for g in grads)


def agree_found_inf(found_inf: bool, parallel_state: ParallelState) -> bool:
    """MAX of every rank's flag over TP, PP and DP (the model-parallel then the DP group reaches every
    rank of the job), so that all ranks skip the same step."""
    flag = torch.tensor([1.0 if found_inf else 0.0], device=device_mod.current_device())
    for group in _groups(parallel_state, sharded_over_dp=True):
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return bool(flag.item() > 0)
