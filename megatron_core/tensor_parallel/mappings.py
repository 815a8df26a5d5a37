"""Autograd functions that move activations into and out of tensor-parallel regions.

Each forward collective is paired with its adjoint in backward (copy <-> all-reduce,
split <-> all-gather, all-gather <-> reduce-scatter). A group of size one makes every one of
them the identity, so serial code pays nothing.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_core import shm_collectives
from megatron_core.collectives import all_gather_flat, reduce_scatter_flat


def _size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    if _size(group) == 1:
        return x
    x = x.contiguous()
    shm_collectives.all_reduce(x, group)
    return x


def _split_last(x: torch.Tensor, group) -> torch.Tensor:
    world = _size(group)
    if world == 1:
        return x
    if x.shape[-1] % world != 0:
        raise ValueError(f"last dimension {x.shape[-1]} is not divisible by the tensor-parallel size {world}")
    return x.chunk(world, dim=-1)[_rank(group)].contiguous()


def _gather_last(x: torch.Tensor, group) -> torch.Tensor:
    world = _size(group)
    if world == 1:
        return x
    x = x.contiguous()
    # gloo wants a flat output for the all-gather; view the pieces afterwards.
    flat = torch.empty(world * x.numel(), dtype=x.dtype, device=x.device)
    all_gather_flat(flat, x.view(-1), group)
    return torch.cat(flat.view(world, *x.shape).unbind(0), dim=-1)


def _split_first(x: torch.Tensor, group) -> torch.Tensor:
    world = _size(group)
    if world == 1:
        return x
    if x.shape[0] % world != 0:
        raise ValueError(f"sequence length {x.shape[0]} is not divisible by the tensor-parallel "
                         f"size {world} (required by sequence parallelism)")
    return x.chunk(world, dim=0)[_rank(group)].contiguous()


def _gather_first(x: torch.Tensor, group) -> torch.Tensor:
    out, work = gather_first_async(x, group)
    if work is not None:
        work.wait()
    return out


def gather_first_async(x: torch.Tensor, group):
    """Start an all-gather of ``x`` along dim 0; returns ``(gathered, work)``; ``work.wait()`` before use.

    ``x`` is [s / TP, ...]; ``gathered`` is [s, ...] (rank order). With a group of size one the
    input itself is returned and ``work`` is None.
    """
    world = _size(group)
    if world == 1:
        return x, None
    x = x.contiguous()
    flat = torch.empty(world * x.numel(), dtype=x.dtype, device=x.device)
    work = all_gather_flat(flat, x.view(-1), group, async_op=True)
    return flat.view(world * x.shape[0], *x.shape[1:]), work


def reduce_scatter_first_async(x: torch.Tensor, group):
    """Start a reduce-scatter of ``x`` [s, ...] along dim 0; returns ``([s / TP, ...], work)``."""
    world = _size(group)
    if world == 1:
        return x, None
    if x.shape[0] % world != 0:
        raise ValueError(f"sequence length {x.shape[0]} is not divisible by the tensor-parallel "
                         f"size {world} (required by sequence parallelism)")
    x = x.contiguous()
    out = torch.empty(x.numel() // world, dtype=x.dtype, device=x.device)
    work = reduce_scatter_flat(out, x.view(-1), group, async_op=True)
    return out.view(x.shape[0] // world, *x.shape[1:]), work


def _reduce_scatter_first(x: torch.Tensor, group) -> torch.Tensor:
    out, work = reduce_scatter_first_async(x, group)
    if work is not None:
        work.wait()
    return out


class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad.clone(), ctx.group), None


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x.clone(), group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_last(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_last(grad, ctx.group), None


class _GatherFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_last(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _split_last(grad, ctx.group), None


class _ScatterToSequenceRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_first(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_first(grad, ctx.group), None


class _GatherFromSequenceRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, tensor_parallel_output_grad):
        ctx.group = group
        ctx.tensor_parallel_output_grad = tensor_parallel_output_grad
        return _gather_first(x, group)

    @staticmethod
    def backward(ctx, grad):
        # Consumers inside a TP region produce partial gradients that must be summed.
        if ctx.tensor_parallel_output_grad:
            return _reduce_scatter_first(grad, ctx.group), None, None
        return _split_first(grad, ctx.group), None, None


class _ReduceScatterToSequenceRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter_first(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_first(grad, ctx.group), None


def copy_to_tensor_model_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    """Identity forward, all-reduce of the gradient backward."""
    return _CopyToRegion.apply(x, group) if _size(group) > 1 else x


def reduce_from_tensor_model_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    """All-reduce forward, identity backward."""
    return _ReduceFromRegion.apply(x, group) if _size(group) > 1 else x


def scatter_to_tensor_model_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    """Keep this rank's slice of the last dimension; all-gather the gradient."""
    return _ScatterToRegion.apply(x, group) if _size(group) > 1 else x


def gather_from_tensor_model_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    """All-gather along the last dimension; split the gradient."""
    return _GatherFromRegion.apply(x, group) if _size(group) > 1 else x


def scatter_to_sequence_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    """Keep this rank's slice of the first (sequence) dimension; all-gather the gradient."""
    return _ScatterToSequenceRegion.apply(x, group) if _size(group) > 1 else x


def gather_from_sequence_parallel_region(x: torch.Tensor, group,
                                         tensor_parallel_output_grad: bool = True) -> torch.Tensor:
    """All-gather along the sequence dimension; reduce-scatter (or split) the gradient."""
    if _size(group) == 1:
        return x
    return _GatherFromSequenceRegion.apply(x, group, tensor_parallel_output_grad)


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    """Reduce-scatter along the sequence dimension; all-gather the gradient."""
    return _ReduceScatterToSequenceRegion.apply(x, group) if _size(group) > 1 else x
