"""Client optimizers and schedulers as DeepSpeed users and Hugging Face's Trainer build them.

``sched = LambdaLR(opt, ...); initialize(model, optimizer=opt, lr_scheduler=sched, ...)``: DeepSpeed 0.19.8
steps the client optimizer's own param groups (at ZeRO-0 the client optimizer itself, at ZeRO-1/2/3 its groups
rewritten in place), so the scheduler's rates are the ones trained with. The engine trains with the library
optimizer; its groups must be the ones the scheduler and the user's ``opt.param_groups`` edits reach.
A client optimizer's settings the library optimizer would not reproduce (``maximize``) are refused in one line.
Reference: plain PyTorch on one process with the same optimizer and scheduler.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from engine_common import MICRO, global_batch, loss_of, make_model, micro_batch, run_steps, state_of
from harness import run_distributed

import megatron_core
from megatron_core.errors import ConfigError

STEPS = 4


def _schedule(step: int) -> float:
    return 1.0 / (step + 1)


def _reference(manual_lr: bool) -> tuple[list[float], dict]:
    model = make_model("mlp")
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule)
    lrs = []
    for step in range(STEPS):
        if manual_lr:
            for group in opt.param_groups:
                group["lr"] = 0.02 / (step + 1)
        lrs.append(opt.param_groups[0]["lr"])
        batch = global_batch("mlp", step, 2 * MICRO)
        loss = sum(loss_of("mlp", model, micro_batch(batch, j)) for j in range(2)) / 2
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if not manual_lr:
            sched.step()
    return lrs, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _engine(stage: int, manual_lr: bool) -> tuple[list[float], list[float], dict, list[str]]:
    model = make_model("mlp")
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    sched = None if manual_lr else torch.optim.lr_scheduler.LambdaLR(opt, _schedule)
    config = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": stage, "reduce_bucket_size": 700}, "steps_per_print": 10**6}
    engine, _, _, _ = megatron_core.initialize(model, optimizer=opt, lr_scheduler=sched, config=config)
    assert engine.optimizer_name() == "AdamW"  # DeepSpeed's: the client optimizer's class name
    lrs = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(STEPS):
            if manual_lr:  # a loop that sets the rate on the optimizer it built
                for group in opt.param_groups:
                    group["lr"] = 0.02 / (step + 1)
            lrs.append(engine.get_lr()[0])
            run_steps("mlp", engine, step, step + 1)
    seen = [str(w.message) for w in caught if "lr_scheduler" in str(w.message)]
    engine.parallel_state.destroy()
    return lrs, [g["lr"] for g in opt.param_groups], state_of(engine), seen


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_scheduler_on_the_client_optimizer_drives_the_rate(stage):
    """Before: the engine kept the client optimizer's first rate (0.01) at every step while the scheduler decayed
    the client optimizer's unused groups; the trained weights were those of a constant rate."""
    lrs, expected = _reference(manual_lr=False)
    assert lrs == pytest.approx([0.01, 0.005, 0.01 / 3, 0.0025], rel=1e-12)
    for got, client_lrs, state, warned in run_distributed(_engine, 2, stage, False, timeout=180):
        assert got == pytest.approx(lrs, rel=1e-12)
        assert client_lrs == pytest.approx([0.01 / (STEPS + 1)], rel=1e-12)
        assert not warned, warned  # torch's "lr_scheduler.step() before optimizer.step()" is false here
        for name, value in expected.items():
            torch.testing.assert_close(state[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_rate_set_on_the_client_optimizer_reaches_the_engine():
    """A loop setting ``lr`` on the optimizer it passed in (DeepSpeed's ZeRO optimizers share its groups)."""
    lrs, expected = _reference(manual_lr=True)
    for got, _, state, _ in run_distributed(_engine, 2, 1, True, timeout=180):
        assert got == pytest.approx(lrs, rel=1e-12)
        for name, value in expected.items():
            torch.testing.assert_close(state[name], value, rtol=1e-5, atol=1e-6, msg=name)


def _client_optimizer_run(make_optimizer):
    model = make_model("mlp")
    engine, _, _, _ = megatron_core.initialize(model, optimizer=make_optimizer(model), config={
        "train_micro_batch_size_per_gpu": MICRO, "steps_per_print": 10**6})
    run_steps("mlp", engine, 0, 2)
    state = state_of(engine)
    engine.parallel_state.destroy()
    return state


def _torch_run(make_optimizer):
    model = make_model("mlp")
    opt = make_optimizer(model)
    for step in range(2):
        opt.zero_grad()
        loss_of("mlp", model, micro_batch(global_batch("mlp", step, MICRO), 0)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _decoupled_adam(model):
    return torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=0.1, decoupled_weight_decay=True)


def test_adam_with_decoupled_weight_decay_is_adamw():
    """torch's ``Adam(decoupled_weight_decay=True)`` is AdamW (torch >= 2.6): trained as plain torch does; before it
    was refused as L2-coupled Adam."""
    expected = _torch_run(_decoupled_adam)
    (state,) = run_distributed(_client_optimizer_run, 1, _decoupled_adam, timeout=120)
    for name, value in expected.items():
        torch.testing.assert_close(state[name], value, rtol=1e-6, atol=1e-7, msg=name)


def _maximizing_sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.1, maximize=True)


def test_maximize_is_refused_in_one_line():
    """Before: ``maximize=True`` was dropped and the engine minimized the loss the client optimizer maximizes."""
    (message,) = run_distributed(_initialize_error, 1, _maximizing_sgd, timeout=120)
    assert message == ("initialize(optimizer=...): maximize=True is not implemented (the engine minimizes the loss); "
                       "drop it and pass the negated objective to engine.backward"), message


def _initialize_error(make_optimizer):
    model = make_model("mlp")
    try:
        megatron_core.initialize(model, optimizer=make_optimizer(model), config={"train_micro_batch_size_per_gpu": 2})
    except ConfigError as exc:
        return str(exc)
    return None
