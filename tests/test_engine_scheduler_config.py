"""The ``scheduler`` section's bounds, as DeepSpeed 0.19.8's scheduler classes take them.

The expected rates were printed by DeepSpeed 0.19.8 (/tmp/peers-venv, ``DS_ACCELERATOR=cpu``):
``deepspeed.runtime.lr_schedules.WarmupDecayLR(torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.01),
total_num_steps=1, warmup_num_steps=1, warmup_max_lr=0.01)``, ``get_last_lr()[0]`` before and after each of
three ``optimizer.step(); scheduler.step()``. With ``warmup_num_steps=0`` DeepSpeed's constructor raises
"warmup_num_steps must be a positive integer, got 0".
"""

import pytest
import torch
from engine_common import config_with

from megatron_core.engine import load_config
from megatron_core.engine.lr_schedules import build_scheduler
from megatron_core.errors import ConfigError

DEEPSPEED_ONE_STEP_LRS = [0.0, 0.0, 0.01, 0.0]


def _lrs(scheduler_section):
    optimizer = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.01)
    scheduler = build_scheduler(scheduler_section.type, scheduler_section.params, optimizer)
    lrs = [scheduler.get_last_lr()[0]]
    for _ in range(3):
        optimizer.step()
        scheduler.step()
        lrs.append(scheduler.get_last_lr()[0])
    return lrs


def test_one_step_of_warmup_and_one_in_total_are_deepspeeds_smallest():
    """``warmup_num_steps`` and ``total_num_steps`` of 1 are accepted and give DeepSpeed's rates."""
    params = {"total_num_steps": 1, "warmup_num_steps": 1, "warmup_max_lr": 0.01}
    config = load_config(config_with(scheduler={"type": "WarmupDecayLR", "params": params}), dp_size=2)
    assert _lrs(config.scheduler) == pytest.approx(DEEPSPEED_ONE_STEP_LRS, abs=1e-15)


@pytest.mark.parametrize("kind", ["WarmupLR", "WarmupDecayLR", "WarmupCosineLR"])
def test_zero_warmup_steps_is_refused_as_deepspeed_refuses_it(kind):
    """DeepSpeed's warmup schedulers raise for ``warmup_num_steps=0``; here one line naming the key."""
    params = {"warmup_num_steps": 0, **({} if kind == "WarmupLR" else {"total_num_steps": 10})}
    with pytest.raises(ConfigError) as info:
        load_config(config_with(scheduler={"type": kind, "params": params}), dp_size=2)
    assert str(info.value) == "DeepSpeed config: scheduler.params.warmup_num_steps must be > 0, got 0"


@pytest.mark.parametrize("missing", ["cycle_min_lr", "cycle_max_lr"])
def test_one_cycle_requires_both_bounds(missing):
    """DeepSpeed's OneCycle has no default for either bound; a missing one is one line, not a TypeError."""
    params = {"cycle_min_lr": 0.001, "cycle_max_lr": 0.01}
    del params[missing]
    with pytest.raises(ConfigError) as info:
        load_config(config_with(scheduler={"type": "OneCycle", "params": params}), dp_size=2)
    assert str(info.value) == f"DeepSpeed config: scheduler.params.{missing} is required by OneCycle"


# DeepSpeed 0.19.8 (/tmp/peers-venv): WarmupLR / WarmupDecayLR(total_num_steps=6) over torch.optim.SGD with two
# param groups, warmup_min_lr=[0.0, 0.0005], warmup_max_lr=[0.001, 0.002], warmup_num_steps=3, warmup_type
# "linear": get_last_lr() before and after each of five optimizer.step(); scheduler.step().
DEEPSPEED_PER_GROUP_WARMUP = {
    "WarmupLR": [[0.0, 0.0005], [0.0, 0.0005], [0.0003333333333333333, 0.001], [0.0006666666666666666, 0.0015],
                 [0.001, 0.002], [0.001, 0.002]],
    "WarmupDecayLR": [[0.0, 0.0005], [0.0, 0.0005], [0.0003333333333333333, 0.001], [0.0006666666666666666, 0.0015],
                      [0.001, 0.002], [0.0006666666666666666, 0.0015]],
}


@pytest.mark.parametrize("kind", sorted(DEEPSPEED_PER_GROUP_WARMUP))
def test_warmup_bounds_may_be_one_per_param_group(kind):
    """docs/engine.md: 'a per-group value may be a list, one per param group', as DeepSpeed's _format_param; for
    WarmupLR and WarmupDecayLR it was 'scheduler.params.warmup_min_lr must be float, got [0.0, 0.0005]'."""
    params = {"warmup_min_lr": [0.0, 0.0005], "warmup_max_lr": [0.001, 0.002], "warmup_num_steps": 3,
              "warmup_type": "linear", **({"total_num_steps": 6} if kind == "WarmupDecayLR" else {})}
    section = load_config(config_with(scheduler={"type": kind, "params": params}), dp_size=2).scheduler
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD([{"params": [model.weight]}, {"params": [model.bias]}], lr=0.01)
    scheduler = build_scheduler(section.type, section.params, optimizer)
    lrs = [scheduler.get_last_lr()]
    for _ in range(5):
        optimizer.step()
        scheduler.step()
        lrs.append(scheduler.get_last_lr())
    assert lrs == [pytest.approx(row, abs=1e-15) for row in DEEPSPEED_PER_GROUP_WARMUP[kind]]
