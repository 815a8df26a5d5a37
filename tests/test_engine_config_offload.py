"""DeepSpeed JSON config: the ZeRO offload sections' defaults and buffer_count (split from test_engine_config.py,
kept under 500 lines)."""

import pytest
from engine_common import config_with

from megatron_core.engine import library_configs_from, load_config
from megatron_core.errors import ConfigError


def test_an_empty_zero_section_parses_to_the_dataclass_defaults():
    """The parser's defaults (DeepSpeed's) and ZeroSection's / OffloadSection's are one set: ignored_tuning_keys
    compares a config's values with ZeroSection(), and code building an EngineConfig directly gets the same."""
    from megatron_core.engine.config import ZeroSection

    for raw in (config_with(), config_with(zero_optimization={}),
                config_with(zero_optimization={"offload_optimizer": {}})):
        assert load_config(raw, dp_size=2).zero_optimization == ZeroSection()


def test_nvme_buffer_count_maps_down_to_one(tmp_path):
    """offload_optimizer.buffer_count is the library's nvme_offload_buffer_count, which takes any count >= 1
    (the bucket being stepped); 0 is a one-line error naming the key."""
    def nvme(count):
        offload = {"device": "nvme", "nvme_path": str(tmp_path), "buffer_count": count}
        return config_with(zero_optimization={"stage": 2, "offload_optimizer": offload})

    optimizer = library_configs_from(load_config(nvme(1), dp_size=2)).optimizer
    assert (optimizer.nvme_offload_path, optimizer.nvme_offload_buffer_count) == (str(tmp_path), 1)
    with pytest.raises(ConfigError, match=r"^DeepSpeed config: zero_optimization.offload_optimizer.buffer_count must "
                                          r"be >= 1, got 0$"):
        load_config(nvme(0), dp_size=2)
