"""Named wall-clock timers for the log line (forward-backward, optimizer, evaluation, saves)."""
from __future__ import annotations

import time

from megatron_core import device


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

    def means(self, names: list[str], normalizer: float = 1.0) -> dict[str, float]:
        """Seconds per iteration of each used timer among ``names`` (its total / ``normalizer``), and reset."""
        return {n: self._timers[n].elapsed() / normalizer for n in names if n in self._timers}


def timing_string(means: dict[str, float]) -> str:
    """Megatron-LM's ``time (ms) | name: ms | ...`` from seconds per iteration ("" for none)."""
    parts = [f"{name}: {seconds * 1000.0:.2f}" for name, seconds in means.items()]
    return "time (ms) | " + " | ".join(parts) if parts else ""
