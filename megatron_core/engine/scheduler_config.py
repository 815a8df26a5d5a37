"""The DeepSpeed config's ``scheduler`` section: its type, and its ``params`` validated with DeepSpeed's defaults.

DeepSpeed passes ``scheduler.params`` to the scheduler class as keyword arguments, so the keys are the
constructor arguments of ``deepspeed/runtime/lr_schedules.py`` (0.19.8) and the defaults are theirs;
:mod:`megatron_core.engine.lr_schedules` implements the classes. A missing required key (``total_num_steps``,
``cycle_min_lr``, ``cycle_max_lr``), an unknown key or a value of the wrong kind is one ConfigError line.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from megatron_core.engine.config_keys import check_keys, choice, number_at_least, typed, where
from megatron_core.errors import ConfigError

_WARMUP = {"warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "warmup_type", "last_batch_iteration"}
_ONE_CYCLE = {
    "cycle_min_lr", "cycle_max_lr", "decay_lr_rate", "cycle_first_step_size", "cycle_second_step_size",
    "cycle_first_stair_count", "cycle_second_stair_count", "decay_step_size", "cycle_momentum", "cycle_min_mom",
    "cycle_max_mom", "decay_mom_rate", "last_batch_iteration",
}
SCHEDULER_PARAMS: dict[str, set[str]] = {
    "WarmupLR": _WARMUP,
    "WarmupDecayLR": _WARMUP | {"total_num_steps"},
    "WarmupCosineLR": {"total_num_steps", "warmup_min_ratio", "warmup_num_steps", "cos_min_ratio", "warmup_type",
                       "last_batch_iteration"},
    "LRRangeTest": {"lr_range_test_min_lr", "lr_range_test_step_size", "lr_range_test_step_rate",
                    "lr_range_test_staircase", "last_batch_iteration"},
    "OneCycle": _ONE_CYCLE,
}
SCHEDULER_TYPES = tuple(SCHEDULER_PARAMS)
PATH = "scheduler.params"


@dataclasses.dataclass
class SchedulerSection:
    """``scheduler``: one of :data:`SCHEDULER_TYPES` and its ``params`` (DeepSpeed's defaults filled in)."""

    type: str
    params: dict[str, Any]


def _required(params: dict, key: str, kind: str) -> None:
    if key not in params:
        raise ConfigError(f"DeepSpeed config: {PATH}.{key} is required by {kind}")


def _per_group_number(params: dict, key: str, default: Any) -> Any:
    """A number >= 0, or a list of them (one per optimizer param group, checked when the scheduler is built)."""
    value = params.get(key, default)
    if isinstance(value, list):
        for item in value:
            number_at_least({key: item}, PATH, key, None, 0.0, float)
        return [float(item) for item in value]
    return number_at_least(params, PATH, key, default, 0.0, float)


def _positive(params: dict, key: str, default: Any, kind: type = float) -> Any:
    value = number_at_least(params, PATH, key, default, 0, kind)
    if value is not None and value <= 0:
        raise ConfigError(f"DeepSpeed config: {where(PATH, key)} must be > 0, got {value}")
    return value


def _warmup_params(kind: str, params: dict) -> dict[str, Any]:
    out: dict[str, Any] = {
        # > 0 as DeepSpeed's WarmupLR / WarmupCosineLR ("warmup_num_steps must be a positive integer")
        "warmup_num_steps": _positive(params, "warmup_num_steps", 1000, int),
        "warmup_type": choice(params, PATH, "warmup_type", "log", ("log", "linear")),
    }
    if kind == "WarmupCosineLR":
        out["warmup_min_ratio"] = number_at_least(params, PATH, "warmup_min_ratio", 0.0, 0.0, float)
        out["cos_min_ratio"] = number_at_least(params, PATH, "cos_min_ratio", 0.0001, 0.0, float)
    else:
        out["warmup_min_lr"] = _per_group_number(params, "warmup_min_lr", 0.0)
        out["warmup_max_lr"] = _per_group_number(params, "warmup_max_lr", 0.001)
    if kind != "WarmupLR":
        _required(params, "total_num_steps", kind)
        out["total_num_steps"] = number_at_least(params, PATH, "total_num_steps", None, 1)
    return out


def _range_test_params(params: dict) -> dict[str, Any]:
    return {
        "lr_range_test_min_lr": _per_group_number(params, "lr_range_test_min_lr", 1e-3),
        "lr_range_test_step_size": _positive(params, "lr_range_test_step_size", 2000, int),
        "lr_range_test_step_rate": number_at_least(params, PATH, "lr_range_test_step_rate", 1.0, 0.0, float),
        "lr_range_test_staircase": typed(params, PATH, "lr_range_test_staircase", bool, False),
    }


def _one_cycle_params(params: dict) -> dict[str, Any]:
    _required(params, "cycle_min_lr", "OneCycle")
    _required(params, "cycle_max_lr", "OneCycle")
    out: dict[str, Any] = {
        key: _per_group_number(params, key, default)
        for key, default in (("cycle_min_lr", None), ("cycle_max_lr", None), ("cycle_min_mom", 0.8),
                             ("cycle_max_mom", 0.9))
    }
    out.update(
        decay_lr_rate=number_at_least(params, PATH, "decay_lr_rate", 0.0, 0.0, float),
        decay_mom_rate=number_at_least(params, PATH, "decay_mom_rate", 0.0, 0.0, float),
        cycle_first_step_size=_positive(params, "cycle_first_step_size", 2000.0),
        cycle_second_step_size=number_at_least(params, PATH, "cycle_second_step_size", None, 0.0, float),
        cycle_first_stair_count=number_at_least(params, PATH, "cycle_first_stair_count", 0, 0),
        cycle_second_stair_count=number_at_least(params, PATH, "cycle_second_stair_count", None, 0),
        decay_step_size=number_at_least(params, PATH, "decay_step_size", 0.0, 0.0, float),
        cycle_momentum=typed(params, PATH, "cycle_momentum", bool, True),
    )
    return out


def scheduler_section(raw: dict | None) -> SchedulerSection | None:
    """The validated ``scheduler`` section (None when the config has none). Raises ConfigError."""
    if raw is None:
        return None
    check_keys(raw, "scheduler", {"type", "params"}, {})
    kind = typed(raw, "scheduler", "type", str, None)
    if kind not in SCHEDULER_PARAMS:
        raise ConfigError(
            f"DeepSpeed config: scheduler.type {kind!r} is unknown; use one of {', '.join(SCHEDULER_TYPES)}"
        )
    params = raw.get("params", {})
    check_keys(params, PATH, SCHEDULER_PARAMS[kind], {})
    if kind == "LRRangeTest":
        out = _range_test_params(params)
    elif kind == "OneCycle":
        out = _one_cycle_params(params)
    else:
        out = _warmup_params(kind, params)
    out["last_batch_iteration"] = number_at_least(params, PATH, "last_batch_iteration", -1, -1)
    return SchedulerSection(kind, out)
