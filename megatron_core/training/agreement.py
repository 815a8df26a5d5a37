"""``agreed``: run a local step on every rank and fail all of them alike when any rank fails."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.distributed as dist

from megatron_core.collectives import lowest_failure
from megatron_core.errors import ConfigError


def agreed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` on every rank; a ValueError on any rank is raised on all of them.

    Without this, a rank that fails alone (a missing file on one node, a checkpoint shard) leaves
    the others waiting in their next collective until the timeout. ``fn`` must not communicate, except
    inside groups whose ranks all fail or all pass together (DDP's same-model check and its parameter
    broadcast stay within one DP group, whose ranks reach one verdict).
    """
    error: ValueError | None = None
    try:
        result = fn(*args, **kwargs)
    except ValueError as exc:
        error, result = exc, None
    if dist.is_initialized() and dist.get_world_size() > 1:
        first = lowest_failure(None if error is None else str(error))
        if first is not None and error is None:
            raise ConfigError(first[1] if first[0] == 0 else f"(on rank {first[0]}) {first[1]}")
        if first is not None and not isinstance(error, ConfigError):
            raise ConfigError(str(error)) from error
    if error is not None:
        raise error
    return result
