"""SIGTERM (a scheduler's pre-emption notice) becomes "save a checkpoint and exit" at an iteration boundary.

The handler only sets a flag; the training loop asks :meth:`ExitSignalHandler.signal_received_any`
once per iteration, which all-reduces the flag so that every rank stops after the same iteration.
"""
from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

import torch.distributed as dist

from megatron_core.collectives import any_rank


class ExitSignalHandler:
    """Catches ``sig`` while active; restores the previous handler on ``release``."""

    def __init__(self, sig: int = signal.SIGTERM) -> None:
        self.sig = sig
        self.received = False
        # What ``signal.signal`` returned: a handler, SIG_DFL / SIG_IGN, or None (not set from Python).
        self._previous: Callable[[int, FrameType | None], Any] | int | None = None
        self._installed = False

    def install(self) -> ExitSignalHandler:
        """Start catching the signal (from the main thread only; elsewhere a no-op); returns ``self``."""
        # Signal handlers can only be set from the main thread; elsewhere (a thread pool) skip it.
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(self.sig, self._handle)
            self._installed = True
        return self

    def _handle(self, signum, frame) -> None:
        self.received = True

    def signal_received_any(self, group: dist.ProcessGroup | None = None) -> bool:
        """True on every rank when any rank got the signal (a collective: call it on all ranks)."""
        return any_rank([self.received], group)[0]

    def release(self) -> None:
        """Restore the previous handler; after a received signal keep catching it instead.

        The run is then exiting on its own after its save: a second SIGTERM (schedulers repeat theirs)
        must not turn that clean exit into death by signal (exit code -15), so it is ignored from here on.
        """
        if not self._installed:
            return
        # A Python-level handler is reset to the default while the interpreter shuts down; SIG_IGN is not.
        signal.signal(self.sig, signal.SIG_IGN if self.received else
                      self._previous if self._previous is not None else signal.SIG_DFL)
        self._installed = False

    def __enter__(self) -> ExitSignalHandler:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.release()
