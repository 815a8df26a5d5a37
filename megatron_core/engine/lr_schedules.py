"""DeepSpeed's ``WarmupLR``, ``WarmupDecayLR``, ``WarmupCosineLR``, ``LRRangeTest`` and ``OneCycle`` over the
library optimizer's param groups.

Megatron's ``OptimizerParamScheduler`` counts samples and warms up linearly from ``init_lr``;
DeepSpeed's schedules count optimizer steps from ``last_batch_iteration = -1`` and warm up
logarithmically by default, so they get this small module (formulas from
``deepspeed/runtime/lr_schedules.py``, https://deepspeed.readthedocs.io/en/latest/schedulers.html):

- warmup, step t < W = max(2, warmup_num_steps): gamma = log(t + 1) / log(W) ('log') or t / W ('linear');
- WarmupLR: lr = min_lr + (max_lr - min_lr) * gamma, then max_lr;
- WarmupDecayLR: after warmup gamma = max(0, (T - t) / max(1, T - W)) with T = total_num_steps;
- WarmupCosineLR: lr = base_lr * ratio, ratio = warmup_min_ratio + (1 - warmup_min_ratio) * gamma
  in warmup, then cos_min_ratio + (1 - cos_min_ratio) * (1 + cos(pi * min(1, (t - W + 1) / max(1, T - W)))) / 2.
- LRRangeTest (Smith 2018, arXiv:1803.09820): lr = min_lr * (1 + step_rate * i), i = (t + 1) / step_size
  (floored with ``lr_range_test_staircase``);
- OneCycle (same paper): one cycle from ``cycle_min_lr`` up to ``cycle_max_lr`` over ``cycle_first_step_size``
  steps and back over ``cycle_second_step_size``, Adam's beta1 cycled the opposite way between ``cycle_max_mom``
  and ``cycle_min_mom``; then lr = min_lr / (1 + decay_lr_rate * k / decay_step_size) and
  beta1 = max_mom * (1 + decay_mom_rate * k / decay_step_size) after k more steps (:class:`OneCycle`).

The engine calls :meth:`step` after each successful optimizer step (not after a skipped fp16 step).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

from megatron_core.errors import ConfigError


class WarmupLR:
    """Warm up from ``warmup_min_lr`` to ``warmup_max_lr`` over ``warmup_num_steps`` steps, then stay."""

    def __init__(
        self,
        optimizer: Any,
        warmup_min_lr: float | list[float] = 0.0,
        warmup_max_lr: float | list[float] = 0.001,
        warmup_num_steps: int = 1000,
        warmup_type: str = "log",
        last_batch_iteration: int = -1,
    ) -> None:
        self.optimizer = optimizer
        # One rate for every param group, or one per group (DeepSpeed's _format_param).
        self.min_lrs = per_group(warmup_min_lr, optimizer.param_groups, "warmup_min_lr")
        self.max_lrs = per_group(warmup_max_lr, optimizer.param_groups, "warmup_max_lr")
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
            return list(self.min_lrs)
        gamma = self._gamma()
        return [low + (high - low) * gamma for low, high in zip(self.min_lrs, self.max_lrs, strict=True)]

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
        warmup_min_lr: float | list[float] = 0.0,
        warmup_max_lr: float | list[float] = 0.001,
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


def per_group(value: Any, groups: list[dict], name: str) -> list[float]:
    """``value`` for every param group: one number for all, or a list with one per group (DeepSpeed's
    ``_format_param``). Raises ConfigError naming ``scheduler.params.<name>`` for a list of another length."""
    if isinstance(value, (list, tuple)):
        if len(value) != len(groups):
            raise ConfigError(f"DeepSpeed config: scheduler.params.{name} has {len(value)} values for the optimizer's "
                              f"{len(groups)} param groups; give one number or one per group")
        return [float(v) for v in value]
    return [float(value)] * len(groups)


class _BatchSchedule:
    """What DeepSpeed's ``LRRangeTest`` and ``OneCycle`` share: the step counter, its checkpoint and ``get_last_lr``.

    As DeepSpeed's, the rates are written at construction only when starting (``last_batch_iteration == -1``),
    and ``load_state_dict`` restores the counter alone (the checkpoint's param groups hold the rates)."""

    optimizer: Any
    last_batch_iteration: int

    def get_lr(self) -> list[float]:
        raise NotImplementedError

    def get_last_lr(self) -> list[float]:
        """The rates last written into the param groups."""
        return [group["lr"] for group in self.optimizer.param_groups]

    def step(self, batch_iteration: int | None = None) -> None:
        """Advance one optimizer step (or jump to ``batch_iteration``) and set the rates."""
        self.last_batch_iteration = self.last_batch_iteration + 1 if batch_iteration is None else batch_iteration
        for group, lr in zip(self.optimizer.param_groups, self.get_lr(), strict=True):
            group["lr"] = lr

    def state_dict(self) -> dict:
        """``{'last_batch_iteration': t}``, as DeepSpeed saves it."""
        return {"last_batch_iteration": self.last_batch_iteration}

    def load_state_dict(self, state: dict) -> None:
        """Resume at the saved step."""
        self.last_batch_iteration = int(state["last_batch_iteration"])


class LRRangeTest(_BatchSchedule):
    """DeepSpeed's learning-rate range test: grow the rate from ``lr_range_test_min_lr`` by
    ``lr_range_test_step_rate`` x ``lr_range_test_min_lr`` every ``lr_range_test_step_size`` steps."""

    def __init__(
        self,
        optimizer: Any,
        lr_range_test_min_lr: float | list[float] = 1e-3,
        lr_range_test_step_size: int = 2000,
        lr_range_test_step_rate: float = 1.0,
        lr_range_test_staircase: bool = False,
        last_batch_iteration: int = -1,
    ) -> None:
        self.optimizer = optimizer
        self.min_lrs = per_group(lr_range_test_min_lr, optimizer.param_groups, "lr_range_test_min_lr")
        self.step_size, self.step_rate = int(lr_range_test_step_size), float(lr_range_test_step_rate)
        self.staircase = bool(lr_range_test_staircase)
        self.last_batch_iteration = last_batch_iteration
        if last_batch_iteration == -1:
            for group, lr in zip(optimizer.param_groups, self.min_lrs, strict=True):
                group["lr"] = lr

    def get_lr(self) -> list[float]:
        """``min_lr * (1 + step_rate * interval)`` per group."""
        interval = (self.last_batch_iteration + 1) / self.step_size
        if self.staircase:
            interval = math.floor(interval)
        return [lr * (1 + self.step_rate * interval) for lr in self.min_lrs]


class OneCycle(_BatchSchedule):
    """DeepSpeed's 1Cycle: the rate cycles once between ``cycle_min_lr`` and ``cycle_max_lr`` (and Adam's beta1
    inversely between ``cycle_max_mom`` and ``cycle_min_mom``), then decays; DeepSpeed's names and defaults.

    As DeepSpeed 0.19.8 (``deepspeed/runtime/lr_schedules.py``): momentum is cycled only for optimizers with
    ``betas`` (Adam / AdamW; SGD keeps its momentum, with a warning), beta2 is set to 0.99 while cycling, the
    post-cycle momentum decay multiplies beta1 by ``1 + decay_mom_rate * k / decay_step_size`` (it grows), and a
    stair count holds the values flat over that many equal stairs of a half cycle.
    """

    def __init__(
        self,
        optimizer: Any,
        cycle_min_lr: float | list[float],
        cycle_max_lr: float | list[float],
        decay_lr_rate: float = 0.0,
        cycle_first_step_size: float = 2000,
        cycle_second_step_size: float | None = None,
        cycle_first_stair_count: int = 0,
        cycle_second_stair_count: int | None = None,
        decay_step_size: float = 0,
        cycle_momentum: bool = True,
        cycle_min_mom: float | list[float] = 0.8,
        cycle_max_mom: float | list[float] = 0.9,
        decay_mom_rate: float = 0.0,
        last_batch_iteration: int = -1,
    ) -> None:
        self.optimizer = optimizer
        groups = optimizer.param_groups
        self.first_step_size = float(cycle_first_step_size)
        second = cycle_second_step_size
        self.second_step_size = self.first_step_size if second is None else float(second)
        self.total_size = self.first_step_size + self.second_step_size
        self.step_ratio = self.first_step_size / self.total_size
        self.first_stair_count = int(cycle_first_stair_count)
        self.second_stair_count = self.first_stair_count if cycle_second_stair_count is None \
            else int(cycle_second_stair_count)
        self.decay_step_size = float(decay_step_size)
        self.min_lrs = per_group(cycle_min_lr, groups, "cycle_min_lr")
        self.max_lrs = per_group(cycle_max_lr, groups, "cycle_max_lr")
        self.decay_lr_rate, self.decay_mom_rate = float(decay_lr_rate), float(decay_mom_rate)
        no_decay = math.isclose(self.decay_step_size, 0)
        self.skip_lr_decay = no_decay or math.isclose(self.decay_lr_rate, 0)
        self.skip_mom_decay = no_decay or math.isclose(self.decay_mom_rate, 0)
        self.min_moms = per_group(cycle_min_mom, groups, "cycle_min_mom")
        self.max_moms = per_group(cycle_max_mom, groups, "cycle_max_mom")
        self.cycle_momentum = bool(cycle_momentum) and all("betas" in group for group in groups)
        if cycle_momentum and not self.cycle_momentum:
            warnings.warn("scheduler OneCycle: cycle_momentum is off because the optimizer has no betas (SGD), as "
                          "in DeepSpeed", stacklevel=2)
        self.last_batch_iteration = last_batch_iteration
        if last_batch_iteration == -1:
            for i, group in enumerate(groups):
                group["lr"] = self.min_lrs[i]
                if self.cycle_momentum:
                    group["betas"] = (self.min_moms[i], 0.99)

    def _scale_factor(self) -> float:
        """Where the step sits in the cycle: 0 at ``cycle_min_lr``, 1 at ``cycle_max_lr`` (DeepSpeed's formula)."""
        t = self.last_batch_iteration + 1
        x = 1.0 + t / self.total_size - math.floor(1 + t / self.total_size)
        if x <= self.step_ratio:
            scale, stairs = x / self.step_ratio, self.first_stair_count
        else:
            scale, stairs = (x - 1) / (self.step_ratio - 1), self.second_stair_count
        if stairs > 0:  # from the integer position, as DeepSpeed: a float scale just under a stair floors low
            position = t % self.total_size
            if position <= self.first_step_size:
                stair = position * stairs / self.first_step_size
            else:
                stair = (self.total_size - position) * stairs / self.second_step_size
            scale = math.floor(stair) / stairs
        return scale

    def get_lr(self) -> list[float]:
        """The rate of every param group at the current step."""
        if self.last_batch_iteration < self.total_size:
            scale = self._scale_factor()
            return [low + (high - low) * scale for low, high in zip(self.min_lrs, self.max_lrs, strict=True)]
        if self.skip_lr_decay:
            return list(self.min_lrs)
        factor = 1 + self.decay_lr_rate * (self.last_batch_iteration - self.total_size + 1) / self.decay_step_size
        return [low / factor for low in self.min_lrs]

    def get_mom(self) -> list[tuple[float, float]] | None:
        """Adam's ``betas`` of every param group at the current step; None without momentum cycling."""
        if not self.cycle_momentum:
            return None
        if self.last_batch_iteration < self.total_size:
            scale = self._scale_factor()
            return [(high - (high - low) * scale, 0.99) for low, high in zip(self.min_moms, self.max_moms, strict=True)]
        if self.skip_mom_decay:
            return [(high, 0.99) for high in self.max_moms]
        factor = 1 + self.decay_mom_rate * (self.last_batch_iteration - self.total_size + 1) / self.decay_step_size
        return [(high * factor, 0.99) for high in self.max_moms]

    def step(self, batch_iteration: int | None = None) -> None:
        """Advance one optimizer step (or jump to ``batch_iteration``); set the rates and, cycling, the betas."""
        super().step(batch_iteration)
        for group, betas in zip(self.optimizer.param_groups, self.get_mom() or [], strict=False):
            group["betas"] = betas


SCHEDULERS: dict[str, Any] = {"WarmupLR": WarmupLR, "WarmupDecayLR": WarmupDecayLR, "WarmupCosineLR": WarmupCosineLR,
                              "LRRangeTest": LRRangeTest, "OneCycle": OneCycle}


def build_scheduler(kind: str, params: dict, optimizer: Any) -> Any:
    """The scheduler named by the config's ``scheduler.type`` with its validated ``params``. Raises ConfigError."""
    return SCHEDULERS[kind](optimizer, **params)
