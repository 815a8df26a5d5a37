"""The training loop of ``pretrain_gpt.py``: flags, configs, LR schedule, checkpoints, logging, exits.

Modules: ``arguments`` (one per flag group), ``validate``, ``config``/``build`` (flags to
dataclasses), ``lr_scheduler``, ``data_loading``, ``training_loop`` (step, evaluation),
``pretrain`` (setup and the loop), ``checkpointing``/``checkpoint_io``/``rng_state``,
``training_log``/``timers``/``flops``, ``signal_handler``, ``initialize`` and ``demo``.
Import from the modules; this package imports nothing heavy itself.
"""
from megatron_core.training.errors import ConfigError

__all__ = ["ConfigError"]
