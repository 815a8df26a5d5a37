"""Gradient work after the last microbatch's backward, before the optimizer step.

Order: each chunk's data-parallel sync (``finish_grad_sync()`` on a DDP wrapper), then the
all-reduces that TP and PP introduce: ``sequence_parallel`` grads over the TP group (each TP rank
saw only its sequence shard) and ``shared_embedding`` grads over the embedding group (the tied
word embedding lives on the first and the last stage). With per-token loss averaging the
gradients are finally divided by the number of tokens in the global batch.

Under ZeRO-2/3 the full gradients are gone after the DP sync: these all-reduces act on this rank's
pieces of the kept ``grad_shard``. That is the same sum: the buffer layout depends only on the
parameters' shapes and order, which the ranks of a TP group share (TP shards are equal) and so do
the two ends of the embedding group (the tied embedding has a bucket of its own there). Both
groups join ranks of one DP rank, so their members hold the same elements of the same parameters
at the same shard offsets.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist

from megatron_core.collectives import all_reduce_host, broadcast_host
from megatron_core.parallel_state import ParallelState, get_parallel_state


def _grad(param: torch.nn.Parameter) -> torch.Tensor | None:
    """The gradient the optimizer will read: the DDP wrapper's ``main_grad`` when present."""
    grad = getattr(param, "main_grad", None)
    return grad if grad is not None else param.grad


def _partitioned(chunk: torch.nn.Module) -> list:
    """The chunk's DDP buffers whose full gradients are freed after the sync (ZeRO-2/3)."""
    return [b for b in getattr(chunk, "buffers_by_dtype", []) if b.partition_grads]


def _grads_with(model_chunks: Iterable[torch.nn.Module], attribute: str | None) -> list[torch.Tensor]:
    """Where the reduced gradients of the parameters with ``attribute`` (all: None) are: ``main_grad``
    (or ``grad``), or under ZeRO-2/3 the views of ``grad_shard`` holding this rank's pieces of them
    (in shard order, the same on every rank of the group: module docstring)."""
    grads = []
    for chunk in model_chunks:
        in_shards: set[int] = set()
        for buffer in _partitioned(chunk):
            in_shards.update(id(p) for p in buffer.params)
            for piece in buffer.local_pieces():
                if attribute is None or getattr(piece.param, attribute, False):
                    start = piece.shard_start
                    grads.append(buffer.grad_shard[start:start + piece.numel])
        for param in chunk.parameters():
            grad = _grad(param)
            if (param.requires_grad and id(param) not in in_shards and grad is not None
                    and (attribute is None or getattr(param, attribute, False))):
                grads.append(grad)
    return grads


def reduced_grads(model_chunks: Iterable[torch.nn.Module]) -> list[torch.Tensor]:
    """This rank's gradients after :func:`finalize_model_grads`: each parameter's ``main_grad`` (or
    ``grad``), except under ZeRO-2/3, whose full gradients are freed: this rank's pieces of each
    buffer's ``grad_shard`` (every element of the gradient is on exactly one DP rank). For checks
    that agree over all ranks afterwards (``training.health``)."""
    return _grads_with(model_chunks, None)


def _all_reduce_coalesced(grads: list[torch.Tensor], group) -> None:
    """Sum ``grads`` over ``group`` with one collective per dtype."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for same in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in same])
        dist.all_reduce(flat, group=group)
        offset = 0
        for g in same:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def changed_after_dp_sync(param: torch.nn.Parameter, parallel_state: ParallelState,
                          calculate_per_token_loss: bool) -> bool:
    """Whether :func:`finalize_model_grads` changes ``param``'s gradient after the DP sync (the TP
    all-reduce of sequence-parallel grads, the tied-embedding all-reduce, the per-token division):
    a copy of its reduced gradient taken as soon as its bucket is reduced would then be stale."""
    if calculate_per_token_loss:
        return True
    if parallel_state.tp_size > 1 and getattr(param, "sequence_parallel", False):
        return True
    return (getattr(param, "shared_embedding", False) and parallel_state.is_in_embedding_group()
            and len(parallel_state.embedding_ranks) > 1)


def finalize_model_grads(model_chunks: list[torch.nn.Module], parallel_state: ParallelState | None = None,
                         num_tokens: torch.Tensor | None = None) -> None:
    """Finish DP sync, all-reduce sequence-parallel and tied-embedding grads, scale per-token grads.

    ``num_tokens`` (per-token loss averaging) is this rank's token count as the schedule counted it
    (non-zero on the last pipeline stage only): it is broadcast over the pipeline and summed over
    data-parallel ranks. The DP sync must then sum rather than average gradients.
    """
    ps = get_parallel_state(parallel_state)
    for chunk in model_chunks:
        finish_grad_sync = getattr(chunk, "finish_grad_sync", None)
        if callable(finish_grad_sync):  # a DDP wrapper; a bare module has nothing to sync
            finish_grad_sync()
    if ps.tp_size > 1:
        grads = _grads_with(model_chunks, "sequence_parallel")
        if grads:
            _all_reduce_coalesced(grads, ps.tp_group)
    if ps.is_in_embedding_group() and len(ps.embedding_ranks) > 1:
        grads = _grads_with(model_chunks, "shared_embedding")
        if grads:
            _all_reduce_coalesced(grads, ps.embedding_group)
    if num_tokens is not None:
        _scale_by_token_count(model_chunks, ps, num_tokens)


def _scale_by_token_count(model_chunks: list[torch.nn.Module], parallel_state: ParallelState,
                          num_tokens: torch.Tensor) -> None:
    total = torch.as_tensor(num_tokens, dtype=torch.int64).clone()
    if parallel_state.pp_size > 1:
        broadcast_host(total, parallel_state.pp_ranks[-1], parallel_state.pp_group)
    if parallel_state.dp_size > 1:
        all_reduce_host(total, parallel_state.dp_group)
    count = int(total.item())
    if count <= 0:
        raise ValueError(f"per-token loss averaging counted {count} tokens in the global batch; loss_func must "
                         f"return (loss_sum, num_tokens, dict) with num_tokens > 0")
    for chunk in model_chunks:
        in_shards: set[int] = set()
        for buffer in _partitioned(chunk):
            buffer.grad_shard.div_(count)
            in_shards.update(id(p) for p in buffer.params)
        for param in chunk.parameters():
            grad = _grad(param)
            if grad is not None and id(param) not in in_shards:
                grad.div_(count)
