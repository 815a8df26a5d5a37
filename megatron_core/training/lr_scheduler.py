"""Learning-rate and weight-decay schedule, as Megatron-LM's ``OptimizerParamScheduler``.

Steps are counted in samples (the trainer calls ``step(global_batch_size)`` after each
successful iteration), so a ramped-up batch advances the schedule by what it consumed.
Warmup is linear from ``init_lr`` to ``max_lr``; then the rate stays constant or decays
(linear, cosine, inverse square root) to ``min_lr`` at ``lr_decay_steps`` and stays there. WSD
(warmup-stable-decay) holds ``max_lr`` until the last ``wsd_decay_steps`` of the decay and anneals over
those (exponential, linear, cosine or minus-sqrt), as Megatron-LM's ``lr_decay_style="WSD"``.

A param group carrying its own ``max_lr``/``min_lr`` follows the same schedule between those bounds
(Megatron-LM's ``get_lr(param_group)``): the ``--decoupled-lr`` group of the embedding and output weights,
tagged ``is_decoupled_lr``. Its bounds are saved with the schedule as ``decoupled_lr``/``decoupled_min_lr``
and checked on resume like ``max_lr``/``min_lr``.
"""
from __future__ import annotations

import math
from typing import Any

from megatron_core.training.errors import ConfigError

DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root", "WSD")
WSD_DECAY_STYLES = ("exponential", "linear", "cosine", "minus_sqrt")
WD_INCR_STYLES = ("constant", "linear", "cosine")


class OptimizerParamScheduler:
    """Sets ``lr`` and ``weight_decay`` of every optimizer param group from the step count."""

    def __init__(self, optimizer: Any, init_lr: float, max_lr: float, min_lr: float, lr_warmup_steps: float,
                 lr_decay_steps: float, lr_decay_style: str, start_wd: float, end_wd: float, wd_incr_steps: float,
                 wd_incr_style: str = "constant", use_checkpoint_opt_param_scheduler: bool = False,
                 override_opt_param_scheduler: bool = False, wsd_decay_steps: float | None = None,
                 lr_wsd_decay_style: str = "exponential") -> None:
        if lr_decay_style not in DECAY_STYLES:
            raise ConfigError(f"--lr-decay-style {lr_decay_style!r}: choose one of {', '.join(DECAY_STYLES)}")
        if lr_decay_style == "WSD":
            _check_wsd(wsd_decay_steps, lr_wsd_decay_style, lr_decay_steps)
        if wd_incr_style not in WD_INCR_STYLES:
            raise ConfigError(f"--weight-decay-incr-style {wd_incr_style!r}: choose one of {', '.join(WD_INCR_STYLES)}")
        if not 0.0 <= min_lr <= max_lr:
            raise ConfigError(f"need 0 <= --min-lr ({min_lr}) <= --lr ({max_lr})")
        if lr_decay_style != "constant" and lr_decay_steps <= 0:
            raise ConfigError(f"the learning-rate decay covers {lr_decay_steps} samples; give --lr-decay-iters "
                              f"(or --lr-decay-samples) > 0, or --lr-decay-style constant")
        if lr_warmup_steps < 0:
            raise ConfigError(f"learning-rate warmup must be >= 0 samples, got {lr_warmup_steps}")
        if use_checkpoint_opt_param_scheduler and override_opt_param_scheduler:
            raise ConfigError("give only one of --use-checkpoint-opt-param-scheduler and "
                              "--override-opt-param-scheduler")
        self.optimizer = optimizer
        self.init_lr, self.max_lr, self.min_lr = float(init_lr), float(max_lr), float(min_lr)
        self.lr_warmup_steps, self.lr_decay_steps = lr_warmup_steps, lr_decay_steps
        self.lr_decay_style = lr_decay_style
        self.wsd_decay_steps, self.lr_wsd_decay_style = wsd_decay_steps, lr_wsd_decay_style
        self.start_wd, self.end_wd = float(start_wd), float(end_wd)
        self.wd_incr_steps, self.wd_incr_style = wd_incr_steps, wd_incr_style
        self.use_checkpoint_opt_param_scheduler = use_checkpoint_opt_param_scheduler
        self.override_opt_param_scheduler = override_opt_param_scheduler
        self.decoupled_lr, self.decoupled_min_lr = _decoupled_bounds(optimizer)
        self.num_steps = 0
        for group in getattr(optimizer, "param_groups", []):
            # A group built without weight decay (biases, norms) keeps none, as Megatron-LM's wd_mult 0.
            group.setdefault("wd_mult", 0.0 if group.get("weight_decay", 1.0) == 0.0 else 1.0)
        self.step(0)

    # ---- the schedule -------------------------------------------------------------------------
    def get_wd(self) -> float:
        """Weight decay at the current step."""
        if self.num_steps > self.wd_incr_steps or self.wd_incr_style == "constant":
            return self.end_wd
        ratio = self.num_steps / self.wd_incr_steps
        coeff = ratio if self.wd_incr_style == "linear" else 0.5 * (math.cos(math.pi * (1 - ratio)) + 1.0)
        return self.start_wd + coeff * (self.end_wd - self.start_wd)

    def get_lr(self, param_group: dict | None = None) -> float:
        """Learning rate at the current step (a group may carry its own ``max_lr``/``min_lr``)."""
        group = param_group or {}
        max_lr, min_lr = group.get("max_lr", self.max_lr), group.get("min_lr", self.min_lr)
        if self.lr_warmup_steps > 0 and self.num_steps <= self.lr_warmup_steps:
            return self.init_lr + (max_lr - self.init_lr) * self.num_steps / self.lr_warmup_steps
        if self.lr_decay_style == "constant":
            return max_lr
        if self.num_steps > self.lr_decay_steps:
            return min_lr
        if self.lr_decay_style == "inverse-square-root":
            warmup = max(self.lr_warmup_steps, 1)
            return max(min_lr, max_lr * math.sqrt(warmup) / math.sqrt(max(self.num_steps, 1)))
        if self.lr_decay_style == "WSD":
            return min_lr + self._wsd_coeff() * (max_lr - min_lr)
        decay_ratio = (self.num_steps - self.lr_warmup_steps) / (self.lr_decay_steps - self.lr_warmup_steps)
        if self.lr_decay_style == "linear":
            coeff = 1.0 - decay_ratio
        else:  # cosine
            coeff = 0.5 * (math.cos(math.pi * decay_ratio) + 1.0)
        return min_lr + coeff * (max_lr - min_lr)

    def _wsd_coeff(self) -> float:
        """1 in the stable phase, then Megatron-LM's anneal over the last ``wsd_decay_steps`` of the decay."""
        assert self.wsd_decay_steps is not None
        anneal_start = self.lr_decay_steps - self.wsd_decay_steps
        if self.num_steps <= anneal_start:
            return 1.0
        ratio = (self.num_steps - anneal_start) / self.wsd_decay_steps
        if self.lr_wsd_decay_style == "linear":
            return 1.0 - ratio
        if self.lr_wsd_decay_style == "cosine":
            return 0.5 * (math.cos(math.pi * ratio) + 1.0)
        if self.lr_wsd_decay_style == "minus_sqrt":
            return 1.0 - math.sqrt(ratio)
        return 2.0 * math.pow(0.5, ratio) - 1.0  # exponential

    def step(self, increment: int) -> None:
        """Advance by ``increment`` samples and write lr / weight decay into the param groups."""
        self.num_steps += increment
        wd = self.get_wd()
        for group in getattr(self.optimizer, "param_groups", []):
            group["lr"] = self.get_lr(group) * group.get("lr_mult", 1.0)
            group["weight_decay"] = wd * group.get("wd_mult", 1.0)

    # ---- checkpoints --------------------------------------------------------------------------
    _SAVED = ("max_lr", "min_lr", "lr_warmup_steps", "lr_decay_steps", "lr_decay_style", "start_wd", "end_wd",
              "wd_incr_steps", "wd_incr_style", "wsd_decay_steps", "lr_wsd_decay_style", "decoupled_lr",
              "decoupled_min_lr")

    def state_dict(self) -> dict[str, Any]:
        """The schedule's settings and position (plain Python values)."""
        state = {name: getattr(self, name) for name in self._SAVED}
        state["num_steps"] = self.num_steps
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at the saved step; settings follow the flags or the checkpoint as Megatron-LM decides.

        By default a setting that differs between the flags and the checkpoint is an error; with
        ``--override-opt-param-scheduler`` the flags win, with ``--use-checkpoint-opt-param-scheduler``
        the checkpoint wins.
        """
        ignored = self._no_effect(state)
        for name in self._SAVED:
            if name in state and name not in ignored:
                setattr(self, name, self._pick(getattr(self, name), state[name], name))
        self._set_decoupled_bounds()
        self.num_steps = 0
        self.step(int(state.get("num_steps", 0)))

    def _no_effect(self, state: dict[str, Any]) -> set[str]:
        """Settings that change nothing when both sides agree on the style: the weight-decay increment
        under constant weight decay, the decay length and floor under a constant learning rate. These
        follow the flags (so extending a run with a larger --train-iters is not refused for them)."""
        ignored = set()
        if self.wd_incr_style == "constant" and state.get("wd_incr_style") == "constant":
            ignored |= {"wd_incr_steps", "start_wd"}
        if self.lr_decay_style == "constant" and state.get("lr_decay_style") == "constant":
            ignored |= {"lr_decay_steps", "min_lr", "decoupled_min_lr"}
        if self.lr_decay_style != "WSD" and state.get("lr_decay_style") != "WSD":
            ignored |= {"wsd_decay_steps", "lr_wsd_decay_style"}
        return ignored

    def _set_decoupled_bounds(self) -> None:
        """Write the chosen decoupled bounds into the tagged group (the optimizer's load restored the saved ones)."""
        groups = [g for g in getattr(self.optimizer, "param_groups", []) if g.get("is_decoupled_lr")]
        if self.decoupled_lr is not None and not groups:
            raise ConfigError(f"the checkpoint's embedding and output layer trained with --decoupled-lr "
                              f"{self.decoupled_lr:g}; add --decoupled-lr {self.decoupled_lr:g} (and its "
                              f"--decoupled-min-lr), or pass --override-opt-param-scheduler to drop it")
        for group in groups:
            if self.decoupled_lr is None:  # the flags' group, the checkpoint's schedule without one
                group.pop("max_lr", None)
                group.pop("min_lr", None)
            else:
                group["max_lr"], group["min_lr"] = self.decoupled_lr, self.decoupled_min_lr

    def _pick(self, ours: Any, saved: Any, name: str) -> Any:
        if self.override_opt_param_scheduler:
            return ours
        if self.use_checkpoint_opt_param_scheduler:
            return saved
        numbers = isinstance(ours, float) and isinstance(saved, (int, float))  # None: no --decoupled-lr
        close = numbers and math.isclose(ours, saved, rel_tol=1e-12)
        if ours != saved and not close:
            raise ConfigError(
                f"the checkpoint's learning-rate schedule has {name} = {_shown(name, saved)} but the flags give "
                f"{_shown(name, ours)}; pass "
                f"--override-opt-param-scheduler to use the flags or --use-checkpoint-opt-param-scheduler to keep "
                f"the checkpoint's")
        return saved


def _shown(name: str, value: Any) -> str:
    """A schedule setting in an error line; the decoupled bounds are None when there is no --decoupled-lr."""
    return "none (no --decoupled-lr)" if value is None and name.startswith("decoupled") else repr(value)


def _decoupled_bounds(optimizer: Any) -> tuple[float | None, float | None]:
    """``(max_lr, min_lr)`` of the group tagged ``is_decoupled_lr`` (``--decoupled-lr``), else ``(None, None)``."""
    for group in getattr(optimizer, "param_groups", []):
        if group.get("is_decoupled_lr"):
            return float(group["max_lr"]), float(group["min_lr"])
    return None, None


def _check_wsd(wsd_decay_steps: float | None, style: str, lr_decay_steps: float) -> None:
    """ConfigError unless the WSD anneal has a style and a length within the decay (Megatron-LM asserts one is set)."""
    if style not in WSD_DECAY_STYLES:
        raise ConfigError(f"--lr-wsd-decay-style {style!r}: choose one of {', '.join(WSD_DECAY_STYLES)}")
    if wsd_decay_steps is None or not 0 < wsd_decay_steps <= lr_decay_steps:
        raise ConfigError(f"--lr-decay-style WSD anneals over {wsd_decay_steps} samples; give --lr-wsd-decay-iters "
                          f"(or --lr-wsd-decay-samples) above 0 and at most the decay's {lr_decay_steps:g} samples")
