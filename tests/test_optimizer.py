"""Loss scalers, configuration errors, weight-decay groups, SGD, and the global grad norm over TP x PP."""
import pytest
import torch
from ddp_common import compare, serial_reference, train
from harness import run_distributed
from toy_model import ToyConfig, build_toy_chunks

from megatron_core import parallel_state
from megatron_core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron_core.optimizer import (
    ConstantGradScaler,
    DistributedOptimizer,
    DynamicGradScaler,
    OptimizerConfig,
    get_megatron_optimizer,
)
from megatron_core.optimizer.optimizer import make_grad_scaler


# ---- loss scaling -----------------------------------------------------------------------------
def test_dynamic_loss_scale_defaults_follow_deepspeed():
    scaler = make_grad_scaler(OptimizerConfig(fp16=True))
    assert isinstance(scaler, DynamicGradScaler)
    assert (scaler.scale, scaler.growth_interval, scaler.hysteresis, scaler.min_scale) == (2.0 ** 16, 1000, 2, 1.0)
    assert isinstance(make_grad_scaler(OptimizerConfig(fp16=True, loss_scale=128.0)), ConstantGradScaler)
    assert make_grad_scaler(OptimizerConfig(fp16=True, loss_scale=0)).__class__ is DynamicGradScaler  # 0 = dynamic
    assert make_grad_scaler(OptimizerConfig(bf16=True)) is None


def test_dynamic_loss_scale_growth_backoff_hysteresis_and_floor():
    s = DynamicGradScaler(initial_scale=8.0, min_scale=2.0, growth_interval=3, hysteresis=2)
    for _ in range(2):
        s.update(False)
    assert s.scale == 8.0
    s.update(False)
    assert s.scale == 16.0, "doubles after growth_interval clean steps"
    s.update(True)
    assert s.scale == 16.0, "the first overflow is absorbed by hysteresis"
    s.update(False)
    s.update(True)
    assert s.scale == 8.0, "the second overflow since the last growth halves"
    s.update(True)
    s.update(True)
    assert s.scale == 2.0, "then every overflow halves, down to min_scale"
    s.update(True)
    assert s.scale == 2.0
    for _ in range(3):
        s.update(False)
    assert s.scale == 4.0 and s.hysteresis_tracker == 2, "growth restores the hysteresis budget"
    restored = DynamicGradScaler(1.0, 1.0, 3, 2)
    restored.load_state_dict(s.state_dict())
    assert restored.state_dict() == s.state_dict()


def _megatron_rule(scale, min_scale, interval, hysteresis, steps):
    """Megatron-LM ``DynamicGradScaler.update`` restated: (scale, growth_tracker, hysteresis_tracker) per step."""
    growth, hyst, out = 0, hysteresis, []
    for found_inf in steps:
        if found_inf:
            growth, hyst = 0, hyst - 1
            if hyst <= 0:
                scale = max(scale * 0.5, min_scale)
        else:
            growth += 1
            if growth == interval:
                growth, hyst, scale = 0, hysteresis, scale * 2.0
        out.append((scale, growth, hyst))
    return out


def _deepspeed_rule(scale, min_scale, window, hysteresis, steps, consecutive=False):
    """DeepSpeed 0.19.8 ``DynamicLossScaler.update_scale`` restated (``delayed_shift`` = hysteresis): growth when
    ``stable_interval = cur_iter - last_overflow_iter - 1`` is a positive multiple of the window, so the first
    growth comes one clean step later than Megatron's. Checked against DeepSpeed itself (/tmp/peers-venv, CPU):
    its scales over all-clean, overflow-then-clean and a 40-step random sequence, hysteresis 1-3, with and
    without ``consecutive_hysteresis``, equal this function's. Only the scales are comparable."""
    cur_iter, last_overflow, cur_hyst, out = 0, -1, hysteresis, []
    for overflow in steps:
        if overflow:
            if hysteresis == 1 or cur_hyst == 1:
                scale = max(scale / 2.0, min_scale)
            else:
                cur_hyst -= 1
            last_overflow = cur_iter
        else:
            if consecutive:
                cur_hyst = hysteresis
            stable = cur_iter - last_overflow - 1
            if stable > 0 and stable % window == 0:
                cur_hyst, scale = hysteresis, scale * 2.0
        cur_iter += 1
        out.append(scale)
    return out


_C, _O = False, True  # a clean step, an overflowing step
SCALER_SEQUENCES = {
    "overflow-resets-growth": [_C, _C, _O, _C, _C, _C, _C],  # 8 after the 4th step, not 16
    "hysteresis-then-backoff": [_O, _O, _O, _C, _C, _C, _O, _C, _O],
    "floor": [_O] * 6 + [_C] * 3,
    "growth-restores-hysteresis": [_C, _C, _C, _O, _C, _C, _C, _O, _O],
    "random": [bool(b) for b in torch.randint(0, 2, (40,), generator=torch.Generator().manual_seed(5)).tolist()],
}


@pytest.mark.parametrize("hysteresis", [1, 2, 3])
@pytest.mark.parametrize("name", list(SCALER_SEQUENCES))
def test_dynamic_loss_scale_follows_megatron_and_deepspeed_after_every_step(name, hysteresis):
    steps = SCALER_SEQUENCES[name]
    s = DynamicGradScaler(initial_scale=8.0, min_scale=2.0, growth_interval=3, hysteresis=hysteresis)
    expected = _megatron_rule(8.0, 2.0, 3, hysteresis, steps)
    for i, found_inf in enumerate(steps):
        s.update(found_inf)
        got = (s.scale, s.growth_tracker, s.hysteresis_tracker)
        assert got == expected[i], f"{name} step {i} ({'overflow' if found_inf else 'clean'}): {got} != {expected[i]}"
    for consecutive in (False, True):  # the engine's scaler: DeepSpeed's window count (and its fp16 key)
        ds = DynamicGradScaler(8.0, 2.0, 3, hysteresis, consecutive_hysteresis=consecutive, deepspeed_window=True)
        deepspeed = _deepspeed_rule(8.0, 2.0, 3, hysteresis, steps, consecutive)
        for i, found_inf in enumerate(steps):
            ds.update(found_inf)
            assert ds.scale == deepspeed[i], f"{name} step {i}: scale {ds.scale} != DeepSpeed's {deepspeed[i]}"
    if name == "overflow-resets-growth" and hysteresis == 2:
        assert [e[0] for e in expected[:4]] == [8.0, 8.0, 8.0, 8.0]


def test_config_errors_name_the_flag():
    with pytest.raises(ValueError, match="--optimizer"):
        OptimizerConfig(optimizer="lamb")
    with pytest.raises(ValueError, match="mutually exclusive"):
        OptimizerConfig(fp16=True, bf16=True)
    with pytest.raises(ValueError, match="zero_stage"):
        DistributedDataParallelConfig(zero_stage=4)
    with pytest.raises(ValueError, match="--offload-param.*--zero-stage 3"):
        DistributedDataParallelConfig(zero_stage=2, offload_param=True)
    with pytest.raises(ValueError, match="--overlap-param-gather"):
        DistributedDataParallelConfig(zero_stage=0, overlap_param_gather=True)
    with pytest.raises(ValueError, match="zero1_all_reduce_grads"):
        DistributedDataParallelConfig(zero_stage=2, zero1_all_reduce_grads=True)
    assert DistributedDataParallelConfig(zero_stage=2).use_distributed_optimizer
    assert DistributedDataParallelConfig(zero_stage=1).reduce_scatter_grads
    assert not DistributedDataParallelConfig(zero_stage=1, zero1_all_reduce_grads=True).reduce_scatter_grads


def _mismatches():
    ps = parallel_state.ParallelState(1, 1)
    errors = {}
    (model,) = build_toy_chunks(ToyConfig(num_layers=1), ps)
    sharded = DistributedDataParallel(DistributedDataParallelConfig(zero_stage=1), model, ps)
    for name, call in {
        "zero-mixed-with-plain-chunk": lambda: get_megatron_optimizer(
            OptimizerConfig(), [sharded, build_toy_chunks(ToyConfig(num_layers=1), ps)[0]], ps),
        "distributed-optimizer-unwrapped": lambda: DistributedOptimizer(
            OptimizerConfig(), [build_toy_chunks(ToyConfig(num_layers=1), ps)[0]], ps),
        "bf16-params-without-flag": lambda: get_megatron_optimizer(
            OptimizerConfig(), [build_toy_chunks(ToyConfig(num_layers=1), ps)[0].to(torch.bfloat16)], ps),
    }.items():
        try:
            call()
        except (TypeError, ValueError) as exc:
            errors[name] = str(exc)
    optimizer = get_megatron_optimizer(OptimizerConfig(), [sharded], ps)
    groups = [[main.dim() for main in g["params"]] for g in optimizer.param_groups]
    decay = [(main.numel(), model.dim()) for main, model in optimizer.pairs]
    ps.destroy()
    wds = [g["weight_decay"] for g in optimizer.param_groups]
    return errors, isinstance(optimizer, DistributedOptimizer), groups, wds, decay


def test_optimizer_choice_errors_and_weight_decay_groups():
    ((errors, distributed, groups, wds, pairs),) = run_distributed(_mismatches, 1, timeout=60)
    assert "zero_stage" in errors["zero-mixed-with-plain-chunk"]
    assert "DistributedDataParallel" in errors["distributed-optimizer-unwrapped"]
    assert "--bf16" in errors["bf16-params-without-flag"]
    assert distributed
    assert wds == [0.01, 0.0], "weight decay on matrices only"
    n_matrices = sum(1 for _, dim in pairs if dim > 1)
    assert len(groups[0]) == n_matrices and len(groups[1]) == len(pairs) - n_matrices > 0


# ---- SGD, zero counting and the global norm over TP x PP ---------------------------------------
def _zero_first_fc2(params: dict) -> None:
    """A zero fc2 weight in layer 0 gives exactly zero gradients to that layer's fc1 (TP-split) and
    layernorm (TP-replicated) in the first step: the zero count must count each element once."""
    if "blocks.0.fc2.weight" in params:  # on the first pipeline stage only
        with torch.no_grad():
            params["blocks.0.fc2.weight"].zero_()


SGD = {"optimizer": "sgd", "sgd_momentum": 0.9, "lr": 0.05, "log_num_zeros_in_grad": True}
CASES = {
    # name: (world, layout, model, DDP options, optimizer options)
    "sgd-dp2-zero1": (2, {}, ToyConfig(num_layers=2), {"zero_stage": 1, "bucket_size": 700}, SGD),
    # Norm and zero count must count TP-replicated layernorms once and the tied output weight once.
    # SGD, not Adam: Adam's g / (sqrt(v) + eps) turns TP x PP reduction-order noise on near-zero
    # gradients into 2e-5 element-wise parameter differences after 3 steps (measured); see test_ddp.
    "tp2-pp2-norm": (4, {"tp": 2, "pp": 2}, ToyConfig(num_layers=2, sequence_parallel=True),
                     {"zero_stage": 0}, SGD),
}


@pytest.mark.parametrize("name", list(CASES))
def test_global_norm_zero_count_and_sgd_equal_one_process(name):
    world, layout, config, ddp, opt = CASES[name]
    dp = world // (layout.get("tp", 1) * layout.get("pp", 1))
    (ref,) = run_distributed(serial_reference, 1, config, 3, dp * 2, opt, _zero_first_fc2, timeout=60)
    assert ref["zeros"][0] > 0
    results = run_distributed(train, world, layout, config, ddp, 3, 2, opt, torch.float32, _zero_first_fc2,
                              timeout=90)
    compare(results, ref, 2, what=name)


# ---- clipping off: 0 or a negative --clip-grad ----------------------------------------------
def _clip_runs() -> dict:
    return {clip: train({}, ToyConfig(num_layers=2), {"zero_stage": 1, "bucket_size": 700}, 3, 2, {"clip_grad": clip})
            for clip in (-1.0, 0.0, 0.5)}


def test_a_negative_clip_grad_trains_unclipped_as_in_megatron_lm():
    """Megatron-LM takes any float for --clip-grad and clips only when ``clip_grad > 0.0``
    (megatron/core/optimizer/optimizer.py), as DeepSpeed's ``gradient_clipping``: a negative value was a
    ValueError here and now trains as 0.0 (no clipping), bit for bit. The 0.5 run shows clipping was live."""
    for r in run_distributed(_clip_runs, 2, timeout=120):
        negative, off, clipped = r[-1.0], r[0.0], r[0.5]
        assert negative["losses"] == off["losses"] and negative["norms"] == off["norms"]
        for name, value in off["params"].items():
            assert torch.equal(negative["params"][name], value), name
        assert min(off["norms"]) > 0.5
        assert any(not torch.equal(clipped["params"][name], value) for name, value in off["params"].items())
