"""``ConfigError``: a bad flag, key, file or combination, reported to the user as one line."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from types import TracebackType


class ConfigError(ValueError):
    """A user-fixable configuration problem; the message names the flag, key or field and the fix.

    A ``ValueError`` so that code catching the libraries' own argument checks catches it too.
    """


@contextlib.contextmanager
def named_for(entry: str) -> Iterator[None]:
    """Prefix each ConfigError raised inside with ``entry: `` (the call or command the user made, such as
    ``load_checkpoint``), once, at that entry point: the readers below it are shared by several entry points
    and name none. A message that already begins with ``entry`` is left as it is."""
    try:
        yield
    except ConfigError as exc:
        if str(exc).startswith(entry):
            raise
        raise ConfigError(f"{entry}: {exc}") from None


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one line, ``prog: error: message (see python prog --help)``,
    printed by rank 0 only and handed to torchrun (:func:`report_line`), then exit status 2 as argparse's;
    argparse's own ``error`` prints the whole usage first (about 60 lines for the generation tools, on
    every rank)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        """Print ``message`` as the one line above and exit with status 2 (argparse's)."""
        report_line(f"{self.prog}: error: {message} (see python {self.prog} --help)", int(os.environ.get("RANK", "0")))
        sys.exit(2)


def record_for_launcher(line: str) -> None:
    """Hand the one-line error to torchrun, which then prints it as the failed rank's root cause
    (``traceback :`` in its ChildFailedError report) instead of "To enable traceback see: ...".

    torchrun gives each worker an error file (``$TORCHELASTIC_ERROR_FILE``) and reads it when the
    worker exits non-zero; ``{"message": str, "timestamp": int}`` is a form it accepts
    (torch.distributed.elastic.multiprocessing.errors.ProcessFailure). A file already written (a
    handler of torchrun's own got there first) is left alone; outside torchrun this does nothing.
    """
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path or os.path.exists(path):
        return
    try:
        with open(path, "w") as f:
            json.dump({"message": line, "timestamp": int(time.time())}, f)
    except OSError:
        pass  # the launcher's report is a courtesy: the error line itself is already printed


def report_line(line: str, rank: int, every_rank: bool = False) -> None:
    """An entry point's one-line error: printed on stderr by rank 0 only (every rank reaches the same
    verdict) unless ``every_rank``, and handed to torchrun by every rank (:func:`record_for_launcher`)."""
    record_for_launcher(line)
    if every_rank or rank == 0:
        print(line, file=sys.stderr, flush=True)


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
            return
        report_line(f"error: {value}", int(os.environ.get("RANK", "0")))

    report.reports_config_errors = True  # type: ignore[attr-defined]
    sys.excepthook = report
