"""Stop a run whose numbers went bad before the bad step lands in the weights or a checkpoint.

Megatron-LM's ``--check-for-nan-in-loss-and-grad`` (on by default there and here): after the
forward-backward pass and before the optimizer step, every rank agrees on whether any loss or
gradient is inf/nan; if so the step is not applied and the run stops with one line naming the
iteration. Under fp16 an overflowing gradient is expected (the loss scaler skips the step), so
only the loss is checked; instead, a run whose loss scale cannot go lower and that still skips
``max_skipped`` iterations in a row stops (DeepSpeed's ``raise_error_at_min_scale``).
"""
from __future__ import annotations

import math
from typing import Any

import torch

from megatron_core.collectives import any_rank
from megatron_core.distributed.finalize_model_grads import reduced_grads
from megatron_core.errors import ConfigError
from megatron_core.optimizer.clip_grads import any_non_finite
from megatron_core.optimizer.grad_scaler import DynamicGradScaler

_FIX = ("the step was not applied and nothing was saved; lower --lr, check the data, or resume from the last "
        "checkpoint (--no-check-for-nan-in-loss-and-grad turns this check off)")


class TrainingDivergedError(ConfigError):
    """The loss or the gradients became inf/nan, or fp16 cannot find a loss scale that fits."""




def check_loss_and_grads(iteration: int, losses: dict[str, float], model: list[torch.nn.Module],
                         optimizer: Any) -> None:
    """Raise :class:`TrainingDivergedError` on every rank if any rank holds a non-finite loss or gradient.

    ``iteration`` is the 1-based number of the iteration being trained; ``losses`` this rank's reduced
    losses (empty off the last pipeline stage). Collective: call it on every rank.
    """
    fp16 = getattr(optimizer, "grad_scaler", None) is not None
    bad_loss, bad_grad = any_rank([any(not math.isfinite(v) for v in losses.values()),
                                    not fp16 and any_non_finite(reduced_grads(model))])
    if bad_loss or bad_grad:
        what = "the loss" if bad_loss else "a gradient"
        raise TrainingDivergedError(f"iteration {iteration}: {what} is inf or nan; {_FIX}")


def check_finite_state(state: dict[str, torch.Tensor], where: str) -> None:
    """Refuse weights holding inf/nan: a ConfigError naming ``where`` and the first such tensor."""
    for name, tensor in state.items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise TrainingDivergedError(f"{where}: weight {name} holds inf or nan; load an earlier checkpoint "
                                        f"(--ckpt-step N) or retrain")


class SkipWatch:
    """Counts fp16 iterations skipped in a row while the loss scale cannot be lowered any further."""

    def __init__(self, max_skipped: int) -> None:
        self.max_skipped, self.count = max_skipped, 0

    def update(self, iteration: int, skipped: bool, optimizer: Any) -> None:
        """Raise :class:`TrainingDivergedError` after ``max_skipped`` such iterations (0: never)."""
        scaler = getattr(optimizer, "grad_scaler", None)
        at_floor = scaler is not None and (not isinstance(scaler, DynamicGradScaler)
                                           or scaler.scale <= scaler.min_scale)
        self.count = self.count + 1 if skipped and at_floor else 0
        if scaler is not None and self.max_skipped and self.count >= self.max_skipped:
            raise TrainingDivergedError(
                f"iteration {iteration}: the last {self.count} fp16 steps overflowed at the lowest loss scale "
                f"{scaler.scale:g} and were skipped; the gradients do not fit fp16: lower --lr, use --bf16, or lower "
                f"--min-loss-scale (--max-skipped-iters-at-min-loss-scale 0 turns this check off)")
