"""DeepSpeed's ``WarmupLR``, ``WarmupDecayLR`` and ``WarmupCosineLR`` over the library optimizer's param groups.

Megatron's ``OptimizerParamScheduler`` counts samples and warms up linearly from ``init_lr``;
DeepSpeed's schedules count optimizer steps from ``last_batch_iteration = -1`` and warm up
logarithmically by default, so they get this small module (formulas from
``deepspeed/runtime/lr_schedules.py``, https://deepspeed.readthedocs.io/en/latest/schedulers.html):

- warmup, step t < W = max(2, warmup_num_steps): gamma = log(t + 1) / log(W) ('log') or t / W ('linear');
- WarmupLR: lr = min_lr + (max_lr - min_lr) * gamma, then max_lr;
- WarmupDecayLR: after warmup gamma = max(0, (T - t) / max(1, T - W)) with T = total_num_steps;
- WarmupCosineLR: lr = base_lr * ratio, ratio = warmup_min_ratio + (1 - warmup_min_ratio) * gamma
  in warmup, then cos_min_ratio + (1 - cos_min_ratio) * (1 + cos(pi * min(1, (t - W + 1) / max(1, T - W)))) / 2.

The engine calls :meth:`step` after each successful optimizer step (not after a skipped fp16 step).
"""

from __future__ import annotations

import math
from typing import Any


class WarmupLR:
    """Warm up from ``warmup_min_lr`` to ``warmup_max_lr`` over ``warmup_num_steps`` steps, then stay."""

    def __init__(
        self,
        optimizer: Any,
        warmup_min_lr: float = 0.0,
        warmup_max_lr: float = 0.001,
        warmup_num_steps: int = 1000,
        warmup_type: str = "log",
        last_batch_iteration: int = -1,
    ) -> None:
        self.optimizer = optimizer
        self.min_lr, self.max_lr = float(warmup_min_lr), float(warmup_max_lr)
        self.warmup_num_steps = max(2, int(warmup_num_steps))
        self.warmup_type = warmup_type
        self.last_batch_iteration = last_batch_iteration
        self._apply()

    def _warmup_gamma(self) -> float:
        t = self.last_batch_iteration
        if self.warmup_type == "log":
            return math.log(t + 1) / math.log(self.warmup_num_steps)
        return t / self.warmup_num_steps

    def _gamma(self) -> float:
        return self._warmup_gamma() if self.last_batch_iteration < self.warmup_num_steps else 1.0

    def get_lr(self) -> list[float]:
        """The learning rate of every param group at the current step (``min_lr`` before the first step)."""
        if self.last_batch_iteration < 0:
            return [self.min_lr for _ in self.optimizer.param_groups]
        lr = self.min_lr + (self.max_lr - self.min_lr) * self._gamma()
        return [lr for _ in self.optimizer.param_groups]

    def get_last_lr(self) -> list[float]:
        """The rates last written into the param groups."""
        return [group["lr"] for group in self.optimizer.param_groups]

    def _apply(self) -> None:
        for group, lr in zip(self.optimizer.param_groups, self.get_lr(), strict=True):
            group["lr"] = lr

    def step(self, last_batch_iteration: int | None = None) -> None:
        """Advance one optimizer step (or jump to ``last_batch_iteration``) and set the rates."""
        self.last_batch_iteration = (
            self.last_batch_iteration + 1 if last_batch_iteration is None else last_batch_iteration
        )
        self._apply()

    def state_dict(self) -> dict:
        """``{'last_batch_iteration': t}``, as DeepSpeed saves it."""
        return {"last_batch_iteration": self.last_batch_iteration}

    def load_state_dict(self, state: dict) -> None:
        """Resume at the saved step and set the rates."""
        self.last_batch_iteration = int(state["last_batch_iteration"])
        self._apply()


class WarmupDecayLR(WarmupLR):
    """:class:`WarmupLR`, then linear decay to 0 at ``total_num_steps``."""

    def __init__(
        self,
        optimizer: Any,
        total_num_steps: int,
        warmup_min_lr: float = 0.0,
        warmup_max_lr: float = 0.001,
        warmup_num_steps: int = 1000,
        warmup_type: str = "log",
        last_batch_iteration: int = -1,
    ) -> None:
        self.total_num_steps = int(total_num_steps)
        super().__init__(optimizer, warmup_min_lr, warmup_max_lr, warmup_num_steps, warmup_type, last_batch_iteration)

    def _gamma(self) -> float:
        if self.last_batch_iteration < self.warmup_num_steps:
            return self._warmup_gamma()
        return max(
            0.0,
            (self.total_num_steps - self.last_batch_iteration) / max(1.0, self.total_num_steps - self.warmup_num_steps),
        )


class WarmupCosineLR(WarmupLR):
    """Ratio warmup of each group's base rate (the optimizer's ``lr``), then cosine decay to ``cos_min_ratio``."""

    def __init__(
        self,
        optimizer: Any,
        total_num_steps: int,
        warmup_min_ratio: float = 0.0,
        warmup_num_steps: int = 1000,
        cos_min_ratio: float = 0.0001,
        warmup_type: str = "log",
        last_batch_iteration: int = -1,
    ) -> None:
        self.total_num_steps = int(total_num_steps)
        self.warmup_min_ratio, self.cos_min_ratio = float(warmup_min_ratio), float(cos_min_ratio)
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        super().__init__(optimizer, 0.0, 0.0, warmup_num_steps, warmup_type, last_batch_iteration)

    def _ratio(self) -> float:
        t = self.last_batch_iteration
        if t < self.warmup_num_steps:
            return self.warmup_min_ratio + (1.0 - self.warmup_min_ratio) * self._warmup_gamma()
        # Clamped at 1, as DeepSpeed 0.19: past total_num_steps the rate stays at the floor instead of
        # climbing the cosine back up.
        progress = min(1.0, (t - self.warmup_num_steps + 1) / max(1, self.total_num_steps - self.warmup_num_steps))
        return max(0.0, self.cos_min_ratio + (1.0 - self.cos_min_ratio) * (1 + math.cos(math.pi * progress)) / 2)

    def get_lr(self) -> list[float]:
        """``base_lr * ratio`` per group (0 before the first step, as DeepSpeed)."""
        if self.last_batch_iteration < 0:
            return [0.0 for _ in self.base_lrs]
        ratio = self._ratio()
        return [base * ratio for base in self.base_lrs]


SCHEDULERS = {"WarmupLR": WarmupLR, "WarmupDecayLR": WarmupDecayLR, "WarmupCosineLR": WarmupCosineLR}


def build_scheduler(kind: str, params: dict, optimizer: Any) -> WarmupLR:
    """The scheduler named by the config's ``scheduler.type`` with its validated ``params``."""
    return SCHEDULERS[kind](optimizer, **params)
