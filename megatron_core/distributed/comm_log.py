"""The data-parallel collectives, issued through one place so that their traffic can be counted.

The gradient buffers and the distributed optimizer call :func:`all_reduce`,
:func:`reduce_scatter` and :func:`all_gather` here with an optional :class:`CommLog`; the log
records each call's operation and size, and the DDP wrapper adds each bucket's launch and wait
times. ``bench/bench_dp_comm.py`` reads it to compare the traffic with the ZeRO paper's 2Ψ.
"""
from __future__ import annotations

import dataclasses
import time

import torch
import torch.distributed as dist

from megatron_core import shm_collectives
from megatron_core.collectives import all_gather_flat, reduce_scatter_flat

# Elements a rank moves per element of the full tensor in a ring implementation, as the ZeRO
# paper counts them (it ignores the (N-1)/N factor): all-reduce = reduce-scatter + all-gather.
PAPER_VOLUME = {"all_reduce": 2.0, "reduce_scatter": 1.0, "all_gather": 1.0, "broadcast": 1.0}


@dataclasses.dataclass
class CommRecord:
    """One collective: its operation, tag (who issued it), the full tensor's size and group size."""

    op: str
    tag: str
    numel: int
    element_size: int
    group_size: int

    @property
    def bytes(self) -> int:
        """Bytes of the full (unsharded) tensor the collective works on."""
        return self.numel * self.element_size

    @property
    def ring_bytes_sent(self) -> float:
        """Bytes each rank sends in a ring implementation: 2(N-1)/N x size for all-reduce, (N-1)/N otherwise."""
        n = self.group_size
        return PAPER_VOLUME[self.op] * (n - 1) / n * self.bytes


@dataclasses.dataclass
class BucketTiming:
    """When a bucket's collective was launched, when the wrapper started waiting for it, and when it returned."""

    launched: float
    wait_started: float
    wait_ended: float


class CommLog:
    """Counts the collectives issued with it and the timing of gradient buckets (no globals: pass it in)."""

    def __init__(self) -> None:
        self.records: list[CommRecord] = []
        self.bucket_timings: list[BucketTiming] = []

    def reset(self) -> None:
        """Forget every recorded collective and bucket timing."""
        self.records.clear()
        self.bucket_timings.clear()

    def record(self, op: str, tensor: torch.Tensor, group, tag: str) -> None:
        """Append one collective ``op`` over ``group`` on the full ``tensor`` (its numel and bytes)."""
        self.records.append(CommRecord(op, tag, tensor.numel(), tensor.element_size(), dist.get_world_size(group)))

    def paper_volume(self, tag_prefix: str = "") -> float:
        """Elements moved per rank in the paper's units (all-reduce 2x, reduce-scatter / all-gather 1x)."""
        return sum(PAPER_VOLUME[r.op] * r.numel for r in self.records if r.tag.startswith(tag_prefix))

    def bytes_by_op(self) -> dict[str, int]:
        """Bytes of the recorded tensors per collective name (as issued, not the paper's factor)."""
        totals: dict[str, int] = {}
        for r in self.records:
            totals[r.op] = totals.get(r.op, 0) + r.bytes
        return totals


def now() -> float:
    """A monotonic clock in seconds (``time.perf_counter``) for the bucket timings."""
    return time.perf_counter()


def _log(log: CommLog | None, op: str, full: torch.Tensor, group, tag: str) -> None:
    if log is not None:
        log.record(op, full, group, tag)


def all_reduce(tensor: torch.Tensor, group, *, async_op: bool = False, log: CommLog | None = None,
               tag: str = "", op=dist.ReduceOp.SUM):
    """Sum (or ``op``) ``tensor`` over ``group`` in place."""
    _log(log, "all_reduce", tensor, group, tag)
    return shm_collectives.all_reduce(tensor, group, async_op=async_op, op=op)


def reduce_scatter(output: torch.Tensor, full: torch.Tensor, group, *, async_op: bool = False,
                   log: CommLog | None = None, tag: str = "", full_is_scratch: bool = False):
    """Sum the flat ``full`` over ``group``; rank i receives chunk i in ``output`` (``full_is_scratch``:
    see :func:`megatron_core.collectives.reduce_scatter_flat`)."""
    _log(log, "reduce_scatter", full, group, tag)
    return reduce_scatter_flat(output, full, group, async_op=async_op, full_is_scratch=full_is_scratch)


def all_gather(full: torch.Tensor, shard: torch.Tensor, group, *, async_op: bool = False,
               log: CommLog | None = None, tag: str = ""):
    """Concatenate every rank's flat ``shard`` into the flat ``full`` (gloo wants 1-D tensors)."""
    _log(log, "all_gather", full, group, tag)
    return all_gather_flat(full, shard, group, async_op=async_op)


def broadcast(tensor: torch.Tensor, src: int, group, *, log: CommLog | None = None, tag: str = "") -> None:
    """Copy global rank ``src``'s ``tensor`` to every rank of ``group``."""
    _log(log, "broadcast", tensor, group, tag)
    dist.broadcast(tensor, src=src, group=group)
