"""Optimizer checkpoints (ZeRO 0-3): resuming from a saved step reproduces the uninterrupted run bit for bit.

The distributed optimizer (ZeRO-1/2) writes its shard to ``distrib_optim_dp{rank:03d}.pt`` beside
``model_optim_rng.pt`` (which holds the model and the optimizer's shared part); the replicated
optimizer writes everything into ``model_optim_rng.pt``. Files are read back with
``torch.load(weights_only=True)``, as the checkpoint contract requires. A shard refuses to load on
another DP rank, and ``reload_model_params()`` makes the fp32 main copies follow weights loaded
without optimizer state.
"""
import dataclasses
import os

import pytest
import torch
from ddp_common import build, train_step
from harness import run_distributed
from toy_model import ToyConfig

CONFIG = ToyConfig(num_layers=2)
LAYOUT = {"tp": 2}
SAVE_AT, STEPS, MICROBATCHES = 3, 5, 2


def _params(chunks, wrapped):
    for w in wrapped:
        w.gather_all_params()  # ZeRO-3: the full parameters (a no-op below stage 3)
    params = [p.detach().clone() for c in chunks for p in c.parameters()]
    for w in wrapped:
        w.release_params()
    return params


def _paths(directory, parallel_state):
    folder = os.path.join(directory, f"mp_rank_{parallel_state.tp_rank:02d}")
    os.makedirs(folder, exist_ok=True)
    optimizer_file = f"distrib_optim_dp{parallel_state.dp_rank:03d}.pt"
    return os.path.join(folder, "model_optim_rng.pt"), os.path.join(folder, optimizer_file)


def _resume(directory, ddp, dtype_name):
    dtype = getattr(torch, dtype_name)
    # Uninterrupted run.
    ps, chunks, wrapped, optimizer = build(LAYOUT, CONFIG, ddp, None, dtype)
    losses = [train_step(ps, CONFIG, wrapped, optimizer, s, MICROBATCHES)[0] for s in range(STEPS)]
    straight = _params(chunks, wrapped)
    ps.destroy()
    # Save after SAVE_AT steps ...
    ps, chunks, wrapped, optimizer = build(LAYOUT, CONFIG, ddp, None, dtype)
    for s in range(SAVE_AT):
        train_step(ps, CONFIG, wrapped, optimizer, s, MICROBATCHES)
    common, sharded = _paths(directory, ps)
    torch.save({"model": wrapped[0].state_dict(), "optimizer": optimizer.state_dict()}, common)
    if hasattr(optimizer, "sharded_state_dict"):
        torch.save(optimizer.sharded_state_dict(), sharded)
    ps.destroy()
    # ... and resume in a fresh model built from another seed, so everything must come from the files.
    other = dataclasses.replace(CONFIG, init_seed=CONFIG.init_seed + 1)
    ps, chunks, wrapped, optimizer = build(LAYOUT, other, ddp, None, dtype)
    state = torch.load(common, weights_only=True)
    wrapped[0].load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    wrong_rank_error = None
    if hasattr(optimizer, "sharded_state_dict"):
        other_rank = os.path.join(os.path.dirname(sharded), f"distrib_optim_dp{1 - ps.dp_rank:03d}.pt")
        torch.distributed.barrier()  # the other DP rank's file is complete
        try:
            optimizer.load_sharded_state_dict(torch.load(other_rank, weights_only=True))
        except ValueError as exc:
            wrong_rank_error = str(exc)
        optimizer.load_sharded_state_dict(torch.load(sharded, weights_only=True))
    resumed_losses = [train_step(ps, CONFIG, wrapped, optimizer, s, MICROBATCHES)[0] for s in range(SAVE_AT, STEPS)]
    resumed = _params(chunks, wrapped)
    ps.destroy()
    # Model weights without optimizer state (--finetune, --no-load-optim): the main copies must follow them.
    ps, chunks, wrapped, optimizer = build(LAYOUT, other, ddp, None, dtype)
    wrapped[0].load_state_dict(state["model"])
    stale = _mains_match_model(optimizer)
    optimizer.reload_model_params()
    reloaded = _mains_match_model(optimizer)
    ps.destroy()
    return straight, resumed, losses[SAVE_AT:], resumed_losses, wrong_rank_error, (stale, reloaded)


def _mains_match_model(optimizer) -> bool:
    """Whether the fp32 main parameters (or this rank's main shard) equal the model's weights."""
    if hasattr(optimizer, "sharded"):
        return all(torch.equal(sb.main[b.local_offset:b.local_offset + b.shard_size], sb.buffer.shard_param(b).float())
                   for sb in optimizer.sharded for b in sb.buffer.buckets)
    return all(torch.equal(main, model.float()) for main, model in optimizer.pairs)


@pytest.mark.parametrize("ddp,dtype", [({"zero_stage": 1, "bucket_size": 1000}, "float32"),
                                       ({"zero_stage": 2, "overlap_grad_reduce": True}, "float32"),
                                       ({"zero_stage": 0}, "bfloat16"),
                                       ({"zero_stage": 3, "bucket_size": 700, "overlap_grad_reduce": True}, "float32"),
                                       ({"zero_stage": 3, "bucket_size": 700, "offload_param": True}, "bfloat16"),
                                       ({"zero_stage": 1, "bucket_size": 700, "overlap_param_gather": True},
                                        "float32")],
                         ids=["zero1", "zero2", "replicated-bf16", "zero3", "zero3-param-offload-bf16",
                              "zero1-overlap-param-gather"])
def test_resume_from_checkpoint_matches_uninterrupted_run(tmp_path, ddp, dtype):
    results = run_distributed(_resume, 4, str(tmp_path), ddp, dtype, timeout=90)
    for rank, (straight, resumed, losses, resumed_losses, wrong_rank_error, reload) in enumerate(results):
        # fp32 shards are their own main copy (Megatron-LM's views), so they cannot go stale; a 16-bit model's
        # separate fp32 copy must be made to follow the loaded weights.
        expected = (dtype == "float32", True)
        assert reload == expected, f"rank {rank}: reload_model_params must copy the loaded weights (stale, after)"
        assert losses == resumed_losses, f"rank {rank}: losses after resuming differ"
        for i, (a, b) in enumerate(zip(straight, resumed, strict=True)):
            assert torch.equal(a, b), f"rank {rank}: parameter {i} differs after resuming"
        if ddp["zero_stage"] > 0:
            assert wrong_rank_error is not None and "data-parallel size" in wrong_rank_error
