"""GPT pretraining data: Megatron-LM's indexed dataset format, GPT samples, blending and splits.

Names are imported lazily so that tools needing only the file format (preprocess_data.py and
its worker processes) do not pay for importing torch.
"""
from __future__ import annotations

import importlib
import types
from typing import Any

_EXPORTS = types.MappingProxyType({
    "BlendedDataset": "blended_dataset",
    "build_blending_indices": "blended_dataset",
    "samples_per_dataset": "blended_dataset",
    "build_gpt_datasets": "builder",
    "parse_data_path": "builder",
    "GPTDatasetConfig": "config",
    "GPTDataset": "gpt_dataset",
    "MockGPTDataset": "gpt_dataset",
    "document_attention_mask": "gpt_dataset",
    "document_position_ids": "gpt_dataset",
    "IndexedDataset": "indexed_dataset",
    "IndexedDatasetBuilder": "indexed_dataset",
    "optimal_dtype": "indexed_dataset",
    "parse_split": "splits",
    "split_document_ranges": "splits",
})

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
