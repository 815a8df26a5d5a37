"""Megatron-LM's mmap indexed dataset: token ids in ``PREFIX.bin``, their layout in ``PREFIX.idx``.

``.idx`` layout (little endian), identical to Megatron-LM's so files move between the tools:

    9 bytes   magic b"MMIDIDX\\x00\\x00"
    uint64    version (1)
    uint8     dtype code of the .bin tokens (see DTYPE_CODES)
    uint64    S, number of sequences
    uint64    D, number of document indices (documents + 1)
    int32[S]  sequence lengths, in tokens
    int64[S]  sequence pointers, byte offsets into .bin
    int64[D]  document indices: document i is sequences [doc[i], doc[i+1])

``.bin`` is the sequences' token ids back to back, in that dtype, with no header.
"""
from __future__ import annotations

import os
import struct
import types
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
# magic, version, dtype code, sequence count, document count
_HEADER = struct.Struct("<9sQBQQ")
HEADER_SIZE = _HEADER.size  # 34 bytes

# Megatron-LM's DType codes; read-only so no caller can change the on-disk meaning.
DTYPE_CODES = types.MappingProxyType({
    1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32,
    5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16,
})


def dtype_code(dtype: np.dtype | type) -> int:
    """The ``.idx`` code of a numpy dtype."""
    wanted = np.dtype(dtype)
    for code, candidate in DTYPE_CODES.items():
        if np.dtype(candidate) == wanted:
            return code
    raise ValueError(f"dtype {wanted} cannot be stored in an indexed dataset")


def optimal_dtype(vocab_size: int | None) -> type:
    """uint16 when every id fits with room to spare (as Megatron-LM decides), else int32."""
    if vocab_size is not None and vocab_size < 65500:
        return np.uint16
    return np.int32


def data_file_path(path_prefix: str) -> str:
    """``PREFIX.bin``."""
    return path_prefix + ".bin"


def index_file_path(path_prefix: str) -> str:
    """``PREFIX.idx``."""
    return path_prefix + ".idx"


class IndexedDatasetBuilder:
    """Appends token sequences to a ``.bin`` file and writes the matching ``.idx`` on ``finalize``."""

    def __init__(self, bin_path: str, dtype: np.dtype | type = np.int32) -> None:
        self.dtype = np.dtype(dtype)
        dtype_code(self.dtype)  # fail now, not after hours of tokenizing
        self.bin_path = bin_path
        self.data_file = open(bin_path, "wb")
        self.sequence_lengths: list[int] = []
        self.document_indices: list[int] = [0]

    def _as_tokens(self, tokens: Iterable[int] | np.ndarray) -> np.ndarray:
        array = np.asarray(tokens)
        if array.size and array.dtype != self.dtype and np.issubdtype(self.dtype, np.integer):
            # A silent wrap-around (e.g. id 70000 in uint16) would corrupt the data unnoticed.
            info = np.iinfo(self.dtype)
            low, high = int(array.min()), int(array.max())
            if low < info.min or high > info.max:
                raise ValueError(f"token id range [{low}, {high}] does not fit in {self.dtype}")
        return array.astype(self.dtype, copy=False).reshape(-1)

    def add_item(self, tokens: Iterable[int] | np.ndarray) -> None:
        """Append one sequence (it joins the current document until ``end_document``)."""
        array = self._as_tokens(tokens)
        self.data_file.write(array.tobytes(order="C"))
        self.sequence_lengths.append(int(array.size))

    def end_document(self) -> None:
        """Close the current document: the sequences added since the last call form it."""
        self.document_indices.append(len(self.sequence_lengths))

    def add_document(self, tokens: Iterable[int] | np.ndarray, lengths: Sequence[int]) -> None:
        """Append a whole document: ``tokens`` cut into sequences of ``lengths``."""
        array = self._as_tokens(tokens)
        if sum(int(n) for n in lengths) != array.size:
            raise ValueError(f"sequence lengths {list(lengths)} do not add up to {array.size} tokens")
        self.data_file.write(array.tobytes(order="C"))
        self.sequence_lengths.extend(int(n) for n in lengths)
        self.end_document()

    def add_index(self, path_prefix: str) -> None:
        """Append every document of an existing indexed dataset (same dtype) to this one."""
        other = IndexedDataset(path_prefix)
        if other.dtype != self.dtype:
            raise ValueError(f"{path_prefix!r} holds {other.dtype} tokens but this builder writes {self.dtype}")
        offset = len(self.sequence_lengths)
        self.sequence_lengths.extend(int(n) for n in other.sequence_lengths)
        self.document_indices.extend(int(i) + offset for i in other.document_indices[1:])
        with open(data_file_path(path_prefix), "rb") as f:
            while chunk := f.read(1 << 24):
                self.data_file.write(chunk)

    def finalize(self, idx_path: str) -> None:
        """Close ``.bin`` and write ``.idx``."""
        self.data_file.close()
        lengths = np.asarray(self.sequence_lengths, dtype=np.int64)
        if lengths.size and lengths.max() > np.iinfo(np.int32).max:
            raise ValueError("a sequence longer than 2**31-1 tokens cannot be indexed")
        pointers = np.zeros(lengths.size, dtype=np.int64)
        np.cumsum(lengths[:-1] * self.dtype.itemsize, out=pointers[1:])
        documents = np.asarray(self.document_indices, dtype=np.int64)
        with open(idx_path, "wb") as f:
            f.write(_HEADER.pack(INDEX_MAGIC, INDEX_VERSION, dtype_code(self.dtype), lengths.size, documents.size))
            f.write(lengths.astype(np.int32).tobytes(order="C"))
            f.write(pointers.tobytes(order="C"))
            f.write(documents.tobytes(order="C"))

    def __enter__(self) -> IndexedDatasetBuilder:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if not self.data_file.closed:
            self.data_file.close()


@dataclass(frozen=True)
class IndexHeader:
    """The fixed-size fields at the start of an ``.idx`` file."""

    dtype: np.dtype
    sequence_count: int
    document_count: int


def read_index_header(idx_path: str) -> IndexHeader:
    """Parse and check the header of ``idx_path``; errors name the file."""
    try:
        with open(idx_path, "rb") as f:
            raw = f.read(HEADER_SIZE)
    except FileNotFoundError:
        raise FileNotFoundError(f"indexed dataset index file not found: {idx_path!r}") from None
    if len(raw) < HEADER_SIZE:
        raise ValueError(f"{idx_path!r} is too short ({len(raw)} bytes) to be an indexed dataset .idx file")
    magic, version, code, sequences, documents = _HEADER.unpack(raw)
    if magic != INDEX_MAGIC:
        raise ValueError(f"{idx_path!r} is not a Megatron mmap indexed dataset (bad magic {magic!r})")
    if version != INDEX_VERSION:
        raise ValueError(f"{idx_path!r} has index version {version}; only version {INDEX_VERSION} is supported")
    if code not in DTYPE_CODES:
        raise ValueError(f"{idx_path!r} has unknown dtype code {code}")
    if documents < 1:
        raise ValueError(f"{idx_path!r} is corrupt: it has no document index entries")
    return IndexHeader(np.dtype(DTYPE_CODES[code]), sequences, documents)


class IndexedDataset:
    """Read-only view of ``PREFIX.bin``/``PREFIX.idx``; item ``i`` is sequence ``i`` as a numpy array."""

    def __init__(self, path_prefix: str, mmap: bool = True) -> None:
        self.path_prefix, self.mmap = path_prefix, mmap
        idx_path, bin_path = index_file_path(path_prefix), data_file_path(path_prefix)
        header = read_index_header(idx_path)
        self.dtype = header.dtype
        count, documents = header.sequence_count, header.document_count
        expected = HEADER_SIZE + count * (4 + 8) + documents * 8
        actual = os.path.getsize(idx_path)
        if actual < expected:  # Megatron's multimodal variant appends modes, so longer is allowed
            raise ValueError(f"{idx_path!r} is truncated: {actual} bytes, its header implies {expected}")
        index = np.memmap(idx_path, dtype=np.uint8, mode="r") if mmap else np.fromfile(idx_path, dtype=np.uint8)
        self._index_buffer = index
        self.sequence_lengths = np.frombuffer(index, np.int32, count, HEADER_SIZE)
        self.sequence_pointers = np.frombuffer(index, np.int64, count, HEADER_SIZE + count * 4)
        self.document_indices = np.frombuffer(index, np.int64, documents, HEADER_SIZE + count * 12)
        if self.document_indices[0] != 0 or self.document_indices[-1] != count:
            raise ValueError(f"{idx_path!r} is corrupt: document indices do not span its {count} sequences")
        if not os.path.isfile(bin_path):
            raise FileNotFoundError(f"indexed dataset data file not found: {bin_path!r}")
        needed = int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1]) * self.dtype.itemsize if count else 0
        if os.path.getsize(bin_path) < needed:
            raise ValueError(
                f"{bin_path!r} is truncated: {os.path.getsize(bin_path)} bytes, {idx_path!r} needs {needed}"
            )
        if os.path.getsize(bin_path) == 0:
            self._data = np.empty(0, dtype=self.dtype)  # numpy cannot memory-map an empty file
        elif mmap:
            self._data = np.memmap(bin_path, dtype=self.dtype, mode="r")
        else:
            self._data = np.fromfile(bin_path, dtype=self.dtype)

    def __len__(self) -> int:
        return int(self.sequence_lengths.shape[0])

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``[offset, offset + length)`` of sequence ``idx`` (to its end when ``length`` is None)."""
        size = int(self.sequence_lengths[idx])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"tokens [{offset}, {offset + length}) are outside sequence {idx} of length {size}")
        start = int(self.sequence_pointers[idx]) // self.dtype.itemsize + offset
        return np.array(self._data[start:start + length])

    def __getitem__(self, idx: int | slice) -> np.ndarray | list[np.ndarray]:
        if isinstance(idx, slice):
            start, stop, step = idx.indices(len(self))
            return [self.get(i) for i in range(start, stop, step)]
        if not -len(self) <= idx < len(self):
            raise IndexError(f"sequence {idx} out of range for {len(self)} sequences in {self.path_prefix!r}")
        return self.get(int(idx) % len(self))

    @property
    def num_documents(self) -> int:
        """Number of documents (one fewer than the document index entries)."""
        return int(self.document_indices.shape[0]) - 1

    @staticmethod
    def exists(path_prefix: str) -> bool:
        """Whether both ``PREFIX.idx`` and ``PREFIX.bin`` exist."""
        return os.path.isfile(index_file_path(path_prefix)) and os.path.isfile(data_file_path(path_prefix))

    # Memory maps do not pickle; DataLoader workers reopen the files instead.
    def __getstate__(self) -> dict:
        return {"path_prefix": self.path_prefix, "mmap": self.mmap}

    def __setstate__(self, state: dict) -> None:
        IndexedDataset.__init__(self, state["path_prefix"], state["mmap"])
