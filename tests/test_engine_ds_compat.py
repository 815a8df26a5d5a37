"""DeepSpeed 0.19.8 surface a fresh user reached for: ``module_state_dict``, ``get_batch_info``,
``megatron_core.__version__``, param groups and weight decay as DeepSpeed forms them, ZeRO-1/2
``safe_get_full_grad`` between micro steps.

What DeepSpeed does was read in ``deepspeed/runtime/engine.py`` (0.19.8) and, where it says so, run on
the CPU with /tmp/peers-venv (the project's tests cannot import deepspeed).
"""

import pathlib
import re

import pytest
import torch
from engine_common import ds_config, make_model
from harness import run_distributed

import megatron_core
from megatron_core.errors import ConfigError

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_version_is_the_distributions():
    """``megatron_core.__version__`` (DeepSpeed's ``deepspeed.__version__``) was an AttributeError; it is the
    installed distribution's version, pyproject.toml's."""
    declared = re.search(r'^version = "([^"]+)"$', (ROOT / "pyproject.toml").read_text(), re.MULTILINE)
    assert declared is not None and megatron_core.__version__ == declared.group(1)


def _state_and_batch_info():
    model = make_model("mlp")
    model[0].weight.requires_grad_(False)
    config = {**ds_config(1, 3, 0), "train_batch_size": 6}
    params = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = megatron_core.initialize(model, model_parameters=params, config=config)
    full = engine.module_state_dict()
    trainable = engine.module_state_dict(prefix="module.", exclude_frozen_parameters=True)
    kept = engine.module_state_dict(keep_vars=True)
    out = {
        "full": sorted(full),
        "same": all(torch.equal(full[k], v) for k, v in engine.module.state_dict().items()),
        "trainable": sorted(trainable),
        "kept_is_param": kept["2.weight"] is engine.module[2].weight,
        "info": engine.get_batch_info(),
    }
    engine.set_train_batch_size(12)
    out["info_after"] = engine.get_batch_info()
    engine.parallel_state.destroy()
    return out


def test_module_state_dict_and_get_batch_info():
    """Both were AttributeErrors. ``module_state_dict`` takes DeepSpeed's arguments (``destination``, ``prefix``,
    ``keep_vars``, ``exclude_frozen_parameters``) and returns the user's model's state dict (no wrapper
    prefix); ``get_batch_info`` the batch triple, following ``set_train_batch_size``."""
    out = run_distributed(_state_and_batch_info, 1, timeout=60)[0]
    names = ["0.bias", "0.weight", "2.bias", "2.weight", "4.bias", "4.weight"]
    assert out["full"] == names and out["same"] and out["kept_is_param"]
    assert out["trainable"] == ["module." + n for n in names if n != "0.weight"]
    assert out["info"] == (6, 2, 3) and out["info_after"] == (12, 2, 6)


# ---- param groups and weight decay, as DeepSpeed forms them ------------------------------------------------
DECAY_CONFIG = {
    "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
    "optimizer": {"type": "AdamW", "params": {"lr": 0.1, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.5}},
    "steps_per_print": 10**6,
}
# DeepSpeed 0.19.8, /tmp/peers-venv, DS_ACCELERATOR=cpu, one gloo rank, torch_adam, ZeRO stage 0, 1 and 2 alike:
# deepspeed.initialize(model=_decay_model(), model_parameters=model.parameters(), config=DECAY_CONFIG) and three
# steps of _decay_batch(0..2) gave get_lr() [0.1], one group with weight_decay 0.5, losses
# [0.7609480619430542, 1.4191032648086548, 1.31943678855896] and model[0].bias[:4]
# [-0.54867023229599, 0.07330617308616638, -0.40006932616233826, -0.0788869857788086].
DEEPSPEED_LOSSES = [0.7609480619430542, 1.4191032648086548, 1.31943678855896]
DEEPSPEED_BIAS = [-0.54867023229599, 0.07330617308616638, -0.40006932616233826, -0.0788869857788086]


def _decay_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))


def _decay_batch(step):
    gen = torch.Generator().manual_seed(step)
    return torch.randn(4, 8, generator=gen), torch.randn(4, 4, generator=gen)


def _groups_of(model, how):
    if how == "parameters":
        return model.parameters()
    if how == "none":
        return None
    matrices = [p for p in model.parameters() if p.dim() > 1]
    return [{"params": matrices, "weight_decay": 0.3}, {"params": [p for p in model.parameters() if p.dim() == 1]}]


def _train_decay(stage, how):
    model = _decay_model()
    config = {**DECAY_CONFIG, "zero_optimization": {"stage": stage}}
    if how == "client":  # a torch AdamW with two groups of their own decays; the config then has no optimizer
        del config["optimizer"]
        groups = _groups_of(model, "groups")
        groups[1]["weight_decay"] = 0.05
        client = torch.optim.AdamW(groups, lr=0.1, betas=(0.9, 0.95), eps=1e-8)
        engine, _, _, _ = megatron_core.initialize(model, optimizer=client, config=config)
    else:
        engine, _, _, _ = megatron_core.initialize(model, model_parameters=_groups_of(model, how), config=config)
    out = {"lr": engine.get_lr(), "decay": [g["weight_decay"] for g in engine.optimizer.param_groups], "losses": []}
    for step in range(3):
        x, y = _decay_batch(step)
        loss = torch.nn.functional.mse_loss(engine(x), y)
        engine.backward(loss)
        engine.step()
        out["losses"].append(loss.item())
    out["bias"] = engine.module[0].bias.detach()[:4].tolist()
    engine.parallel_state.destroy()
    return out


def _torch_reference(how):
    """The same three steps with torch.optim.AdamW over the same groups (what DeepSpeed steps)."""
    model = _decay_model()
    groups = list(model.parameters()) if how in ("parameters", "none") else _groups_of(model, how)
    if how == "client":
        groups[1]["weight_decay"] = 0.05
    optimizer = torch.optim.AdamW(groups, lr=0.1, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.5)
    losses = []
    for step in range(3):
        x, y = _decay_batch(step)
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, model[0].bias.detach()[:4].tolist(), [g["weight_decay"] for g in optimizer.param_groups]


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_weight_decay_and_groups_follow_deepspeed(stage):
    """With ``model_parameters=model.parameters()`` (or none) DeepSpeed builds one param group and decays every
    parameter, biases included; the engine had two groups (Megatron's no decay on 1-D parameters), so
    ``get_lr()`` showed two rates and training differed from DeepSpeed's as soon as weight_decay > 0
    (bias[:4] after 3 steps moved away from DeepSpeed's numbers above). Group dicts keep their own
    ``weight_decay`` (those were refused unless 0 or the optimizer's), the optimizer's filling a group without one;
    a client optimizer's groups are kept too."""
    for how in ("parameters", "none", "groups", "client"):
        out = run_distributed(_train_decay, 1, stage, how, timeout=60)[0]
        losses, bias, decays = _torch_reference(how)
        assert out["decay"] == decays and out["lr"] == [0.1] * len(decays), (how, out)
        assert out["losses"] == pytest.approx(losses, rel=1e-5), how
        assert out["bias"] == pytest.approx(bias, rel=1e-5, abs=1e-6), how
        if how in ("parameters", "none"):
            assert out["losses"] == pytest.approx(DEEPSPEED_LOSSES, rel=1e-5)
            assert out["bias"] == pytest.approx(DEEPSPEED_BIAS, rel=1e-5, abs=1e-6)


# ---- fp16.consecutive_hysteresis -----------------------------------------------------------------------------
OVERFLOWS = [1, 0, 1, 0, 1, 1, 0, 0, 0, 0, 0, 0, 1, 0, 1, 1, 1, 0, 0, 0, 0]
# DeepSpeed 0.19.8's DynamicLossScaler(init_scale=2**10, scale_window=3 or 1, min_scale=1, delayed_shift=2,
# consecutive_hysteresis=...), cur_scale after each update_scale(overflow) over OVERFLOWS (/tmp/peers-venv, CPU).
# Window 1: no growth on the first clean step after an overflow, then one on every step.
DEEPSPEED_SCALES = {
    (False, 3): [1024, 1024, 512, 512, 256, 128, 128, 128, 128, 256, 256, 256, 256, 256, 128, 64, 32, 32, 32, 32, 64],
    (True, 3): [1024, 1024, 1024, 1024, 1024, 512, 512, 512, 512, 1024, 1024, 1024, 1024, 1024, 1024, 512, 256, 256,
                256, 256, 512],
    (False, 1): [1024, 1024, 512, 512, 256, 128, 128, 256, 512, 1024, 2048, 4096, 4096, 4096, 2048, 1024, 512, 512,
                 1024, 2048, 4096],
    (True, 1): [1024, 1024, 1024, 1024, 1024, 512, 512, 1024, 2048, 4096, 8192, 16384, 16384, 16384, 16384, 8192,
                4096, 4096, 8192, 16384, 32768],
}


@pytest.mark.parametrize("consecutive,window", [(False, 3), (True, 3), (False, 1), (True, 1)])
def test_consecutive_hysteresis_follows_deepspeeds_loss_scaler(consecutive, window):
    """``fp16.consecutive_hysteresis: true`` was refused. With it a step without overflow restores the hysteresis,
    so only two overflows in a row (hysteresis 2) halve the scale; the config reaches the engine's scaler."""
    from megatron_core.engine.config import load_config
    from megatron_core.engine.library_configs import optimizer_config_from
    from megatron_core.optimizer.optimizer import make_grad_scaler

    fp16 = {"enabled": True, "initial_scale_power": 10, "loss_scale_window": window, "hysteresis": 2,
            "consecutive_hysteresis": consecutive}
    scaler = make_grad_scaler(optimizer_config_from(load_config({**ds_config(1, 1, 0), "fp16": fp16}, 1)))
    scales = []
    for overflow in OVERFLOWS:
        scaler.update(bool(overflow))
        scales.append(scaler.scale)
    assert scales == DEEPSPEED_SCALES[consecutive, window]


# ---- safe_get_full_grad between micro steps --------------------------------------------------------------------
# DeepSpeed 0.19.8, 2 gloo ranks on the CPU (/tmp/peers-venv), torch.nn.Linear(8, 4) (seed 0), AdamW, micro batch 2,
# gradient_accumulation_steps 2, each micro step engine.backward(engine(torch.ones(2, 8) * (rank + 1)).sum()), then
# deepspeed.utils.safe_get_full_grad(engine.module.weight).sum() before engine.step(): per stage, rank 0's and
# rank 1's (micro step 1, the boundary micro step 2). "raise": ValueError("Gradients are only available immediately
# after backward and before engine step").
DEEPSPEED_MID_GRADS = {
    0: [(32.0, 96.0), (64.0, 96.0)],
    1: [(32.0, 96.0), (64.0, 96.0)],
    2: [("raise", 96.0), ("raise", 96.0)],
    3: [(48.0, 96.0), (48.0, 96.0)],
}


def _mid_accumulation_grads(stage):
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "steps_per_print": 10**6,
              "optimizer": {"type": "AdamW", "params": {"lr": 0.01}}, "zero_optimization": {"stage": stage}}
    engine, _, _, _ = megatron_core.initialize(model, model_parameters=model.parameters(), config=config)
    sums = []
    for _ in range(2):
        engine.backward(engine(torch.ones(2, 8) * (engine.global_rank + 1)).sum())
        try:
            sums.append(megatron_core.zero.safe_get_full_grad(engine.module.weight).sum().item())
        except ValueError as exc:
            assert "only available immediately after backward and before engine step" in str(exc)
            sums.append("raise")
        engine.step()
    engine.parallel_state.destroy()
    return tuple(sums)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_safe_get_full_grad_between_micro_steps_answers_as_deepspeed(stage):
    """Before the accumulation boundary ZeRO-2 returned the micro step's reduced gradient where DeepSpeed raises;
    ZeRO-0/1 give the rank's own accumulated gradient and ZeRO-3 the reduced one so far, as DeepSpeed's."""
    assert run_distributed(_mid_accumulation_grads, 2, stage, timeout=120) == DEEPSPEED_MID_GRADS[stage]


# ---- data_types.grad_accum_dtype ---------------------------------------------------------------------------------
# DeepSpeed 0.19.8 (/tmp/peers-venv, CPU, one rank), bf16, torch.nn.Linear(16, 8) (seed 0), micro batch 4, GA 2,
# engine.backward(engine(x).float().pow(2).mean()) for two x = torch.randn(4, 16) (generator seed 1) in bf16, then
# safe_get_full_grad(engine.module.weight).flatten()[:6]: grad_accum_dtype "bf16" at ZeRO-0 (its FP16_UnfusedOptimizer)
# and "fp32" at ZeRO-1 (its BF16_Optimizer).
DEEPSPEED_ACCUMULATED = {
    ("bf16", 0): ("torch.bfloat16", [-0.050048828125, 0.04931640625, -0.01361083984375, -0.027587890625,
                                     0.030029296875, -0.0213623046875]),
    ("fp32", 1): ("torch.float32", [-0.04998779296875, 0.04931640625, -0.01361083984375, -0.027587890625,
                                    0.030029296875, -0.0213623046875]),
}


def _accumulated_grad(accum, stage):
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 8)
    config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2, "bf16": {"enabled": True},
              "data_types": {"grad_accum_dtype": accum}, "gradient_clipping": 0.0,
              "optimizer": {"type": "AdamW", "params": {"lr": 0.01}}, "zero_optimization": {"stage": stage}}
    engine, _, _, _ = megatron_core.initialize(model, model_parameters=model.parameters(), config=config)
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        engine.backward(engine(torch.randn(4, 16, generator=gen).to(torch.bfloat16)).float().pow(2).mean())
    grad = megatron_core.zero.safe_get_full_grad(engine.module.weight)
    engine.parallel_state.destroy()
    return str(grad.dtype), grad.float().flatten()[:6].tolist()


@pytest.mark.parametrize("accum,stage", sorted(DEEPSPEED_ACCUMULATED))
def test_grad_accum_dtype_accumulates_as_deepspeed(accum, stage):
    """``data_types.grad_accum_dtype`` was refused. ``"bf16"`` under bf16 accumulates the micro steps' gradients
    in bf16 (DeepSpeed's result bit for bit; the engine's bf16 default accumulates in fp32), ``"fp32"`` in fp32."""
    assert run_distributed(_accumulated_grad, 1, accum, stage, timeout=60)[0] == DEEPSPEED_ACCUMULATED[accum, stage]


@pytest.mark.parametrize("extra,message", [
    ({"data_types": {"grad_accum_dtype": "bf16"}},
     "data_types.grad_accum_dtype = 'bf16' with fp32 training is not implemented; use 'fp32' or the training dtype"),
    ({"data_types": {"grad_accum_dtype": "int8"}, "fp16": {"enabled": True}},
     "data_types.grad_accum_dtype = 'int8' with fp16 training is not implemented"),
    ({"data_types": {"grad_accum_dtype": "bfloat16"}, "bf16": {"enabled": True}, "communication_data_type": "fp32"},
     "data_types.grad_accum_dtype = 'bfloat16' with communication_data_type 'fp32' is not implemented"),
])
def test_grad_accum_dtype_mixes_not_implemented_are_one_line(extra, message):
    from megatron_core.engine.config import load_config
    from megatron_core.errors import ConfigError

    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config({**ds_config(1, 1, 0), **extra}, 1)


def _load_into_other_groups(directory):
    model = _decay_model()
    config = {**DECAY_CONFIG, "zero_optimization": {"stage": 1}}
    engine, _, _, _ = megatron_core.initialize(model, model_parameters=_groups_of(model, "groups"), config=config)
    engine.save_checkpoint(directory)
    engine.parallel_state.destroy()
    model = _decay_model()
    engine, _, _, _ = megatron_core.initialize(model, model_parameters=model.parameters(), config=config)
    try:
        engine.load_checkpoint(directory)
    finally:
        engine.parallel_state.destroy()


def test_a_checkpoint_of_other_param_groups_is_one_line(tmp_path):
    """Loading the optimizer of a run with other param groups (two here, one now; every engine checkpoint saved
    before the groups followed DeepSpeed's) was zip()'s ValueError with a traceback."""
    with pytest.raises(Exception, match="was saved with 2 optimizer param groups, this engine has 1 .*; load with "
                                        "load_optimizer_states=False"):
        run_distributed(_load_into_other_groups, 1, str(tmp_path), timeout=60)


def _group_error(case):
    model = make_model("mlp")
    params = list(model.parameters())
    groups = {"twice": [{"params": params}, {"params": params[:1]}],
              "string-decay": [{"params": params, "weight_decay": "0.1"}],
              "negative-decay": [{"params": params[:1], "weight_decay": -0.1}, {"params": params[1:]}]}[case]
    try:
        megatron_core.initialize(model, model_parameters=groups, config=ds_config(1, 1, 0))
    except ConfigError as exc:
        return str(exc)
    return None


@pytest.mark.parametrize("case,message", [
    ("twice", r"a parameter of shape \(\d+, \d+\) is in groups 0 and 1; give each parameter to one group"),
    ("string-decay", r"group 0's weight_decay must be a number >= 0, got '0\.1'"),
    ("negative-decay", r"group 0's weight_decay must be a number >= 0, got -0\.1"),
])
def test_bad_param_groups_are_one_line(case, message):
    """A parameter in two groups is torch.optim's ValueError under DeepSpeed 0.19.8 (checked on the CPU); a
    weight_decay string is its TypeError deep in the Adam kernel, a negative one torch's 'Invalid weight_decay
    value'. The engine took all three silently."""
    error = run_distributed(_group_error, 1, case, timeout=60)[0]
    assert error is not None and re.fullmatch(r"initialize\(model_parameters=\.\.\.\): " + message, error), error


def _one_tensor_group():
    model = make_model("mlp")
    params = list(model.parameters())
    engine, _, _, _ = megatron_core.initialize(
        model, model_parameters=[{"params": params[0], "weight_decay": 0.0}, {"params": params[1:]}],
        config=ds_config(1, 1, 0))
    return len(engine.get_lr())


def test_a_group_of_one_tensor_is_that_tensor():
    """torch.optim reads ``{"params": tensor}`` as a group of one; the engine iterated the tensor's rows and
    refused the groups as not covering the model."""
    assert run_distributed(_one_tensor_group, 1, timeout=60)[0] == 2


# ---- bf16 / fp16 cast: parameters only --------------------------------------------------------------------------
# DeepSpeed 0.19.8 (/tmp/peers-venv, CPU, one rank): tiny_hf_llama() under {"bf16": {"enabled": true}}, ZeRO-0,
# engine(input_ids=ids, labels=ids).loss for ids = torch.randint(0, 256, (2, 16)) (generator seed 0), no grad.
DEEPSPEED_BF16_LLAMA_LOSS = 5.606157302856445


def _bf16_llama_loss():
    from hf_testing import tiny_hf_llama

    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "bf16": {"enabled": True},
              "optimizer": {"type": "AdamW", "params": {"lr": 0.01}}, "zero_optimization": {"stage": 0}}
    model = tiny_hf_llama()
    engine, _, _, _ = megatron_core.initialize(model, model_parameters=model.parameters(), config=config)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        loss = engine(input_ids=ids, labels=ids).loss.item()
    dtypes = {str(p.dtype) for p in engine.module.parameters()}, str(engine.module.model.rotary_emb.inv_freq.dtype)
    engine.parallel_state.destroy()
    return loss, dtypes


def test_half_precision_casts_parameters_and_keeps_fp32_buffers():
    """bf16 cast the whole module, buffers too: Llama's rotary ``inv_freq`` was rounded to bf16, so the first
    loss was 5.606153 where DeepSpeed 0.19.8, which casts the parameters only and keeps fp32 buffers, gives
    5.606157 (and every later step drifted, 1e-5 to 4e-4 in a 2-rank Llama run)."""
    loss, (param_dtypes, inv_freq_dtype) = run_distributed(_bf16_llama_loss, 1, timeout=120)[0]
    assert param_dtypes == {"torch.bfloat16"} and inv_freq_dtype == "torch.float32"
    assert loss == DEEPSPEED_BF16_LLAMA_LOSS, loss
