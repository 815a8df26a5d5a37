"""Paths of Megatron-LM's legacy checkpoint layout, and crash-safe writes.

A checkpoint is complete only once its directory has its final name and the tracker file points
at it: files are written into ``iter_NNNNNNN.tmp``, fsynced, the directory is renamed, and the
tracker is replaced atomically last. A process killed at any moment leaves the previous
checkpoint as the one that loads.
"""
from __future__ import annotations

import os
import shutil
from typing import Any

import torch

TRACKER_FILENAME = "latest_checkpointed_iteration.txt"
MODEL_FILENAME = "model_optim_rng.pt"


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def mp_rank_name(tp_rank: int, pp_rank: int, pp_size: int) -> str:
    """``mp_rank_TT`` without pipeline parallelism, else ``mp_rank_TT_PPP``."""
    return f"mp_rank_{tp_rank:02d}" if pp_size == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def distrib_optim_filename(dp_rank: int) -> str:
    return f"distrib_optim_dp{dp_rank:03d}.pt"


def fsync_dir(path: str) -> None:
    """Make a rename or new entry in ``path`` durable."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems do not support fsync on directories
    finally:
        os.close(fd)


def save_file(obj: Any, path: str) -> None:
    """``torch.save`` and fsync (the caller writes into a temporary directory)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def load_file(path: str) -> Any:
    """Load with ``weights_only=True``: tensors and plain Python values only, no code runs."""
    return torch.load(path, map_location="cpu", weights_only=True)


def write_text_atomic(path: str, text: str) -> None:
    """Replace ``path`` by ``text`` in one step: write a temporary file, fsync, ``os.replace``."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def publish_dir(tmp_dir: str, final_dir: str) -> None:
    """Rename a complete temporary directory to its final name, replacing an older copy."""
    old = final_dir + ".old"
    if os.path.isdir(final_dir):
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final_dir, old)
    os.rename(tmp_dir, final_dir)
    fsync_dir(os.path.dirname(os.path.abspath(final_dir)))
    shutil.rmtree(old, ignore_errors=True)


def read_tracker(root: str) -> int | None:
    """The iteration named by the tracker file, or None when there is none."""
    path = os.path.join(root, TRACKER_FILENAME)
    if not os.path.isfile(path):
        return None
    text = open(path).read().strip()
    if text == "release":
        return 0  # Megatron-LM's name for a converted, iteration-less checkpoint
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{path} holds {text!r}, not an iteration number; delete it or point --load elsewhere") from None


def existing_iteration_dir(root: str, iteration: int) -> str | None:
    """The directory of ``iteration`` (or ``release``), falling back to a replaced copy left by a crash."""
    candidates = [iteration_dir(root, iteration), iteration_dir(root, iteration) + ".old"]
    if iteration == 0:
        candidates.append(os.path.join(root, "release"))
    for path in candidates:
        if os.path.isdir(path):
            return path
    return None
