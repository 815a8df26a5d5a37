"""``GPTDataset``: fixed-length next-token-prediction samples cut from a split of an indexed dataset."""
from __future__ import annotations

import hashlib
import logging
import os
from typing import Any, Protocol

import numpy as np
import torch

from .config import GPTDatasetConfig
from .gpt_indices import build_gpt_indices
from .index_cache import description_hash, load_arrays, save_arrays
from .mock_indexed_dataset import MockIndexedDataset

logger = logging.getLogger(__name__)

_INDEX_NAMES = ("document_index", "sample_index", "shuffle_index")
EOD_PROBE_DOCUMENTS = 16
"""Documents of a split read to check that documents end with EOD under the document masks."""
# Bump when the index construction changes, so old caches are not reused.
_INDEX_FORMAT = 1


class LowLevelDataset(Protocol):
    """What GPTDataset reads: per-document token counts and token ranges."""

    sequence_lengths: np.ndarray
    document_indices: np.ndarray

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens of document ``idx`` from ``offset``, ``length`` of them (to its end when None)."""


def default_cache_dir(dataset_path: str) -> str:
    """Where indices are cached without ``--data-cache-path``: next to the data, as in Megatron-LM."""
    return os.path.join(os.path.dirname(os.path.abspath(dataset_path)), "cache", "GPTDataset_indices")


def _document_starts(tokens: torch.Tensor, eod: int) -> torch.Tensor:
    """[..., s] bool: True where a token opens a new document, i.e. the token before it is EOD."""
    starts = torch.zeros_like(tokens, dtype=torch.bool)
    starts[..., 1:] = tokens[..., :-1] == eod
    return starts


def document_position_ids(tokens: torch.Tensor, eod: int) -> torch.Tensor:
    """Position ids [s] (int64) of input ``tokens`` [s] that restart at 0 after each ``eod``.

    Megatron-LM's ``--reset-position-ids`` (``_get_ltor_masks_and_position_ids`` in megatron-core
    0.16.1's ``datasets/gpt_dataset.py``): an EOD ends its document and keeps counting (it is the last
    token of it); the token after it is position 0. E.g. tokens ``a b EOD c EOD EOD d`` get positions
    ``0 1 2 0 1 0 0``. Without an EOD the positions are ``0 .. s-1``.
    """
    arange = torch.arange(tokens.shape[0], dtype=torch.int64)
    # Each token's document starts at the last start index at or before it (0 for the first document).
    first = torch.cummax(torch.where(_document_starts(tokens, eod), arange, 0), dim=0).values
    return arange - first


def document_attention_mask(tokens: torch.Tensor, eod: int) -> torch.Tensor:
    """Causal, block-diagonal attention mask [..., 1, s, s] (bool, True = may NOT attend) of input
    ``tokens`` [..., s] (one sample [s] -> [1, s, s]; a micro batch [b, s] -> [b, 1, s, s]), on their device.

    Megatron-LM's ``--reset-attention-mask`` (``_get_ltor_masks_and_position_ids``, megatron-core 0.16.1):
    query i attends to key j when j <= i and no EOD lies in ``[j, i)``: tokens after an EOD do not see
    it or anything before it, while the EOD itself still sees its own document. Costs s * s bytes per
    sample; built on the training rank from each micro batch's tokens (``pretrain_gpt.get_batch``), not
    in the data loader, whose shared memory would carry them.
    """
    s = tokens.shape[-1]
    document = torch.cumsum(_document_starts(tokens, eod), dim=-1)
    mask = document.unsqueeze(-1) != document.unsqueeze(-2)
    mask |= torch.ones(s, s, dtype=torch.bool, device=tokens.device).triu_(1)
    return mask.unsqueeze(-3)


class GPTDataset(torch.utils.data.Dataset):
    """Samples of ``seq_length + 1`` tokens over shuffled, concatenated documents.

    Args mirror Megatron-LM's: ``indexed_indices`` are the document ids of this split,
    ``num_samples`` how many samples are needed (None: one epoch), ``index_split`` the split
    name ("train"/"valid"/"test"), ``dataset_path`` the data prefix (None: no caching).
    """

    def __init__(
        self,
        indexed_dataset: LowLevelDataset,
        dataset_path: str | None,
        indexed_indices: np.ndarray,
        num_samples: int | None,
        index_split: str,
        config: GPTDatasetConfig,
    ) -> None:
        super().__init__()
        self.dataset, self.dataset_path, self.config = indexed_dataset, dataset_path, config
        self.indexed_indices = np.asarray(indexed_indices, dtype=np.int64)
        self.num_samples, self.index_split = num_samples, index_split
        where = dataset_path or "mock data"
        num_sequences = int(indexed_dataset.sequence_lengths.shape[0])
        if int(indexed_dataset.document_indices.shape[0]) - 1 != num_sequences:
            # Document ids index sequence lengths directly, which needs one sequence per document.
            raise ValueError(
                f"{where!r} has {indexed_dataset.document_indices.shape[0] - 1} documents but {num_sequences} "
                "sequences; GPTDataset needs document-level data (preprocess without sentence splitting)."
            )
        if self.indexed_indices.size == 0:
            raise ValueError(f"the {index_split} split of {where!r} has no documents")
        if num_samples and int(np.asarray(indexed_dataset.sequence_lengths)[self.indexed_indices].sum()) == 0:
            skip = "" if index_split == "train" else ", evaluate nothing (--eval-iters 0)"
            raise ValueError(
                f"the {index_split} split of {where!r} (documents {self.indexed_indices[0]}.."
                f"{self.indexed_indices[-1]}) holds no tokens, but {num_samples} samples are needed; its documents "
                f"are all empty: move the --split boundaries{skip} or add data"
            )
        if config.reset_position_ids or config.reset_attention_mask:
            self._check_documents_end_with_eod(where)
        self.unique_description = self._describe()
        self.unique_description_hash = description_hash(self.unique_description)
        self.cache_dir = None
        if dataset_path is not None:
            self.cache_dir = config.data_cache_path or default_cache_dir(dataset_path)
        self.built_from_cache = False
        self.document_index, self.sample_index, self.shuffle_index = self._load_or_build_indices()

    def _check_documents_end_with_eod(self, where: str) -> None:
        """ValueError when none of the split's first ``EOD_PROBE_DOCUMENTS`` non-empty documents ends with
        the EOD id: the document masks find boundaries by EOD alone (as Megatron-LM's), so data preprocessed
        without ``--append-eod`` would be trained across documents while the flags say otherwise."""
        lengths = np.asarray(self.dataset.sequence_lengths)
        probed = [int(i) for i in self.indexed_indices[:EOD_PROBE_DOCUMENTS] if lengths[i] > 0]
        if probed and not any(int(self.dataset.get(i, int(lengths[i]) - 1, 1)[0]) == self.config.eod for i in probed):
            raise ValueError(
                f"--reset-position-ids/--reset-attention-mask find documents by their EOD token (id "
                f"{self.config.eod}), but none of the first {len(probed)} documents of the {self.index_split} split "
                f"of {where!r} ends with it; preprocess the data with tools/preprocess_data.py --append-eod "
                "(or drop the flags)")

    def _describe(self) -> dict[str, Any]:
        indices = self.indexed_indices
        lengths = np.asarray(self.dataset.sequence_lengths)
        return {
            "class": type(self).__name__,
            "format": _INDEX_FORMAT,
            "dataset_path": os.path.realpath(self.dataset_path) if self.dataset_path else None,
            "index_split": self.index_split,
            "document_range": [int(indices[0]), int(indices[-1]) + 1],
            "documents_md5": hashlib.md5(indices.tobytes()).hexdigest(),
            # Content fingerprint: regenerated data under the same path gets new indices. The sample index
            # depends on every document's length, so the lengths themselves are hashed, not just their sum.
            "num_tokens": int(lengths[indices].sum()),
            "document_lengths_md5": hashlib.md5(
                np.ascontiguousarray(lengths[indices], dtype=np.int64).tobytes()).hexdigest(),
            "sequence_length": self.config.seq_length,
            "num_samples": self.num_samples,
            "random_seed": self.config.seed,
        }

    @property
    def cache_stem(self) -> str:
        """File-name stem of this dataset's cached indices."""
        return f"{self.unique_description_hash}-{type(self).__name__}-{self.index_split}"

    def _load_or_build_indices(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        cached = load_arrays(self.cache_dir, self.cache_stem, _INDEX_NAMES)
        if cached is not None:
            self.built_from_cache = True
            return tuple(cached[name] for name in _INDEX_NAMES)  # type: ignore[return-value]
        arrays = build_gpt_indices(
            self.dataset.sequence_lengths, self.indexed_indices, self.config.seq_length, self.num_samples,
            self.config.seed,
        )
        named = dict(zip(_INDEX_NAMES, arrays, strict=True))
        if save_arrays(self.cache_dir, self.cache_stem, named, self.unique_description):
            logger.info("cached %s %s indices in %s", self.dataset_path, self.index_split, self.cache_dir)
        return arrays

    def __len__(self) -> int:
        return int(self.sample_index.shape[0]) - 1

    def get_tokens(self, idx: int) -> np.ndarray:
        """The ``seq_length + 1`` token ids of sample ``idx`` (after shuffling)."""
        position = int(self.shuffle_index[idx])
        first, first_offset = (int(v) for v in self.sample_index[position])
        last, last_offset = (int(v) for v in self.sample_index[position + 1])
        doc = self.document_index
        if first == last:
            return self.dataset.get(int(doc[first]), first_offset, last_offset - first_offset + 1)
        parts = [self.dataset.get(int(doc[first]), first_offset)]
        parts += [self.dataset.get(int(doc[i])) for i in range(first + 1, last)]
        parts.append(self.dataset.get(int(doc[last]), 0, last_offset + 1))
        return np.concatenate(parts)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        """Sample ``idx``: ``tokens``, ``labels`` [s] int64, ``loss_mask`` [s] fp32, ``position_ids`` [s] int64
        (per document under ``reset_position_ids``), and under ``reset_attention_mask`` ``attention_mask_eod``
        [] int64, the EOD id from which the training rank builds the document mask of the micro batch's
        tokens (:func:`document_attention_mask`; ``pretrain_gpt.get_batch``)."""
        if not 0 <= idx < len(self):
            raise IndexError(f"sample {idx} out of range for {len(self)} samples")
        text = torch.from_numpy(self.get_tokens(idx).astype(np.int64))
        tokens, labels = text[:-1].contiguous(), text[1:].contiguous()
        loss_mask = torch.ones(self.config.seq_length, dtype=torch.float32)
        if self.config.eod_mask_loss:
            # As Megatron-LM: no loss for predicting across a document boundary (input token is EOD).
            loss_mask[tokens == self.config.eod] = 0.0
        if self.config.pad >= 0:
            loss_mask[labels == self.config.pad] = 0.0
        if self.config.reset_position_ids:
            position_ids = document_position_ids(tokens, self.config.eod)
        else:
            position_ids = torch.arange(self.config.seq_length, dtype=torch.int64)
        sample = {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "position_ids": position_ids}
        if self.config.reset_attention_mask:
            # Not the mask itself (megatron-core's dataset builds it here): s * s bytes per sample through the
            # loader's shared memory, 16 MiB at s = 4096. Eight bytes say which token ends a document; the
            # rank builds the [b, 1, s, s] mask from the tokens. Without the flag attention stays causal.
            sample["attention_mask_eod"] = torch.tensor(self.config.eod, dtype=torch.int64)
        return sample


class MockGPTDataset(GPTDataset):
    """A GPTDataset over deterministic synthetic documents (``--mock-data``); nothing is cached."""

    def __init__(
        self,
        config: GPTDatasetConfig,
        num_samples: int | None,
        index_split: str = "train",
        indexed_indices: np.ndarray | None = None,
    ) -> None:
        mock = MockIndexedDataset(
            config.mock_num_documents, 2 * config.seq_length, config.resolved_mock_vocab_size, config.eod
        )
        if indexed_indices is None:
            indexed_indices = np.arange(len(mock), dtype=np.int64)
        super().__init__(mock, None, indexed_indices, num_samples, index_split, config)
