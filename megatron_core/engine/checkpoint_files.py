"""Engine checkpoint files: their names, atomic writes, the ``latest`` file, what ``client_state`` may hold,
and the ``zero_to_fp32.py`` script beside them (the layout: :mod:`megatron_core.engine.checkpoint`).

Every file is read back with ``torch.load(weights_only=True)`` (:func:`load_states`), so ``client_state``
must hold tensors, plain Python values and ``argparse.Namespace`` (Megatron-DeepSpeed passes its args
there); :func:`client_state_error` names anything else before a file is written.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import pickle
import re
import shutil
import stat
from typing import Any

import torch

from megatron_core.errors import ConfigError
from megatron_core.training.checkpoint_io import is_pickled_object, unpickler_reason

LATEST = "latest"
RECOVERY_SCRIPT = "zero_to_fp32.py"  # DeepSpeed's name, in the save directory


def model_file(folder: str, tp_rank: int) -> str:
    """The model-states file of TP rank ``tp_rank`` in a tag folder."""
    return os.path.join(folder, f"mp_rank_{tp_rank:02d}_model_states.pt")


def optim_file(folder: str, dp_rank: int, tp_rank: int) -> str:
    """The optimizer-fragment file of one (DP rank, TP rank)."""
    return os.path.join(folder, f"zero_pp_rank_{dp_rank}_mp_rank_{tp_rank:02d}_optim_states.pt")


def optim_files(folder: str, tp_rank: int, saved: dict) -> list[str]:
    """The fragment files of TP rank ``tp_rank`` that the save of ``saved`` (its model-states dict) wrote, in DP
    order: every DP rank's under ZeRO-1/2/3, DP rank 0's at ZeRO-0.

    Named from the saved ``dp_size`` and ``zero_stage``, as DeepSpeed names its files from the saved
    ``dp_world_size``: files an earlier save into the same tag left (more DP ranks, or sharded) are not read.
    Raises ConfigError naming the first missing one.
    """
    paths = [optim_file(folder, dp_rank, tp_rank) for dp_rank in range(saved["dp_size"] if saved["zero_stage"] else 1)]
    missing = [path for path in paths if not os.path.exists(path)]
    if missing:
        raise ConfigError(f"checkpoint {folder!r} has no {os.path.basename(missing[0])} (the save wrote {len(paths)} "
                          f"optimizer fragment files for TP rank {tp_rank}, {len(missing)} missing); is a rank's file "
                          f"missing?")
    return paths


def copy_recovery_script(save_dir: str) -> None:
    """DeepSpeed's ``_copy_recovery_script``: ``save_dir/zero_to_fp32.py`` (:mod:`megatron_core.engine.zero_to_fp32`),
    executable by its owner (a file share refusing the mode keeps the copy, as DeepSpeed), replaced atomically."""
    path = os.path.join(save_dir, RECOVERY_SCRIPT)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        shutil.copyfile(os.path.join(os.path.dirname(os.path.abspath(__file__)), RECOVERY_SCRIPT), tmp)
        with contextlib.suppress(OSError):
            os.chmod(tmp, os.stat(tmp).st_mode | stat.S_IEXEC)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


# Classes read back besides torch.load(weights_only=True)'s own: a plain attribute container.
SAFE_GLOBALS: tuple[Any, ...] = (argparse.Namespace,)


def load_states(path: str | io.BytesIO) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, also reading ``argparse.Namespace`` (in client_state).

    Raises ConfigError naming a file ``path`` that torch cannot read (truncated, overwritten, not a torch
    file, or holding a pickled class): torch's own error is a multi-line traceback."""
    with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
        if not isinstance(path, str):
            return torch.load(path, weights_only=True, map_location="cpu")
        try:
            return torch.load(path, weights_only=True, map_location="cpu")
        except (RuntimeError, EOFError, pickle.UnpicklingError) as exc:
            if isinstance(exc, pickle.UnpicklingError) and is_pickled_object(exc):
                found = re.search(r"Unsupported global: GLOBAL \S+", str(exc))
                raise ConfigError(f"checkpoint file {path} holds what torch.load(weights_only=True) does not read "
                                  f"({found.group(0) if found else unpickler_reason(exc)}); files are never "
                                  f"unpickled with code") from None
            lines = str(exc).strip().splitlines()
            reason = unpickler_reason(exc) if isinstance(exc, pickle.UnpicklingError) else \
                lines[0].split(". ")[0] if lines else type(exc).__name__
            raise ConfigError(f"checkpoint file {path} is damaged ({reason}); save it again or load another tag"
                              ) from None


def foreign_states(saved: Any, path: str) -> str | None:
    """Why the model-states file ``path`` (read as ``saved``) is not this engine's, or None when it is.

    DeepSpeed's files (the same names, ``ds_version``) are read by :mod:`megatron_core.engine.deepspeed_checkpoint`
    before this check; anything else without this engine's ``format_version`` is refused."""
    if isinstance(saved, dict) and "format_version" in saved:
        return None
    return f"{path} is no engine checkpoint (no 'format_version'); load a folder that save_checkpoint wrote"


def client_state_error(client_state: Any) -> str | None:
    """Why ``client_state`` would not load back through :func:`load_states` (the first key), or None."""
    if not isinstance(client_state, dict):
        return f"save_checkpoint: client_state must be a dict, got {type(client_state).__name__}"
    for key, value in client_state.items():
        buffer = io.BytesIO()
        try:
            torch.save(value, buffer)
            buffer.seek(0)
            load_states(buffer)
        except Exception as exc:  # pickling errors of any kind, and the weights-only unpickler's refusal
            found = re.search(r"Unsupported global: GLOBAL \S+", str(exc))
            reason = found.group(0) if found else type(exc).__name__
            return (f"save_checkpoint: client_state[{key!r}] ({type(value).__name__}) is not read back by "
                    f"torch.load(weights_only=True) ({reason}); keep tensors, numbers, strings, lists, dicts and "
                    f"argparse.Namespace in client_state")
    return None


def read_latest(load_dir: str) -> str | None:
    """The tag in ``load_dir/latest``, or None when there is no such file (a folder of that name included, as
    DeepSpeed 0.19.8's ``os.path.isfile`` check). Raises ConfigError for a file that is not UTF-8 text."""
    path = os.path.join(load_dir, LATEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not a text file naming a tag ({exc.reason} at byte "
                          f"{exc.start}); write the tag to load into it or pass tag=") from None
