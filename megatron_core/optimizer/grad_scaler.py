"""Loss scalers for fp16 training: a constant one and a dynamic one with hysteresis."""
from __future__ import annotations

from typing_extensions import override


class ConstantGradScaler:
    """A fixed loss scale (``--loss-scale``)."""

    def __init__(self, scale: float) -> None:
        self.scale = float(scale)

    @property
    def inv_scale(self) -> float:
        """``1 / scale``: multiplies scaled gradients back to true gradients."""
        return 1.0 / self.scale

    def update(self, found_inf: bool) -> None:
        """Adjust the scale after a step; ``found_inf`` says whether the step's gradients overflowed.

        A constant scale ignores it (an overflowing step is skipped by the optimizer either way).
        """

    def state_dict(self) -> dict:
        """The checkpointed scaler state: ``{"scale": float}``."""
        return {"scale": self.scale}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output."""
        self.scale = float(state["scale"])


class DynamicGradScaler(ConstantGradScaler):
    """Grows the scale by ``growth_factor`` after ``growth_interval`` clean steps; backs off after overflows.

    An overflowing step decrements the hysteresis budget; once it is used up (``hysteresis``
    overflows since the last growth) every further overflow multiplies the scale by
    ``backoff_factor``, down to ``min_scale``. A growth restores the budget (Megatron-LM's rule;
    DeepSpeed's ``hysteresis`` / ``delayed_shift`` counts the same way). With ``consecutive_hysteresis``
    (DeepSpeed's fp16 key, its ``DynamicLossScaler``) every step without overflow restores it, so only
    ``hysteresis`` overflows in a row back the scale off. ``deepspeed_window`` counts the growth window as
    DeepSpeed's ``DynamicLossScaler`` does (0.19.8): the first growth after ``growth_interval + 1`` clean steps
    (since the start or the last overflow), then one every ``growth_interval``; Megatron-LM's grows after
    ``growth_interval``.
    """

    def __init__(self, initial_scale: float, min_scale: float, growth_interval: int, hysteresis: int,
                 growth_factor: float = 2.0, backoff_factor: float = 0.5, consecutive_hysteresis: bool = False,
                 deepspeed_window: bool = False) -> None:
        super().__init__(initial_scale)
        self.min_scale, self.growth_interval, self.hysteresis = float(min_scale), growth_interval, hysteresis
        self.consecutive_hysteresis, self.deepspeed_window = consecutive_hysteresis, deepspeed_window
        self.growth_factor, self.backoff_factor = growth_factor, backoff_factor
        self.growth_tracker = 0
        self.hysteresis_tracker = hysteresis

    @override
    def update(self, found_inf: bool) -> None:
        if found_inf:
            self.growth_tracker = 0
            self.hysteresis_tracker -= 1
            if self.hysteresis_tracker <= 0:
                self.scale = max(self.scale * self.backoff_factor, self.min_scale)
            return
        self.growth_tracker += 1  # clean steps since the last overflow (Megatron's: or since the last growth)
        if self.consecutive_hysteresis:
            self.hysteresis_tracker = self.hysteresis
        if self.deepspeed_window:  # DeepSpeed's stable_interval: the clean steps before this one
            grow = self.growth_tracker > 1 and (self.growth_tracker - 1) % self.growth_interval == 0
        else:
            grow = self.growth_tracker == self.growth_interval
            if grow:
                self.growth_tracker = 0
        if grow:
            self.hysteresis_tracker = self.hysteresis
            self.scale *= self.growth_factor

    @override
    def state_dict(self) -> dict:
        return {"scale": self.scale, "growth_tracker": self.growth_tracker,
                "hysteresis_tracker": self.hysteresis_tracker}

    @override
    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self.growth_tracker = int(state["growth_tracker"])
        self.hysteresis_tracker = int(state["hysteresis_tracker"])
