"""A bucket of a ``ParamAndGradBuffer`` (the range one collective reduces, its parameter and gradient storage
and its reduction's state) and a ``ShardPiece`` (the part of one parameter in a DP rank's shard)."""
from __future__ import annotations

import dataclasses

import torch


class Bucket:
    """A padded, contiguous range of a buffer whose gradients one collective reduces."""

    def __init__(self, index: int, start: int, end: int, params: list[torch.nn.Parameter], dp_size: int,
                 dp_rank: int, local_offset: int) -> None:
        self.index, self.start, self.end, self.params = index, start, end, params
        self.shard_size = (end - start) // dp_size
        self.shard_start = start + dp_rank * self.shard_size  # buffer coordinates
        self.local_offset = local_offset  # where this bucket's shard starts in the rank's concatenated shard
        self.pending: set[int] = set()
        self.handle = None
        self.reduce_scatter_output: torch.Tensor | None = None
        self.launched_at: float | None = None
        # Parameters: a view of the buffer's ``param_data`` (ZeRO 0-2) or a storage of its own that
        # ZeRO-3 frees (``gathered`` False) and all-gathers again; ``gather_handle`` is an
        # all-gather in flight into it; ``persistent`` buckets are never freed.
        self.param_data: torch.Tensor = torch.empty(0)  # set by the buffer
        # Each parameter with its view of param_data: a freed bucket points its parameters at ``released``
        # instead, since a view of a storage resized to 0 bytes reads unallocated memory (a segfault).
        self.param_views: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        self.gathered = True
        self.gather_handle = None
        self.persistent = False
        self.grads_pending_release: set[int] = set()
        # Gradients: a view of the buffer's ``grad_data`` (ZeRO 0-1) or, under ZeRO-2/3, a storage of
        # its own, allocated (``grad_allocated``) from the bucket's first gradient to its reduction.
        self.grad_data: torch.Tensor = torch.empty(0)  # set by the buffer
        self.grad_allocated = True
        self.main_grads: list[tuple[torch.nn.Parameter, torch.Tensor]] = []  # each parameter's view of grad_data
        self.reset()

    def reset(self) -> None:
        """Mark every parameter's gradient pending again and forget the last reduction."""
        self.pending = {id(p) for p in self.params}
        self.handle, self.reduce_scatter_output, self.launched_at = None, None, None

    def point_params_at_buffer(self) -> None:
        """Give every parameter its view of ``param_data`` again (its storage was just re-allocated)."""
        for p, view in self.param_views:
            p.data = view

    def point_params_at(self, released: torch.Tensor) -> None:
        """Make every parameter a stride-0 expansion of the one-element ``released`` (its shape kept): a read
        outside a gather gives NaN; a write is lost (as to DeepSpeed's freed parameters) or, for most in-place
        ops, refused by torch; neither touches freed memory."""
        for p, _ in self.param_views:
            p.data = released.view(()).expand(p.shape)  # view(()): a 0-dim parameter too

    @property
    def launched(self) -> bool:
        """Whether this bucket's gradient collective has been issued this step."""
        return self.launched_at is not None


@dataclasses.dataclass
class ShardPiece:
    """The part of one parameter that falls in this rank's shard (flat element ranges)."""

    param: torch.nn.Parameter
    param_start: int  # within the flattened parameter
    param_end: int
    shard_start: int  # within the rank's concatenated shard of the buffer
    bucket: Bucket

    @property
    def numel(self) -> int:
        """Elements of the parameter in this piece."""
        return self.param_end - self.param_start
