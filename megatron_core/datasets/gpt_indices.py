"""The three index arrays behind a GPT dataset, computed as Megatron-LM computes them.

* document index: the split's document ids repeated once per epoch, then shuffled;
* sample index: row k = (position in the document index, token offset) where sample k starts;
  sample k runs to row k+1 inclusive, so samples overlap by one token (the last label of a
  sample is the first input of the next) and may span several documents;
* shuffle index: a permutation of the samples.

Everything follows from one ``numpy.random.RandomState(seed)``, so any rank can rebuild the
same arrays, and files cached by one run are valid for another with the same settings.
"""
from __future__ import annotations

import numpy as np

# Megatron-LM shuffles the final epoch separately when it is used for less than this fraction,
# so the few samples taken from it are not concentrated at the start of the last pass.
_SEPARATE_FINAL_EPOCH_THRESHOLD = 0.80


def num_epochs_needed(tokens_per_epoch: int, seq_length: int, num_samples: int | None) -> int:
    """Fewest passes over the documents that yield ``num_samples`` samples of seq_length + 1 tokens."""
    if num_samples is None:
        return 1
    if tokens_per_epoch <= 0:
        raise ValueError("the documents hold no tokens, so no samples can be drawn from them")
    tokens_needed = num_samples * seq_length + 1  # +1: each sample also needs its last label
    return max(1, -(-tokens_needed // tokens_per_epoch))


def build_document_index(
    documents: np.ndarray, num_epochs: int, rng: np.random.RandomState, separate_final_epoch: bool
) -> np.ndarray:
    """``documents`` repeated ``num_epochs`` times and shuffled (the last epoch apart if asked)."""
    if not separate_final_epoch or num_epochs == 1:
        index = np.tile(np.asarray(documents, dtype=np.int64), num_epochs)
        rng.shuffle(index)
        return index
    first = build_document_index(documents, num_epochs - 1, rng, False)
    last = build_document_index(documents, 1, rng, False)
    return np.concatenate((first, last))


def build_sample_index(
    sequence_lengths: np.ndarray, document_index: np.ndarray, seq_length: int
) -> np.ndarray:
    """``[num_samples + 1, 2]`` start (document index position, offset) of every sample.

    Sample k covers flat tokens ``[k * seq_length, (k + 1) * seq_length]`` of the documents laid
    end to end in document-index order; a row points at the document holding that token (the
    first non-empty one), which is what Megatron-LM's C++ helper produces.
    """
    lengths = np.asarray(sequence_lengths, dtype=np.int64)[document_index]
    ends = np.cumsum(lengths)
    total = int(ends[-1]) if ends.size else 0
    num_samples = max(total - 1, 0) // seq_length  # drop the last partial sample
    starts = np.arange(num_samples + 1, dtype=np.int64) * seq_length
    position = np.searchsorted(ends, starts, side="right")
    sample_index = np.empty((num_samples + 1, 2), dtype=np.int64)
    sample_index[:, 0] = position
    if num_samples or total:
        sample_index[:, 1] = starts - (ends[position] - lengths[position])
    sample_index[0] = (0, 0)  # Megatron starts at the first entry even if that document is empty
    return sample_index


def build_shuffle_index(num_samples: int, total_size: int, rng: np.random.RandomState) -> np.ndarray:
    """A permutation of ``range(total_size)``; the tail from ``num_samples`` is shuffled apart."""
    first = np.arange(num_samples, dtype=np.int64)
    rng.shuffle(first)
    if num_samples == total_size:
        return first
    last = np.arange(num_samples, total_size, dtype=np.int64)
    rng.shuffle(last)
    return np.concatenate((first, last))


def build_gpt_indices(
    sequence_lengths: np.ndarray,
    documents: np.ndarray,
    seq_length: int,
    num_samples: int | None,
    seed: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(document index, sample index, shuffle index) for ``documents`` of a dataset.

    ``num_samples=None`` means a single epoch. The result may hold more samples than asked for:
    whole epochs are always laid out.
    """
    tokens_per_epoch = int(np.asarray(sequence_lengths, dtype=np.int64)[documents].sum())
    num_epochs = num_epochs_needed(tokens_per_epoch, seq_length, num_samples)
    separate_final_epoch = False
    if num_epochs > 1 and num_samples is not None:
        samples_before_final = ((num_epochs - 1) * tokens_per_epoch - 1) // seq_length
        samples_from_final = num_samples - samples_before_final
        samples_per_epoch = (tokens_per_epoch - 1) // seq_length
        separate_final_epoch = samples_from_final < int(_SEPARATE_FINAL_EPOCH_THRESHOLD * samples_per_epoch)
    rng = np.random.RandomState(seed)
    document_index = build_document_index(documents, num_epochs, rng, separate_final_epoch)
    sample_index = build_sample_index(sequence_lengths, document_index, seq_length)
    total = sample_index.shape[0] - 1
    shuffled_part = ((num_epochs - 1) * tokens_per_epoch - 1) // seq_length if separate_final_epoch else total
    shuffle_index = build_shuffle_index(shuffled_part, total, rng)
    return document_index, sample_index, shuffle_index
