"""Read megatron-core's ``torch_dist`` checkpoints (Megatron-LM's default ``--ckpt-format``) in one process.

``megatron.core.dist_checkpointing.save`` writes into ``iter_NNNNNNN/``: ``metadata.json``
(``{"sharded_backend": "torch_dist", ...}``), ``common.pt`` (the non-tensor entries of Megatron-LM's
state dict: ``args``, ``checkpoint_version``, ``iteration``, ...; see ``checkpoint.megatron_lm``) and
``torch.distributed.checkpoint``'s ``.metadata`` and ``__R_N.distcp`` files. Each tensor is stored
under its ``GPTModel.sharded_state_dict()`` key with its global (TP = 1) shape, so every layout reads the
same tensors; the transformer layers are stacked on a leading axis of size ``num_layers``
(``decoder.layers.self_attention.linear_qkv.weight`` is [num_layers, 3 * hidden, hidden] without GQA), and
the pre-norms carry Transformer Engine's names (``linear_qkv.layer_norm_weight``). Verified against the
files megatron-core 0.16.1 writes. Read with torch's own DCP reader: megatron-core is not needed.
"""
from __future__ import annotations

import json
import os
import pickle
import warnings
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from megatron_core.checkpoint import megatron_lm
from megatron_core.errors import ConfigError
from megatron_core.transformer.config import TransformerConfig

METADATA_JSON = "metadata.json"  # megatron-core's record of the backend, beside DCP's ".metadata"
COMMON_FILE = "common.pt"
_MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.")
_STACKED = "decoder.layers."


def is_megatron_core_dist(path: str) -> bool:
    """Whether the iteration directory ``path`` was written by megatron-core's ``dist_checkpointing.save``."""
    try:
        with open(os.path.join(path, METADATA_JSON), encoding="utf-8") as f:
            return json.load(f).get("sharded_backend") == "torch_dist"
    except (OSError, ValueError, AttributeError):
        return False


def is_megatron_core_checkpoint(load_dir: str, iteration: int | None = None) -> bool:
    """Whether ``load_dir`` (at ``iteration``, default the tracker's) holds megatron-core's torch_dist files."""
    from megatron_core.training import checkpoint_io as io
    try:
        iteration = io.read_tracker(load_dir) if iteration is None else iteration
    except (OSError, ValueError):
        return False
    path = io.existing_iteration_dir(load_dir, iteration) if iteration is not None else None
    return path is not None and is_megatron_core_dist(path)


def conversion_hint(load_dir: str) -> str:
    """The one line for a ``--load`` of megatron-core's torch_dist checkpoint ``load_dir``."""
    return (f"--load {load_dir} is megatron-core's torch_dist checkpoint (Megatron-LM's --ckpt-format torch_dist), "
            f"which training does not resume (the converter and text generation read it): convert it once with "
            f"tools/checkpoint/convert.py --model-type GPT "
            f"--loader core --saver core --load-dir {load_dir} --save-dir CKPT, then run with --load CKPT "
            f"--finetune (or --no-load-optim --no-load-rng)")


def unstack_layers(stacked: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """``decoder.layers.NAME`` [num_layers, ...] -> ``decoder.layers.I.NAME`` [...] for each layer I; other
    names unchanged. Raises ValueError for a stacked tensor whose leading axis is not ``num_layers``."""
    out: dict[str, torch.Tensor] = {}
    for name, value in stacked.items():
        if not name.startswith(_STACKED):
            out[name] = value
            continue
        if value.dim() == 0 or value.shape[0] != num_layers:
            raise ValueError(f"{name} has shape {tuple(value.shape)}, not [num_layers={num_layers}, ...]")
        rest = name[len(_STACKED):]
        for layer in range(num_layers):
            out[f"{_STACKED}{layer}.{rest}"] = value[layer].clone()
    return out


def read_megatron_core_dist(load_dir: str, iteration: int, path: str
                            ) -> tuple[TransformerConfig, dict[str, Any], dict[str, Any], dict[str, torch.Tensor]]:
    """``(config, model_info, tokenizer flags, full state dict under this framework's names)`` of megatron-core's
    torch_dist iteration directory ``path``; the optimizer state is not read. Raises ConfigError naming the file
    for a damaged checkpoint or one whose ``common.pt`` holds no Megatron-LM ``args`` (model flags)."""
    common_path = os.path.join(path, COMMON_FILE)
    try:
        common = megatron_lm.load_megatron_lm_file(common_path)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        raise ConfigError(f"{common_path} is missing, truncated or damaged ({type(exc).__name__})") from None
    if not megatron_lm.is_megatron_lm_state(common):
        raise ConfigError(f"{common_path} holds no Megatron-LM args, so the model cannot be rebuilt: it was saved "
                          f"by megatron-core outside Megatron-LM's training loop")
    args = common["args"]
    config = megatron_lm.config_from_args(args, common_path)
    reader = dcp.FileSystemReader(path)
    try:
        metadata = reader.read_metadata().state_dict_metadata
        buffers = {key: torch.empty(tuple(meta.size), dtype=meta.properties.dtype) for key, meta in metadata.items()
                   if key.startswith(_MODEL_PREFIXES) and isinstance(meta, TensorStorageMetadata)}
        with warnings.catch_warnings():  # DCP warns that it loads in one process: that is the intent here
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
            dcp.load(buffers, storage_reader=reader, no_dist=True)
    except (CheckpointException, OSError, RuntimeError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ConfigError(f"{path}: megatron-core's tensor files cannot be read ({first})") from None
    try:
        state = megatron_lm.local_layer_names(unstack_layers(buffers, config.num_layers))
    except ValueError as exc:
        raise ConfigError(f"{path}: {exc}: the checkpoint's args do not describe its tensors") from None
    info = megatron_lm.model_info_from_args(args)
    return config, info, megatron_lm.tokenizer_flags_from_args(args), state
