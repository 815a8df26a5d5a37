"""Damaged torch_dist checkpoints (the default format) from pretrain_gpt.py: one ``error:`` line naming the
file and the earlier iterations to load instead (``--ckpt-step N``), exit code 2, no traceback; the same
checks #14 built for the legacy layout (tests/test_failures_checkpoint.py). Also: a save the launcher
died during is refused, a failed write leaves no partial directory."""
import contextlib
import io as text_io
import os
import shutil

import pytest
import torch
from harness import run_distributed
from test_failures_training import TINY, _run

import pretrain_gpt
from megatron_core.training import checkpoint_io as io
from megatron_core.training import initialize

ZERO = ["--use-distributed-optimizer", "--global-batch-size", "4"]  # 2 DP ranks, one microbatch each


def _cli(argv):
    err = text_io.StringIO()
    with contextlib.redirect_stderr(err):
        code = pretrain_gpt.cli(argv)
    torch.distributed.barrier()
    return code, err.getvalue()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A torch_dist ZeRO-1 checkpoint of 2 DP ranks at iterations 1 and 2 (copied per test before damage)."""
    ckpt = str(tmp_path_factory.mktemp("saved") / "ckpt")
    results = run_distributed(_run, 2, TINY + ZERO + ["--save", ckpt, "--save-interval", "1"], timeout=120)
    assert not any(isinstance(r, str) for r in results), results
    names = sorted(os.listdir(io.iteration_dir(ckpt, 2)))
    assert names == [".metadata", "__0_0.distcp", "__1_0.distcp", "common.pt", io.MANIFEST_FILENAME], names
    return ckpt


def _damage(saved, tmp_path, what):
    ckpt = str(tmp_path / "ckpt")
    shutil.copytree(saved, ckpt)
    directory = io.iteration_dir(ckpt, 2)
    victims = {"truncated shard": "__1_0.distcp", "deleted metadata": ".metadata", "garbage common": "common.pt",
               "garbage metadata": ".metadata", "deleted common": "common.pt",
               "truncated shard, no manifest": "__0_0.distcp"}
    path = os.path.join(directory, victims[what])
    if what.startswith("deleted"):
        os.remove(path)
    elif what.startswith("truncated"):
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    else:
        size = os.path.getsize(path)
        with open(path, "wb") as f:  # same size: only the content tells
            f.write(bytes(range(256)) * (size // 256) + bytes(size % 256))
    if what.endswith("no manifest"):  # a checkpoint whose manifest is gone: the readers' own errors
        os.remove(os.path.join(directory, io.MANIFEST_FILENAME))
    return ckpt, path


@pytest.mark.parametrize("what,needle", [
    ("truncated shard", "bytes, the save wrote"), ("deleted metadata", "was deleted"),
    ("garbage common", "is truncated or damaged"), ("garbage metadata", "is truncated or damaged"),
    ("deleted common", "was deleted"), ("truncated shard, no manifest", "holds an unreadable tensor file"),
])
def test_a_damaged_file_is_one_error_line_naming_it_and_the_earlier_iteration(saved, tmp_path, what, needle):
    ckpt, path = _damage(saved, tmp_path, what)
    results = run_distributed(_cli, 2, TINY + ZERO + ["--load", ckpt], timeout=120)
    assert [code for code, _ in results] == [2, 2], results
    text = results[0][1]
    named = path if not what.endswith("no manifest") else io.iteration_dir(ckpt, 2)
    assert text.startswith(f"error: checkpoint file {named} ") and text.count("\n") == 1, text
    assert needle in text and "(iteration 2 is damaged); load the previous checkpoint with --ckpt-step 1 " \
        "(iterations saved before it: 1)" in text, text
    assert "Traceback" not in text and not results[1][1]  # said once, by rank 0
    if what != "truncated shard":
        return
    # The fix it names works: the earlier iteration loads.
    results = run_distributed(_run, 2, TINY + ZERO + ["--load", ckpt, "--ckpt-step", "1"], timeout=120)
    assert any(getattr(r, "loaded_iteration", None) == 1 for r in results), results


def _save_after_the_launcher_died(argv):
    initialize._LAUNCHER_PID = -1  # os.getppid() never is: as if the torchrun agent had been killed
    return _run(argv)


@pytest.mark.parametrize("fmt", ["torch_dist", "torch"])
def test_no_checkpoint_is_published_once_the_launcher_died(tmp_path, fmt):
    ckpt = str(tmp_path / "ckpt")
    message = run_distributed(_save_after_the_launcher_died, 1, TINY + ["--save", ckpt, "--ckpt-format", fmt],
                              timeout=60)[0]
    assert message == "ConfigError: not saving iteration 2: the launcher of this job died", message
    assert io.complete_iterations(ckpt) == [] and not os.path.exists(os.path.join(ckpt, io.TRACKER_FILENAME))
