"""``deepspeed.comm``'s names over ``torch.distributed``, for scripts that write ``import deepspeed.comm as dist``.

DeepSpeed's communication module (``deepspeed/comm/comm.py``) keeps torch.distributed's function names and
arguments and adds a few of its own; a ported script replaces ``deepspeed.comm`` with ``megatron_core.comm``:

- the collectives and queries are torch.distributed's own functions (``get_rank``, ``get_world_size``,
  ``barrier``, ``all_reduce``, ``broadcast``, ``all_gather``, ``all_gather_into_tensor``,
  ``reduce_scatter_tensor``, ``send``/``recv``, ...), so DeepSpeed's logging keywords (``prof``,
  ``log_name``, ``debug``) are not taken;
- ``get_local_rank()``: the rank on this node (torchrun's ``LOCAL_RANK``; 0 without it), as DeepSpeed reads it
  from its launcher's environment;
- ``init_distributed(...)``: :func:`megatron_core.init_distributed` (DeepSpeed's arguments; a no-op when a
  process group exists);
- ``get_world_group()``, ``get_global_rank(group, group_rank)``, ``get_all_ranks_from_group(group)``;
- ``has_all_gather_into_tensor()`` / ``has_reduce_scatter_tensor()``: True (torch >= 2.0 has both).

DeepSpeed's communication logger (``comms_logger``, ``log_summary``) is not implemented.
"""

from __future__ import annotations

import os
from typing import Any

from torch.distributed import (
    P2POp,
    ReduceOp,
    all_gather,
    all_gather_into_tensor,
    all_gather_object,
    all_reduce,
    all_to_all,
    all_to_all_single,
    barrier,
    batch_isend_irecv,
    broadcast,
    broadcast_object_list,
    destroy_process_group,
    gather,
    get_rank,
    get_world_size,
    irecv,
    is_available,
    is_initialized,
    isend,
    monitored_barrier,
    new_group,
    recv,
    reduce,
    reduce_scatter,
    reduce_scatter_tensor,
    scatter,
    send,
)
from torch.distributed import get_global_rank as _torch_global_rank
from torch.distributed import get_process_group_ranks as _group_ranks
from torch.distributed import group as _group

from megatron_core.errors import ConfigError

__all__ = [
    "P2POp", "ReduceOp", "all_gather", "all_gather_into_tensor", "all_gather_object", "all_reduce", "all_to_all",
    "all_to_all_single", "barrier", "batch_isend_irecv", "broadcast", "broadcast_object_list",
    "destroy_process_group", "gather", "get_all_ranks_from_group", "get_global_rank", "get_local_rank", "get_rank",
    "get_world_group", "get_world_size", "has_all_gather_into_tensor", "has_reduce_scatter_tensor",
    "init_distributed", "irecv", "is_available", "is_initialized", "isend", "monitored_barrier", "new_group", "recv",
    "reduce", "reduce_scatter", "reduce_scatter_tensor", "scatter", "send",
]


def get_local_rank() -> int:
    """This process's rank on its node: torchrun's ``LOCAL_RANK`` (0 when it is not set)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def get_world_group() -> Any:
    """The default (world) process group. Raises ConfigError before one exists."""
    world = _group.WORLD
    if world is None:
        raise ConfigError("megatron_core.comm: no process group yet; call megatron_core.init_distributed() or "
                          "megatron_core.initialize(...) first")
    return world


def get_global_rank(group: Any = None, group_rank: int = 0) -> int:
    """The global rank of ``group_rank`` in ``group`` (the world group when None), as DeepSpeed's."""
    return _torch_global_rank(group if group is not None else get_world_group(), group_rank)


def get_all_ranks_from_group(group: Any = None) -> list[int]:
    """The global ranks of ``group`` (the world group when None), in group-rank order."""
    return _group_ranks(group if group is not None else get_world_group())


def has_all_gather_into_tensor() -> bool:
    """True: torch.distributed has ``all_gather_into_tensor`` (DeepSpeed checks for older torch)."""
    return True


def has_reduce_scatter_tensor() -> bool:
    """True: torch.distributed has ``reduce_scatter_tensor`` (DeepSpeed checks for older torch)."""
    return True


def init_distributed(*args: Any, **kwargs: Any) -> None:
    """:func:`megatron_core.init_distributed` (``deepspeed.comm.init_distributed``; same arguments)."""
    from megatron_core.engine import init_distributed as _init  # noqa: PLC0415 - keeps this module light

    _init(*args, **kwargs)
