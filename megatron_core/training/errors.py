"""``ConfigError`` for the training entry points (the one class, defined in ``megatron_core.errors``)."""
from __future__ import annotations

from megatron_core.errors import ConfigError

__all__ = ["ConfigError"]
