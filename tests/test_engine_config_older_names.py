"""DeepSpeed's older key names (``bfloat16``, ``cpu_offload``, ``cpu_offload_param``,
``stage3_gather_fp16_weights_on_model_save``) and ``"zero_optimization": true``: read as the keys they stand
for, refused beside them, and named as written in errors."""

import json

import pytest
from engine_common import config_with

from megatron_core.engine import library_configs_from, load_config
from megatron_core.errors import ConfigError


def test_bfloat16_is_the_older_name_of_bf16(tmp_path):
    """DeepSpeed still reads a "bfloat16" section when "bf16" is absent (and "check_overflow", the older
    name of check_grad_overflow)."""
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config_with(bfloat16={"enabled": True, "check_overflow": False})))
    assert load_config(str(path), dp_size=2).bf16_enabled
    with pytest.raises(ConfigError, match='both "bf16" and its older name "bfloat16"'):
        load_config(config_with(bf16={"enabled": True}, bfloat16={"enabled": True}), dp_size=2)



def test_deepspeeds_older_zero_key_names_are_read():
    """DeepSpeed still reads its deprecated ZeRO keys: cpu_offload (-> offload_optimizer cpu),
    cpu_offload_param (-> offload_param cpu) and stage3_gather_fp16_weights_on_model_save; it accepts
    cpu_offload_use_pin_memory and applies it to nothing (0.19), here it becomes those sections' pin_memory
    (which changes nothing either). cpu_offload: true was refused as not implemented, and
    cpu_offload_param was an unknown key (the known list spelt it cpu_offload_params)."""
    zero = load_config(config_with(zero_optimization={"stage": 3, "cpu_offload": True, "cpu_offload_param": True,
                                                "cpu_offload_use_pin_memory": True,
                                                "stage3_gather_fp16_weights_on_model_save": True}),
                       dp_size=2).zero_optimization
    assert (zero.offload_optimizer.device, zero.offload_param.device) == ("cpu", "cpu")
    assert zero.offload_optimizer.pin_memory and zero.offload_param.pin_memory
    assert zero.stage3_gather_16bit_weights_on_model_save
    # ... and map at stage 3 as the current keys do (a stage check that refused offload_param there was untested).
    libraries = library_configs_from(load_config(config_with(zero_optimization={"stage": 3, "cpu_offload": True,
                                                                          "cpu_offload_param": True}), dp_size=2))
    assert libraries.ddp.offload_param and libraries.optimizer.optimizer_cpu_offload
    zero = load_config(config_with(zero_optimization={"stage": 2, "cpu_offload": False}), dp_size=2).zero_optimization
    assert zero.offload_optimizer.device == "none"
    with pytest.raises(ConfigError, match=r"^DeepSpeed config: zero_optimization.cpu_offload is the older name of "
                                          r"zero_optimization.offload_optimizer: give one of them$"):
        load_config(config_with(zero_optimization={"stage": 2, "cpu_offload": True,
                                             "offload_optimizer": {"device": "cpu"}}), dp_size=2)
    # As DeepSpeed ("Cannot provide deprecated parameter ... and replacing parameter ... together"); the
    # older name was dropped silently when the current one was given too.
    with pytest.raises(ConfigError, match=r"^DeepSpeed config: zero_optimization.stage3_gather_fp16_weights_on_model_"
                                          r"save is the older name of zero_optimization.stage3_gather_16bit_weights_"
                                          r"on_model_save: give one of them$"):
        load_config(config_with(zero_optimization={"stage": 3, "stage3_gather_fp16_weights_on_model_save": True,
                                             "stage3_gather_16bit_weights_on_model_save": False}), dp_size=2)


@pytest.mark.parametrize("zero,message", [
    # cpu_offload_param: true below stage 3 named offload_param.device, a key the config did not hold.
    ({"stage": 2, "cpu_offload_param": True},
     "zero_optimization.cpu_offload_param = true offloads ZeRO-3's parameter shards: set zero_optimization.stage "
     "to 3, or cpu_offload_param to false"),
    ({"stage": 0, "cpu_offload": True},
     "zero_optimization.cpu_offload = true offloads the ZeRO optimizer's shard: set zero_optimization.stage to 1, "
     "2 or 3, or cpu_offload to false"),
    # The pin flag was checked under the section it was copied into (offload_optimizer.pin_memory), and not at
    # all without cpu_offload.
    ({"stage": 2, "cpu_offload": True, "cpu_offload_use_pin_memory": "yes"},
     "zero_optimization.cpu_offload_use_pin_memory must be bool, got 'yes'"),
    ({"stage": 2, "cpu_offload_use_pin_memory": "yes"},
     "zero_optimization.cpu_offload_use_pin_memory must be bool, got 'yes'"),
], ids=["cpu_offload_param", "cpu_offload", "pin_memory_with_cpu_offload", "pin_memory_alone"])
def test_errors_name_the_older_offload_key_the_config_holds(zero, message):
    """DeepSpeed's deprecated cpu_offload / cpu_offload_param / cpu_offload_use_pin_memory are read as the
    offload sections they stand for; an error about them names the key the user wrote, and its fix."""
    with pytest.raises(ConfigError) as info:
        library_configs_from(load_config(config_with(zero_optimization=zero), dp_size=2))
    assert str(info.value) == f"DeepSpeed config: {message}"
    # The current spelling keeps its own message.
    current = {"stage": 2, "offload_param": {"device": "cpu"}}
    with pytest.raises(ConfigError, match=r"offload_param.device = 'cpu' offloads ZeRO-3's parameter shards: set "
                                          r"zero_optimization.stage to 3, or offload_param.device to 'none'$"):
        library_configs_from(load_config(config_with(zero_optimization=current), dp_size=2))


def test_a_boolean_zero_optimization_is_deepspeeds_older_stage_1():
    """DeepSpeed reads "zero_optimization": true as stage 1 and false as stage 0 (its deprecated format,
    read_zero_config_deprecated in deepspeed/runtime/zero/config.py); true was refused as not a JSON object."""
    assert load_config(config_with(zero_optimization=True), dp_size=2).zero_optimization.stage == 1
    assert load_config(config_with(zero_optimization=False), dp_size=2).zero_optimization.stage == 0
