"""The multi-rank harness itself: results, exceptions with their rank, hangs that time out."""
import os
import time

import pytest
import torch
import torch.distributed as dist
from harness import RankError, RanksTimedOut, run_distributed


def _all_reduce_rank():
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    return dist.get_rank(), t.item()


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_results_come_back_in_rank_order(world):
    results = run_distributed(_all_reduce_rank, world, timeout=60)
    expected = world * (world + 1) / 2
    assert results == [(r, expected) for r in range(world)]


def _raise_on_rank_one():
    if dist.get_rank() == 1:
        raise ValueError("boom on purpose")
    dist.barrier()


def test_exception_names_its_rank():
    with pytest.raises(RankError, match=r"(?s)rank 1 of 2 raised.*boom on purpose"):
        run_distributed(_raise_on_rank_one, 2, timeout=60)


def _hang_on_rank_zero(pid_file):
    if dist.get_rank() == 0:
        with open(pid_file, "w") as f:
            f.write(str(os.getpid()))
        time.sleep(600)


def test_hang_times_out_names_ranks_and_kills_them(tmp_path):
    pid_file = str(tmp_path / "pid")
    with pytest.raises(RanksTimedOut, match=r"ranks \[0\] of 2 did not finish"):
        run_distributed(_hang_on_rank_zero, 2, pid_file, timeout=3)
    pid = int(open(pid_file).read())
    with pytest.raises(ProcessLookupError):  # killed and reaped, not left sleeping
        os.kill(pid, 0)
