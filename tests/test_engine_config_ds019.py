"""DeepSpeed 0.19's defaults and keys the engine's config follows: ``gradient_clipping`` 1.0 when left out,
``communication_data_type``, ``managed_gradient_accumulation`` (test_engine_config.py has the rest)."""

import re

import pytest
from engine_common import BASE_CONFIG, config_with

from megatron_core.engine import deepspeed_to_megatron, library_configs_from, load_config
from megatron_core.errors import ConfigError


def test_gradient_clipping_defaults_to_deepspeeds_1():
    """DeepSpeed 0.19 clips at 1.0 when the config leaves gradient_clipping out (deepspeedai/DeepSpeed#8068,
    GRADIENT_CLIPPING_DEFAULT = 1.0); 0 turns clipping off. The engine ran such a config unclipped, and
    pretrain_gpt.py's --clip-grad 1.0 (Megatron's default) 'disagreed' with a file without the key."""
    config = load_config(BASE_CONFIG, dp_size=1)
    assert config.gradient_clipping == 1.0 and library_configs_from(config).optimizer.clip_grad == 1.0
    assert load_config(config_with(gradient_clipping=0), dp_size=1).gradient_clipping == 0.0
    # DeepSpeed reads the key unchecked and clips only when it is > 0.0: a negative value is no clipping there
    negative = load_config(config_with(gradient_clipping=-1), dp_size=1)
    assert negative.gradient_clipping == -1.0 and library_configs_from(negative).optimizer.clip_grad == -1.0
    assert deepspeed_to_megatron(BASE_CONFIG, dp_size=1, flags={"clip_grad": 1.0}).optimizer.clip_grad == 1.0


def test_communication_data_type_fp32_reduces_gradients_in_fp32():
    """"communication_data_type": "fp32" was refused as not implemented, though fp32 and bf16 training reduce in
    fp32 here anyway; under fp16 it now reduces in fp32 too (DeepSpeed's meaning). The training dtype's own
    choice is accepted; a lower precision than this framework reduces in is refused in one line."""
    for precision in ({}, {"bf16": {"enabled": True}}, {"fp16": {"enabled": True}}):
        config = load_config(config_with(communication_data_type="fp32", **precision), dp_size=2)
        assert library_configs_from(config).ddp.grad_reduce_in_fp32, precision
    fp16 = {"fp16": {"enabled": True}}
    assert not library_configs_from(load_config(config_with(**fp16), dp_size=2)).ddp.grad_reduce_in_fp32
    config = load_config(config_with(communication_data_type="FP16", **fp16), dp_size=2)
    assert config.communication_data_type == "fp16" and not library_configs_from(config).ddp.grad_reduce_in_fp32
    for raw, message in (
        (config_with(communication_data_type="bf16", bf16={"enabled": True}),
         "communication_data_type = 'bf16' is not implemented with bf16 training (gradients reduce in fp32 here); "
         "remove it or set it to 'fp32'"),
        (config_with(communication_data_type="fp16"), "communication_data_type = 'fp16' is not implemented with fp32"),
        (config_with(communication_data_type="int8"),
         "communication_data_type = 'int8': choose one of fp32, fp16, bf16"),
    ):
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(raw, dp_size=2)


def test_deepspeed_019_managed_gradient_accumulation_key():
    """DeepSpeed 0.19's managed_gradient_accumulation (default true) was an unknown key; false (every step() a
    boundary) is not implemented."""
    assert load_config(config_with(managed_gradient_accumulation=True), dp_size=1).gradient_accumulation_steps == 4
    with pytest.raises(ConfigError, match="managed_gradient_accumulation = False is a DeepSpeed option this "
                                          "framework does not implement"):
        load_config(config_with(managed_gradient_accumulation=False), dp_size=1)


@pytest.mark.parametrize(("kind", "params", "decay"), [
    ("AdamW", {"torch_adam": True}, 0.01),
    ("Adam", {"torch_adam": True}, 0.01),  # Adam is AdamW (adam_w_mode's default): torch.optim.AdamW
    ("AdamW", {"torch_adam": True, "weight_decay": 0.0}, 0.0),
    ("AdamW", {}, 0.0),  # FusedAdam's (and CPUAdam's under offload) default
    ("AdamW", {"torch_adam": False}, 0.0),
    ("SGD", {}, 0.0),
], ids=["torch-adamw", "torch-adam", "torch-adamw-given", "fused", "torch-adam-false", "sgd"])
def test_weight_decay_default_is_the_optimizer_class_deepspeed_builds(kind, params, decay):
    """DeepSpeed 0.19.8 builds ``torch.optim.AdamW(params, **optimizer.params)`` for ``"torch_adam": true``, so a
    section without ``weight_decay`` decays by torch's default 0.01; FusedAdam and DeepSpeedCPUAdam default to 0.
    The engine used 0 for every one: 3 steps of an MLP at ZeRO-3, DP 2 then differed from DeepSpeed's from the
    second loss (0.721713 here vs 0.721694 there; with weight_decay 0 written out both give 0.721713)."""
    config = load_config(config_with(optimizer={"type": kind, "params": {"lr": 0.01, **params}}), dp_size=1)
    assert config.optimizer is not None and config.optimizer.weight_decay == decay
    assert library_configs_from(config).optimizer.weight_decay == decay
