"""Turn ``--data-path``/``--split``/``--mock-data`` into the train, valid and test datasets."""
from __future__ import annotations

import glob
import math
import os
from collections.abc import Sequence

import numpy as np

from .blended_dataset import BlendedDataset, normalize_weights, samples_per_dataset
from .config import GPTDatasetConfig
from .gpt_dataset import GPTDataset, MockGPTDataset, default_cache_dir
from .indexed_dataset import IndexedDataset, data_file_path, index_file_path
from .mock_indexed_dataset import MockIndexedDataset
from .splits import SPLIT_NAMES, split_document_ranges


def _existing_prefixes(prefix: str) -> list[str]:
    """Prefixes with both files that ``prefix`` may have meant: ``prefix_*`` (preprocess_data.py writes
    ``OUTPUT_PREFIX_text_document``, its ``--json-keys`` key and level appended) and, for a directory,
    the prefixes inside it."""
    patterns = [glob.escape(prefix) + "_*.idx"]
    if os.path.isdir(prefix):
        patterns.append(os.path.join(glob.escape(prefix), "*.idx"))
    found = [path[:-len(".idx")] for pattern in patterns for path in sorted(glob.glob(pattern))]
    return [p for p in found if os.path.isfile(data_file_path(p))]


def _check_prefix(prefix: str, flag: str = "--data-path") -> None:
    missing = [p for p in (index_file_path(prefix), data_file_path(prefix)) if not os.path.isfile(p)]
    if not missing:
        return
    found = _existing_prefixes(prefix)
    if prefix.endswith((".bin", ".idx")):
        hint = f" ({flag} takes the prefix without the extension: {prefix[:-4]!r})"
    elif found:
        shown = ", ".join(repr(p) for p in found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
        hint = (f"; did you mean {flag} {found[0]}? (found {shown}: tools/preprocess_data.py names its files "
                f"OUTPUT_PREFIX_KEY_LEVEL, OUTPUT_PREFIX_text_document by default)")
    else:
        hint = " (make it with tools/preprocess_data.py; the prefix usually ends in _text_document)"
    raise ValueError(f"{flag} {prefix!r}: missing {', '.join(repr(p) for p in missing)}{hint}")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def parse_data_path(data_path: Sequence[str] | None, check_files: bool = True,
                    flag: str = "--data-path") -> tuple[list[str], list[float] | None]:
    """``["A"]`` -> ``(["A"], [1.0])``; ``["0.3", "A", "0.7", "B"]`` -> ``(["A", "B"], [0.3, 0.7])``;
    ``["A", "B"]`` -> ``(["A", "B"], None)``.

    Megatron-LM's three forms of ``--data-path``: a prefix, weight prefix pairs, or prefixes alone (no
    entry where a weight would stand is a number), whose weights the builder infers from the lengths of
    the datasets (None here). Weights are normalized to sum to 1. With ``check_files`` each prefix must
    have its ``.bin`` and ``.idx`` files. Errors (ValueError) name ``flag``.
    """
    items = [str(item) for item in data_path or []]
    weights: list[float] | None
    if not items:
        raise ValueError(f"{flag} is empty; give a dataset prefix, or weight prefix pairs like 0.3 A 0.7 B")
    if len(items) == 1:
        prefixes, weights = items, [1.0]
    elif not any(_is_number(item) for item in items[0::2]):
        prefixes, weights = items, None
    else:
        if len(items) % 2:
            raise ValueError(
                f"{flag} has {len(items)} entries; with several datasets give weight prefix pairs, "
                f"e.g. {flag} 0.3 A 0.7 B"
            )
        prefixes, weights = items[1::2], []
        for raw in items[0::2]:
            try:
                weight = float(raw)
            except ValueError:
                raise ValueError(
                    f"{flag} weight {raw!r} is not a number; give weight prefix pairs, "
                    f"e.g. {flag} 0.3 A 0.7 B"
                ) from None
            if not math.isfinite(weight) or weight <= 0:
                raise ValueError(f"{flag} weight {raw!r} must be a positive number")
            weights.append(weight)
    if check_files:
        for prefix in prefixes:
            _check_prefix(prefix, flag)
    return prefixes, None if weights is None else normalize_weights(weights)


# How a pretrain_gpt.py run asks for no samples of a split (Megatron-LM's flags). The test split is
# evaluated whenever it has a share of --split (or a --test-data-path), so its fix is a zero share.
NO_EVALUATION = ", evaluate nothing (--eval-iters 0)"
NO_SAMPLES_OF = {"valid": NO_EVALUATION,
                 "test": ", a zero test share (--split A,B,0: no test evaluation)" + NO_EVALUATION}


class EmptySplitError(ValueError):
    """A split that samples are asked of has no documents; ``split`` names it (train, valid or test)."""

    def __init__(self, message: str, split: str) -> None:
        super().__init__(message)
        self.split = split


def _split_indices(
    config: GPTDatasetConfig, num_documents: int, where: str, num_samples: Sequence[int | None]
) -> list[np.ndarray | None]:
    """Document ids of each split that is needed; None for a split nobody asked samples of."""
    result: list[np.ndarray | None] = []
    ranges = split_document_ranges(config.split, num_documents)
    for name, bounds, wanted in zip(SPLIT_NAMES, ranges, num_samples, strict=True):
        if wanted == 0 or (bounds is None and wanted is None):
            result.append(None)
            continue
        begin, end = bounds if bounds is not None else (0, 0)
        if end <= begin:
            raise EmptySplitError(
                f"--split {config.split!r} gives the {name} split no documents of {where} ({num_documents} "
                f"documents in all), but {wanted if wanted is not None else 'an epoch of'} {name} samples are "
                f"needed; give {name} a larger share of --split{NO_SAMPLES_OF.get(name, '')}, or add data",
                name,
            )
        result.append(np.arange(begin, end, dtype=np.int64))
    return result


def _check_blend_splits(
    config: GPTDatasetConfig, prefixes: list[str], low_level: list[IndexedDataset], num_samples: Sequence[int | None]
) -> None:
    """Every split a ``--data-path`` blend samples has documents in each of its prefixes, or in none.

    Megatron-LM's ``BlendedMegatronDatasetBuilder._build_blended_dataset_splits``
    (megatron/core/datasets/blended_megatron_dataset_builder.py) builds each prefix's ``--split`` share and
    blends them by the weights, with no rule for a share that holds no document: its GPTDataset then
    loops forever (NVIDIA/Megatron-LM issue #957), and the proposed fix (pull request #5519) raises an error
    naming the split. The same here, naming the prefixes: dropping them and renormalising the weights
    would sample another mixture than the one asked for, and skipping the whole split (what a split empty
    in every prefix does for the test set) would drop the others' documents. Raises ValueError.
    """
    if len(prefixes) < 2:
        return
    per_prefix = [split_document_ranges(config.split, ds.num_documents) for ds in low_level]
    for s, (name, wanted) in enumerate(zip(SPLIT_NAMES, num_samples, strict=True)):
        if wanted == 0 or per_prefix[0][s] is None:  # no samples asked, or a zero share: alike for every prefix
            continue
        bounds = [ranges[s] or (0, 0) for ranges in per_prefix]
        empty = [(prefix, ds.num_documents)
                 for prefix, ds, (begin, end) in zip(prefixes, low_level, bounds, strict=True) if end <= begin]
        if 0 < len(empty) < len(prefixes):
            which = ", ".join(f"{prefix!r} ({count} documents)" for prefix, count in empty)
            raise ValueError(
                f"--split {config.split!r} gives the {name} split no documents of {which} while the other "
                f"--data-path prefixes have some; a blend samples every prefix in each split (as Megatron-LM's "
                f"builder): give {name} a larger share of --split{NO_SAMPLES_OF.get(name, '')}, add documents "
                f"to that prefix, or give each split its own prefixes (--train-data-path, --valid-data-path, "
                f"--test-data-path instead of --data-path)")


def _weights_by_length(config: GPTDatasetConfig, prefixes: list[str], low_level: list[IndexedDataset],
                       docs: list[np.ndarray], name: str, flag: str) -> list[float]:
    """Megatron-LM's weights of a blend given as prefixes alone: each prefix's one-epoch sample count in
    this split (``BlendedMegatronDatasetBuilder``: ``len()`` of each split's dataset). Raises ValueError
    naming a prefix whose split holds less than one sample (its weight would be 0)."""
    weights = []
    for prefix, ds, split_docs in zip(prefixes, low_level, docs, strict=True):
        tokens = int(np.asarray(ds.sequence_lengths, dtype=np.int64)[split_docs].sum())
        samples = max(tokens - 1, 0) // config.seq_length  # gpt_indices.build_sample_index at one epoch
        if samples == 0:
            raise ValueError(f"{flag} {prefix!r}: its {name} split holds {tokens} tokens, less than one sample of "
                             f"--seq-length {config.seq_length}, so its inferred weight is 0; give weight prefix "
                             f"pairs, {name} a larger share of --split, or drop that prefix")
        weights.append(float(samples))
    return weights


def _split_dataset(
    config: GPTDatasetConfig, prefixes: list[str], weights: list[float] | None, low_level: list[IndexedDataset],
    docs: list[np.ndarray], wanted: int | None, name: str, flag: str
) -> GPTDataset | BlendedDataset:
    """One split: a GPTDataset over ``docs`` of one prefix, or their blend by ``weights`` (None: by length)."""
    if len(prefixes) == 1:
        return GPTDataset(low_level[0], prefixes[0], docs[0], wanted, name, config)
    if wanted is None:
        raise ValueError(f"a blended {flag} needs a {name} sample count, not None")
    if weights is None:
        weights = _weights_by_length(config, prefixes, low_level, docs, name, flag)
    sizes = samples_per_dataset(weights, wanted)
    parts = [GPTDataset(ds, prefix, split_docs, size, name, config)
             for ds, prefix, split_docs, size in zip(low_level, prefixes, docs, sizes, strict=True)]
    cache_dir = config.data_cache_path or default_cache_dir(prefixes[0])
    return BlendedDataset(parts, weights, wanted, cache_dir)


def _per_split_datasets(
    config: GPTDatasetConfig, num_samples: list[int | None]
) -> tuple[GPTDataset | BlendedDataset | None, GPTDataset | BlendedDataset | None, GPTDataset | BlendedDataset | None]:
    """Megatron-LM's ``--{train,valid,test}-data-path``: each split from every document of its own prefixes."""
    results: list[GPTDataset | BlendedDataset | None] = []
    for name, paths, wanted in zip(SPLIT_NAMES, config.per_split_paths, num_samples, strict=True):
        flag = f"--{name}-data-path"
        if wanted == 0 or (paths is None and wanted is None):
            results.append(None)
            continue
        if paths is None:
            raise ValueError(f"{wanted} {name} samples are needed but no {flag} is given; give {flag} "
                             f"PREFIX{NO_EVALUATION if name in ('valid', 'test') else ''}")
        prefixes, weights = parse_data_path(paths, flag=flag)
        low_level = [IndexedDataset(prefix) for prefix in prefixes]
        docs = [np.arange(ds.num_documents, dtype=np.int64) for ds in low_level]
        results.append(_split_dataset(config, prefixes, weights, low_level, docs, wanted, name, flag))
    return results[0], results[1], results[2]


def build_gpt_datasets(
    config: GPTDatasetConfig, train_valid_test_num_samples: Sequence[int | None]
) -> tuple[GPTDataset | BlendedDataset | None, GPTDataset | BlendedDataset | None, GPTDataset | BlendedDataset | None]:
    """(train, valid, test) datasets; an entry is None when its sample count is 0.

    A sample count of None means one epoch of that split (not allowed for blends). From ``data_path``
    the splits are ``--split``'s shares of each prefix's documents; from the per-split paths each split
    is every document of its own prefixes. Raises ValueError naming the flag for a bad path or a split
    that is needed and has no data.
    """
    num_samples = list(train_valid_test_num_samples)
    if len(num_samples) != 3:
        raise ValueError(f"need train, valid and test sample counts, got {num_samples}")
    if config.mock:
        mock = MockIndexedDataset(
            config.mock_num_documents, 2 * config.seq_length, config.resolved_mock_vocab_size, config.eod
        )
        splits = _split_indices(config, len(mock), "the mock data", num_samples)
        train, valid, test = (
            None if docs is None else MockGPTDataset(config, n, name, docs)
            for name, docs, n in zip(SPLIT_NAMES, splits, num_samples, strict=True)
        )
        return train, valid, test
    if any(config.per_split_paths):
        return _per_split_datasets(config, num_samples)
    prefixes, weights = parse_data_path(config.data_path)
    low_level = [IndexedDataset(prefix) for prefix in prefixes]
    _check_blend_splits(config, prefixes, low_level, num_samples)
    per_prefix_splits = [
        _split_indices(config, ds.num_documents, repr(prefix), num_samples)
        for prefix, ds in zip(prefixes, low_level, strict=True)
    ]
    results: list[GPTDataset | BlendedDataset | None] = []
    for s, (name, wanted) in enumerate(zip(SPLIT_NAMES, num_samples, strict=True)):
        if per_prefix_splits[0][s] is None:
            results.append(None)
            continue
        docs: list[np.ndarray] = []
        for prefix, splits in zip(prefixes, per_prefix_splits, strict=True):
            # _split_indices gives None only for a split with no samples wanted, the same for every prefix.
            split_docs = splits[s]
            if split_docs is None:
                raise ValueError(f"--data-path {prefix!r} has no {name} split while {prefixes[0]!r} has one")
            docs.append(split_docs)
        results.append(_split_dataset(config, prefixes, weights, low_level, docs, wanted, name, "--data-path"))
    return results[0], results[1], results[2]
