"""DeepSpeed engine calls that Hugging Face's ``Trainer`` and Accelerate make on ``deepspeed.initialize``'s engine
beyond training: the ZeRO queries, ``empty_partition_cache`` and ``_zero3_consolidated_16bit_state_dict``
(mixed into :class:`megatron_core.engine.engine.Engine`; DeepSpeed 0.19.8's ``DeepSpeedEngine`` names)."""
from __future__ import annotations

from typing import Any

from megatron_core.engine.config import EngineConfig


class DeepSpeedQueries:
    """What :class:`Engine` answers as DeepSpeed's engine does (it holds ``config`` and ``ddp``)."""

    config: EngineConfig
    ddp: Any
    client_optimizer_name: str | None = None  # initialize's: the class name of an optimizer= it was given

    def optimizer_name(self) -> str | None:
        """DeepSpeed's: the client optimizer's class name, else the config's ``optimizer.type`` lower-cased
        (``adam``, ``adamw``, ``sgd``)."""
        if self.client_optimizer_name is not None:
            return self.client_optimizer_name
        return None if self.config.optimizer is None else self.config.optimizer.type

    def steps_per_print(self) -> int:
        """The config's ``steps_per_print`` (10 when left out)."""
        return self.config.steps_per_print

    def zero_optimization(self) -> bool:
        """Whether ZeRO is on (``zero_optimization.stage`` above 0), DeepSpeed's ``zero_enabled``."""
        return self.config.zero_optimization.stage > 0

    def zero_optimization_partition_gradients(self) -> bool:
        """Whether gradients are partitioned over DP (stage 2 and up)."""
        return self.config.zero_optimization.stage >= 2

    def zero_optimization_partition_weights(self) -> bool:
        """Whether parameters are partitioned over DP (stage 3), what Accelerate and HF's Trainer test before
        consolidating the weights for a save."""
        return self.config.zero_optimization.stage >= 3

    def zero_gather_16bit_weights_on_model_save(self) -> bool:
        """The config's ``zero_optimization.stage3_gather_16bit_weights_on_model_save`` (its older ``..._fp16_...``
        name read as the same key)."""
        return self.config.zero_optimization.stage3_gather_16bit_weights_on_model_save

    def empty_partition_cache(self) -> None:
        """ZeRO-3: free every gathered parameter bucket but those a ``GatheredParameters`` block holds (HF's
        Trainer calls it after a ``generate`` pass); below stage 3 nothing is partitioned, so nothing happens.
        Collective-free."""
        self.ddp.release_params()

    def _zero3_consolidated_16bit_state_dict(self, exclude_frozen_parameters: bool = False) -> dict | None:
        """The module's full state dict in its training dtype on the CPU, on rank 0; None on the other ranks (as
        DeepSpeed's, which Accelerate's ``get_state_dict`` calls under ZeRO-3). Collective over DP (ZeRO-3 gathers
        the shards); without the ``requires_grad=False`` parameters when ``exclude_frozen_parameters``."""
        from megatron_core.engine.checkpoint import consolidated_16bit_state_dict

        return consolidated_16bit_state_dict(self, exclude_frozen_parameters)
