"""Megatron-LM's command line for ``pretrain_gpt.py``, one module per concern.

``parse_args(argv)`` returns an ``argparse.Namespace`` with Megatron-LM's names and defaults;
``megatron_core.training.arguments.validate.validate_args`` checks it and fills in derived values, and
``config_from_args`` maps it onto the typed ``RunConfig`` that everything below the entry point takes.
"""
from __future__ import annotations

import argparse
import difflib
from collections.abc import Sequence
from importlib import resources

from megatron_core.training.arguments import checkpointing, compat, data, distributed, logs, model, training
from megatron_core.training.arguments.given import record_given_flags
from megatron_core.training.arguments.to_config import config_from_args
from megatron_core.training.errors import ConfigError

__all__ = ["build_parser", "config_from_args", "megatron_lm_flags", "parse_args"]

# Megatron-LM's flag names, one a line (package data, next to this file).
_MEGATRON_LM_FLAGS = "megatron_lm_flags.txt"
# Flags Megatron-LM's parser still has but its validate_args refuses, naming the flag to use instead ("Deprecated
# arguments"): dropping them, the advice for other unimplemented flags, would change the run (TP 1, no recompute).
_RETIRED = {"--batch-size": "--micro-batch-size", "--warmup": "--lr-warmup-fraction",
            "--model-parallel-size": "--tensor-model-parallel-size",
            "--checkpoint-activations": "--recompute-activations, or --recompute-granularity and --recompute-method"}


class _Parser(argparse.ArgumentParser):
    """Raises :class:`ConfigError` instead of exiting, so ``main(argv)`` can run inside a test."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(f"{message}{self._suggestions(message)} (see python {self.prog} --help)")

    def _suggestions(self, message: str) -> str:
        """What to do about each unknown flag of argparse's "unrecognized arguments: ..." message, on the same line:
        "; --save-retain-interval is a Megatron-LM flag that this trainer does not implement: drop it" for a flag
        of Megatron-LM's own parser (``megatron_lm_flags``), where the closest flag of ours would be a wrong guess,
        and "; did you mean: --trian-iters -> --train-iters?" for any other flag close to one of ours (a typo), or
        "--save-retain-intervall -> Megatron-LM's --save-retain-interval, not implemented here" when the closest
        flag is one of Megatron-LM's that this trainer lacks; an old flag that Megatron-LM refuses too names the
        flag to use instead ("--batch-size is an old Megatron-LM flag ...: use --micro-batch-size").
        ``--flag=value`` is judged by ``--flag``. Empty for any other message."""
        if not message.startswith("unrecognized arguments:"):
            return ""
        known = [option for action in self._actions for option in action.option_strings]
        megatron = megatron_lm_flags()
        unimplemented: list[str] = []
        hints = []
        retired: list[str] = []
        for word in message.split(":", 1)[1].split():
            flag = word.split("=", 1)[0]
            if not flag.startswith("--"):
                continue
            if flag in _RETIRED:
                advice = f"{flag} is an old Megatron-LM flag that Megatron-LM refuses too: use {_RETIRED[flag]}"
                if advice not in retired:
                    retired.append(advice)
                continue
            if flag in megatron:
                if flag not in unimplemented:
                    unimplemented.append(flag)
                continue
            # Megatron-LM's flags compete too: a misspelt one of those is no typo of the nearest of ours.
            close = difflib.get_close_matches(flag, known + sorted(megatron.difference(known)), n=1, cutoff=0.75)
            if close:
                hints.append(f"{flag} -> {close[0]}" if close[0] in known else
                             f"{flag} -> Megatron-LM's {close[0]}, not implemented here")
        parts = list(retired)
        if unimplemented:
            one = len(unimplemented) == 1
            parts.append(f"{', '.join(unimplemented)} {'is a Megatron-LM flag' if one else 'are Megatron-LM flags'} "
                         f"that this trainer does not implement: drop {'it' if one else 'them'}")
        if hints:
            parts.append(f"did you mean: {', '.join(hints)}?")
        return "".join(f"; {part}" for part in parts)


def megatron_lm_flags() -> frozenset[str]:
    """Every flag of Megatron-LM's ``megatron/training/arguments.py`` ("--save-retain-interval", ...), read from
    the package data file ``megatron_lm_flags.txt`` (its header names the Megatron-LM commit).

    Raises FileNotFoundError when the package was installed without its data file (a packaging bug:
    pyproject.toml's ``[tool.setuptools.package-data]`` lists it)."""
    text = resources.files(__name__).joinpath(_MEGATRON_LM_FLAGS).read_text(encoding="utf-8")
    return frozenset(line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#"))


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    """Append "(default: X)" to every flag's help that has a default worth showing (argparse's own
    ArgumentDefaultsHelpFormatter skips flags that have no help text)."""
    for action in parser._actions:
        # Identity tests for None/False: a membership test would drop 0 and 0.0 too (0 == False).
        if (not action.option_strings or action.help == argparse.SUPPRESS or action.nargs == 0
                or action.default is None or action.default is False or action.default == []
                or "%(default)" in (action.help or "")):
            continue
        action.help = (f"{action.help} " if action.help else "") + "(default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    """The full parser: model, training, learning rate, mixed precision, parallel, data, logging, checkpoints."""
    parser = _Parser(
        prog="pretrain_gpt.py", allow_abbrev=False,
        description="Pretrain a GPT model with tensor, pipeline and data parallelism (Megatron-LM's flags). "
                    "Try: python pretrain_gpt.py --demo")
    for group in (model, training, distributed, data, logs, checkpointing, compat):
        group.add_arguments(parser)
    _show_defaults(parser)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` (``sys.argv[1:]`` when None); unknown flags are an error, as in Megatron-LM.

    The result's ``given_flags`` (a frozenset of dests) names the flags on the command line whatever their value:
    ``--use-checkpoint-args`` fills only the others, so a flag given at its default is not taken for one left alone.
    """
    args = build_parser().parse_args(argv)
    record_given_flags(args, build_parser(), argv)
    return args
