"""DeepSpeed's ``csv_monitor`` and ``tensorboard`` sections: loss, learning rate and loss scale per step.

Rank 0 writes; the x axis is ``global_samples`` and the tags are DeepSpeed's (``Train/Samples/train_loss``,
``Train/Samples/lr``, ``Train/Samples/loss_scale``). The CSV monitor writes one file per tag under
``output_path/job_name/`` with the header ``step,<tag>``, as DeepSpeed's ``csvMonitor``.
"""

from __future__ import annotations

import os
from typing import Any

from megatron_core.errors import ConfigError


class Monitor:
    """Writes the engine's scalars to the enabled monitors (nothing when none is enabled or off rank 0)."""

    def __init__(self, config: Any, rank: int) -> None:
        self.csv_dir: str | None = None
        self.writer: Any = None
        if rank != 0:
            return
        if config.csv_monitor.enabled:
            self.csv_dir = os.path.join(config.csv_monitor.output_path or ".", config.csv_monitor.job_name)
            os.makedirs(self.csv_dir, exist_ok=True)
        if config.tensorboard.enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415 - optional dependency
            except ImportError:
                raise ConfigError(
                    "DeepSpeed config: tensorboard.enabled needs the tensorboard package "
                    "(pip install tensorboard), or set it to false"
                ) from None
            folder = os.path.join(config.tensorboard.output_path or "runs", config.tensorboard.job_name)
            self.writer = SummaryWriter(log_dir=folder)

    def write(self, samples: int, values: dict[str, float]) -> None:
        """Append ``values`` at ``samples``."""
        for name, value in values.items():
            tag = f"Train/Samples/{name}"
            if self.csv_dir is not None:
                path = os.path.join(self.csv_dir, tag.replace("/", "_") + ".csv")
                new = not os.path.exists(path)
                with open(path, "a", encoding="utf-8") as f:
                    if new:
                        f.write(f"step,{name}\n")
                    f.write(f"{samples},{value}\n")
            if self.writer is not None:
                self.writer.add_scalar(tag, value, samples)
        if self.writer is not None:
            self.writer.flush()
