"""``--overlap-cpu-optimizer-d2h-h2d``: overlapped host copies and the bucket-by-bucket host step.

At DP2 the toy model trains 5 AdamW steps (2 accumulated microbatches, clipping) with CPU optimizer
offload, once without and once with the flag, under ZeRO-1, ZeRO-2 and ZeRO-3, with and without
``overlap_grad_reduce``, offloading all of the shard or half of it, and with NVMe offload. With the
flag the losses, grad norms and final parameters must be bitwise those without it (the same fused
AdamW arithmetic per tensor, the same gradient values copied at another time), and both must equal
the one-process run (fp32, relative 1e-5), as ``test_zero3``'s offload test. The runs also count
the gradient copies already started when ``finish_grad_sync`` is entered (during backward with
``overlap_grad_reduce``) and when the step begins (all of them), so a flag that did nothing fails.
"""
import json

import pytest
import torch
from ddp_common import build, compare, serial_reference, train_built
from harness import run_distributed
from toy_model import ToyConfig

from megatron_core.engine import deepspeed_to_megatron
from megatron_core.errors import ConfigError
from megatron_core.optimizer import OptimizerConfig

STEPS, MICROBATCHES = 5, 2
CONFIG = ToyConfig(num_layers=2)
Z3 = {"zero_stage": 3, "overlap_grad_reduce": True, "bucket_size": 700, "stage3_prefetch_bucket_size": 1000}
VARIANTS = {
    # name: (DDP options, optimizer options); every one runs with and without the flag
    "zero1": ({"zero_stage": 1, "bucket_size": 700}, {"optimizer_cpu_offload": True}),
    "zero1-overlap-grad-reduce-half": ({"zero_stage": 1, "bucket_size": 700, "overlap_grad_reduce": True},
                                       {"optimizer_cpu_offload": True, "optimizer_offload_fraction": 0.5}),
    "zero2-overlap-grad-reduce": ({"zero_stage": 2, "bucket_size": 700, "overlap_grad_reduce": True},
                                  {"optimizer_cpu_offload": True}),
    "zero2-half": ({"zero_stage": 2, "bucket_size": 700}, {"optimizer_cpu_offload": True,
                                                            "optimizer_offload_fraction": 0.5}),
    "zero3": (Z3, {"optimizer_cpu_offload": True}),
    "zero2-nvme-overlap-grad-reduce": ({"zero_stage": 2, "bucket_size": 700, "overlap_grad_reduce": True},
                                       {"nvme_offload_path": None}),
    "zero1-nvme-half": ({"zero_stage": 1, "bucket_size": 700}, {"nvme_offload_path": None,
                                                                 "optimizer_offload_fraction": 0.5}),
}


def _train(ddp: dict, opt: dict) -> dict:
    ps, chunks, wrapped, optimizer = build({}, CONFIG, ddp, opt)
    started = {"at_finish_grad_sync": 0, "at_step": 0, "offloaded_buckets": 0}
    if optimizer.overlap is not None:
        started["offloaded_buckets"] = sum(sum(sb.offloaded) for sb in optimizer.sharded)
        for buffer in wrapped[0].buffers_by_dtype:
            finish = buffer.finish_grad_sync

            def counted(finish=finish, buffer=buffer) -> None:
                if not buffer._synced:
                    started["at_finish_grad_sync"] += len(optimizer.overlap.pending)
                finish()
            buffer.finish_grad_sync = counted

    def before_step() -> None:
        if optimizer.overlap is not None:
            started["at_step"] += len(optimizer.overlap.pending)

    result = train_built((ps, chunks, wrapped, optimizer), CONFIG, STEPS, MICROBATCHES, before_step)
    result["started"] = started
    return result


def _train_all(directory: str) -> dict:
    out = {}
    for name, (ddp, opt) in VARIANTS.items():
        if "nvme_offload_path" in opt:
            opt = {**opt, "nvme_offload_path": directory}
        out[name] = _train(ddp, opt)
        out[name + "+overlap"] = _train(ddp, {**opt, "overlap_cpu_optimizer_d2h_h2d": True})
    return out


def test_overlapped_offload_is_bitwise_plain_offload_and_equals_one_process(tmp_path):
    (ref,) = run_distributed(serial_reference, 1, CONFIG, STEPS, 2 * MICROBATCHES, timeout=60)
    results = run_distributed(_train_all, 2, str(tmp_path), timeout=240)
    for name in VARIANTS:
        for rank, r in enumerate(results):
            plain, overlapped = r[name], r[name + "+overlap"]
            assert overlapped["losses"] == plain["losses"] and overlapped["norms"] == plain["norms"], name
            for param, value in plain["params"].items():
                assert torch.equal(overlapped["params"][param], value), f"{name} rank {rank} {param}"
            started = overlapped["started"]
            # every offloaded bucket's gradient copy was started before the step, at every step
            assert started["at_step"] == STEPS * started["offloaded_buckets"] > 0, (name, started)
        compare([r[name + "+overlap"] for r in results], ref, MICROBATCHES, what=name + "+overlap")
    for name, (ddp, _) in VARIANTS.items():
        for r in results:
            started = r[name + "+overlap"]["started"]
            # queued behind their reduce-scatters during backward with overlap_grad_reduce or under
            # ZeRO-2/3 (which reduce from the gradient hooks), else by finish_grad_sync (after its entry)
            in_hooks = ddp.get("overlap_grad_reduce") or ddp["zero_stage"] >= 2
            during_backward = STEPS * started["offloaded_buckets"] if in_hooks else 0
            assert started["at_finish_grad_sync"] == during_backward, (name, started)


def test_flag_needs_cpu_offload_and_maps_from_deepspeed_overlap_comm():
    with pytest.raises(ValueError, match="--overlap-cpu-optimizer-d2h-h2d .*--optimizer-cpu-offload") as info:
        OptimizerConfig(overlap_cpu_optimizer_d2h_h2d=True)
    assert "\n" not in str(info.value)
    assert OptimizerConfig(nvme_offload_path="/tmp", overlap_cpu_optimizer_d2h_h2d=True).optimizer_cpu_offload

    def mapped(zero: dict):
        ds = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2, **zero}}
        return deepspeed_to_megatron(json.loads(json.dumps(ds)), 1).optimizer

    cpu = {"offload_optimizer": {"device": "cpu", "pin_memory": True}}
    assert mapped({**cpu, "overlap_comm": True}).overlap_cpu_optimizer_d2h_h2d
    assert not mapped({**cpu, "overlap_comm": False}).overlap_cpu_optimizer_d2h_h2d
    assert not mapped({"overlap_comm": True}).overlap_cpu_optimizer_d2h_h2d  # nothing offloaded
    with pytest.raises(ConfigError, match="overlap_cpu_optimizer_d2h_h2d"):
        deepspeed_to_megatron({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2, **cpu}}, 1,
                              flags={"overlap_cpu_optimizer_d2h_h2d": True})
