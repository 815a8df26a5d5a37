"""The user's own accumulation boundary, as DeepSpeed's engine allows it: ``set_gradient_accumulation_boundary``
(Accelerate's ``DeepSpeedEngineWrapper`` and many RLHF loops set it before every backward and call ``step()``
once) and the ``no_sync()`` context (backwards inside it never reduce over DP).

Equivalence: three micro batches per rank at DP 2 accumulated either way give the parameters of the usual
loop with ``gradient_accumulation_steps`` 3.
"""

import pytest
import torch
from engine_common import ds_config, loss_of, make_model, micro_batch
from engine_common import global_batch as data
from equivalence import assert_rel_close
from harness import run_distributed

import megatron_core

MICRO_STEPS = 3


def _batch(k: int, rank: int) -> dict:
    return micro_batch(data("mlp", k, 4), rank)


def _state(engine) -> dict:
    state = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    engine.parallel_state.destroy()
    return state


def _accumulate(stage: int, how: str):
    rank = torch.distributed.get_rank()
    ga = 1 if how == "no_sync" else MICRO_STEPS
    engine, _, _, _ = megatron_core.initialize(make_model("mlp"), config=ds_config(2, ga, stage))
    for k in range(MICRO_STEPS):
        last = k == MICRO_STEPS - 1
        loss = loss_of("mlp", engine, _batch(k, rank))
        if how == "counter":  # the usual loop: the engine counts micro steps
            engine.backward(loss)
            engine.step()
        elif how == "boundary":  # DeepSpeed's docstring pattern: one step() after all the passes
            engine.set_gradient_accumulation_boundary(last)
            engine.backward(loss)
        elif not last:  # no_sync: every micro step is a boundary by the counter (GA 1), the context holds it
            with engine.no_sync():
                engine.backward(loss / MICRO_STEPS)
            if k == 0:  # this rank's own gradient, not yet averaged with the other rank's
                local = next(engine.module.parameters()).main_grad.detach().clone()
        else:
            engine.backward(loss / MICRO_STEPS)
    if how != "counter":
        engine.step()
    counters = (engine.global_steps, engine.micro_steps, engine.was_step_applied())
    return _state(engine), counters, local if how == "no_sync" else None


@pytest.mark.parametrize("stage", [0, 1])
def test_manual_boundary_and_no_sync_match_the_counted_accumulation(stage):
    """Both were AttributeErrors ('Engine' object has no attribute 'set_gradient_accumulation_boundary' /
    'no_sync'). Without the override the one step() came at micro step 0 (no boundary: nothing stepped); a
    boundary backward inside no_sync that reduced would average the first micro batches twice."""
    results = {how: run_distributed(_accumulate, 2, stage, how, timeout=120) for how in ("counter", "boundary",
                                                                                         "no_sync")}
    for how in ("boundary", "no_sync"):
        for rank in range(2):
            state, counters, _ = results[how][rank]
            assert counters == (1, 1, True), (how, counters)
            for name, expected in results["counter"][rank][0].items():
                assert_rel_close(state[name], expected, 1e-5, f"{how} rank {rank} {name}")
    # Reduced only outside the context: inside it each rank keeps the gradient of its own micro batch.
    local = [results["no_sync"][rank][2] for rank in range(2)]
    assert (local[0] - local[1]).abs().max() > 1e-3, "no_sync's backward reduced the gradients over DP"


def _misuse(kind: str):
    stage = 2 if kind == "stage-2" else 1
    engine, _, _, _ = megatron_core.initialize(make_model("mlp"), config=ds_config(1, 1, stage))
    try:
        with engine.no_sync():
            if kind == "step-inside":
                engine.backward(loss_of("mlp", engine, _batch(0, 0)))
                engine.step()
            elif kind == "reentry":
                with engine.no_sync():
                    pass
    finally:
        engine.parallel_state.destroy()


@pytest.mark.parametrize(
    "kind,message",
    [
        ("stage-2", "engine.no_sync() does not work with zero_optimization.stage 2"),
        ("step-inside", "engine.step() inside engine.no_sync()"),
        ("reentry", "engine.no_sync() inside engine.no_sync()"),
    ],
)
def test_no_sync_misuse_is_one_line(kind, message):
    """DeepSpeed asserts the same three cases."""
    with pytest.raises(Exception) as info:
        run_distributed(_misuse, 1, kind, timeout=60)
    assert message in str(info.value) and "ConfigError" in str(info.value), str(info.value)


def _two_backwards(stage):
    from megatron_core.errors import ConfigError

    engine, _, _, _ = megatron_core.initialize(make_model("mlp"), config=ds_config(2, 1, stage))
    batch = _batch(0, engine.parallel_state.dp_rank)
    engine.backward(loss_of("mlp", engine, batch))
    try:
        engine.backward(loss_of("mlp", engine, batch))
    except ConfigError as exc:
        return str(exc)
    finally:
        engine.parallel_state.destroy()
    return None


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_a_second_backward_after_the_boundary_is_one_line(stage):
    """Two engine.backward calls before engine.step() at the accumulation boundary (two losses of one batch)
    raised the DDP buffer's RuntimeError traceback, whose advice (DistributedDataParallel.no_sync, the schedule's
    no_sync_func) is not the engine's. The boundary backward reduces the gradients, so a second one cannot be
    added to them: one line naming the fix. (DeepSpeed 0.19.8 accumulates the two.)"""
    assert run_distributed(_two_backwards, 2, stage, timeout=90) == [
        "engine.backward(): a second backward at the accumulation boundary before engine.step() (the first one "
        "reduced the gradients over data-parallel ranks already); add the losses and call engine.backward once"] * 2


def _backward_of(kind: str):
    from megatron_core.errors import ConfigError

    engine, _, _, _ = megatron_core.initialize(make_model("mlp"), config=ds_config(1, 1, 1))
    batch = _batch(0, 0)
    try:
        out = engine(batch["x"])
        if kind in ("scalar", "one-element"):
            loss = torch.nn.functional.mse_loss(out.float(), batch["y"])
            engine.backward(loss if kind == "scalar" else loss.reshape(1))
            engine.step()
            return {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
        losses = {"per-element": torch.nn.functional.mse_loss(out.float(), batch["y"], reduction="none"),
                  "float": torch.nn.functional.mse_loss(out.float(), batch["y"]).item(),
                  "detached": torch.nn.functional.mse_loss(out.float(), batch["y"]).detach()}
        try:
            engine.backward(losses[kind])
        except ConfigError as exc:
            return str(exc)
        return None
    finally:
        engine.parallel_state.destroy()


@pytest.mark.parametrize("kind,message", [
    ("per-element", "engine.backward(loss): loss has shape [2, 4] (8 elements); backward needs a scalar loss: "
                    "reduce it first, e.g. engine.backward(loss.mean())"),
    ("float", "engine.backward(loss): loss is a float, not a tensor; pass the loss tensor itself (not loss.item())"),
    ("detached", "engine.backward(loss): loss does not require grad"),
])
def test_a_loss_backward_cannot_take_is_one_line_naming_it(kind, message):
    """A per-element loss was a ValueError (a float and a detached loss torch's own errors); DeepSpeed asserts
    a one-element tensor with a grad_fn."""
    result = run_distributed(_backward_of, 1, kind, timeout=60)[0]
    assert result is not None and result.startswith(message), result


def test_a_one_element_loss_is_taken_as_deepspeed_takes_it():
    """DeepSpeed's backward takes a loss of shape [1] (numel 1); it was refused for not being 0-dimensional."""
    scalar, one = (run_distributed(_backward_of, 1, kind, timeout=60)[0] for kind in ("scalar", "one-element"))
    for name, expected in scalar.items():
        assert torch.equal(one[name], expected), name
