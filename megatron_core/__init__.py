"""A Megatron-style model-parallel training library that runs on CPU (gloo) and GPU (NCCL).

``megatron_core.initialize(model, config=...)`` is the DeepSpeed-style entry point (``deepspeed.initialize``;
``megatron_core.init_distributed`` is ``deepspeed.init_distributed``);
it is imported on first use so that ``import megatron_core`` stays light.
"""
from importlib import metadata
from typing import Any

try:
    # The installed distribution's version (pyproject.toml's [project] version), as torch and DeepSpeed expose it.
    __version__ = metadata.version("shardtrain")
except metadata.PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"


def __getattr__(name: str) -> Any:
    if name in ("initialize", "add_config_arguments", "init_distributed"):
        from megatron_core import engine  # noqa: PLC0415 - lazy: pulls in torch.distributed and the optimizer

        return getattr(engine, name)
    if name in ("zero", "comm"):  # megatron_core.zero.GatheredParameters, megatron_core.comm: deepspeed.zero/.comm
        import importlib  # noqa: PLC0415

        return importlib.import_module(f"megatron_core.{name}")
    raise AttributeError(f"module 'megatron_core' has no attribute {name!r}")
