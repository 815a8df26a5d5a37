"""Flat all-gather and reduce-scatter under whichever names this torch release has.

torch 2.13 renamed ``all_gather_into_tensor``/``reduce_scatter_tensor`` to ``*_single`` and warns on
the old names; torch 2.4, the oldest release we support, has only the old ones.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def all_gather_flat(output: torch.Tensor, shard: torch.Tensor, group, async_op: bool = False):
    """Concatenate every rank's 1-D ``shard`` into the 1-D ``output`` (gloo needs flat tensors)."""
    return _ALL_GATHER(output, shard, group=group, async_op=async_op)


def reduce_scatter_flat(output: torch.Tensor, full: torch.Tensor, group, async_op: bool = False):
    """Sum the 1-D ``full`` over ``group``; rank i receives chunk i in ``output``."""
    return _REDUCE_SCATTER(output, full, group=group, async_op=async_op)
