"""NVMe offload's bad directories on real file systems: one-line errors, on every rank, no damage.

We run as root, so permissions do not stop a write; the conditions are built for real: a path
under a regular file (ENOTDIR), a read-only tmpfs (EROFS), a full 256 KiB tmpfs (ENOSPC) and a
file-size limit (RLIMIT_FSIZE: EFBIG, SIGXFSZ ignored as CPython does by default). The tmpfs cases
skip, saying why, only where ``mount`` is not permitted; the RLIMIT ones always run. Library level:
``DistributedOptimizer`` construction at DP2 (where one rank failing alone must stop both with the
same message), and a step whose swap-file write fails after construction. End to end:
``pretrain_gpt.py`` saves a checkpoint, the resumed run hits the full disk and ends with one
``error:`` line and exit code 2, no traceback, and the checkpoint is byte-for-byte unchanged and
still resumes.
"""
import contextlib
import hashlib
import os
import resource
import signal
import subprocess
import sys

import pytest
from ddp_common import build, train_step
from harness import run_distributed
from test_pretrain import REPO, _logged, _train
from toy_model import ToyConfig

from megatron_core.errors import ConfigError

# ~37k parameters: each rank's swap file (main + 2 Adam moments, fp32) is ~220 KiB, so the two
# ranks' files do not fit a 256 KiB tmpfs and one file exceeds a 64 KiB file-size limit.
CONFIG = ToyConfig(num_layers=2, hidden_size=64, ffn_hidden_size=128)
SMALL_FSIZE = 64 * 1024


@contextlib.contextmanager
def _tmpfs(directory, options: str):
    """A tmpfs mounted at ``directory`` with ``options``; skips when mounting is not permitted."""
    os.makedirs(directory, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(directory)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"mount -t tmpfs not permitted here ({proc.stderr.strip() or proc.returncode}); "
                    f"the RLIMIT_FSIZE variant covers a full disk")
    try:
        yield str(directory)
    finally:
        subprocess.run(["umount", str(directory)], check=True)


def _limit_file_size(limit: int) -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of the default kill
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


def _construct(path: str, fsize_limit_on_rank: int | None = None):
    """Build the DP2 ZeRO-1 optimizer with NVMe offload at ``path``; the ConfigError text, or None."""
    import torch.distributed as dist

    if fsize_limit_on_rank == dist.get_rank():
        _limit_file_size(SMALL_FSIZE)
    try:
        build({}, CONFIG, {"zero_stage": 1}, {"nvme_offload_path": path})[0].destroy()
    except ConfigError as exc:
        return str(exc)
    return None


def _assert_same_one_line_error(results, *needles):
    messages = set(results)
    assert len(messages) == 1 and None not in messages, results  # every rank raised the same error
    (message,) = messages
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, message


def test_path_under_a_regular_file_is_an_error_on_every_rank(tmp_path):
    (tmp_path / "file").write_text("")
    path = str(tmp_path / "file" / "swap")
    results = run_distributed(_construct, 2, path, timeout=60)
    _assert_same_one_line_error(results, f"--nvme-offload-path {path} is not a directory",
                                f"{tmp_path / 'file'} is a file: pass a directory elsewhere")


def test_read_only_file_system_is_an_error(tmp_path):
    with _tmpfs(tmp_path / "ro", "size=1m,ro") as path:
        results = run_distributed(_construct, 2, path, timeout=60)
    _assert_same_one_line_error(results, f"--nvme-offload-path {path} is not writable", "pass another")


def test_full_tmpfs_is_an_error_on_every_rank_and_nothing_is_left(tmp_path):
    with _tmpfs(tmp_path / "full", "size=256k") as path:
        results = run_distributed(_construct, 2, path, timeout=60)
        assert os.listdir(path) == []  # the swap files of both ranks were removed
    _assert_same_one_line_error(results, "--nvme-offload-path: reserving space for", path,
                                "No space left on device", "free space")


def test_file_size_limit_on_one_rank_stops_both_before_training(tmp_path):
    results = run_distributed(_construct, 2, str(tmp_path), 1, timeout=60)
    _assert_same_one_line_error(results, "--nvme-offload-path: reserving space for", "rank00001", "File too large",
                                "ulimit -f")


def _step_after_limit(path: str):
    """Construct and step once, then lower rank 1's file-size limit: the next step's write fails."""
    import torch.distributed as dist

    ps, chunks, wrapped, optimizer = build({}, CONFIG, {"zero_stage": 1}, {"nvme_offload_path": path})
    train_step(ps, CONFIG, wrapped, optimizer, 0, 1)
    if dist.get_rank() == 1:
        _limit_file_size(SMALL_FSIZE)
    try:
        train_step(ps, CONFIG, wrapped, optimizer, 1, 1)
    except ConfigError as exc:
        return str(exc)
    finally:
        ps.destroy()
    return None


def test_failing_write_during_a_step_stops_every_rank_with_one_line(tmp_path):
    results = run_distributed(_step_after_limit, 2, str(tmp_path), timeout=60)
    _assert_same_one_line_error(results, "--nvme-offload-path: writing", "rank00001", "File too large",
                                "ulimit -f")


# ---- end to end: a saved checkpoint, then a resume onto a full disk ------------------------------
ARGS = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
        "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "1e-3", "--mock-data", "--vocab-size", "255",
        "--num-workers", "0", "--log-interval", "1", "--eval-iters", "0", "--zero-stage", "1"]


def _pretrain(argv, preexec=None):
    return subprocess.run([sys.executable, os.path.join(REPO, "pretrain_gpt.py"), *argv], capture_output=True,
                          text=True, timeout=120, cwd=REPO, preexec_fn=preexec)


def _digest(directory) -> dict:
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                out[os.path.relpath(os.path.join(root, name), directory)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.mark.parametrize("full", ["tmpfs-256k", "file-size-limit"])
def test_resume_onto_a_full_disk_is_one_line_and_the_checkpoint_survives(tmp_path, full):
    ckpt, swap = tmp_path / "ckpt", tmp_path / "swap"
    swap.mkdir()
    flags = ARGS + ["--save", str(ckpt), "--save-interval", "2", "--train-iters", "4"]
    # the saving and the resuming runs in forked ranks (pretrain_gpt.main), the failing one as a command
    first = _logged(run_distributed(_train, 1, flags + ["--exit-interval", "2", "--nvme-offload-path", str(swap)],
                                    timeout=60))
    assert first.exit_reason == "exit-interval"
    saved = _digest(ckpt)
    assert saved
    resume = flags + ["--load", str(ckpt), "--nvme-offload-path", str(swap)]
    if full == "file-size-limit":
        proc = _pretrain(resume, lambda: _limit_file_size(SMALL_FSIZE))
    else:
        with _tmpfs(swap, "size=256k"):
            proc = _pretrain(resume)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --nvme-offload-path: reserving space for "), lines
    assert str(swap) in lines[0], lines
    assert ("No space left on device; free space" if full == "tmpfs-256k" else "File too large; raise the "
            "file-size limit (ulimit -f)") in lines[0], lines
    assert _digest(ckpt) == saved  # the previous checkpoint is byte-for-byte untouched
    resumed = _logged(run_distributed(_train, 1, resume, timeout=60))
    assert resumed.loaded_iteration == 2 and len(resumed.losses) == 2, resumed
