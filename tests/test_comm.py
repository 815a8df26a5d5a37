"""``megatron_core.comm``: the names of ``deepspeed.comm`` a ported script calls, on 2 gloo ranks."""

import os

import torch
from harness import run_distributed

import megatron_core


def _collectives():
    dist = megatron_core.comm  # as ``deepspeed.comm``, reached from the package
    rank, world = dist.get_rank(), dist.get_world_size()
    summed = torch.full((2,), float(rank + 1))
    dist.all_reduce(summed)
    maxed = torch.tensor([float(rank)])
    dist.all_reduce(maxed, op=dist.ReduceOp.MAX)
    gathered = torch.empty(world * 2)
    dist.all_gather_into_tensor(gathered, torch.full((2,), float(rank)))
    shard = torch.empty(1)
    dist.reduce_scatter_tensor(shard, torch.arange(2, dtype=torch.float32) * (rank + 1))
    sent = torch.tensor([7.0 if rank == 0 else 0.0])
    dist.broadcast(sent, src=0)
    dist.barrier()
    return {
        "rank": rank, "world": world, "sum": summed.tolist(), "max": maxed.item(), "gathered": gathered.tolist(),
        "shard": shard.item(), "sent": sent.item(), "local": dist.get_local_rank(),
        "local_env": int(os.environ.get("LOCAL_RANK", "0")), "ranks": dist.get_all_ranks_from_group(),
        "global": dist.get_global_rank(dist.get_world_group(), 1), "initialized": dist.is_initialized(),
        "has": (dist.has_all_gather_into_tensor(), dist.has_reduce_scatter_tensor()),
    }


def test_deepspeed_comm_names_work_on_two_ranks():
    """``megatron_core.comm`` was an AttributeError; a script written against ``deepspeed.comm`` had to be
    rewritten for torch.distributed."""
    for rank, out in enumerate(run_distributed(_collectives, 2, timeout=60)):
        assert (out["rank"], out["world"], out["initialized"], out["has"]) == (rank, 2, True, (True, True))
        assert out["sum"] == [3.0, 3.0] and out["max"] == 1.0 and out["gathered"] == [0.0, 0.0, 1.0, 1.0]
        assert out["shard"] == 3.0 * rank and out["sent"] == 7.0  # [0, 1] * 1 + [0, 1] * 2 = [0, 3]
        assert out["local"] == out["local_env"] and out["ranks"] == [0, 1] and out["global"] == 1
