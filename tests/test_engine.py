"""The engine (``megatron_core.initialize``) against a plain PyTorch loop over the same global batch.

An MLP trains 2 AdamW steps (the HF models SGD: see engine_common.HF_OPT) with clipping at DP 1, 2
and 4 x every ZeRO stage the library implements x
gradient accumulation 1 and 4; tiny Hugging Face GPT-2 and Llama models (random weights, one layer) at
DP 2 over the same stages x GA, and at DP 4 over ZeRO 0 and 2 x GA (to keep the suite short). Each
rank's per-micro-batch losses, the global grad norm of every step and the final state dict must equal
the one-process loop's (fp32, relative 1e-5 element-wise). One forked job runs all stages and
accumulation counts of a (model, DP) pair in turn, to pay the process start-up once.
"""

import pytest
import torch
from engine_common import CLIP, SGD, ds_config, global_batch, loss_of, make_model, micro_batch, reference, train_engine
from equivalence import assert_rel_close
from harness import run_distributed

from megatron_core.distributed import DistributedDataParallelConfig

STEPS = 2
PRECISION_STEPS = 3


def _implemented_stages() -> list[int]:
    stages = []
    for stage in range(4):
        try:
            DistributedDataParallelConfig(zero_stage=stage)
            stages.append(stage)
        except ValueError:
            pass
    return stages


STAGES = _implemented_stages()
GAS = (1, 4)
CASES = [("mlp", 1), ("mlp", 2), ("mlp", 4), ("gpt2", 2), ("gpt2", 4), ("llama", 2), ("llama", 4)]


def _matrix(kind, stages, gas):
    import torch.distributed as dist

    dp = dist.get_world_size()
    return {(stage, ga): train_engine(kind, ds_config(dp, ga, stage, kind), STEPS) for stage in stages for ga in gas}


def _compare(results, ref, ga, what):
    for rank, res in enumerate(results):
        dp_rank, dp = res["dp"]
        mine = [[step[k * dp + dp_rank] for k in range(ga)] for step in ref["losses"]]
        assert_rel_close(torch.tensor(res["losses"]), torch.tensor(mine), 1e-5, f"{what} rank {rank} losses")
        assert_rel_close(torch.tensor(res["norms"]), torch.tensor(ref["norms"]), 1e-5, f"{what} rank {rank} norms")
        assert set(res["state"]) == set(ref["state"]), f"{what}: state dict keys differ"
        for name, value in ref["state"].items():
            assert_rel_close(res["state"][name], value, 1e-5, f"{what} rank {rank} {name}")
        assert res["global_steps"] == STEPS and res["micro_steps"] == STEPS * ga


@pytest.mark.parametrize("kind,dp", CASES, ids=[f"{k}-dp{d}" for k, d in CASES])
def test_engine_equals_plain_pytorch_loop(kind, dp):
    refs = {ga: run_distributed(reference, 1, kind, STEPS, dp * ga, timeout=120)[0] for ga in GAS}
    stages = [s for s in STAGES if s in (0, 2)] if kind != "mlp" and dp == 4 else STAGES
    results = run_distributed(_matrix, dp, kind, stages, GAS, timeout=240)
    for stage in stages:
        for ga in GAS:
            _compare([r[(stage, ga)] for r in results], refs[ga], ga, f"{kind} dp{dp} zero{stage} ga{ga}")


# ---- mixed precision ------------------------------------------------------------------------
def _precision(stage, precision):
    extra = (
        {"fp16": {"enabled": True, "initial_scale_power": 8}} if precision == "fp16" else {"bf16": {"enabled": True}}
    )
    return train_engine("mlp", ds_config(2, 2, stage, optimizer=SGD, **extra), PRECISION_STEPS)


@pytest.mark.parametrize("precision,tol", [("fp16", 5e-3), ("bf16", 2e-2)])
def test_mixed_precision_close_to_fp32(precision, tol):
    """fp16 (dynamic loss scale) and bf16 stay within a stated tolerance of fp32 after 3 steps (rel. per tensor).

    SGD, not Adam: Adam's normalisation turns a gradient below the format's resolution into an
    lr-sized step of either sign, so its error does not shrink with the precision. The tolerances are
    a few units of each format's rounding (fp16 2^-11, bf16 2^-8) on weights of the size trained here.
    """
    (ref,) = run_distributed(reference, 1, "mlp", PRECISION_STEPS, 4, CLIP, SGD, timeout=120)
    for stage in (0, 2):
        results = run_distributed(_precision, 2, stage, precision, timeout=120)
        for rank, res in enumerate(results):
            for name, value in ref["state"].items():
                assert res["state"][name].dtype == getattr(torch, "float16" if precision == "fp16" else "bfloat16")
                assert_rel_close(res["state"][name].float(), value, tol, f"{precision} zero{stage} rank {rank} {name}")


def _overflow(stage):
    import megatron_core

    config = ds_config(2, 2, stage, fp16={"enabled": True, "initial_scale_power": 8, "hysteresis": 1})
    engine, optimizer, _, _ = megatron_core.initialize(make_model("mlp"), config=config)
    rank = engine.parallel_state.dp_rank
    history = []
    for step in range(3):
        batch = global_batch("mlp", step, 8)
        before = [p.detach().clone() for p in engine.module.parameters()]
        for k in range(2):
            mb = micro_batch(batch, k * 2 + rank)
            if step == 1 and rank == 1 and k == 0:
                mb["x"] = mb["x"] * 1e4  # inf in fp16 on one rank only
            engine.backward(loss_of("mlp", engine, mb))
            engine.step()
        changed = any(not torch.equal(a, b) for a, b in zip(before, engine.module.parameters(), strict=True))
        history.append((changed, engine.get_loss_scale(), engine.skipped_steps, engine.get_global_grad_norm()))
    return history, engine.global_steps


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_fp16_overflow_skips_the_step_on_every_rank(stage):
    results = run_distributed(_overflow, 2, stage, timeout=120)
    for rank, (history, global_steps) in enumerate(results):
        assert [h[0] for h in history] == [True, False, True], f"rank {rank}: which steps updated"
        assert [h[1] for h in history] == [256.0, 128.0, 128.0], f"rank {rank}: loss scale backs off once"
        assert [h[2] for h in history] == [0, 1, 1] and history[1][3] is None
        assert global_steps == 3  # a skipped step still counts, as in DeepSpeed


def _overflow_every_step():
    import megatron_core

    fp16 = {"enabled": True, "initial_scale_power": 2, "min_loss_scale": 1, "hysteresis": 2}
    engine, _, _, _ = megatron_core.initialize(make_model("mlp"), config=ds_config(2, 1, 1, fp16=fp16))
    rank = engine.parallel_state.dp_rank
    for step in range(6):
        mb = micro_batch(global_batch("mlp", step, 4), rank)
        if rank == 1:
            mb["x"] = mb["x"] * 1e4  # inf in fp16 on one rank, every step
        engine.backward(loss_of("mlp", engine, mb))
        engine.step()


def test_fp16_overflow_at_the_minimum_loss_scale_stops_the_run():
    """DeepSpeed's loss scaler raises 'Current loss scale already at minimum' on an overflow it cannot back off
    from (scale at min_loss_scale, hysteresis used up); the engine skipped such steps forever. Scale 4: the first
    overflow uses the hysteresis, the next two back off to 2 and 1, the fourth stops on every rank."""
    with pytest.raises(Exception) as info:
        run_distributed(_overflow_every_step, 2, timeout=120)
    text = str(info.value)
    assert "TrainingDivergedError" in text and "global step 4: the fp16 gradients overflowed at the minimum loss " \
        "scale 1 (fp16.min_loss_scale) after 3 skipped steps" in text, text


def _fp16_with_fp32_reduction(stage):
    import megatron_core

    config = ds_config(2, 1, stage, fp16={"enabled": True, "initial_scale_power": 8}, communication_data_type="fp32")
    engine, _, _, _ = megatron_core.initialize(make_model("mlp"), config=config)
    before = [p.detach().clone() for p in engine.module.parameters()]
    engine.backward(loss_of("mlp", engine, micro_batch(global_batch("mlp", 0, 4), engine.parallel_state.dp_rank)))
    dtypes = {p.main_grad.dtype for p in engine.module.parameters() if getattr(p, "main_grad", None) is not None}
    engine.step()
    changed = all(not torch.equal(a, b) for a, b in zip(before, engine.module.parameters(), strict=True))
    return dtypes, changed, {p.dtype for p in engine.module.parameters()}


@pytest.mark.parametrize("stage", [0, 2])
def test_communication_data_type_fp32_under_fp16(stage):
    """fp16 weights, gradients accumulated and reduced in fp32 ("communication_data_type": "fp32"), and steps."""
    for dtypes, changed, weights in run_distributed(_fp16_with_fp32_reduction, 2, stage, timeout=120):
        # ZeRO-2 frees main_grad once its bucket is reduced; at ZeRO-0 every parameter still holds one.
        assert dtypes == {torch.float32} if stage == 0 else dtypes <= {torch.float32}, dtypes
        assert changed and weights == {torch.float16}, (changed, weights)
