"""Loading DeepSpeed's bf16 and fp16 checkpoints whose optimizer is not its ZeRO one (DeepSpeed 0.19.8).

Without ZeRO, fp16 and bf16 (gradients accumulated in bf16, its default) train through DeepSpeed's
``FP16_UnfusedOptimizer``, whose ``state_dict`` (fp32 master copies, the loss scale, the torch optimizer's state)
is the model file's ``optimizer``; bf16 at ZeRO-1 with ``grad_accum_dtype`` fp32 trains through its
``BF16_Optimizer`` (``bf16_zero_pp_rank_*`` files without ``zero_stage``). ``deepspeed_files`` writes both layouts
(checked against real DeepSpeed runs: docs/engine.md) from this engine's state after the save; the loading
engine starts from other weights and must continue as the run that never stopped, bit for bit.
"""

import os

import pytest
import torch
from deepspeed_files import other_weights, state_for_deepspeed, write_deepspeed_checkpoint
from engine_common import ds_config, make_model, run_steps, sharded, state_of
from harness import run_distributed

import megatron_core
from megatron_core.engine.checkpoint_files import load_states, model_file
from megatron_core.engine.consolidate import consolidate_state_dict
from megatron_core.errors import ConfigError

SCHEDULER = {"type": "WarmupLR", "params": {"warmup_num_steps": 5, "warmup_max_lr": 0.01}}
BF16 = {"bf16": {"enabled": True}}
# no hysteresis: DeepSpeed's FP16_UnfusedOptimizer halves the scale at every overflow (it keeps none); the scale
# grows after step 1 and 3, is saved after step 3 (262144) and overflows twice after it (backs off, skipped)
FP16 = {"fp16": {"enabled": True, "initial_scale_power": 16, "loss_scale_window": 1, "hysteresis": 1}}


def _deepspeed_state(directory: str, config: dict, saved: dict, dtype: torch.dtype, bf16_optimizer: bool) -> dict:
    """This engine's checkpoint after the save restated for ``write_deepspeed_checkpoint``; fp16: the
    ``FP16_UnfusedOptimizer``'s loss scale (``cur_iter`` counts every step, skipped ones too;
    ``last_overflow_iter = cur_iter - growth_tracker - 1``)."""
    state = state_for_deepspeed(os.path.join(directory, "ours", "t"), config)
    state.update(dtype=dtype, bf16_optimizer=bf16_optimizer, skipped_steps=saved["skipped_steps"])
    scaler = saved["grad_scaler"]
    if dtype == torch.float16:
        state["scaler"] = {"dynamic": True, "cur_scale": scaler["scale"], "cur_iter": saved["global_steps"],
                           "last_overflow_iter": saved["global_steps"] - scaler["growth_tracker"] - 1,
                           "scale_factor": 2.0, "scale_window": 1}
    return state


def _resume(directory, precision, saved_stage, saved_dp, stage):
    """6 steps straight; the same run saved after 3, written in DeepSpeed's layout, loaded, 3 more steps."""
    dtype, extra = {"bf16": (torch.bfloat16, BF16), "fp16": (torch.float16, FP16)}[precision]
    data_types = {"data_types": {"grad_accum_dtype": "fp32"}} if saved_stage == 1 else {}
    config = sharded(ds_config(1, 1, stage, "mlp", scheduler=SCHEDULER, **extra, **data_types))
    engine, _, _, _ = megatron_core.initialize(make_model("mlp"), config=config)
    run_steps("mlp", engine, 0, 3)
    engine.save_checkpoint(os.path.join(directory, "ours"), tag="t")
    saved = load_states(model_file(os.path.join(directory, "ours", "t"), 0))
    straight, scales = [], []
    for step in range(3, 6):
        straight += run_steps("mlp", engine, step, step + 1)[0]
        scales.append(engine.get_loss_scale())
    straight_state, skipped = state_of(engine), engine.skipped_steps
    engine.parallel_state.destroy()
    state = _deepspeed_state(directory, config, saved, dtype, saved_stage == 1)
    write_deepspeed_checkpoint(os.path.join(directory, "ds"), "global_step3", state, saved_stage, saved_dp,
                               {"epoch": 7})
    engine, _, _, _ = megatron_core.initialize(other_weights(), config=config)
    _, client = engine.load_checkpoint(os.path.join(directory, "ds"))
    resumed, resumed_scales = [], []
    for step in range(3, 6):
        resumed += run_steps("mlp", engine, step, step + 1)[0]
        resumed_scales.append(engine.get_loss_scale())
    result = (straight, resumed, scales, resumed_scales, straight_state, state_of(engine), skipped,
              engine.skipped_steps, client)
    engine.parallel_state.destroy()
    return result


@pytest.mark.parametrize("precision,saved_stage,saved_dp,stage",
                         [("bf16", 0, 1, 0), ("bf16", 0, 2, 2), ("bf16", 1, 2, 1), ("bf16", 1, 2, 3),
                          ("fp16", 0, 1, 0), ("fp16", 0, 1, 2)])
def test_deepspeed_checkpoint_of_another_optimizer_resumes(tmp_path, precision, saved_stage, saved_dp, stage):
    [(straight, resumed, scales, resumed_scales, straight_state, resumed_state, skipped, resumed_skipped,
      client)] = run_distributed(_resume, 1, str(tmp_path), precision, saved_stage, saved_dp, stage, timeout=120)
    assert resumed == straight  # the losses, bit for bit
    for name, value in straight_state.items():
        assert torch.equal(resumed_state[name], value), name
    assert resumed_scales == scales and resumed_skipped == skipped
    if precision == "fp16":  # the loaded scale grew and backed off, and steps were skipped
        assert max(scales) > min(scales) and skipped > 0, (scales, skipped)
    assert client["epoch"] == 7 and ("optimizer" in client) == (saved_stage == 0)


def _bf16_state(shapes: dict, bf16_optimizer: bool = False) -> dict:
    """A bf16 run's state for the writer, with fixed random fp32 masters and Adam moments of ``shapes``."""
    g = torch.Generator().manual_seed(0)
    tensors = [{n: torch.randn(s, generator=g) for n, s in shapes.items()} for _ in range(3)]
    return {"shapes": shapes, "fp32": tensors[0], "exp_avg": tensors[1], "exp_avg_sq": tensors[2],
            "step": torch.tensor(4.0), "group": {"lr": 0.01, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0},
            "clip": 0.5, "lr_scheduler": {}, "global_steps": 3, "global_samples": 6, "ds_config": {},
            "dtype": torch.bfloat16, "bf16_optimizer": bf16_optimizer}


@pytest.mark.parametrize("saved_stage,dp", [(0, 1), (0, 2), (1, 2)])
def test_deepspeed_bf16_checkpoint_consolidates_its_fp32_masters(tmp_path, saved_stage, dp):
    """``zero_to_fp32`` on these files: each parameter's fp32 master copy, not the bf16 weights in ``module``
    (DeepSpeed's own zero_to_fp32.py reads neither layout: no ``*_optim_states.pt`` at ZeRO-0, no ``zero_stage``
    in BF16_Optimizer's)."""
    shapes = {"fc.weight": (4, 3), "fc.bias": (4,), "out.weight": (1, 4)}
    state = _bf16_state(shapes, bf16_optimizer=saved_stage == 1)
    write_deepspeed_checkpoint(str(tmp_path), "global_step3", state, saved_stage, dp, {})
    consolidated, _ = consolidate_state_dict(str(tmp_path))
    assert sorted(consolidated) == sorted(shapes)
    for name, value in state["fp32"].items():
        assert consolidated[name].dtype == torch.float32 and torch.equal(consolidated[name], value), name


def test_deepspeed_bf16_zero0_checkpoint_of_a_tied_model_consolidates(tmp_path):
    """A tied name is one more ``module`` entry sharing its owner's storage (``torch.save`` keeps the sharing) and
    has no master copy of its own: it gets its owner's."""
    shapes = {"wte.weight": (6, 3), "fc.bias": (3,)}
    state = _bf16_state(shapes)
    write_deepspeed_checkpoint(str(tmp_path), "global_step3", state, 0, 1, {})
    path = os.path.join(str(tmp_path), "global_step3", "mp_rank_00_model_states.pt")
    saved = torch.load(path, weights_only=False)
    saved["module"]["lm_head.weight"] = saved["module"]["wte.weight"]  # HF's tie, as module.state_dict() has it
    torch.save(saved, path)
    consolidated, _ = consolidate_state_dict(str(tmp_path))
    assert sorted(consolidated) == sorted([*shapes, "lm_head.weight"])
    for name in ("wte.weight", "lm_head.weight"):
        assert torch.equal(consolidated[name], state["fp32"]["wte.weight"]), name


def test_deepspeed_zero0_masters_out_of_module_order_are_not_consolidated(tmp_path):
    """ZeRO-0's fp32 master copies are unnamed: taken in ``module``'s order, each must round to its parameter."""
    zeros = {"a": torch.zeros(3), "b": torch.zeros(3)}
    state = {"shapes": {"a": (3,), "b": (3,)}, "fp32": {"a": torch.tensor([1.0, 2, 3]), "b": torch.tensor([4.0, 5, 6])},
             "exp_avg": zeros, "exp_avg_sq": zeros,
             "step": torch.tensor(1.0), "group": {"lr": 0.01, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0},
             "clip": 0.5, "lr_scheduler": {}, "global_steps": 1, "global_samples": 2, "ds_config": {},
             "dtype": torch.bfloat16}
    write_deepspeed_checkpoint(str(tmp_path), "global_step1", state, 0, 1, {})
    path = os.path.join(str(tmp_path), "global_step1", "mp_rank_00_model_states.pt")
    saved = torch.load(path, weights_only=False)
    saved["optimizer"]["fp32_groups"][0].reverse()  # another param group order than the module's
    torch.save(saved, path)
    with pytest.raises(ConfigError, match=r"^zero_to_fp32: .*mp_rank_00_model_states.pt's fp32 master copies \(2\) "
                                          r"are not its module's 2 parameters in order"):
        consolidate_state_dict(str(tmp_path))


def _fused_fp16_error(directory):
    config = ds_config(1, 1, 0, "mlp")
    engine, _, _, _ = megatron_core.initialize(make_model("mlp"), config=config)
    run_steps("mlp", engine, 0, 1)
    engine.save_checkpoint(os.path.join(directory, "ours"), tag="t")
    state = state_for_deepspeed(os.path.join(directory, "ours", "t"), config)
    write_deepspeed_checkpoint(os.path.join(directory, "ds"), "global_step1", state, 0, 1, {})
    path = os.path.join(directory, "ds", "global_step1", "mp_rank_00_model_states.pt")
    saved = torch.load(path, weights_only=False)
    saved["optimizer"] = {"optimizer_state_dict": saved["optimizer"], "cur_scale": 1.0, "dynamic_loss_scale": False,
                          "cur_iter": 1, "clip_grad": 0.5,
                          "fp32_groups_flat": [torch.cat([v.reshape(-1) for v in state["fp32"].values()])]}
    torch.save(saved, path)
    try:
        engine.load_checkpoint(os.path.join(directory, "ds"))
    except ConfigError as exc:
        return str(exc)
    finally:
        engine.parallel_state.destroy()
    return None


def test_deepspeed_fused_fp16_optimizer_checkpoint_is_one_line(tmp_path):
    """DeepSpeed's FP16_Optimizer (its FusedAdam, GPU only) keeps one flat fp32 vector per group, not verified."""
    [message] = run_distributed(_fused_fp16_error, 1, str(tmp_path), timeout=120)
    assert message is not None and "\n" not in message
    assert "holds DeepSpeed's FP16_Optimizer (its FusedAdam at ZeRO-0: 'fp32_groups_flat')" in message
    assert "zero_to_fp32.py" in message


def test_deepspeed_bf16_optimizer_checkpoint_missing_a_rank_names_its_files(tmp_path):
    """BF16_Optimizer's files are ``bf16_zero_pp_rank_*``: the missing-rank line named ``zero_pp_rank_*`` files."""
    state = _bf16_state({"fc.weight": (4, 3), "fc.bias": (4,)}, bf16_optimizer=True)
    write_deepspeed_checkpoint(str(tmp_path), "global_step3", state, 1, 2, {})
    os.remove(os.path.join(str(tmp_path), "global_step3", "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"))
    with pytest.raises(ConfigError) as info:
        consolidate_state_dict(str(tmp_path))
    assert "has 1 bf16_zero_pp_rank_*_optim_states.pt files, DeepSpeed's partition_count is 2" in str(info.value)
