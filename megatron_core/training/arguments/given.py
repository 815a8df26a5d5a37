"""Which flags the command line gave: ``--use-checkpoint-args`` and ``--deepspeed-config`` fill only the others.

``parse_args`` records the dests the command line set, whatever their value (a second parse with every default
suppressed), as ``args.given_flags``; comparing a value with its default instead took a flag given at its default
(``--attention-dropout 0.1``, ``--clip-grad 1.0``) for one left alone, so the checkpoint's or the file's value
replaced it silently.
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

GIVEN_FLAGS = "given_flags"


def record_given_flags(args: argparse.Namespace, parser: argparse.ArgumentParser,
                       argv: Sequence[str] | None) -> None:
    """Set ``args.given_flags`` to the dests ``argv`` sets; ``parser`` (a fresh one) loses its defaults."""
    for action in parser._actions:  # with no defaults, the namespace holds only what the command line set
        action.default = argparse.SUPPRESS
    setattr(args, GIVEN_FLAGS, frozenset(vars(parser.parse_args(argv))))


def on_command_line(args: argparse.Namespace, dest: str, parser_defaults: dict[str, Any]) -> bool:
    """Whether the command line gave ``dest``; for a namespace not from ``parse_args`` (no record), whether its
    value differs from the parser's default."""
    given = getattr(args, dest, None)
    recorded = getattr(args, GIVEN_FLAGS, None)
    if recorded is not None:
        return dest in recorded
    return given is not None and given != parser_defaults.get(dest)
