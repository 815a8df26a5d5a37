"""Named wall-clock timers for the log line (forward-backward, optimizer, evaluation, saves).

With ``--timing-log-level`` 1 or 2 the logging iterations gather every rank's timers (one all-gather over an
explicit process group) and print Megatron-LM's block (``megatron/core/timers.py``'s ``Timers.log``) as
``--timing-log-option`` says: ``max`` the slowest rank's time, ``minmax`` (the default) the fastest and the
slowest, ``all`` each rank's.
"""
from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist

from megatron_core import device
from megatron_core.training.config import TIMING_LOG_OPTIONS, LoggingConfig


class Timer:
    """Accumulates elapsed seconds between ``start`` and ``stop`` until read with ``reset``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._elapsed = 0.0
        self._started_at: float | None = None

    def start(self) -> None:
        """Begin an interval after the device's queued work finishes; RuntimeError if already running."""
        if self._started_at is not None:
            raise RuntimeError(f"timer {self.name!r} started twice")
        device.synchronize()  # time finished device work, not queued kernels
        self._started_at = time.perf_counter()

    def stop(self) -> None:
        """Add the running interval (device work included) to the total; RuntimeError if not started."""
        if self._started_at is None:
            raise RuntimeError(f"timer {self.name!r} stopped before it was started")
        device.synchronize()
        self._elapsed += time.perf_counter() - self._started_at
        self._started_at = None

    def elapsed(self, reset: bool = True) -> float:
        """Seconds accumulated so far (including a running interval); zeroed when ``reset``."""
        running = time.perf_counter() - self._started_at if self._started_at is not None else 0.0
        total = self._elapsed + running
        if reset:
            self._elapsed = 0.0
            if self._started_at is not None:
                self._started_at = time.perf_counter()
        return total


class Timers:
    """A dictionary of :class:`Timer` created on first use: ``timers("optimizer").start()``."""

    def __init__(self) -> None:
        self._timers: dict[str, Timer] = {}

    def __call__(self, name: str) -> Timer:
        """The timer called ``name``, created (stopped, at zero) on first use."""
        if name not in self._timers:
            self._timers[name] = Timer(name)
        return self._timers[name]

    def means(self, names: list[str], normalizer: float = 1.0, reset: bool = True) -> dict[str, float]:
        """Seconds per iteration of each used timer among ``names`` (its total / ``normalizer``), and reset
        unless ``reset`` is False."""
        return {n: self._timers[n].elapsed(reset) / normalizer for n in names if n in self._timers}

    def gather_means(self, names: list[str], group: dist.ProcessGroup, normalizer: float = 1.0,
                     reset: bool = True) -> list[list[float]]:
        """Seconds per iteration of each timer in ``names`` on every rank of ``group``, ``[rank in group][name]``
        (0.0 where a rank never ran it), and reset unless ``reset`` is False. One all-gather: a collective every
        rank of ``group`` calls with the same ``names``, as Megatron-LM's ``Timers._get_elapsed_time_all_ranks``."""
        mine = torch.tensor([self._timers[n].elapsed(reset) / normalizer if n in self._timers else 0.0 for n in names],
                            dtype=torch.float64, device=device.current_device())
        every = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
        dist.all_gather(every, mine, group=group)
        return [t.tolist() for t in every]


def slowest(names: list[str], times: list[list[float]]) -> dict[str, float]:
    """The largest value of each timer over the ranks of ``times`` (``[rank][name]``), for the timers some
    rank ran (Megatron-LM's ``Timers.write`` of the max to TensorBoard)."""
    return {name: max(row[i] for row in times) for i, name in enumerate(names) if any(row[i] > 0.0 for row in times)}


def timing_block(names: list[str], times: list[list[float]], option: str) -> str:
    """Megatron-LM's ``Timers.log`` text of ``times`` (seconds, ``[rank][name]`` as :meth:`Timers.gather_means`)
    in milliseconds for ``option`` (``max``, ``minmax`` or ``all``); a rank's 0.0 means "not run there" and
    is left out, as Megatron-LM does; "" when no rank ran any. ValueError for another option."""
    if option not in TIMING_LOG_OPTIONS:
        raise ValueError(f"timing log option {option!r} is not one of {', '.join(TIMING_LOG_OPTIONS)}")
    lines = []
    for i, name in enumerate(names):
        ran = [(rank, row[i] * 1000.0) for rank, row in enumerate(times) if row[i] > 0.0]
        if not ran:
            continue
        values = [ms for _, ms in ran]
        if option == "all":
            lines.append(f"  {name}:")
            lines.extend(f"     rank {rank:2d}: {ms:.2f}" for rank, ms in ran)
        elif option == "max":
            lines.append(f"    {(name + ' ').ljust(48, '.')}: {max(values):.2f}")
        else:
            lines.append(f"    {(name + ' ').ljust(48, '.')}: ({min(values):.2f}, {max(values):.2f})")
    if not lines:
        return ""
    title = {"max": "max time across ranks (ms):", "minmax": "(min, max) time across ranks (ms):",
             "all": "times across ranks (ms):"}[option]
    return "\n".join([title, *lines])


def interval_timing(timers: Timers, logging: LoggingConfig, writer: Any, iteration: int,
                    group: dist.ProcessGroup) -> str:
    """The block printed after the log line (``--timing-log-level 1`` or 2, at the line's iterations, else ""):
    every rank's mean forward-backward and optimizer milliseconds of the interval ending the line, gathered and
    shown as ``--timing-log-option`` says (Megatron-LM's ``Timers.log``; default ``minmax``), then reset.
    With ``--log-timers-to-tensorboard`` also, every ``--tensorboard-log-interval`` iterations, their seconds
    per iteration since the last line as ``<name>-time`` (Megatron-LM's tags and cadence: its ``Timers.write``
    of the slowest rank's mean, without reset; the logging rank's at level 0, where nothing is gathered).
    Call it on every rank of ``group`` at every iteration: it gathers (a collective) where the flags say."""
    names = ["forward-backward", "optimizer"]
    line = iteration % logging.log_interval == 0
    write = (logging.log_timers_to_tensorboard and logging.tensorboard_dir is not None
             and iteration % logging.tensorboard_log_interval == 0)
    if not (line or write):
        return ""
    since = iteration % logging.log_interval or logging.log_interval  # Megatron-LM's total_iterations
    block = ""
    if logging.timing_log_level < 1:
        means = timers.means(names, normalizer=since, reset=line)
    else:
        times = timers.gather_means(names, group, normalizer=since, reset=line)
        means = slowest(names, times)
        if line:
            block = timing_block(names, times, logging.timing_log_option)
    if writer is not None and write:
        for name, value in means.items():
            writer.add_scalar(f"{name}-time", value, iteration)
    return block
