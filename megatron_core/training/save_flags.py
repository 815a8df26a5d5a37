"""Which parts of the training state a checkpoint holds, and the check a resume makes against it.

A save records ``{"optimizer": bool, "rng": bool}`` under :data:`SAVE_FLAGS` (``--no-save-optim`` and
``--no-save-rng`` leave those parts out). A resume that would load a part the checkpoint lacks stops with
one line naming the flag that skips it, as Megatron-LM's ``load_checkpoint`` does ("Unable to load
optimizer from checkpoint ... Specify --no-load-optim or --finetune"): continuing with a fresh
optimizer, or this run's own seeding, while the user believes the run resumed exactly would be silent.

A re-shard of a training checkpoint by ``tools/checkpoint/convert.py`` records what it wrote
(:func:`reshard_flags`: never RNG states, the optimizer state only from a legacy checkpoint without
``--no-load-optim``), as does ``pretrain_gpt.py --ckpt-convert-format`` (only the parts it loaded).
Only checkpoints recording the entry are checked: a model-only checkpoint (the Hugging Face converter's,
or a re-shard of one) or one saved before the entry existed records nothing and loads as before,
starting the optimizer fresh.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from megatron_core.errors import ConfigError
from megatron_core.training.config import CheckpointConfig

# Key in the legacy per-rank file and in a torch_dist checkpoint's ``extra`` record.
SAVE_FLAGS = "save_flags"
# The record's optional "written_by": the tool that wrote a checkpoint without a part (the error names it
# instead of a --no-save-* flag the user may never have given).
RESHARD_TOOL = "tools/checkpoint/convert.py"


def save_flags(config: CheckpointConfig, optimizer_saved: bool) -> dict[str, Any]:
    """The record of what a save holds. ``optimizer_saved``: the save wrote optimizer state (the run has
    an optimizer and no ``--no-save-optim``); the RNG states are saved unless ``--no-save-rng``. A
    ``--ckpt-convert-format`` save names itself (it leaves out what its load skipped)."""
    record: dict[str, Any] = {"optimizer": optimizer_saved, "rng": not config.no_save_rng}
    if config.ckpt_convert_format is not None:
        record["written_by"] = "pretrain_gpt.py --ckpt-convert-format"
    return record


def reshard_flags(optimizer_written: bool) -> dict[str, Any]:
    """The record of a re-shard by :data:`RESHARD_TOOL`: it never carries RNG states (they are per TP/PP
    rank of the layout that drew them, as Megatron-LM's converter drops them too); ``optimizer_written``:
    it wrote the re-sharded optimizer state."""
    return {"optimizer": optimizer_written, "rng": False, "written_by": RESHARD_TOOL}


def check_saved_parts(saved: Any, config: CheckpointConfig, where: str, load_optim: bool, load_rng: bool) -> None:
    """Raise ConfigError when this resume would load a part the checkpoint was saved without.

    ``saved``: the checkpoint's :data:`SAVE_FLAGS` entry (None when it records none: nothing is checked);
    ``where``: the checkpoint directory the message names; ``load_optim`` / ``load_rng``: whether this run
    would load the optimizer / the RNG states (the torch_dist format skips missing RNG states, as
    Megatron-LM's does, so it passes False). ``--finetune`` loads neither, so it never raises.
    """
    if not isinstance(saved, Mapping) or config.finetune:
        return
    lacking = []
    if load_optim and not config.no_load_optim and not saved.get("optimizer", True):
        lacking.append(("optimizer", "--no-save-optim", "--no-load-optim"))
    if load_rng and not config.no_load_rng and not saved.get("rng", True):
        lacking.append(("RNG", "--no-save-rng", "--no-load-rng"))
    if not lacking:
        return
    parts = " or ".join(part for part, _, _ in lacking)
    origin = f"written by {saved['written_by']}" if saved.get("written_by") else \
        f"saved with {' '.join(flag for _, flag, _ in lacking)}"
    skip = " ".join(flag for _, _, flag in lacking)
    raise ConfigError(f"checkpoint {where} was {origin} (it holds no {parts} state) and this run would "
                      f"load it: pass {skip} (or --finetune) to resume from its weights without it")
