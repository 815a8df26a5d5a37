"""DeepSpeed 0.19.8 checkpoints of a model with frozen parameters (``requires_grad=False``).

DeepSpeed keeps a frozen parameter's value in ``module`` (ZeRO-0/1), also in ``frozen_param_fragments`` (ZeRO-2,
whole) or only there, split over the DP ranks' model files (ZeRO-3: each rank's ``ceil(numel / dp)`` elements,
``module`` an empty placeholder). ``deepspeed_files`` writes these layouts (checked against real DeepSpeed runs:
docs/engine.md); the loading engine starts from other weights (the frozen one too) and must continue as the run
that never stopped, bit for bit.
"""

import os

import pytest
import torch
from deepspeed_files import other_weights, state_for_deepspeed, write_deepspeed_checkpoint
from engine_common import ds_config, make_model, run_steps, sharded, state_of
from harness import run_distributed

import megatron_core
from megatron_core.engine.consolidate import consolidate_state_dict, save_consolidated

FROZEN = "4.bias"  # 4 elements: over 3 DP ranks 2 each, the last rank's half padding


def _frozen(model: torch.nn.Module) -> torch.nn.Module:
    model[4].bias.requires_grad_(False)
    return model


def _resume(directory, saved_stage, saved_dp, stage):
    config = sharded(ds_config(1, 1, stage, "mlp"))
    engine, _, _, _ = megatron_core.initialize(_frozen(make_model("mlp")), config=config)
    run_steps("mlp", engine, 0, 2)
    engine.save_checkpoint(os.path.join(directory, "ours"), tag="t")
    straight, _ = run_steps("mlp", engine, 2, 4)
    straight_state = state_of(engine)
    engine.parallel_state.destroy()
    state = state_for_deepspeed(os.path.join(directory, "ours", "t"), config)
    assert list(state["frozen"]) == [FROZEN] and FROZEN not in state["shapes"]
    write_deepspeed_checkpoint(os.path.join(directory, "ds"), "global_step2", state, saved_stage, saved_dp, {})
    engine, _, _, _ = megatron_core.initialize(_frozen(other_weights()), config=config)
    engine.load_checkpoint(os.path.join(directory, "ds"))
    resumed, _ = run_steps("mlp", engine, 2, 4)
    result = straight, resumed, straight_state, state_of(engine), state["frozen"][FROZEN]
    engine.parallel_state.destroy()
    return result


@pytest.mark.parametrize("saved_stage,saved_dp,stage", [(3, 3, 3), (3, 2, 1), (1, 2, 3), (2, 2, 0)])
def test_deepspeed_checkpoint_with_frozen_parameters_resumes(tmp_path, saved_stage, saved_dp, stage):
    [(straight, resumed, straight_state, resumed_state, frozen)] = run_distributed(
        _resume, 1, str(tmp_path), saved_stage, saved_dp, stage, timeout=120)
    assert resumed == straight  # the losses, bit for bit
    for name, value in straight_state.items():
        assert torch.equal(resumed_state[name], value), name
    assert torch.equal(resumed_state[FROZEN], frozen)  # the saved value, not other_weights()'s


@pytest.mark.parametrize("stage,dp,dtype", [(3, 3, torch.float32), (3, 2, torch.bfloat16), (1, 2, torch.float32),
                                            (2, 2, torch.bfloat16)])
def test_deepspeed_checkpoint_with_frozen_parameters_consolidates(tmp_path, stage, dp, dtype):
    """``zero_to_fp32`` writes frozen parameters in fp32 (DeepSpeed's ``_zero3_merge_frozen_params`` at ZeRO-3, its
    ``_zero2_merge_frozen_params`` at ZeRO-2) and leaves them out under ``--exclude_frozen_parameters``. At ZeRO-1
    DeepSpeed's model file lists none (``frozen_param_shapes`` is None), so its script drops them silently; here
    they come from ``module``, and ``--exclude_frozen_parameters`` writes DeepSpeed's output."""
    g = torch.Generator().manual_seed(0)
    shapes = {"fc.weight": (4, 3), "fc.bias": (4,)}
    tensors = [{n: torch.randn(s, generator=g) for n, s in shapes.items()} for _ in range(3)]
    frozen = {"emb.weight": torch.randn(5, generator=g).to(dtype)}  # 5 elements: padded over 2 and 3 ranks
    state = {"shapes": shapes, "fp32": tensors[0], "exp_avg": tensors[1], "exp_avg_sq": tensors[2],
             "step": torch.tensor(2.0), "group": {"lr": 0.01, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0},
             "clip": 0.5, "lr_scheduler": {}, "global_steps": 2, "global_samples": 4, "ds_config": {},
             "dtype": dtype, "frozen": frozen}
    write_deepspeed_checkpoint(str(tmp_path), "global_step2", state, stage, dp, {})
    consolidated, _ = consolidate_state_dict(str(tmp_path))
    assert sorted(consolidated) == sorted([*shapes, *frozen])
    value = consolidated["emb.weight"]
    assert value.dtype == torch.float32 and torch.equal(value, frozen["emb.weight"].float())
    for name, tensor in tensors[0].items():
        assert torch.equal(consolidated[name], tensor), name
    output = save_consolidated(str(tmp_path), str(tmp_path / "out.bin"), exclude_frozen_parameters=True)
    assert sorted(torch.load(output, weights_only=True)) == sorted(shapes)
