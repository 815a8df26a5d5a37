"""Data parallelism with ZeRO 0/1/2, alone and with TP / PP, against one process on the global batch.

Every layout trains the toy model for 5 AdamW steps with clipping by the global norm; each rank's
per-microbatch losses, the grad norm of every step and the final parameters must equal the serial
run's (fp32, relative 1e-5). One forked job runs all ZeRO stages of a layout in turn.
"""
import dataclasses

import pytest
import torch
from ddp_common import MICRO_BATCH, compare, serial_reference, train
from equivalence import assert_rel_close
from harness import run_distributed
from toy_model import ToyConfig, build_toy_chunks, global_parameters, loss_func, microbatches

from megatron_core import parallel_state
from megatron_core.distributed import CommLog, DistributedDataParallel, DistributedDataParallelConfig
from megatron_core.distributed.comm_log import CommRecord

STEPS, MICROBATCHES = 5, 2
STAGES = {"zero0": {"zero_stage": 0}, "zero1": {"zero_stage": 1}, "zero2": {"zero_stage": 2},
          "zero1-allreduce": {"zero_stage": 1, "zero1_all_reduce_grads": True}}

# SGD with momentum 0.9 where TP / PP change the summation order of the gradients: Adam's
# g / (sqrt(v) + eps) turns their 1e-7 reduction-order noise on near-zero gradients into parameter
# differences of 1-2e-5 element-wise after a few steps (measured, even with eps 1e-4); SGD keeps the
# comparison at 1e-5. Adam, and its sharded states under ZeRO, stay covered by the other layouts.
SGD = {"optimizer": "sgd", "sgd_momentum": 0.9, "lr": 0.05}
LAYOUTS = {
    # name: (world size, layout, model, DDP options shared by the stages, stages[, optimizer options])
    "dp2-overlap-small-buckets": (2, {}, ToyConfig(num_layers=2), {"overlap_grad_reduce": True, "bucket_size": 300},
                                  ["zero0", "zero1", "zero2", "zero1-allreduce"]),
    "dp4-no-overlap": (4, {}, ToyConfig(num_layers=2), {"overlap_grad_reduce": False, "bucket_size": 2000},
                       ["zero0", "zero1", "zero2"]),
    "dp2-tp2-sequence-parallel": (4, {"tp": 2}, ToyConfig(num_layers=2, sequence_parallel=True),
                                  {"overlap_grad_reduce": True, "bucket_size": 1000}, ["zero0", "zero1", "zero2"], SGD),
    # One bucket and a vocabulary larger than the layers: the DP shard boundary would cut the tied
    # embedding differently on the first and last stage unless it has a bucket of its own.
    "dp2-pp2-one-bucket": (4, {"pp": 2}, ToyConfig(num_layers=2, vocab_size=256),
                           {"overlap_grad_reduce": True, "bucket_size": None}, ["zero0", "zero1", "zero2"]),
    "dp2-pp2-vpp2": (4, {"pp": 2, "vpp": 2}, ToyConfig(num_layers=4), {"overlap_grad_reduce": True, "bucket_size": 500},
                     ["zero0", "zero2"], SGD),
}


def _train_stages(layout, config, ddp, stages, opt=None):
    return {s: train(layout, config, {**ddp, **STAGES[s]}, STEPS, MICROBATCHES, opt) for s in stages}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_data_parallel_training_equals_one_process(name):
    world, layout, config, ddp, stages, *opt = LAYOUTS[name]
    opt = opt[0] if opt else None
    dp = world // (layout.get("tp", 1) * layout.get("pp", 1))
    (ref,) = run_distributed(serial_reference, 1, config, STEPS, dp * MICROBATCHES, opt, timeout=60)
    results = run_distributed(_train_stages, world, layout, config, ddp, stages, opt, timeout=120)
    for stage in stages:
        compare([r[stage] for r in results], ref, MICROBATCHES, what=f"{name} {stage}")


# ---- buffer layout, hooks and overlap -----------------------------------------------------------
def _model(parallel_state, config, seed_offset=0):
    torch.manual_seed(seed_offset)
    config = dataclasses.replace(config, init_seed=config.init_seed + seed_offset)
    (model,) = build_toy_chunks(config, parallel_state)
    return model


def _backward(model, config, step=0):
    b = microbatches(config, step, 1, MICRO_BATCH)[0]
    loss, _ = loss_func(b["loss_mask"], model(b["tokens"], b["labels"]))
    loss.backward()


def _broadcast_and_layout():
    ps = parallel_state.ParallelState(1, 1)
    config = ToyConfig(num_layers=2)
    model = _model(ps, config, seed_offset=ps.dp_rank)  # different weights on every rank
    before = {n: p.detach().clone() for n, p in global_parameters([model]).items()}
    ddp = DistributedDataParallel(DistributedDataParallelConfig(zero_stage=1, bucket_size=700), model, ps)
    buffer = ddp.buffers_by_dtype[0]
    layout = {
        "buckets": [(b.start, b.end, b.shard_size, b.shard_start) for b in buffer.buckets],
        "pieces": [(n, piece.param_start, piece.param_end) for piece in buffer.local_pieces()
                   for n, p in global_parameters([model]).items() if p is piece.param],
        "order": [n for p in buffer.params for n, q in global_parameters([model]).items() if q is p],
        "numel": {n: p.numel() for n, p in global_parameters([model]).items()},
        "views": all(p.data_ptr() == buffer.param_data[buffer.param_ranges[id(p)][0]:].data_ptr()
                     and p.main_grad.data_ptr() == buffer.grad_data[buffer.param_ranges[id(p)][0]:].data_ptr()
                     for p in buffer.params),
    }
    after = {n: p.detach().clone() for n, p in global_parameters([model]).items()}
    ps.destroy()
    return before, after, layout, ps.dp_rank, ps.dp_size


def test_broadcast_from_dp_rank0_and_bucket_layout():
    results = run_distributed(_broadcast_and_layout, 4, timeout=60)
    rank0_before = results[0][0]
    names = list(rank0_before)
    assert any(not torch.equal(results[1][0][n], rank0_before[n]) for n in names), "ranks should start different"
    for _before, after, layout, dp_rank, dp_size in results:
        for n in names:
            assert torch.equal(after[n], rank0_before[n]), f"dp rank {dp_rank}: {n} not broadcast from DP rank 0"
        assert layout["views"], "parameters and main_grad must be views into the contiguous buffers"
        # Registered in reverse order: the output side of the model (first in backward) comes first.
        assert layout["order"][0] == "final_norm.bias" and layout["order"][-1] == "embedding.weight", layout["order"]
        for start, end, shard_size, shard_start in layout["buckets"]:
            assert (end - start) % dp_size == 0 and shard_size * dp_size == end - start
            assert shard_start == start + dp_rank * shard_size
        assert len(layout["buckets"]) > 2, "bucket_size=700 should give several buckets"
    # The shards of all DP ranks cover every parameter element exactly once.
    numel = results[0][2]["numel"]
    for name, n in numel.items():
        covered = torch.zeros(n, dtype=torch.int32)
        for _, _, layout, _, _ in results:
            for piece_name, s, e in layout["pieces"]:
                if piece_name == name:
                    covered[s:e] += 1
        assert torch.equal(covered, torch.ones(n, dtype=torch.int32)), f"{name}: shards must partition it"


def _overlap_and_no_sync(overlap):
    ps = parallel_state.ParallelState(1, 1)
    config = ToyConfig(num_layers=2)
    model = _model(ps, config)
    log = CommLog()
    ddp = DistributedDataParallel(DistributedDataParallelConfig(overlap_grad_reduce=overlap, bucket_size=600),
                                  model, ps, comm_log=log)
    buffer = ddp.buffers_by_dtype[0]
    log.reset()  # drop the broadcast
    with ddp.no_sync():
        _backward(ddp, config, 10 * ps.dp_rank)
    launched_in_no_sync = [b.launched for b in buffer.buckets]
    # This rank's own gradients (no bucket reduced yet). Not read after the next backward: with
    # overlap a bucket may already be summed then (the shared-memory all-reduce completes at launch).
    local = {n: p.main_grad.clone() for n, p in global_parameters([model]).items()}
    _backward(ddp, config, 10 * ps.dp_rank + 1)
    launched_after_backward = [b.launched for b in buffer.buckets]
    records_before_finish = [r.tag for r in log.records]
    ddp.finish_grad_sync()
    records = [(r.op, r.tag) for r in log.records]
    synced = {n: p.main_grad.clone() for n, p in global_parameters([model]).items()}
    try:
        _backward(ddp, config, 2)  # another backward without zero_grad_buffer and outside no_sync
        double_ready_error = None
    except RuntimeError as exc:
        double_ready_error = str(exc)
    ps.destroy()
    return {"in_no_sync": launched_in_no_sync, "after_backward": launched_after_backward,
            "before_finish": records_before_finish, "records": records, "error": double_ready_error,
            "local": local, "synced": synced, "buckets": len(buffer.buckets)}


def _serial_accumulated_grads(steps):
    ps = parallel_state.ParallelState(1, 1)
    config = ToyConfig(num_layers=2)
    model = _model(ps, config)
    for step in steps:
        _backward(model, config, step)
    grads = {n: p.grad.clone() for n, p in global_parameters([model]).items()}
    ps.destroy()
    return grads


@pytest.mark.parametrize("overlap", [True, False])
def test_overlap_launches_buckets_in_backward_and_no_sync_accumulates(overlap):
    results = run_distributed(_overlap_and_no_sync, 2, overlap, timeout=60)
    # Rank r accumulated microbatches 10r and 10r + 1; DP averages over the 2 ranks.
    (ref,) = run_distributed(_serial_accumulated_grads, 1, [0, 1, 10, 11], timeout=60)
    for rank, res in enumerate(results):
        n = res["buckets"]
        assert n >= 3, "bucket_size=600 should give several buckets"
        assert not any(res["in_no_sync"]), "no bucket may be reduced inside no_sync()"
        if overlap:
            assert all(res["after_backward"]), "with overlap every bucket is launched during backward"
            assert res["before_finish"] == [f"grad.bucket{i}" for i in range(n)], "launched in bucket order"
        else:
            assert not any(res["after_backward"]) and res["before_finish"] == []
        assert res["records"] == [("all_reduce", f"grad.bucket{i}") for i in range(n)]
        assert res["error"] is not None and "no_sync" in res["error"]
        for name, grad in res["synced"].items():
            assert_rel_close(grad, ref[name] / 2, 1e-5, f"rank {rank} synced main_grad {name}")
    assert any(not torch.allclose(results[0]["local"][n], results[1]["local"][n]) for n in ref), \
        "the two ranks should have seen different data"


def _broadcast_records():
    ps = parallel_state.ParallelState(1, 1)
    config = ToyConfig(num_layers=2)
    log = CommLog()
    ddp = DistributedDataParallel(DistributedDataParallelConfig(bucket_size=600), _model(ps, config, ps.dp_rank),
                                  ps, comm_log=log)
    numel = ddp.buffers_by_dtype[0].param_data.numel()
    ps.destroy()
    return [(r.op, r.tag, r.numel, r.group_size) for r in log.records], numel


def test_the_start_up_broadcast_is_logged_and_ring_volumes_follow_the_paper():
    """DDP's start-up broadcast of DP rank 0's parameters is one logged collective over the whole buffer (the log
    read before only the gradients' records), and ``ring_bytes_sent`` is the ring cost per rank (bench_dp_comm.py
    reads it): 2(N-1)/N x size for an all-reduce, (N-1)/N for the others."""
    for records, numel in run_distributed(_broadcast_records, 2, timeout=60):
        assert records == [("broadcast", "param.broadcast", numel, 2)]
    assert CommRecord("all_reduce", "t", 100, 4, 4).ring_bytes_sent == 600.0
    assert CommRecord("all_gather", "t", 100, 2, 8).ring_bytes_sent == 175.0
