"""Paths of Megatron-LM's checkpoint layout, crash-safe writes, and the manifest both formats publish.

A checkpoint is complete only once its directory has its final name and the tracker file points
at it: files are written into ``iter_NNNNNNN.tmp``, fsynced, the directory is renamed, and the
tracker is replaced atomically last. A process killed at any moment leaves the previous
checkpoint as the one that loads. ``manifest.json`` (every file and its size) lets a load name a
deleted or truncated file and the earlier iterations to load instead (:func:`verify_manifest`).
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import pickle
import pickletools
import re
import shutil
from typing import Any

import torch

from megatron_core.errors import ConfigError

TRACKER_FILENAME = "latest_checkpointed_iteration.txt"
MODEL_FILENAME = "model_optim_rng.pt"
# Megatron-LM's directory (and tracker text) of a released, iteration-less checkpoint.
RELEASE_DIRNAME = "release"
MANIFEST_FILENAME = "manifest.json"  # every file of an iteration and its size in bytes, written at save


def iteration_dir(root: str, iteration: int) -> str:
    """``root/iter_NNNNNNN``: the directory of one saved iteration (Megatron-LM's layout)."""
    return os.path.join(root, f"iter_{iteration:07d}")


def mp_rank_name(tp_rank: int, pp_rank: int, pp_size: int) -> str:
    """``mp_rank_TT`` without pipeline parallelism, else ``mp_rank_TT_PPP``."""
    return f"mp_rank_{tp_rank:02d}" if pp_size == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def distrib_optim_filename(dp_rank: int) -> str:
    """The file of DP rank ``dp_rank``'s distributed-optimizer shard inside an ``mp_rank`` directory."""
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


class _KeepWriteError:
    """A binary file whose ``write`` keeps the first OSError it raises."""

    def __init__(self, file: Any) -> None:
        self.file = file
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self.file.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def flush(self) -> None:
        self.file.flush()


def torch_save(obj: Any, file: Any) -> None:
    """``torch.save(obj, file)`` that raises the write's own OSError (e.g. "[Errno 28] No space left on
    device"): torch's zip writer reports a failed write as "unexpected pos N vs M" (RuntimeError)."""
    writer = _KeepWriteError(file)
    try:
        torch.save(obj, writer)  # type: ignore[arg-type]  # any object with write() and flush() will do
    except RuntimeError:
        if writer.error is not None:
            raise writer.error from None
        raise


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` to a temporary name, renamed when complete; a failed write raises its own OSError and
    leaves no partial file."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch_save(obj, f)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)  # a failed or interrupted write leaves nothing behind
        raise


def save_file(obj: Any, path: str) -> None:
    """``torch.save`` and fsync (the caller writes into a temporary directory)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        torch_save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def load_file(path: str) -> Any:
    """Load with ``weights_only=True``: tensors and plain Python values only, no code runs.

    Raises ConfigError (one line naming ``path``) for a file that is not a plain-tensor checkpoint
    or that is truncated or damaged.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not is_pickled_object(exc):  # garbage in the pickle (overwritten bytes) fails the same unpickler
            raise DamagedFileError(path, pickle.UnpicklingError(unpickler_reason(exc))) from None
        found = _pickled_classes(path)
        if "argparse.Namespace" in found:  # Megatron-LM's file: its run's args, read through an allow-list
            return _load_megatron_lm(path, found)
        raise ConfigError(f"{path} is not a plain-tensor checkpoint: it holds pickled Python objects, which are "
                          f"not loaded (they could run code); re-save it with tensors and plain values only") from None
    except (EOFError, RuntimeError, OSError, ValueError) as exc:
        raise DamagedFileError(path, exc) from None


def _pickled_classes(path: str) -> list[str]:
    """The classes the file's pickle names (Megatron-LM's ``args`` is ``argparse.Namespace``), from a scan that
    runs nothing; empty where the scan cannot follow the file. Raises DamagedFileError when the scan meets bytes
    that are no pickle opcode: the unpickler stopped at the first class (Megatron-LM's args come first), before
    the damage further on."""
    try:
        return torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except pickle.UnpicklingError as exc:
        if is_pickled_object(exc):  # an opcode the scan does not follow: refused as a pickled object
            return []
        raise DamagedFileError(path, pickle.UnpicklingError(unpickler_reason(exc))) from None
    except (EOFError, OSError, RuntimeError, ValueError):  # e.g. torch's pre-1.6 format, which the scan cannot read
        return []


def _load_megatron_lm(path: str, found: list[str]) -> Any:
    """Megatron-LM's legacy file (or torch_dist ``common.pt``) at ``path``, restated in this framework's entries
    when it holds model weights (``checkpoint.megatron_lm``); ``found``: the classes its pickle names."""
    from megatron_core.checkpoint import megatron_lm
    try:
        state = megatron_lm.load_megatron_lm_file(path, found)
    except ConfigError:  # a class outside the allow-list, named
        raise
    except (EOFError, RuntimeError, OSError, ValueError, pickle.UnpicklingError) as exc:
        raise DamagedFileError(path, exc) from None
    if megatron_lm.is_megatron_lm_state(state) and any(key.startswith("model") for key in state):
        return megatron_lm.from_megatron_lm(state, path)
    return state


def is_pickled_object(exc: pickle.UnpicklingError) -> bool:
    """Whether ``torch.load(weights_only=True)`` refused what a pickle may hold (a class or function the file
    pickles: ``Unsupported global: GLOBAL module.Name``; an opcode of a newer pickle protocol, ``Unsupported
    operand 149``), rather than bytes that are no pickle opcode at all (damage: ``Unsupported operand 90``,
    ``invalid load key``)."""
    text = str(exc)
    operand = re.search(r"Unsupported operand (\d+)", text)
    if operand is not None:
        return chr(int(operand.group(1))) in {op.code for op in pickletools.opcodes}
    return "Unsupported global" in text


def unpickler_reason(exc: pickle.UnpicklingError) -> str:
    """The weights-only unpickler's own reason (``Unsupported operand 90``) from torch's multi-line message."""
    tail = str(exc).split("WeightsUnpickler error:")[-1]
    return next((line.strip() for line in tail.splitlines() if line.strip()), type(exc).__name__)


class DamagedFileError(ConfigError):
    """A checkpoint file that cannot be read back (truncated, empty, overwritten)."""

    def __init__(self, path: str, exc: BaseException) -> None:
        self.cause = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:160]}"
        super().__init__(f"{path} is truncated or damaged ({self.cause}); load an earlier checkpoint with "
                         f"--ckpt-step N")


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


def publish_iteration(root: str, tmp_dir: str, final_dir: str, iteration: int) -> None:
    """Rank 0, both formats: manifest, fsync every directory, rename into place, then point the
    tracker at ``iteration`` (atomically), in that order so a crash at any step leaves the previous
    checkpoint loadable. Raises OSError."""
    write_manifest(tmp_dir)
    for dirpath, _, _ in os.walk(tmp_dir):
        fsync_dir(dirpath)
    publish_dir(tmp_dir, final_dir)
    write_text_atomic(os.path.join(root, TRACKER_FILENAME), str(iteration))


def root_cause(exc: BaseException) -> tuple[int | None, BaseException]:
    """``(rank, exception)``: the lowest rank's own exception inside a ``torch.distributed.checkpoint``
    ``CheckpointException`` (whose ``failures`` maps ranks to ``(exception, traceback)``), else ``(None, exc)``."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        rank = min(failures)
        cause = failures[rank]
        cause = cause[0] if isinstance(cause, tuple) else cause
        if isinstance(cause, BaseException):
            return rank, cause
    return None, exc


def first_line(exc: BaseException) -> str:
    """An exception's first message line (at most 200 characters), for one-line errors; for a DCP
    ``CheckpointException`` the first failing rank's exception (its ``str`` lists every rank's traceback)."""
    rank, cause = root_cause(exc)
    lines = str(cause).strip().splitlines()
    text = f"{type(cause).__name__}: {lines[0]}" if lines and rank is not None else (lines or [type(cause).__name__])[0]
    return (text if rank is None else f"rank {rank}: {text}")[:200]


def write_failure(exc: BaseException, directory: str) -> str:
    """:func:`first_line` of a failed checkpoint write; when it carries no OS error (torch's zip writer reports a
    write cut short by a full disk as ``unexpected pos N vs M``, ``torch.distributed.checkpoint``'s writer
    passes that on) the bytes still free on the file system holding ``directory`` are added, so the line
    says whether space ran out."""
    text = first_line(exc)
    if "[Errno" in text:
        return text
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return text
    return f"{text}; {free} bytes free on the file system of {directory}"


def read_tracker(root: str) -> int | None:
    """The iteration named by the tracker file, or None when there is none."""
    path = os.path.join(root, TRACKER_FILENAME)
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        raw = f.read(64)
    try:
        text = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        text = "<binary>"
    if text == RELEASE_DIRNAME:
        return 0  # Megatron-LM's name for a converted, iteration-less checkpoint
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{path} holds {text!r}, not an iteration number; "
                         "delete it or point --load elsewhere") from None


def foreign_checkpoint_hint(root: str) -> str:
    """What to run when ``root`` is a Hugging Face folder or an engine checkpoint instead of a training
    checkpoint ("" otherwise): the message's ending, from "; " on."""
    entries = os.listdir(root) if os.path.isdir(root) else []
    convert = "tools/checkpoint/convert.py --model-type GPT --loader hf --saver core --load-dir {} --save-dir CKPT"
    if "config.json" in entries:
        return f"; it is a Hugging Face model folder: convert it with {convert.format(root)} and load CKPT"
    if any(re.fullmatch(r"mp_rank_\d+_model_states\.pt", e) for e in entries):  # the engine's names (DeepSpeed's)
        parent, tag = os.path.split(os.path.normpath(root))
        return (f"; it is a tag folder of a megatron_core.initialize (engine) checkpoint: for a transformers model "
                f"write a Hugging Face folder with tools/zero_to_fp32.py {parent} HF_DIR -t {tag}, then "
                f"{convert.format('HF_DIR')}")
    if "latest" in entries or any(e.startswith("global_step") for e in entries):
        return (f"; it is a megatron_core.initialize (engine) checkpoint: for a transformers model write a Hugging "
                f"Face folder with tools/zero_to_fp32.py {root} HF_DIR, then {convert.format('HF_DIR')}")
    return ""


def existing_iteration_dir(root: str, iteration: int) -> str | None:
    """The directory of ``iteration`` (or ``release``), falling back to a replaced copy left by a crash."""
    candidates = [iteration_dir(root, iteration), iteration_dir(root, iteration) + ".old"]
    if iteration == 0:
        candidates.append(os.path.join(root, RELEASE_DIRNAME))
    for path in candidates:
        if os.path.isdir(path):
            return path
    return None


def write_manifest(directory: str) -> None:
    """Record every file under ``directory`` and its size, so a load can tell a damaged file."""
    sizes = {}
    for dirpath, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(dirpath, name)
            sizes[os.path.relpath(path, directory)] = os.path.getsize(path)
    text = json.dumps({"files": sizes}, indent=1, sort_keys=True)
    path = os.path.join(directory, MANIFEST_FILENAME)
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def read_manifest(directory: str) -> dict[str, int] | None:
    """The manifest's ``{relative path: size}``, or None for a checkpoint saved without one."""
    path = os.path.join(directory, MANIFEST_FILENAME)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, "rb") as f:
            return {str(k): int(v) for k, v in json.loads(f.read().decode("utf-8"))["files"].items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ConfigError(f"{path} is damaged (not the JSON a save writes); load an earlier checkpoint with "
                          f"--ckpt-step N") from None


def damaged_message(root: str, iteration: int, path: str, what: str) -> str:
    """One line naming a damaged checkpoint file and the fix: ``--ckpt-step`` of an earlier iteration."""
    earlier = [i for i in complete_iterations(root) if i < iteration]
    fix = (f"load the previous checkpoint with --ckpt-step {earlier[-1]} (iterations saved before it: "
           f"{', '.join(map(str, earlier[-5:]))})" if earlier
           else "no earlier checkpoint is there: retrain or restore the file")
    return f"checkpoint file {path} {what} (iteration {iteration} is damaged); {fix}"


def verify_manifest(root: str, iteration: int, directory: str, prefix: str = "") -> None:
    """Every file the save recorded under ``directory`` (those starting with ``prefix``) exists with its size.

    Raises ConfigError (:func:`damaged_message`) for a deleted or resized file; nothing to check for a
    checkpoint saved without a manifest.
    """
    manifest = read_manifest(directory)
    for relative, size in sorted((manifest or {}).items()):
        if not relative.startswith(prefix):
            continue
        path = os.path.join(directory, relative)
        if not os.path.isfile(path):
            raise ConfigError(damaged_message(root, iteration, path, "was deleted"))
        if os.path.getsize(path) != size:
            raise ConfigError(damaged_message(root, iteration, path,
                                              f"has {os.path.getsize(path)} bytes, the save wrote {size}"))


def complete_iterations(root: str) -> list[int]:
    """Iterations under ``root`` with a final (not ``.tmp``) directory, ascending."""
    found = []
    for path in glob.glob(os.path.join(glob.escape(root), "iter_*")):
        name = os.path.basename(path)[len("iter_"):]
        if name.isdigit() and os.path.isdir(path):
            found.append(int(name))
    return sorted(found)


def remove_leftovers(root: str) -> list[str]:
    """Delete temporaries of saves that were killed (``iter_N.tmp``, ``iter_N.old``, tracker temporaries)."""
    removed = []
    pattern = [os.path.join(glob.escape(root), p) for p in ("iter_*.tmp", "iter_*.old", f"{TRACKER_FILENAME}.tmp.*")]
    for path in (p for pat in pattern for p in glob.glob(pat)):
        if path.endswith(".old") and not os.path.isdir(path[:-len(".old")]):
            continue  # a crash between the two renames of publish_dir: this is still the checkpoint
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                os.remove(path)
            except OSError:
                continue
        removed.append(path)
    return removed


def check_writable(root: str, flag: str = "--save") -> None:
    """Create ``root`` if needed and write a probe file in it; ConfigError naming ``root`` if that fails."""
    if os.path.exists(root) and not os.path.isdir(root):
        raise ConfigError(f"{flag} {root} is an existing file, not a directory; give a directory (it is created if "
                          f"missing)")
    probe = os.path.join(root, f".write_test.{os.getpid()}")
    try:
        os.makedirs(root, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as exc:
        raise ConfigError(f"{flag} {root} is not writable ({exc.strerror or exc}); give a directory this job can "
                          f"write to") from None
