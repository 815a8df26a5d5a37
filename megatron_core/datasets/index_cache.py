"""On-disk cache of dataset index arrays, keyed by a hash of everything they depend on.

Index building is deterministic, so a cache hit is exactly what a rebuild would give; the hash
key means a changed setting (seed, seq_length, split, ...) can never reuse stale arrays. Files
are written to a temporary name and renamed, so ranks racing to fill the same cache (or a
killed run) never leave a half-written file that a later run would trust.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


def description_hash(description: Mapping[str, Any]) -> str:
    """Stable hex digest of a JSON-able description."""
    text = json.dumps(description, sort_keys=True, separators=(",", ":"))
    return hashlib.md5(text.encode("utf-8")).hexdigest()


def cache_file(cache_dir: str, stem: str, name: str) -> str:
    """Path of one cached array."""
    return os.path.join(cache_dir, f"{stem}-{name}.npy")


def load_arrays(cache_dir: str | None, stem: str, names: Sequence[str]) -> dict[str, np.ndarray] | None:
    """All the named arrays (memory-mapped), or None if any is missing or unreadable."""
    if cache_dir is None:
        return None
    paths = {name: cache_file(cache_dir, stem, name) for name in names}
    if not all(os.path.isfile(p) for p in paths.values()):
        return None
    try:
        return {name: np.load(path, mmap_mode="r", allow_pickle=False) for name, path in paths.items()}
    except (OSError, ValueError) as exc:
        logger.warning("ignoring unreadable cached index in %s (%s); rebuilding", cache_dir, exc)
        return None


def save_arrays(
    cache_dir: str | None, stem: str, arrays: Mapping[str, np.ndarray], description: Mapping[str, Any]
) -> bool:
    """Write the arrays (and a readable description) atomically; False if the directory is unwritable."""
    if cache_dir is None:
        return False
    try:
        os.makedirs(cache_dir, exist_ok=True)
        _atomic_write(os.path.join(cache_dir, f"{stem}-description.json"),
                      lambda f: f.write(json.dumps(description, indent=2, sort_keys=True).encode()))
        for name, array in arrays.items():
            _atomic_write(cache_file(cache_dir, stem, name), lambda f, a=array: np.save(f, a, allow_pickle=False))
    except OSError as exc:
        # A read-only data directory must not stop training: the indices are simply rebuilt next time.
        logger.warning("could not cache dataset indices in %s (%s); set --data-cache-path to a writable dir",
                       cache_dir, exc)
        return False
    return True


def _atomic_write(path: str, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=".npy")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
