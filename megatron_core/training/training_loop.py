"""One training iteration and one evaluation (the loop around them is in ``pretrain.py``).

Megatron-LM's ``train_step`` / ``evaluate``, written against the contracts of
docs/design.md: a schedule from ``get_forward_backward_func`` drives the model chunks, the
optimizer's ``step()`` answers ``(ok, grad_norm, num_zeros)``, and the scheduler advances by
the samples of each successful iteration.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from megatron_core import device
from megatron_core.collectives import all_reduce_host
from megatron_core.distributed import finalize_model_grads, no_sync_func
from megatron_core.parallel_state import ParallelState
from megatron_core.pipeline_parallel import get_forward_backward_func
from megatron_core.training import data_loading, health
from megatron_core.training.config import DataConfig, TrainingConfig
from megatron_core.training.timers import Timers


@dataclass
class StepResult:
    """What one iteration reports (losses only on the last pipeline stage)."""

    losses: dict[str, float]
    skipped: bool
    grad_norm: float | None
    num_zeros: int | None


@dataclass
class TrainState:
    """Progress that a checkpoint carries and a resumed run continues from."""

    iteration: int = 0
    consumed_train_samples: int = 0
    loss_history: list[float] = field(default_factory=list)  # "lm loss" per iteration (last stage)


def reduce_loss_dicts(loss_dicts: list[dict[str, torch.Tensor]], parallel_state: ParallelState) -> dict[str, float]:
    """Token-weighted mean of each reported loss over microbatches and DP ranks.

    A value is ``[sum, count]`` (a per-token loss sum and its token count) or a plain scalar
    (counted once). Empty off the last pipeline stage; a key whose tokens were all masked is left out.
    """
    if not loss_dicts:
        return {}
    reduced = {}
    for key in loss_dicts[0]:
        total = torch.zeros(2, dtype=torch.float64)
        for d in loss_dicts:
            value = d[key].detach().double().cpu().view(-1)
            total += value if value.numel() == 2 else torch.cat([value, value.new_ones(1)])
        if parallel_state.dp_size > 1:
            all_reduce_host(total, parallel_state.dp_group)
        if total[1] > 0:  # a batch whose every label is masked has no loss to report
            reduced[key] = (total[0] / total[1]).item()
    return reduced


def _iterator_arg(iterators: list) -> Any:
    return iterators if len(iterators) > 1 else iterators[0]


def train_step(forward_step_func: Callable, data_iterators: list, model: list[torch.nn.Module], optimizer: Any,
               scheduler: Any, parallel_state: ParallelState, num_microbatches: int, global_batch_size: int,
               seq_length: int, micro_batch_size: int, timers: Timers, iteration: int = 0,
               check_for_nan: bool = True, empty_unused_memory_level: int = 0,
               calculate_per_token_loss: bool = False) -> StepResult:
    """Forward and backward over the global batch, then the optimizer and scheduler steps.

    ``iteration`` is the number of the iteration being trained (for error messages). With
    ``check_for_nan`` a non-finite loss or gradient on any rank raises ``TrainingDivergedError``
    before the optimizer step (``health.check_loss_and_grads``). ``empty_unused_memory_level`` 1
    releases the device allocator's cache after the forward-backward, 2 also after the optimizer step
    (Megatron-LM's ``--empty-unused-memory-level``). ``calculate_per_token_loss`` (which the DDP
    config's must match) makes the gradient that of the mean over every unmasked token of the global batch.
    """
    optimizer.zero_grad()  # also zeroes the DDP gradient buffers
    timers("forward-backward").start()
    schedule = get_forward_backward_func(parallel_state)
    loss_dicts = schedule(
        forward_step_func=forward_step_func, data_iterator=_iterator_arg(data_iterators), model=model,
        num_microbatches=num_microbatches, seq_length=seq_length, micro_batch_size=micro_batch_size,
        forward_only=False, no_sync_func=no_sync_func(model),
        finalize_model_grads_func=functools.partial(finalize_model_grads, parallel_state=parallel_state),
        grad_scale_func=getattr(optimizer, "scale_loss", None), calculate_per_token_loss=calculate_per_token_loss)
    timers("forward-backward").stop()
    if empty_unused_memory_level >= 1:
        device.empty_cache()
    losses = reduce_loss_dicts(loss_dicts, parallel_state)
    if check_for_nan:
        health.check_loss_and_grads(iteration, losses, model, optimizer)
    timers("optimizer").start()
    ok, grad_norm, num_zeros = optimizer.step()
    timers("optimizer").stop()
    if ok:
        scheduler.step(increment=global_batch_size)
    if empty_unused_memory_level >= 2:
        device.empty_cache()
    return StepResult(losses, not ok, _as_float(grad_norm), _as_int(num_zeros))


def _as_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _as_int(value: Any) -> int | None:
    return None if value is None else int(value)


def evaluate(forward_step_func: Callable, dataset: Any, model: list[torch.nn.Module], parallel_state: ParallelState,
             training: TrainingConfig, data: DataConfig) -> dict[str, float]:
    """Mean losses over the first ``eval_iters`` validation batches (the same ones every time)."""
    if training.eval_iters == 0:
        return {}  # every rank decides alike: evaluation is collective along the pipeline
    for chunk in model:
        chunk.eval()
    iterators = data_loading.data_iterators(dataset, 0, training.micro_batch_size, parallel_state, data.num_workers,
                                            len(model), data.every_chunk_reads_data)
    num_microbatches = training.global_batch_size // (training.micro_batch_size * parallel_state.dp_size)
    schedule = get_forward_backward_func(parallel_state)
    loss_dicts: list = []
    try:
        with torch.no_grad():
            for _ in range(training.eval_iters):
                loss_dicts += schedule(
                    forward_step_func=forward_step_func, data_iterator=_iterator_arg(iterators), model=model,
                    num_microbatches=num_microbatches, seq_length=data.seq_length,
                    micro_batch_size=training.micro_batch_size, forward_only=True)
                if training.empty_unused_memory_level >= 1:
                    device.empty_cache()
    finally:
        data_loading.shutdown_data_iterators(iterators)
        for chunk in model:
            chunk.train()
    return reduce_loss_dicts(loss_dicts, parallel_state)


def learning_rates(optimizer: Any) -> tuple[float, float | None]:
    """(learning rate, decoupled learning rate) as Megatron-LM's ``train_step`` reads them.

    The first is the first group's without megatron.core's ``is_decoupled_lr`` tag (0.0 for an
    optimizer without groups); the second is the tagged group's (``--decoupled-lr``), None without one.
    """
    groups = getattr(optimizer, "param_groups", None) or []
    main = [g for g in groups if not g.get("is_decoupled_lr")]
    decoupled = [g for g in groups if g.get("is_decoupled_lr")]
    return (float(main[0].get("lr", 0.0)) if main else 0.0,
            float(decoupled[0]["lr"]) if decoupled else None)


def loss_scale(optimizer: Any) -> float:
    """The optimizer's current loss scale (``get_loss_scale()``), 1.0 when it has none."""
    get = getattr(optimizer, "get_loss_scale", None)
    return float(get()) if get is not None else 1.0


