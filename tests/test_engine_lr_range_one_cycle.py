"""DeepSpeed's ``OneCycle`` and ``LRRangeTest`` schedulers (``scheduler.type`` in the config), against DeepSpeed itself.

The expected sequences were produced by DeepSpeed 0.19.8 (/tmp/peers-venv, ``DS_ACCELERATOR=cpu``, one gloo
rank): ``deepspeed.initialize(model=torch.nn.Linear(8, 4), model_parameters=model.parameters(), config=...)``
with each scheduler below and the optimizer ``AdamW`` (lr 0.01, betas [0.9, 0.95], ``torch_adam``) or ``SGD``
(lr 0.01, momentum 0.9), then ``engine.get_lr()[0]`` / ``engine.get_mom()[0]`` before the first step and after
each of 11 ``engine.backward(engine(torch.ones(2, 8)).sum()); engine.step()``. The learning rates were the same
under both optimizers; SGD's momentum stayed 0.9 throughout (DeepSpeed cycles only ``betas``).
"""

import warnings

import pytest
import torch
from harness import run_distributed

import megatron_core

SCHEDULERS = {
    "one-cycle": {"type": "OneCycle", "params": {
        "cycle_min_lr": 0.001, "cycle_max_lr": 0.01, "cycle_first_step_size": 3, "cycle_second_step_size": 2,
        "decay_lr_rate": 0.5, "decay_step_size": 2, "cycle_min_mom": 0.85, "cycle_max_mom": 0.95,
        "decay_mom_rate": 0.1}},
    "one-cycle-stairs": {"type": "OneCycle", "params": {
        "cycle_min_lr": 0.002, "cycle_max_lr": 0.006, "cycle_first_step_size": 4, "cycle_first_stair_count": 2}},
    # decay rates without decay_step_size: DeepSpeed's default step size 0 means no decay after the cycle
    "one-cycle-no-decay-step": {"type": "OneCycle", "params": {
        "cycle_min_lr": 0.001, "cycle_max_lr": 0.01, "cycle_first_step_size": 2, "decay_lr_rate": 0.5,
        "decay_mom_rate": 0.1, "cycle_min_mom": 0.85, "cycle_max_mom": 0.95}},
    "range-test": {"type": "LRRangeTest", "params": {
        "lr_range_test_min_lr": 0.001, "lr_range_test_step_size": 3, "lr_range_test_step_rate": 2.0}},
    "range-test-stairs": {"type": "LRRangeTest", "params": {
        "lr_range_test_min_lr": 0.001, "lr_range_test_step_size": 3, "lr_range_test_staircase": True}},
}
DEEPSPEED_LRS = {
    "one-cycle": [0.001, 0.004, 0.006999999999999999, 0.009999999999999998, 0.0055, 0.001, 0.0008,
                  0.0006666666666666666, 0.0005714285714285715, 0.0005, 0.00044444444444444447, 0.0004],
    "one-cycle-stairs": [0.002, 0.002, 0.004, 0.004, 0.006, 0.004, 0.004, 0.002, 0.002, 0.002, 0.002, 0.002],
    "one-cycle-no-decay-step": [0.001, 0.0055000000000000005, 0.010000000000000002, 0.0055000000000000005]
    + [0.001] * 8,
    "range-test": [0.001, 0.0016666666666666666, 0.002333333333333333, 0.003, 0.0036666666666666666,
                   0.004333333333333334, 0.005, 0.005666666666666667, 0.006333333333333333, 0.007,
                   0.007666666666666667, 0.008333333333333331],
    "range-test-stairs": [0.001, 0.001, 0.001, 0.002, 0.002, 0.002, 0.003, 0.003, 0.003, 0.004, 0.004, 0.004],
}
# Adam's beta1 under DeepSpeed (beta2 was 0.99 throughout under OneCycle, the config's 0.95 under LRRangeTest).
DEEPSPEED_BETA1 = {
    "one-cycle": [0.85, 0.9166666666666666, 0.8833333333333333, 0.85, 0.9, 0.95, 0.9974999999999999, 1.045,
                  1.0924999999999998, 1.14, 1.1875, 1.2349999999999999],
    "one-cycle-stairs": [0.8, 0.9, 0.8500000000000001, 0.8500000000000001, 0.8, 0.8500000000000001,
                         0.8500000000000001, 0.9, 0.9, 0.9, 0.9, 0.9],
    "one-cycle-no-decay-step": [0.85, 0.8999999999999999, 0.85, 0.8999999999999999] + [0.95] * 8,
    "range-test": [0.9] * 12,
    "range-test-stairs": [0.9] * 12,
}
OPTIMIZERS = {"adam": {"type": "AdamW", "params": {"lr": 0.01, "betas": [0.9, 0.95]}},
              "sgd": {"type": "SGD", "params": {"lr": 0.01, "momentum": 0.9}}}


def _schedule(name, optimizer):
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    config = {"train_micro_batch_size_per_gpu": 2, "optimizer": OPTIMIZERS[optimizer], "scheduler": SCHEDULERS[name],
              "steps_per_print": 10**6}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine, _, _, _ = megatron_core.initialize(model, model_parameters=model.parameters(), config=config)
    lrs, moms = [engine.get_lr()[0]], [engine.get_mom()[0]]
    for _ in range(11):
        engine.backward(engine(torch.ones(2, 8)).sum())
        engine.step()
        lrs.append(engine.get_lr()[0])
        moms.append(engine.get_mom()[0])
    engine.parallel_state.destroy()
    return lrs, moms, [str(w.message) for w in caught if "cycle_momentum" in str(w.message)]


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_schedule_follows_deepspeed(name):
    """``OneCycle`` and ``LRRangeTest`` were refused ("a DeepSpeed scheduler this framework does not implement").
    Their rates, and under OneCycle Adam's betas, step for step as DeepSpeed's engine sets them."""
    one_cycle = name.startswith("one-cycle")
    lrs, moms, warned = run_distributed(_schedule, 1, name, "adam", timeout=60)[0]
    assert lrs == pytest.approx(DEEPSPEED_LRS[name], rel=1e-12) and not warned
    assert [m[0] for m in moms] == pytest.approx(DEEPSPEED_BETA1[name], rel=1e-12)
    assert {m[1] for m in moms} == {0.99 if one_cycle else 0.95}
    lrs, moms, warned = run_distributed(_schedule, 1, name, "sgd", timeout=60)[0]
    assert lrs == pytest.approx(DEEPSPEED_LRS[name], rel=1e-12) and set(moms) == {0.9}
    assert len(warned) == one_cycle  # DeepSpeed logs that it does not cycle SGD's momentum


def _per_group_mismatch():
    model = torch.nn.Linear(8, 4)
    scheduler = {"type": "OneCycle", "params": {"cycle_min_lr": [0.001, 0.002], "cycle_max_lr": 0.01}}
    config = {"train_micro_batch_size_per_gpu": 2, "optimizer": OPTIMIZERS["adam"], "scheduler": scheduler}
    megatron_core.initialize(model, config=config)


def test_per_group_values_must_match_the_groups():
    """A list gives one value per param group, as DeepSpeed's ``_format_param``; another length is one line."""
    with pytest.raises(Exception, match="scheduler.params.cycle_min_lr has 2 values for the optimizer's 1 param "
                                        "groups; give one number or one per group"):
        run_distributed(_per_group_mismatch, 1, timeout=60)


def test_one_cycle_built_directly_keeps_deepspeeds_defaults():
    """A client may build the class itself and pass it as ``lr_scheduler`` (as with DeepSpeed's class): its
    defaults are DeepSpeed's, here ``decay_step_size=0`` (no decay after the cycle whatever the decay rates)."""
    from megatron_core.engine.lr_schedules import OneCycle

    params = dict(SCHEDULERS["one-cycle-no-decay-step"]["params"])
    optimizer = torch.optim.AdamW(torch.nn.Linear(8, 4).parameters(), lr=0.01, betas=(0.9, 0.95))
    scheduler = OneCycle(optimizer, **params)
    lrs, beta1 = [scheduler.get_last_lr()[0]], [optimizer.param_groups[0]["betas"][0]]
    for _ in range(11):
        scheduler.step()
        lrs.append(scheduler.get_last_lr()[0])
        beta1.append(optimizer.param_groups[0]["betas"][0])
    assert lrs == pytest.approx(DEEPSPEED_LRS["one-cycle-no-decay-step"], rel=1e-12)
    assert beta1 == pytest.approx(DEEPSPEED_BETA1["one-cycle-no-decay-step"], rel=1e-12)
