"""Read a whole model out of a torch_dist checkpoint in one process, whatever layout saved it.

Tools that work on the whole model (``tools/checkpoint/convert.py``: re-shard, export to Hugging
Face) read every ``model/`` tensor at its global shape with ``torch.distributed.checkpoint`` in
no-process-group mode, put a strided parameter's logical parts (``name#partI``, :mod:`.sharded`)
back together along its TP dimension and cut the vocabulary tables to the true vocabulary: the
"full" state dict of :mod:`megatron_core.checkpoint.sharding` (TP = 1, PP = 1, global layer numbers),
the same as merging a legacy checkpoint's per-rank files.
"""
from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from megatron_core.checkpoint import megatron_lm_dist
from megatron_core.checkpoint.sharding import VOCAB_KEYS, partition_of
from megatron_core.dist_checkpointing.serialization import (
    checkpoint_dir,
    is_dist_dir,
    read_checkpoint_common,
    read_metadata,
)
from megatron_core.errors import ConfigError
from megatron_core.training import checkpoint_io as io
from megatron_core.transformer.config import TransformerConfig

_PART = re.compile(r"^(.*)#part(\d+)$")


@dataclass
class FullCheckpoint:
    """A torch_dist checkpoint's whole model: its config, ``model_info``, tokenizer flags and state dict."""

    config: TransformerConfig
    model_info: dict[str, Any]
    tokenizer: dict[str, Any]  # the ``--tokenizer-*`` flags of the run that saved it (may be empty)
    state: dict[str, torch.Tensor]  # full: TP = 1, PP = 1, true vocabulary rows
    iteration: int
    # The vocabulary tables' rows past the true vocabulary (the saving layout's padding), by name: a
    # re-shard starts the new layout's padding from them (checkpoint.sharding.pad_vocab_rows).
    vocab_padding: dict[str, torch.Tensor] = field(default_factory=dict)


def load_full_model(load_dir: str, iteration: int | None = None) -> FullCheckpoint:
    """The whole model of the torch_dist checkpoint in ``load_dir`` (at ``iteration``, default the tracker's).

    Runs in one process (no process group needed, none used if one exists); reads only the model
    tensors, never the optimizer state. Raises ConfigError for a damaged checkpoint (naming the file)
    or one that records no ``model_config`` / ``model_info`` (not written by pretrain_gpt.py).
    """
    path, iteration = checkpoint_dir(load_dir, iteration)
    if megatron_lm_dist.is_megatron_core_dist(path):  # Megatron-LM's own torch_dist: stacked layers, args
        config, info, tokenizer, state = megatron_lm_dist.read_megatron_core_dist(load_dir, iteration, path)
        return FullCheckpoint(config, info, tokenizer, state, iteration)
    common = read_checkpoint_common(load_dir, iteration, path)
    extra = common.get("extra", {})
    if "model_config" not in extra or "model_info" not in extra:
        raise ConfigError(f"--load-dir {load_dir}: this torch_dist checkpoint records no model_config/model_info, "
                          f"so the model cannot be rebuilt; save it with pretrain_gpt.py")
    config = TransformerConfig.from_dict(extra["model_config"])
    reader = dcp.FileSystemReader(path)
    metadata = read_metadata(load_dir, iteration, path, reader).state_dict_metadata
    buffers = {key: torch.empty(tuple(meta.size), dtype=meta.properties.dtype) for key, meta in metadata.items()
               if key.startswith("model/") and isinstance(meta, TensorStorageMetadata)}
    try:
        with warnings.catch_warnings():  # DCP warns that it loads in one process: that is the intent here
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
            dcp.load(buffers, storage_reader=reader, no_dist=True)
    except CheckpointException as exc:
        raise ConfigError(io.damaged_message(load_dir, iteration, path, f"holds an unreadable tensor file "
                                             f"({(str(exc).strip().splitlines() or [''])[0][:200]})")) from None
    vocab = int(extra["model_info"].get("vocab_size") or extra["model_info"]["padded_vocab_size"])
    padding: dict[str, torch.Tensor] = {}
    return FullCheckpoint(config, dict(extra["model_info"]), dict(extra.get("tokenizer") or {}),
                          _assemble(buffers, config, vocab, padding), int(common["iteration"]), padding)


def _assemble(buffers: dict[str, torch.Tensor], config: TransformerConfig, vocab: int,
              padding: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``model/name`` and ``model/name#partI`` tensors -> the full state dict (parts joined, vocabulary cut;
    the rows cut off go into ``padding`` by name)."""
    parts: dict[str, dict[int, torch.Tensor]] = {}
    full: dict[str, torch.Tensor] = {}
    for key, value in buffers.items():
        name = key[len("model/"):]
        match = _PART.match(name)
        if match:
            parts.setdefault(match.group(1), {})[int(match.group(2))] = value
        else:
            full[name] = value
    for name, pieces in parts.items():
        dim = (partition_of(name, config) or (0, 1))[0]
        full[name] = torch.cat([pieces[i] for i in sorted(pieces)], dim=dim)
    for name in VOCAB_KEYS:
        if name in full:
            padding[name] = full[name][vocab:].clone()
            full[name] = full[name][:vocab].clone()
    return full


def is_torch_dist(load_dir: str, iteration: int | None = None) -> bool:
    """Whether ``load_dir`` (at ``iteration``, default the tracker's) is a torch_dist checkpoint."""
    if not os.path.isdir(load_dir):
        return False
    try:
        iteration = io.read_tracker(load_dir) if iteration is None else iteration
    except ValueError:
        return False
    path = io.existing_iteration_dir(load_dir, iteration) if iteration is not None else None
    return path is not None and is_dist_dir(path)
