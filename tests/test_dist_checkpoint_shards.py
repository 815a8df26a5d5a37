"""torch_dist checkpoints under ZeRO: each DP rank writes and reads its own shard, nothing is gathered.

A rank's piece of a parameter is a flat element range; it is written as rectangular chunks of the
same global tensors as before (``sharded.flat_boxes`` / ``piece_slices``), so a checkpoint reshards
to any TP x DP x ZeRO layout and one written before this change (``fixtures/dist_ckpt_pre_shard``)
still loads. Checked here: the chunk decomposition; every parameter and optimizer-state tensor equal
after a save and a load under other layouts (exactly, fp32); no floating-point collective bigger
than a few bytes during either (the gathered save all-reduced 12 bytes per parameter over DP); the
old checkpoint's values; resident-memory growth of a save and a load (VmHWM) about this rank's shard.
"""
import contextlib
import functools
import math
import os
import threading

import pytest
import torch
import torch.distributed.checkpoint as dcp
from ddp_common import build, train_step
from dist_state import assert_same, local_state, merged
from harness import run_distributed
from test_ddp_gpt import GPTSpec
from test_memory import in_a_fresh_process

from megatron_core.dist_checkpointing import load_dist_checkpoint, save_dist_checkpoint, serialization
from megatron_core.dist_checkpointing.sharded import flat_boxes, param_slices, piece_slices
from megatron_core.models.presets import gpt2_config

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "dist_ckpt_pre_shard")
GLOBAL_MICROBATCHES = 4
_PERSISTENT = 1100  # stage3_param_persistence_threshold: ZeRO-3 buckets this small (2 of 10) stay gathered
_COLLECTIVES = ("all_reduce", "all_reduce_host", "broadcast", "all_gather", "all_gather_into_tensor",
                "all_gather_single", "all_gather_flat", "_ALL_GATHER", "reduce_scatter_tensor", "reduce_scatter_single",
                "reduce_scatter", "reduce_scatter_flat", "_REDUCE_SCATTER", "gather", "scatter", "reduce")


@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4), (4, 1, 3, 2), ()])
def test_flat_boxes_are_contiguous_and_cover_the_range_once(shape):
    n = math.prod(shape)
    index = torch.arange(n).reshape(shape)
    for lo in range(n):
        for hi in range(lo + 1, n + 1):
            boxes = flat_boxes(shape, lo, hi)
            assert len(boxes) <= max(1, 2 * len(shape) - 1)
            seen = []
            for offsets, sizes, first in boxes:
                elements = index[tuple(slice(o, o + z) for o, z in zip(offsets, sizes, strict=True))]
                assert torch.equal(elements.reshape(-1), torch.arange(first, first + elements.numel()))
                seen += elements.reshape(-1).tolist()
            assert sorted(seen) == list(range(lo, hi)), (shape, lo, hi)


def test_piece_slices_cut_gated_fc1_parts_like_param_slices():
    """Every flat range of a TP slice of a partition_stride 2 weight: its chunks are views of the range's
    elements at the right places of ``param_slices``'s ``#part{i}`` tensors; the whole range gives
    exactly ``param_slices``'s one chunk per part."""
    param = torch.nn.Parameter(torch.zeros(6, 4))
    param.tensor_model_parallel, param.partition_dim, param.partition_stride = True, 0, 2
    local = torch.arange(24, dtype=torch.float32).reshape(6, 4)
    for tp_rank in range(2):
        reference = {s.name: s for s in param_slices("w", local, param, tp_rank, 2)}
        for lo in range(24):
            for hi in range(lo + 1, 25):
                count = 0
                for name, global_shape, chunks in piece_slices("w", local.reshape(-1)[lo:hi], lo, param, tp_rank, 2):
                    spec = reference[name]
                    assert global_shape == spec.global_shape
                    for offsets, view in chunks:
                        where = tuple(slice(o - b, o - b + z) for o, b, z in zip(offsets, spec.offsets, view.shape,
                                                                                 strict=True))
                        assert torch.equal(spec.local[where], view), (name, lo, hi)
                        count += view.numel()
                assert count == hi - lo
        whole = piece_slices("w", local.reshape(-1), 0, param, tp_rank, 2)
        assert [(n, g, [(o, v.shape) for o, v in c]) for n, g, c in whole] == \
            [(n, s.global_shape, [(s.offsets, s.local.shape)]) for n, s in reference.items()]


@contextlib.contextmanager
def _float_collectives():
    """Bytes of the largest floating-point tensor handed to each collective inside the block, wherever the
    project binds it (torch.distributed, megatron_core's comm wrappers and shared-memory all-reduce; the
    outermost call of nested wrappers). DCP's object collectives move pickled bytes (uint8): not counted."""
    import torch.distributed.distributed_c10d as c10d

    from megatron_core import collectives, comm, shm_collectives
    from megatron_core.distributed import comm_log

    sizes: list[int] = []
    depth = [0]

    def counting(original):
        @functools.wraps(original)
        def call(*args, **kwargs):
            values = [*args, *kwargs.values()]
            found = [t for a in values for t in (a if isinstance(a, list | tuple) else [a])
                     if torch.is_tensor(t) and t.is_floating_point()]
            if found and depth[0] == 0:
                sizes.append(max(t.numel() * t.element_size() for t in found))
            depth[0] += 1
            try:
                return original(*args, **kwargs)
            finally:
                depth[0] -= 1
        return call

    patched = [(module, name, getattr(module, name))
               for module in (torch.distributed, c10d, comm, collectives, comm_log, shm_collectives)
               for name in _COLLECTIVES if callable(getattr(module, name, None))]
    for module, name, original in patched:
        setattr(module, name, counting(original))
    try:
        yield sizes
    finally:
        for module, name, original in patched:
            setattr(module, name, original)


def _perturb(params):
    for p in params.values():
        p.data.add_(0.5)


class _DelayedWrite:
    """``torch.distributed.checkpoint`` whose ``save`` starts once ``go`` is set: an asynchronous save's
    background write then surely runs after the training step that follows it."""

    def __init__(self, go: threading.Event) -> None:
        self.go = go

    def __getattr__(self, name):
        return getattr(dcp, name)

    def save(self, *args, **kwargs):
        self.go.wait()
        return dcp.save(*args, **kwargs)


def _save_run(layout, ddp, directory, async_save):
    spec = GPTSpec("llama")  # gated fc1: partition_stride 2
    ps, chunks, wrapped, optimizer = build(layout, spec, ddp)
    for step in range(2):
        assert train_step(ps, spec, wrapped, optimizer, step, GLOBAL_MICROBATCHES // ps.dp_size)[1][0]
    state = local_state(ps, spec, chunks, wrapped, optimizer)
    go = threading.Event()
    if not async_save:
        go.set()
    serialization.dcp = _DelayedWrite(go)
    try:
        with _float_collectives() as sizes:
            request = save_dist_checkpoint(directory, 2, wrapped, optimizer, None, ps, async_save=async_save)
        if async_save:  # training goes on before the copies are written: the checkpoint must hold step 2's state
            assert train_step(ps, spec, wrapped, optimizer, 2, GLOBAL_MICROBATCHES // ps.dp_size)[1][0]
            go.set()
        request.wait()
    finally:
        serialization.dcp = dcp
    ps.destroy()
    return {**state, "collective_bytes": sizes}


def _load_run(layout, ddp, directory):
    spec = GPTSpec("llama")
    ps, chunks, wrapped, optimizer = build(layout, spec, ddp, prepare=_perturb)
    with _float_collectives() as sizes:
        load_dist_checkpoint(directory, wrapped, optimizer, None, ps)
    # ZeRO-3's buckets that stay gathered (persistent) hold the loaded values, not the ones before the load
    stale = [b.index for w in wrapped for buffer in w.buffers_by_dtype if buffer.param_shard is not None
             for b in buffer.buckets if b.gathered and not torch.equal(
                 b.param_data[b.shard_start - b.start:][:b.shard_size], buffer.shard_param(b))]
    state = local_state(ps, spec, chunks, wrapped, optimizer)
    # and it trains on: a step after the load (the ZeRO-3 shards, main copies and state are consistent)
    assert train_step(ps, spec, wrapped, optimizer, 2, GLOBAL_MICROBATCHES // ps.dp_size)[1][0]
    ps.destroy()
    return {**state, "collective_bytes": sizes, "stale_buckets": stale}


# (save layout, world, DDP config, async) -> loads under (layout, world, DDP config); small buckets split
# parameters mid-row between DP ranks.
CASES = {
    "tp2dp2-zero1-to-dp2-zero3": (({"tp": 2}, 4, {"zero_stage": 1, "bucket_size": 700}, False),
                                  [({}, 2, {"zero_stage": 3, "bucket_size": 900,
                                             "stage3_param_persistence_threshold": _PERSISTENT}), ({}, 1, {})]),
    "dp2-zero3-async-to-tp2dp2-zero1": (({}, 2, {"zero_stage": 3, "bucket_size": 700}, True),
                                        [({"tp": 2}, 4, {"zero_stage": 1}),
                                         ({}, 4, {"zero_stage": 2, "bucket_size": 500})]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sharded_save_and_load_reshard_exactly_without_gathering(case, tmp_path):
    (layout, world, ddp, async_save), loads = CASES[case]
    saved = run_distributed(_save_run, world, layout, ddp, str(tmp_path), async_save, timeout=120)
    reference = merged(saved)
    assert reference["step"] == {2.0}
    for r in saved:
        # the gathered save all-reduced every state tensor of the model (here 12 x 4 bytes per parameter)
        assert max(r["collective_bytes"], default=0) <= 8, f"{case}: save collectives {r['collective_bytes']}"
    for load_layout, load_world, load_ddp in loads:
        loaded = run_distributed(_load_run, load_world, load_layout, load_ddp, str(tmp_path), timeout=120)
        assert_same(reference, merged(loaded), f"{case} loaded under {load_layout} {load_ddp}")
        for r in loaded:
            assert not r["stale_buckets"], f"{case}: persistent buckets {r['stale_buckets']} not refreshed"
            # the only floating-point collective: re-gathering ZeRO-3's persistent buckets (<= _PERSISTENT elements)
            bound = 4 * load_ddp.get("stage3_param_persistence_threshold", 2)
            assert max(r["collective_bytes"], default=0) <= bound, f"{case}: load collectives {r['collective_bytes']}"


def test_a_checkpoint_written_before_sharded_saves_still_loads(tmp_path):
    """``fixtures/dist_ckpt_pre_shard``: written by commit 65d0e05 (TP 2 x DP 2, ZeRO-1, gathered optimizer
    state: one chunk per TP slice) with the values it held (``expected.pt``, by the same helper)."""
    expected = torch.load(os.path.join(FIXTURE, "expected.pt"), weights_only=True)
    expected["step"] = set(expected["step"])
    for layout, world, ddp in (({}, 2, {"zero_stage": 3, "bucket_size": 700}), ({"tp": 2}, 2, {"zero_stage": 0})):
        loaded = run_distributed(_load_run, world, layout, ddp, os.path.join(FIXTURE, "checkpoint"), timeout=120)
        assert_same(expected, merged(loaded), f"pre-shard checkpoint loaded under {layout} {ddp}")


# ---- memory: a save and a load grow by (at most) this rank's shard, not the whole model's state ----
_OVERHEAD_MIB = 12  # gloo's and DCP's own buffers, a tensor item read in flight (the largest is 4 MiB here)


class _Wide(GPTSpec):
    """GPT-2, 4 layers of hidden 512: 12.7 M parameters, 48 MiB in fp32; Adam's state 3 times that."""

    def config(self):
        return gpt2_config(num_layers=4, hidden_size=512, num_attention_heads=8, hidden_dropout=0.0,
                           attention_dropout=0.0)


def _checkpoint_peaks(zero_stage, directory):
    import ctypes
    import ctypes.util

    from test_memory import _reset_peak, _rss_mib

    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    assert libc.mallopt(-3, 1 << 20) == 1 and libc.mallopt(-4, 1 << 16) == 1  # as test_memory: RSS follows tensors
    spec = _Wide("gpt2")
    ps, chunks, wrapped, optimizer = build({}, spec, {"zero_stage": zero_stage, "bucket_size": 1 << 21})
    assert train_step(ps, spec, wrapped, optimizer, 0, 1)[1][0]
    psi = sum(p.numel() for p in chunks[0].parameters())
    mine = sum(piece.numel for sb in optimizer.sharded for piece in sb.pieces)
    before = _reset_peak()
    save_dist_checkpoint(directory, 1, wrapped, optimizer, None, ps).wait()
    save_peak = _rss_mib("VmHWM") - before
    before = _reset_peak()
    load_dist_checkpoint(directory, wrapped, optimizer, None, ps)  # into a run with state (in place)
    load_peak = _rss_mib("VmHWM") - before
    ps.destroy()
    del chunks, wrapped, optimizer
    ps, chunks, wrapped, optimizer = build({}, spec, {"zero_stage": zero_stage, "bucket_size": 1 << 21})
    before = _reset_peak()
    load_dist_checkpoint(directory, wrapped, optimizer, None, ps)  # a resumed job: no state yet
    fresh_load_peak = _rss_mib("VmHWM") - before
    ps.destroy()
    mib = 4 / 2 ** 20
    return {"save_peak": save_peak, "load_peak": load_peak, "fresh_load_peak": fresh_load_peak, "model": psi * mib,
            "state": 3 * psi * mib, "state_shard": 3 * mine * mib, "dp": ps.dp_size}


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="Linux's VmHWM reset")
@pytest.mark.parametrize("zero_stage", [1, 3])
def test_save_and_load_grow_by_this_ranks_shard(zero_stage, tmp_path):
    """The gathered save filled whole-model fp32 buffers of the main parameters and both Adam moments on
    every rank (12 bytes per parameter: 146 MiB growth here at DP 2) and under ZeRO-3 also gathered the
    parameters; the load filled whole per-parameter tensors. Now a save writes views of this rank's
    shard (growth: DCP's copies of them) and a load reads into fresh tensors of this rank's pieces only
    (growth: the optimizer state's shard, 12 bytes per parameter / DP, the Adam moments' part of which a
    fresh optimizer keeps as its state)."""
    for r in in_a_fresh_process("test_dist_checkpoint_shards", "_checkpoint_peaks", 2, zero_stage, str(tmp_path)):
        assert r["state_shard"] <= r["state"] / r["dp"] + 1, r
        # DCP copies each view it writes and keeps the copies until its file is written: this rank's shard of
        # the parameters, the largest of its items here (an Adam moment's piece is its own tensor, not copied).
        assert r["save_peak"] <= r["model"] / r["dp"] + _OVERHEAD_MIB, r
        assert r["load_peak"] <= r["state_shard"] + _OVERHEAD_MIB, r
        # A fresh optimizer keeps the loaded Adam moments as its state, not copies of them
        assert r["fresh_load_peak"] <= r["state_shard"] + _OVERHEAD_MIB, r


def _refusals(directory):
    from megatron_core.dist_checkpointing.sharded import shard_pieces
    from megatron_core.training.checkpointing import check_finite_model
    from megatron_core.training.dist_checkpoint import _agreed, _local_values
    from megatron_core.training.health import TrainingDivergedError

    spec = GPTSpec("llama")
    ps, chunks, wrapped, optimizer = build({}, spec, {"zero_stage": 3, "bucket_size": 700})
    named = dict(chunks[0].named_parameters())
    name = "decoder.layers.0.mlp.linear_fc1.weight"
    if ps.dp_rank == 1:  # a non-finite value in rank 1's shard only: rank 0 sees none of it
        shard_pieces(wrapped[0], zero3_only=True)[id(named[name])][1][0] = float("nan")
    try:
        _agreed(lambda: check_finite_model(_local_values(wrapped), 7))
        message = None
    except TrainingDivergedError as exc:
        message = str(exc)
    ps.destroy()
    return message


def test_zero3_non_finite_shard_is_refused_on_every_rank(tmp_path):
    """Each rank checks its own shard before a save (nothing gathered): a rank seeing no bad value must
    refuse too, or it would wait in the save's collectives for a rank that has stopped."""
    for message in run_distributed(_refusals, 2, str(tmp_path), timeout=60):
        assert message == ("not saving iteration 7: weight decoder.layers.0.mlp.linear_fc1.weight holds inf or "
                           "nan; resume from the last good checkpoint"), message
