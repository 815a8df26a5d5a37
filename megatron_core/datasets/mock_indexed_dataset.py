"""Synthetic documents with the ``IndexedDataset`` reading interface, for ``--mock-data``."""
from __future__ import annotations

import numpy as np

# Mock documents are fixed (like Megatron-LM's mock data) so that changing --seed only changes
# the order samples are drawn in, never the underlying "corpus".
_MOCK_DATA_SEED = 0


class MockIndexedDataset:
    """Documents of pseudo-random length; tokens count upwards (learnable) and end with EOD.

    Document ``d`` of length ``n`` is ``(7 * d + 0, 7 * d + 1, ..., ) mod (vocab - 1)``, skipping
    the EOD id, for ``n - 1`` tokens, then EOD. Tokens are computed on the fly, so the mock
    corpus costs no memory beyond its lengths.
    """

    def __init__(self, num_documents: int, max_document_length: int, vocab_size: int, eod: int) -> None:
        if num_documents < 1 or max_document_length < 1:
            raise ValueError("mock data needs at least one document of at least one token")
        rng = np.random.RandomState(_MOCK_DATA_SEED)
        self.sequence_lengths = rng.randint(1, max_document_length + 1, size=num_documents).astype(np.int32)
        self.document_indices = np.arange(num_documents + 1, dtype=np.int64)
        self.vocab_size, self.eod = vocab_size, eod
        self.dtype = np.dtype(np.int64)

    def __len__(self) -> int:
        return int(self.sequence_lengths.shape[0])

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``[offset, offset + length)`` of document ``idx``."""
        size = int(self.sequence_lengths[idx])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"tokens [{offset}, {offset + length}) are outside mock document {idx} of length {size}")
        positions = np.arange(offset, offset + length, dtype=np.int64)
        values = (7 * int(idx) + positions) % (self.vocab_size - 1)
        tokens = values + (values >= self.eod)  # skip over the EOD id
        tokens[positions == size - 1] = self.eod
        return tokens

    def __getitem__(self, idx: int) -> np.ndarray:
        return self.get(idx)
