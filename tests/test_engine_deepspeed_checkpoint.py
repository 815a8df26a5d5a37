"""Loading a checkpoint DeepSpeed wrote (``engine.load_checkpoint`` on DeepSpeed 0.19.8's files).

The files are written by ``deepspeed_files.write_deepspeed_checkpoint`` in DeepSpeed 0.19.8's layout (verified
against real DeepSpeed runs: docs/engine.md, "Checkpoints DeepSpeed wrote"), from the state of this engine
after 2 steps; the loading engine starts from other weights and must continue exactly as the run that
never stopped (same losses and weights, bit for bit: the fp32 values, Adam's moments and step, the lr
schedule and the counters are the saved ones). Also at another DP size and ZeRO stage than the files', the
``client_state`` DeepSpeed returns, and one-line errors for what is not read.
"""

import functools
import os

import pytest
import torch
import torch.distributed as dist
from deepspeed_files import other_weights, state_for_deepspeed, write_deepspeed_checkpoint
from engine_common import config_error, ds_config, make_model, opt_for, run_steps, sharded, state_of
from harness import run_distributed

import megatron_core
from megatron_core.engine.checkpoint_files import load_states, model_file
from megatron_core.engine.consolidate import consolidate_state_dict
from megatron_core.errors import ConfigError

SCHEDULER = {"type": "WarmupLR", "params": {"warmup_num_steps": 5, "warmup_max_lr": 0.01}}


def _resume(directory, saved_stage, saved_dp, stage):
    dp = dist.get_world_size()
    config = sharded(ds_config(dp, 1, stage, "mlp", scheduler=SCHEDULER))
    engine, _, _, _ = megatron_core.initialize(make_model("mlp"), config=config)
    run_steps("mlp", engine, 0, 2)
    engine.save_checkpoint(os.path.join(directory, "ours"), tag="t")
    saved_counters = (engine.global_steps, engine.global_samples, engine.skipped_steps)
    straight, _ = run_steps("mlp", engine, 2, 4)
    straight_state, straight_lr = state_of(engine), engine.get_lr()
    engine.parallel_state.destroy()
    ds_dir = os.path.join(directory, "ds")
    if dist.get_rank() == 0:
        state = state_for_deepspeed(os.path.join(directory, "ours", "t"), config)
        write_deepspeed_checkpoint(ds_dir, "global_step2", state, saved_stage, saved_dp, {"epoch": 7})
    dist.barrier()

    engine, _, _, _ = megatron_core.initialize(other_weights(), config=config)
    path, client = engine.load_checkpoint(ds_dir)
    counters = (engine.global_steps, engine.global_samples, engine.skipped_steps)
    resumed, _ = run_steps("mlp", engine, 2, 4)
    result = (straight, resumed, straight_state, state_of(engine), straight_lr, engine.get_lr(), path, client,
              (saved_counters, counters))
    engine.parallel_state.destroy()
    return result


def _check(results, saved_stage):
    for rank, (straight, resumed, straight_state, resumed_state, lr, resumed_lr, path, client, counters) in \
            enumerate(results):
        assert resumed == straight  # the losses, bit for bit
        for name, value in straight_state.items():
            assert torch.equal(resumed_state[name], value), name
        assert resumed_lr == lr
        saved_counters, loaded_counters = counters
        assert loaded_counters == saved_counters and saved_counters[0] == 2
        assert client["epoch"] == 7 and client["ds_version"] == "0.19.8"  # DeepSpeed returns its metadata too
        assert "module" not in client and "global_steps" not in client and "lr_scheduler" not in client
        # DeepSpeed gives its ZeRO-0 optimizer's state back (``client_state['optimizer'] = optim_checkpoint
        # ['optimizer']``) and drops the model file's None at ZeRO 1-3 (its ``optimizer`` key is loaded state)
        assert ("optimizer" in client) == (saved_stage == 0)
        if saved_stage == 0:
            assert client["optimizer"]["state"] and client["optimizer"]["param_groups"][0]["lr"] > 0
        # the file DeepSpeed names: at ZeRO-3 this DP rank's (every rank writes one)
        expected = (f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt" if saved_stage == 3
                    else "mp_rank_00_model_states.pt")
        assert os.path.basename(path) == expected


@pytest.mark.parametrize("saved_stage,saved_dp,stage",
                         [(0, 1, 0), (1, 2, 1), (2, 2, 2), (3, 2, 3), (3, 1, 0), (2, 2, 3)])
def test_deepspeed_checkpoint_resumes_one_rank(tmp_path, saved_stage, saved_dp, stage):
    _check(run_distributed(_resume, 1, str(tmp_path), saved_stage, saved_dp, stage, timeout=120), saved_stage)


@pytest.mark.parametrize("saved_stage,saved_dp,stage", [(2, 2, 2), (3, 2, 1), (0, 1, 3)])
def test_deepspeed_checkpoint_resumes_two_ranks(tmp_path, saved_stage, saved_dp, stage):
    _check(run_distributed(_resume, 2, str(tmp_path), saved_stage, saved_dp, stage, timeout=180), saved_stage)


def _load_error(directory, stage, change):
    config = ds_config(1, 1, stage, "mlp")
    engine, _, _, _ = megatron_core.initialize(make_model("mlp"), config=config)
    run_steps("mlp", engine, 0, 1)
    engine.save_checkpoint(os.path.join(directory, "ours"), tag="t")
    state = state_for_deepspeed(os.path.join(directory, "ours", "t"), config)
    ds_dir = os.path.join(directory, "ds")
    write_deepspeed_checkpoint(ds_dir, "global_step1", state, stage, 2, {})
    change(os.path.join(ds_dir, "global_step1"))
    try:
        engine.load_checkpoint(ds_dir)
    except ConfigError as exc:
        return str(exc)
    finally:
        engine.parallel_state.destroy()
    return None


def _edit_model_states(key, value):
    def change(folder):
        path = os.path.join(folder, "mp_rank_00_model_states.pt")
        saved = torch.load(path, weights_only=False)
        saved[key] = value
        torch.save(saved, path)
    return change


def _remove_rank_1(folder):
    os.remove(os.path.join(folder, "zero_pp_rank_1_mp_rank_00_optim_states.pt"))


def _edit_zero0_optimizer(edit):
    def change(folder):
        path = os.path.join(folder, "mp_rank_00_model_states.pt")
        saved = torch.load(path, weights_only=False)
        edit(saved["optimizer"])
        torch.save(saved, path)
    return change


def _bf16_optimizer_keys(osd):
    """The ZeRO-0 model file's ``optimizer`` as DeepSpeed's BF16_Optimizer writes it (bf16 with pipeline
    parallelism): its own keys, no torch ``state`` / ``param_groups``."""
    osd.clear()
    osd.update(base_optimizer_state={}, single_partition_of_fp32_groups=[], clip_grad=1.0)


def _one_parameter_less(osd):
    osd["param_groups"][0]["params"].pop()


@pytest.mark.parametrize("stage,change,expected,fix", [
    (2, _edit_model_states("mp_world_size", 2), "mp_world_size 2) with tensor parallelism is not read here",
     "zero_to_fp32.py"),
    (2, _remove_rank_1, "partition_count is 2; is a rank's file missing?", "missing"),
    (0, _edit_zero0_optimizer(_bf16_optimizer_keys), "'optimizer' is not a torch optimizer's state_dict (keys "
     "['base_optimizer_state', 'clip_grad', 'single_partition_of_fp32_groups'])", "zero_to_fp32.py"),
    (0, _edit_zero0_optimizer(_one_parameter_less), "'s optimizer has 5 parameters, this engine trains 6",
     "give initialize the saving run's model and model_parameters"),
], ids=["tensor-parallel", "rank-file-missing", "zero0-bf16-optimizer", "zero0-parameter-count"])
def test_deepspeed_checkpoint_not_read_is_one_line(tmp_path, stage, change, expected, fix):
    [message] = run_distributed(_load_error, 1, str(tmp_path), stage, change, timeout=120)
    assert message is not None and expected in message and "\n" not in message
    assert fix in message


def _load_zero3_without_model_file(directory, saved_dp, removed_rank):
    config = sharded(ds_config(dist.get_world_size(), 1, 3, "mlp"))
    engine, _, _, _ = megatron_core.initialize(make_model("mlp"), config=config)
    run_steps("mlp", engine, 0, 1)
    engine.save_checkpoint(os.path.join(directory, "ours"), tag="t")
    ds_dir = os.path.join(directory, "ds")
    if dist.get_rank() == 0:
        state = state_for_deepspeed(os.path.join(directory, "ours", "t"), config)
        write_deepspeed_checkpoint(ds_dir, "global_step1", state, 3, saved_dp, {})
        if removed_rank is not None:
            os.remove(os.path.join(ds_dir, "global_step1", f"zero_pp_rank_{removed_rank}_mp_rank_00_model_states.pt"))
    dist.barrier()
    try:
        path, _ = engine.load_checkpoint(ds_dir)
        return os.path.basename(path), os.path.exists(path)
    except ConfigError as exc:
        return str(exc)
    finally:
        engine.parallel_state.destroy()


@pytest.mark.parametrize("removed_rank", [0, 1])
def test_deepspeed_zero3_checkpoint_missing_a_rank_model_file_is_one_line(tmp_path, removed_rank):
    """A model file lost from a DP-2 ZeRO-3 checkpoint. Rank 1's: DP rank 1 fell back to rank 0's file (meant for a
    checkpoint of fewer ranks) and returned the lost file's name. Rank 0's: the line named mp_rank_00_model_states.pt,
    a file ZeRO-3 does not write, with no fix. Every rank now stops on the same line naming the lost file."""
    messages = run_distributed(_load_zero3_without_model_file, 2, str(tmp_path), 2, removed_rank, timeout=180)
    for message in messages:
        assert isinstance(message, str) and "\n" not in message, message
        assert message.startswith("load_checkpoint: ") and message.endswith("; copy every rank's file"), message
        assert (f"zero_pp_rank_{removed_rank}_mp_rank_00_model_states.pt is missing (DeepSpeed's dp_world_size is 2: "
                "each of its DP ranks wrote a model-states file)") in message


def _mlp_state_for_deepspeed(directory: str) -> dict:
    """One engine step of the "mlp" model at DP 1, saved under DIRECTORY/ours and read as DeepSpeed's state."""
    config = ds_config(1, 1, 0, "mlp")
    engine, _, _, _ = megatron_core.initialize(make_model("mlp"), config=config)
    run_steps("mlp", engine, 0, 1)
    engine.save_checkpoint(os.path.join(directory, "ours"), tag="t")
    engine.parallel_state.destroy()
    return state_for_deepspeed(os.path.join(directory, "ours", "t"), config)


def test_deepspeed_zero3_checkpoint_missing_rank_0_model_file_consolidates_to_one_line(tmp_path):
    """zero_to_fp32 on a DP-2 ZeRO-3 checkpoint without rank 0's model file: it said the folder was not an engine
    checkpoint (no mp_rank_00_model_states.pt); now the lost file and the fix, as load_checkpoint."""
    def consolidate_without_rank_0(directory):
        state = _mlp_state_for_deepspeed(directory)
        write_deepspeed_checkpoint(os.path.join(directory, "ds"), "global_step1", state, 3, 2, {})
        os.remove(os.path.join(directory, "ds", "global_step1", "zero_pp_rank_0_mp_rank_00_model_states.pt"))
        where = [("ds", None), ("ds", "global_step1"), (os.path.join("ds", "global_step1"), None)]
        return [config_error(functools.partial(consolidate_state_dict, os.path.join(directory, path), tag))
                for path, tag in where]

    [messages] = run_distributed(consolidate_without_rank_0, 1, str(tmp_path), timeout=120)
    for message in messages:
        assert message is not None and "\n" not in message and message.startswith("zero_to_fp32: "), message
        assert message.endswith("global_step1/zero_pp_rank_0_mp_rank_00_model_states.pt is missing (DeepSpeed's "
                                "dp_world_size is 2: each of its DP ranks wrote a model-states file); copy every "
                                "rank's file"), message


def test_deepspeed_zero3_checkpoint_of_fewer_ranks_names_rank_0_file(tmp_path):
    """A DP-1 ZeRO-3 checkpoint on 2 ranks: DP rank 1 reads and names rank 0's file, which exists."""
    results = run_distributed(_load_zero3_without_model_file, 2, str(tmp_path), 1, None, timeout=180)
    assert results == [("zero_pp_rank_0_mp_rank_00_model_states.pt", True)] * 2


@pytest.mark.parametrize("stage,dp", [(0, 1), (2, 2), (3, 2)])
def test_deepspeed_checkpoint_consolidates(tmp_path, stage, dp):
    """``zero_to_fp32``'s ``consolidate_state_dict`` on DeepSpeed's files: each parameter's fp32 main value
    (real DeepSpeed 0.19.8's own zero_to_fp32.py wrote the same bits for its files: docs/engine.md)."""
    def state_and_consolidated(directory):
        state = _mlp_state_for_deepspeed(directory)
        write_deepspeed_checkpoint(os.path.join(directory, "ds"), "global_step1", state, stage, dp, {})
        return state["fp32"], consolidate_state_dict(os.path.join(directory, "ds"))

    [(fp32, (consolidated, hf_config))] = run_distributed(state_and_consolidated, 1, str(tmp_path), timeout=120)
    assert hf_config is None and sorted(consolidated) == sorted(fp32)
    for name, value in fp32.items():
        assert torch.equal(consolidated[name], value), name


# the scale grows twice before the save (262144), then overflows twice after it: the first spends the hysteresis
# (saved as 2), the second backs off (131072) and is skipped (a wrong hysteresis backed off one step early)
FP16 = {"enabled": True, "initial_scale_power": 16, "loss_scale_window": 1, "hysteresis": 2}


def _fp16_resume(directory, stage):
    """fp16: DeepSpeed's ``DynamicLossScaler`` in the files, restated from this engine's scaler after 3 steps
    (``cur_iter`` counts every step, skipped ones too; ``last_overflow_iter = cur_iter - growth_tracker - 1``)."""
    config = ds_config(1, 1, stage, "mlp", fp16=FP16, scheduler=SCHEDULER)
    engine, _, _, _ = megatron_core.initialize(make_model("mlp"), config=config)
    scales = []
    for step in range(6):
        if step == 3:
            engine.save_checkpoint(os.path.join(directory, "ours"), tag="t")
            saved = load_states(model_file(os.path.join(directory, "ours", "t"), 0))
        run_steps("mlp", engine, step, step + 1)
        scales.append(engine.get_loss_scale())
    straight, skipped = state_of(engine), engine.skipped_steps
    engine.parallel_state.destroy()
    state = state_for_deepspeed(os.path.join(directory, "ours", "t"), config)
    scaler = saved["grad_scaler"]
    state.update(dtype=torch.float16, skipped_steps=saved["skipped_steps"], scaler={
        "cur_scale": scaler["scale"], "dynamic": True, "cur_iter": saved["global_steps"],
        "last_overflow_iter": saved["global_steps"] - scaler["growth_tracker"] - 1, "scale_factor": 2.0,
        "scale_window": 1, "min_scale": 1, "delayed_shift": 2, "cur_hysteresis": scaler["hysteresis_tracker"],
        "consecutive_hysteresis": False, "raise_error_at_min_scale": True, "dtype": torch.float16})
    write_deepspeed_checkpoint(os.path.join(directory, "ds"), "global_step3", state, stage, 2, {})
    engine, _, _, _ = megatron_core.initialize(other_weights(), config=config)
    engine.load_checkpoint(os.path.join(directory, "ds"))
    resumed_scales = []
    for step in range(3, 6):
        run_steps("mlp", engine, step, step + 1)
        resumed_scales.append(engine.get_loss_scale())
    result = scales, resumed_scales, straight, state_of(engine), skipped, engine.skipped_steps
    engine.parallel_state.destroy()
    return result


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_fp16_checkpoint_resumes_loss_scale(tmp_path, stage):
    [(scales, resumed_scales, straight, resumed, skipped, resumed_skipped)] = run_distributed(
        _fp16_resume, 1, str(tmp_path), stage, timeout=120)
    assert resumed_scales == scales[3:] and scales[2] > scales[0] and scales[5] < scales[2], scales  # grew, backed off
    assert resumed_skipped == skipped > 0
    for name, value in straight.items():
        assert torch.equal(resumed[name], value), name


def _small_state(dtype: torch.dtype) -> dict:
    """A two-parameter state for ``write_deepspeed_checkpoint``, without an engine."""
    g = torch.Generator().manual_seed(0)
    shapes = {"fc.weight": (4, 3), "fc.bias": (4,)}

    def tensors():
        return {n: torch.randn(s, generator=g) for n, s in shapes.items()}

    return {"shapes": shapes, "fp32": tensors(), "exp_avg": tensors(), "exp_avg_sq": tensors(),
            "step": torch.tensor(2.0), "group": {"lr": 0.01, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0},
            "clip": 0.5, "lr_scheduler": {}, "global_steps": 2, "global_samples": 4, "ds_config": {}, "dtype": dtype}


@pytest.mark.parametrize("stage,dp", [(0, 1), (1, 1), (2, 2), (3, 2)])
def test_deepspeed_checkpoint_consolidates_buffers_in_fp32(tmp_path, stage, dp):
    """DeepSpeed 0.19.8's zero_to_fp32.py takes the buffers ``buffer_names`` lists from ``module``, floating ones
    in fp32 (``parse_model_states``: ``v.float() if v.is_floating_point() else v``): a bf16 run's buffer too
    (ZeRO-0: an fp32 run, whose ``module`` is the weights, with a bf16 buffer)."""
    state = _small_state(torch.float32 if stage == 0 else torch.bfloat16)
    write_deepspeed_checkpoint(str(tmp_path), "global_step2", state, stage, dp, {})
    buffers = {"norm.running_mean": torch.tensor([0.1, 0.2, 0.3]).to(torch.bfloat16),
               "norm.num_batches_tracked": torch.tensor(7)}
    folder = os.path.join(str(tmp_path), "global_step2")
    for name in os.listdir(folder):
        if name.endswith("model_states.pt"):
            saved = torch.load(os.path.join(folder, name), weights_only=False)
            saved["module"].update(buffers)
            saved["buffer_names"] = list(buffers)
            torch.save(saved, os.path.join(folder, name))
    consolidated, _ = consolidate_state_dict(str(tmp_path))
    assert sorted(consolidated) == sorted([*state["shapes"], *buffers])
    mean = consolidated["norm.running_mean"]
    assert mean.dtype == torch.float32 and torch.equal(mean, buffers["norm.running_mean"].float())
    count = consolidated["norm.num_batches_tracked"]
    assert count.dtype == torch.int64 and int(count) == 7
    for name, value in state["fp32"].items():
        assert torch.equal(consolidated[name], value), name


def _tied_zero3_resume(directory):
    """HF GPT-2 (``lm_head.weight`` tied to ``transformer.wte.weight``) from DeepSpeed's ZeRO-3 files, which hold
    the tied name as one more empty placeholder in ``module`` and name its owner in ``shared_params``."""
    config = ds_config(1, 1, 3, "gpt2", optimizer=opt_for("mlp"))  # AdamW, the optimizer the files hold
    engine, _, _, _ = megatron_core.initialize(make_model("gpt2"), config=config)
    run_steps("gpt2", engine, 0, 2)
    engine.save_checkpoint(os.path.join(directory, "ours"), tag="t")
    straight, _ = run_steps("gpt2", engine, 2, 4)
    straight_state = state_of(engine)
    engine.parallel_state.destroy()
    state = state_for_deepspeed(os.path.join(directory, "ours", "t"), config)
    ds_dir = os.path.join(directory, "ds")
    write_deepspeed_checkpoint(ds_dir, "global_step2", state, 3, 1, {})
    path = os.path.join(ds_dir, "global_step2", "zero_pp_rank_0_mp_rank_00_model_states.pt")
    saved = torch.load(path, weights_only=False)
    assert "lm_head.weight" not in saved["module"] and "transformer.wte.weight" in saved["module"]
    saved["module"]["lm_head.weight"] = torch.empty(0)
    saved["shared_params"] = {"lm_head.weight": "transformer.wte.weight"}
    torch.save(saved, path)
    model = make_model("gpt2")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    engine, _, _, _ = megatron_core.initialize(model, config=config)
    engine.load_checkpoint(ds_dir)
    resumed, _ = run_steps("gpt2", engine, 2, 4)
    result = straight, resumed, straight_state, state_of(engine)
    engine.parallel_state.destroy()
    return result


def test_deepspeed_zero3_checkpoint_of_a_tied_model_resumes(tmp_path):
    [(straight, resumed, straight_state, resumed_state)] = run_distributed(_tied_zero3_resume, 1, str(tmp_path),
                                                                            timeout=120)
    assert resumed == straight
    assert sorted(resumed_state) == sorted(straight_state) and "lm_head.weight" in straight_state
    for name, value in straight_state.items():
        assert torch.equal(resumed_state[name], value), name


def _load_into_another_model(directory, stage, strict):
    """A DeepSpeed checkpoint of the MLP loaded into another model: the same layers under other names."""
    config = ds_config(1, 1, stage, "mlp")
    engine, _, _, _ = megatron_core.initialize(make_model("mlp"), config=config)
    run_steps("mlp", engine, 0, 1)
    engine.save_checkpoint(os.path.join(directory, "ours"), tag="t")
    engine.parallel_state.destroy()
    state = state_for_deepspeed(os.path.join(directory, "ours", "t"), config)
    write_deepspeed_checkpoint(os.path.join(directory, "ds"), "global_step1", state, stage, 2, {})
    engine, _, _, _ = megatron_core.initialize(torch.nn.ModuleDict({"net": make_model("mlp")}), config=config)
    try:
        engine.load_checkpoint(os.path.join(directory, "ds"), load_module_strict=strict)
    except ConfigError as exc:
        return str(exc)
    finally:
        engine.parallel_state.destroy()
    return None


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "load_module_strict=False"])
@pytest.mark.parametrize("stage", [0, 1, 3])
def test_deepspeed_checkpoint_of_another_model_says_so(tmp_path, stage, strict):
    """Its parameters were taken for frozen ones left out by ``exclude_frozen_parameters=True`` (the error told the
    user to load with ``load_module_strict=False``, which then failed on the first parameter as 'frozen when
    saved'); fp32 at ZeRO-0 raised a KeyError)."""
    [message] = run_distributed(_load_into_another_model, 1, str(tmp_path), stage, strict, timeout=120)
    expected = ("holds another model than this engine's (6 missing key(s), e.g. 'net.0.weight'; 6 unexpected key(s), "
                "e.g. '0.weight')" if strict else "has no optimizer state for 'net.0.weight', a parameter the "
                "checkpoint does not hold; load it with load_optimizer_states=False")
    assert message is not None and expected in message and "\n" not in message, message
