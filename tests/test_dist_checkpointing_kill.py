"""A torch_dist save killed with SIGKILL (during a synchronous save, and during an async save while
training goes on) leaves the previous checkpoint loadable and the tracker pointing at it."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from ddp_common import build
from harness import ProcessOutput, run_distributed
from test_dist_checkpointing import OPT, FourLayers, _perturb

from megatron_core.dist_checkpointing import load_dist_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = r"""
import os, sys, time
import torch, torch.distributed as dist
sys.path.insert(0, os.path.join(sys.argv[1], "tests"))
from ddp_common import build, train_step
from test_dist_checkpointing import OPT, FourLayers
from megatron_core.dist_checkpointing import save_dist_checkpoint
from megatron_core.dist_checkpointing.serialization import PAUSE_BEFORE_PUBLISH_ENV
directory, mode = sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
spec = FourLayers("gpt2")
ps, chunks, wrapped, optimizer = build({}, spec, {}, OPT)
train_step(ps, spec, wrapped, optimizer, 0, 2)
save_dist_checkpoint(directory, 1, wrapped, optimizer, None, ps).wait()
torch.save({n: p.detach().clone() for n, p in chunks[0].named_parameters()}, os.path.join(directory, "ref.pt"))
train_step(ps, spec, wrapped, optimizer, 1, 2)
os.environ[PAUSE_BEFORE_PUBLISH_ENV] = "600"
print("saving 2", flush=True)
request = save_dist_checkpoint(directory, 2, wrapped, optimizer, None, ps, async_save=mode == "async")
train_step(ps, spec, wrapped, optimizer, 2, 2)  # async: training goes on while the save is written
print("trained on", flush=True)
request.wait()
"""


def _load(directory):
    ps, chunks, wrapped, optimizer = build({}, FourLayers("gpt2"), {}, OPT, prepare=_perturb)
    common = load_dist_checkpoint(directory, wrapped, optimizer, None, ps)
    ref = torch.load(os.path.join(directory, "ref.pt"))
    same = all(torch.equal(p, ref[n]) for n, p in chunks[0].named_parameters())
    ps.destroy()
    return common["iteration"], same


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_kill_during_save_keeps_previous_checkpoint(tmp_path, mode):
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, REPO, str(tmp_path), mode], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # A reader thread gives the wait a deadline even if the process hangs silently.
    ProcessOutput(proc).until("trained on" if mode == "async" else "saving 2", timeout=120)
    deadline = time.time() + 60
    while not os.path.isdir(tmp_path / "iter_0000002.tmp") and time.time() < deadline:
        time.sleep(0.05)
    assert os.path.isdir(tmp_path / "iter_0000002.tmp")
    time.sleep(0.5)  # let the rank write its DCP files into the temporary directory
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text() == "1"
    assert not os.path.isdir(tmp_path / "iter_0000002")
    ((iteration, same),) = run_distributed(_load, 1, str(tmp_path), timeout=60)
    assert iteration == 1 and same


def _save_refused_at_publish(directory, async_save):
    from megatron_core.dist_checkpointing import save_dist_checkpoint
    from megatron_core.errors import ConfigError

    ps, _, wrapped, optimizer = build({}, FourLayers("gpt2"), {}, OPT)
    save_dist_checkpoint(directory, 1, wrapped, optimizer, None, ps).wait()
    died = "not saving iteration 2: the launcher of this job died"  # what training's hook says then
    try:  # a synchronous save raises at once, an asynchronous one from wait()
        save_dist_checkpoint(directory, 2, wrapped, optimizer, None, ps, async_save=async_save,
                             refuse_publish=lambda: died).wait()
        return None
    except ConfigError as exc:
        return str(exc)
    finally:
        ps.destroy()


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_save_refused_at_publish_leaves_the_previous_checkpoint(tmp_path, mode):
    """Every file written, then the launcher found dead (rank 0 asks just before publishing): every rank
    raises the one message, the partial directory is removed, the tracker still names iteration 1."""
    messages = run_distributed(_save_refused_at_publish, 2, str(tmp_path), mode == "async", timeout=60)
    assert messages == ["not saving iteration 2: the launcher of this job died"] * 2, messages
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text() == "1"
    assert sorted(os.listdir(tmp_path)) == ["iter_0000001", "latest_checkpointed_iteration.txt"]
