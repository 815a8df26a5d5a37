"""DeepSpeed 0.19.8 surface a fresh user reached for: ``module_state_dict``, ``get_batch_info``,
``megatron_core.__version__``, param groups and weight decay as DeepSpeed forms them, ZeRO-1/2
``safe_get_full_grad`` between micro steps.

What DeepSpeed does was read in ``deepspeed/runtime/engine.py`` (0.19.8) and, where it says so, run on
the CPU with /tmp/peers-venv (the project's tests cannot import deepspeed).
"""

import pathlib
import re

import torch
from engine_common import ds_config, make_model
from harness import run_distributed

import megatron_core

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
