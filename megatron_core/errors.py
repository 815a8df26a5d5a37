"""``ConfigError``: a bad flag, key, file or combination, reported to the user as one line."""
from __future__ import annotations

import os
import sys
from types import TracebackType


class ConfigError(ValueError):
    """A user-fixable configuration problem; the message names the flag, key or field and the fix.

    A ``ValueError`` so that code catching the libraries' own argument checks catches it too.
    """


def report_uncaught_config_errors() -> None:
    """Let a user's own script (one that calls ``megatron_core.initialize``) end on a ConfigError it does
    not catch with one ``error:`` line on rank 0 instead of a traceback through this library; any other
    exception goes to the previous ``sys.excepthook``. Installed once per process."""
    previous = sys.excepthook
    if getattr(previous, "reports_config_errors", False):
        return

    def report(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
        if not isinstance(value, ConfigError):
            previous(kind, value, tb)
        elif os.environ.get("RANK", "0") == "0":  # one line per job, not one per rank
            print(f"error: {value}", file=sys.stderr, flush=True)

    report.reports_config_errors = True  # type: ignore[attr-defined]
    sys.excepthook = report
