"""Flat all-gather and reduce-scatter under whichever names this torch release has; host tensors
reduced through the compute device; agreement on failures and flags.

torch 2.13 renamed ``all_gather_into_tensor``/``reduce_scatter_tensor`` to ``*_single`` and warns on
the old names; torch 2.4, the oldest release we support, has only the old ones.

On gloo a reduce-scatter is done as an all-reduce of the whole tensor and this rank's chunk copied
out: gloo's own reduce-scatter took 2.1-2.4x the time of its all-reduce of the same tensor between
two local ranks (measured with torch 2.13: 26 MB 51 ms vs 24 ms, 2 MB 5.0 ms vs 2.1 ms), although
in a ring it should move half the bytes. The result is the same sum; only this rank's chunk is
returned, as from a reduce-scatter. NCCL and other backends use their own reduce-scatter.
"""
from __future__ import annotations

import threading
from typing import Any

import torch
import torch.distributed as dist

from megatron_core import device as device_mod
from megatron_core import shm_collectives

_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def all_gather_flat(output: torch.Tensor, shard: torch.Tensor, group, async_op: bool = False):
    """Concatenate every rank's 1-D ``shard`` into the 1-D ``output`` (gloo needs flat tensors)."""
    return _ALL_GATHER(output, shard, group=group, async_op=async_op)


class _ChunkOnWait:
    """The handle of a gloo reduce-scatter done as an all-reduce: ``wait()`` also copies the chunk out."""

    def __init__(self, work: Any, output: torch.Tensor, chunk: torch.Tensor) -> None:
        self.work, self.output, self.chunk = work, output, chunk
        # One waiter copies, the others wait for it: ZeRO-2/3 free the full tensor (the chunk's storage)
        # as soon as one wait returns, while the offload copy engine may wait on the same handle.
        self._lock = threading.Lock()

    def wait(self) -> bool:
        with self._lock:
            if self.work is not None:
                self.work.wait()
                if self.output.data_ptr() != self.chunk.data_ptr():
                    self.output.copy_(self.chunk)
                self.work = None
        return True


def reduce_scatter_flat(output: torch.Tensor, full: torch.Tensor, group, async_op: bool = False,
                        full_is_scratch: bool = False):
    """Sum the 1-D ``full`` over ``group``; rank i receives chunk i (``full.numel() / N`` elements) in
    the 1-D ``output``. ``full_is_scratch``: the caller no longer needs ``full``'s values, so on gloo
    the sum may be taken in place there (without it, ``full`` is left unchanged). Returns the work
    handle (``async_op``) or None, like ``torch.distributed``."""
    if dist.get_backend(group) != "gloo":
        return _REDUCE_SCATTER(output, full, group=group, async_op=async_op)
    buffer = full if full_is_scratch else full.clone()
    size, rank = output.numel(), dist.get_rank(group)
    chunk = buffer[rank * size:(rank + 1) * size]
    handle = _ChunkOnWait(shm_collectives.all_reduce(buffer, group, async_op=True), output, chunk)
    if async_op:
        return handle
    handle.wait()
    return None


# Host tensors go to the compute device in pieces of at most this many bytes (bounded device memory).
HOST_REDUCE_PIECE_BYTES = 256 << 20


def all_reduce_host(tensor: torch.Tensor, group=None, op: Any = dist.ReduceOp.SUM,
                    piece_bytes: int = HOST_REDUCE_PIECE_BYTES) -> None:
    """``dist.all_reduce(tensor, op, group)`` in place for a contiguous ``tensor`` in host memory, moved
    through the compute device in pieces of at most ``piece_bytes``: an NCCL group reduces device
    tensors only ("No backend type associated with device type cpu"), as Megatron-LM's CPU-side
    reductions use gloo groups. On the CPU each piece is a view of ``tensor``, reduced without a copy."""
    dev = device_mod.current_device()
    flat = tensor.view(-1)
    step = max(piece_bytes // tensor.element_size(), 1)
    for start in range(0, flat.numel(), step):
        host = flat[start:start + step]
        piece = host.to(dev)
        dist.all_reduce(piece, op=op, group=group)
        if piece.data_ptr() != host.data_ptr():
            host.copy_(piece)


def broadcast_host(tensor: torch.Tensor, src: int, group=None) -> None:
    """``dist.broadcast`` of a small host ``tensor`` in place, through the compute device (as
    :func:`all_reduce_host`)."""
    dev = device_mod.current_device()
    moved = tensor.to(dev)
    dist.broadcast(moved, src=src, group=group)
    if moved is not tensor:
        tensor.copy_(moved)


def any_rank(flags: list[bool], group=None) -> list[bool]:
    """Element-wise OR of ``flags`` over every rank of ``group`` (the default group: all ranks); the same
    list on every rank. A collective; without a process group, or in a group of one, ``flags`` itself."""
    if not (dist.is_initialized() and dist.get_world_size(group) > 1):
        return [bool(f) for f in flags]
    value = torch.tensor([1 if f else 0 for f in flags], dtype=torch.int32, device=device_mod.current_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
    return [bool(v) for v in value.tolist()]


def failures(failure: Any, group=None) -> list[tuple[int, Any]]:
    """``(rank, failure)`` of every rank of ``group`` (the default group: all ranks) whose ``failure`` is not
    None, lowest rank first: the same list on every rank.

    A collective (``all_gather_object``): every rank of ``group`` calls it once, whether its own step
    failed or not, so a rank that failed alone does not leave the others waiting for it in their next
    collective. Without a process group, or in a group of one, this rank's own ``[(0, failure)]`` or [].
    """
    outcomes: list[Any] = [failure]
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        outcomes = [None] * dist.get_world_size(group)
        dist.all_gather_object(outcomes, failure, group=group)
    return [(rank, f) for rank, f in enumerate(outcomes) if f is not None]


def lowest_failure(failure: Any, group=None) -> tuple[int, Any] | None:
    """The first of :func:`failures` (the lowest failed rank's ``(rank, failure)``), or None when no rank
    failed: the same answer on every rank; a collective, as :func:`failures`."""
    return next(iter(failures(failure, group)), None)
