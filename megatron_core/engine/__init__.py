"""Train any ``torch.nn.Module`` from a DeepSpeed JSON config: ``megatron_core.initialize`` and its engine.

Built on the library's parts (``DistributedDataParallel`` with its ZeRO stage, ``get_megatron_optimizer``,
``finalize_model_grads``, the tensor-parallel layers for AutoTP); see ``docs/engine.md``.
"""

from megatron_core.engine.config import EngineConfig, load_config
from megatron_core.engine.engine import Engine
from megatron_core.engine.initialize import add_config_arguments, init_distributed, initialize
from megatron_core.engine.library_configs import LibraryConfigs, deepspeed_to_megatron, library_configs_from

__all__ = [
    "Engine",
    "EngineConfig",
    "LibraryConfigs",
    "add_config_arguments",
    "deepspeed_to_megatron",
    "init_distributed",
    "initialize",
    "library_configs_from",
    "load_config",
]
