"""RNG streams for tensor parallelism and activation checkpointing that replays them.

Two streams matter: the default one, seeded identically on every tensor-parallel rank, for
dropout on replicated activations; and the "model-parallel" stream, seeded per TP rank, for
dropout on activations that are split across TP ranks (attention probabilities).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from megatron_core import device
from megatron_core.rng_tracker import MODEL_PARALLEL_RNG, RNGStatesTracker, model_parallel_manual_seed

__all__ = ["MODEL_PARALLEL_RNG", "RNGStatesTracker", "checkpoint", "model_parallel_manual_seed"]


def _capture_rng(tracker: RNGStatesTracker | None) -> tuple:
    return (torch.get_rng_state(), device.get_rng_state(),
            tracker.get_states() if tracker is not None else None)


def _restore_rng(saved: tuple, tracker: RNGStatesTracker | None) -> None:
    cpu_state, device_state, tracker_states = saved
    torch.set_rng_state(cpu_state)
    device.set_rng_state(device_state)
    if tracker is not None:
        tracker.set_states(tracker_states)


class _CheckpointFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run_function, tracker, *args):
        ctx.run_function = run_function
        ctx.tracker = tracker
        ctx.rng = _capture_rng(tracker)
        tensor_positions = [i for i, a in enumerate(args) if torch.is_tensor(a)]
        ctx.tensor_positions = tensor_positions
        ctx.non_tensors = [None if torch.is_tensor(a) else a for a in args]
        ctx.save_for_backward(*[args[i] for i in tensor_positions])
        with torch.no_grad():
            outputs = run_function(*args)
        return outputs

    @staticmethod
    def backward(ctx, *grads):
        args = list(ctx.non_tensors)
        for pos, tensor in zip(ctx.tensor_positions, ctx.saved_tensors, strict=True):
            detached = tensor.detach()
            detached.requires_grad_(tensor.requires_grad)
            args[pos] = detached
        # Replay the forward under the RNG states it saw, then put the current ones back.
        now = _capture_rng(ctx.tracker)
        _restore_rng(ctx.rng, ctx.tracker)
        with torch.enable_grad():
            outputs = ctx.run_function(*args)
        _restore_rng(now, ctx.tracker)
        if torch.is_tensor(outputs):
            outputs = (outputs,)
        pairs = [(o, g) for o, g in zip(outputs, grads, strict=True) if torch.is_tensor(o) and o.requires_grad]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        input_grads = tuple(a.grad if torch.is_tensor(a) else None for a in args)
        return (None, None) + input_grads


def checkpoint(function: Callable[..., Any], tracker: RNGStatesTracker | None, *args: Any) -> Any:
    """Run ``function(*args)`` without keeping activations; recompute them in backward.

    The CPU, device and tracker RNG states are restored for the recomputation, so dropout masks
    match the first forward exactly.
    """
    return _CheckpointFunction.apply(function, tracker, *args)
