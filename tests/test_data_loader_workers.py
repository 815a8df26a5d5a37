"""The pretraining DataLoader's worker processes: they ignore the stop signals a scheduler sends the whole
process group (their rank stops them itself), and on Linux they die with their rank
(``prctl(PR_SET_PDEATHSIG, SIGKILL)``). A worker holds copies of its rank's sockets (fork), so without that a
``kill -9`` of a rank reached its peers only when the workers noticed, at torch's next parent check: a TP 2
peer printed "a peer was lost" 5.1 s after the kill, now 0.1 s (tests/test_failures_launch.py kills a rank
with workers)."""
import ctypes
import ctypes.util
import signal
import sys
import types

import pytest
import torch

from megatron_core.training.data_loading import data_loader

_PR_GET_PDEATHSIG = 2


class _WorkerFacts(torch.utils.data.Dataset):
    """Each sample: the worker's parent-death signal and its SIGTERM / SIGINT handlers."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, idx: int) -> torch.Tensor:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        death = ctypes.c_int(-1)
        libc.prctl(_PR_GET_PDEATHSIG, ctypes.byref(death), 0, 0, 0)
        ignored = [signal.getsignal(s) == signal.SIG_IGN for s in (signal.SIGTERM, signal.SIGINT)]
        return torch.tensor([death.value, *ignored])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux's")
def test_workers_ignore_stop_signals_and_die_with_their_rank():
    one_rank = types.SimpleNamespace(dp_rank=0, dp_size=1)  # the two fields the sampler reads
    loader = data_loader(_WorkerFacts(), 0, 2, one_rank, num_workers=1)
    for batch in loader:
        assert batch.tolist() == [[int(signal.SIGKILL), 1, 1]] * 2


_ONE_CPU_LOADER = """
import os, types, torch
os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
from megatron_core.training.data_loading import data_loader
one_rank = types.SimpleNamespace(dp_rank=0, dp_size=1)
for _ in range(2):  # two loaders (a train and a valid one), two epochs each
    loader = data_loader(list(range(8)), 0, 2, one_rank, num_workers=2)
    for epoch in range(2):
        assert [b.tolist() for b in loader] == [[0, 1], [2, 3], [4, 5], [6, 7]]
"""


@pytest.mark.skipif(not hasattr(__import__("os"), "sched_setaffinity"), reason="needs an affinity mask")
def test_more_workers_than_cpus_warns_once_naming_the_flag():
    """torch's own check warned at construction and at every iterator, from two source lines: three times
    for one loader read twice (two lines each). Ours: one line, in the flag's terms, however many loaders and
    epochs."""
    import subprocess

    done = subprocess.run([sys.executable, "-c", _ONE_CPU_LOADER], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "suggested max number of worker" not in done.stderr
    assert done.stderr.count("--num-workers 2 is more than the 1 CPU(s) this rank may use") == 1, done.stderr
    # One line: a Python warning would add a second one quoting torch's source line.
    assert done.stderr.startswith("warning: --num-workers 2 ") and done.stderr.count("\n") == 1, done.stderr
