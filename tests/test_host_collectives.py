"""Reductions of host tensors (loss sums, token counts, step counts, checkpoint gathers, flags) go through
the compute device (``collectives.all_reduce_host``, ``broadcast_host``, ``any_rank``): an NCCL group only
reduces device tensors, so a CPU tensor there fails with "No backend type associated with device type cpu".
On these CPU machines the device is the CPU; what is checked is the piecewise reduction (any piece size,
the same sums as one all-reduce) and the flags' agreement. That NCCL accepts them is not testable here."""
import torch
from harness import run_distributed

from megatron_core import collectives


def _reductions() -> dict:
    import torch.distributed as dist
    rank = dist.get_rank()
    out = {}
    for piece_bytes in (4, 12, 40, 1 << 20):  # one element, 3 elements, exactly the tensor, more than it
        x = torch.arange(10, dtype=torch.float32) * (rank + 1)
        collectives.all_reduce_host(x, piece_bytes=piece_bytes)
        out[piece_bytes] = x
    m = torch.tensor([float(rank), 5.0 - rank], dtype=torch.float64)
    collectives.all_reduce_host(m, op=dist.ReduceOp.MAX)
    out["max"] = m
    b = torch.tensor([7 if rank == 1 else 0], dtype=torch.int64)
    collectives.broadcast_host(b, src=1)
    out["broadcast"] = b
    out["any"] = collectives.any_rank([rank == 1, False, True])
    return out


def test_host_reductions_equal_one_all_reduce_for_any_piece_size():
    for out in run_distributed(_reductions, 2, timeout=60):
        for piece_bytes in (4, 12, 40, 1 << 20):
            assert torch.equal(out[piece_bytes], torch.arange(10, dtype=torch.float32) * 3), piece_bytes
        assert out["max"].tolist() == [1.0, 5.0]
        assert out["broadcast"].tolist() == [7]
        assert out["any"] == [True, False, True]


def test_any_rank_without_a_group_is_the_flags():
    assert collectives.any_rank([True, False]) == [True, False]
