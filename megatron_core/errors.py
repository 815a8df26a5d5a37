"""``ConfigError``: a bad flag, key, file or combination, reported to the user as one line."""
from __future__ import annotations

import os
import sys
from types import TracebackType


class ConfigError(ValueError):
    """A user-fixable configuration problem; the message names the flag, key or field and the fix.

    A ``ValueError`` so that code catching the libraries' own argument checks catches it too.
    """


_previous_hook = None


def _report(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
    if isinstance(value, ConfigError):
        if os.environ.get("RANK", "0") == "0":  # one line per job, not one per rank
            print(f"error: {value}", file=sys.stderr, flush=True)
        return
    assert _previous_hook is not None
    _previous_hook(kind, value, tb)


def report_uncaught_config_errors() -> None:
    """Let a user's own script (one that calls ``megatron_core.initialize``) end on a ConfigError it does
    not catch with one ``error:`` line on rank 0 instead of a traceback through this library; any other
    exception goes to the previous ``sys.excepthook``. Installed once per process."""
    global _previous_hook
    if _previous_hook is None:
        _previous_hook = sys.excepthook
        sys.excepthook = _report
