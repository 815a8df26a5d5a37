"""Data-parallel traffic per step against the ZeRO paper's 2Ψ, and how much of it hides behind backward.

Ranks are forked on this machine (the test harness's launcher) and talk gloo. The model is a stack
of column/row-parallel MLP blocks (fp32, TP = 1) with Ψ parameters, cut into buckets.

1. Traffic. Every collective of the DDP wrapper and the distributed optimizer goes through
   ``megatron_core.distributed.comm_log`` and is counted by a ``CommLog``: per step, the elements
   each op works on (in the paper's units: all-reduce 2x its size, reduce-scatter / all-gather 1x)
   divided by Ψ, and the bytes a rank sends in a ring implementation ((N-1)/N of that). Expected:
   2Ψ for plain DP (all-reduce), ZeRO-1 and ZeRO-2 (reduce-scatter Ψ + all-gather Ψ); 3Ψ for the
   ZeRO-1 variant that all-reduces gradients.
2. Overlap (plain DP). Baseline measured in the same run: backward alone, with no DP communication
   (under ``no_sync``). Then backward + ``finish_grad_sync`` with ``overlap_grad_reduce`` off (all
   buckets reduced after backward) and on (each bucket launched from the backward hooks). Hidden
   fraction = (t_off - t_on) / (t_off - t_backward). Also from the bucket timings: the share of
   each bucket's launch-to-completion time that passed before the wrapper started waiting for it
   (an upper bound: a bucket may have finished before the wait began).
3. Memory: ``memory_footprint`` of rank 0 after a step for each stage, and the peak RSS.

   Measured twice: with the real CPU backward, where on 2 shared cores gloo's communication
   threads compete with backward for the CPU (so overlap can even lose), and with emulated device
   time (each block's backward also sleeps ``--device-ms``, leaving the CPU free as a GPU would),
   which shows what the launch-from-hooks mechanism hides when compute does not need the CPU.

Run: ``python bench/bench_dp_comm.py [--dp 2] [--hidden 256] [--layers 8]`` (well under a minute).
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
os.environ.setdefault("MCORE_FORCE_CPU", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from harness import run_distributed  # noqa: E402

from megatron_core import parallel_state  # noqa: E402
from megatron_core.distributed import CommLog, DistributedDataParallel, DistributedDataParallelConfig  # noqa: E402
from megatron_core.optimizer import OptimizerConfig, get_megatron_optimizer, memory_footprint  # noqa: E402
from megatron_core.tensor_parallel import ColumnParallelLinear, RowParallelLinear  # noqa: E402

STAGES = {"DP (ZeRO-0)": {"zero_stage": 0}, "ZeRO-1": {"zero_stage": 1},
          "ZeRO-1, all-reduce grads": {"zero_stage": 1, "zero1_all_reduce_grads": True}, "ZeRO-2": {"zero_stage": 2}}
EXPECTED = {"DP (ZeRO-0)": 2.0, "ZeRO-1": 2.0, "ZeRO-1, all-reduce grads": 3.0, "ZeRO-2": 2.0}
TOKENS, TIMED_STEPS = 256, 10


class _DeviceTime(torch.autograd.Function):
    """Identity whose backward sleeps, like waiting on an accelerator kernel (leaves the CPU free)."""

    @staticmethod
    def forward(ctx, x, seconds):
        ctx.seconds = seconds
        return x

    @staticmethod
    def backward(ctx, grad):
        time.sleep(ctx.seconds)
        return grad, None


class MLPStack(torch.nn.Module):
    """Residual column/row-parallel MLP blocks; ``backward_sleep_s`` adds emulated device time per block."""

    def __init__(self, hidden: int, layers: int, parallel_state, backward_sleep_s: float = 0.0) -> None:
        super().__init__()
        self.backward_sleep_s = backward_sleep_s
        torch.manual_seed(0)
        self.blocks = torch.nn.ModuleList(
            torch.nn.ModuleList([ColumnParallelLinear(hidden, 4 * hidden, parallel_state=parallel_state),
                                 RowParallelLinear(4 * hidden, hidden, parallel_state=parallel_state)])
            for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for fc1, fc2 in self.blocks:
            if self.backward_sleep_s > 0:
                x = _DeviceTime.apply(x, self.backward_sleep_s)
            h, _ = fc1(x)
            y, _ = fc2(F.gelu(h))
            x = x + y
        return x


def _setup(args, ddp_options: dict, log: CommLog, backward_sleep_s: float = 0.0):
    ps = parallel_state.ParallelState(1, 1)
    model = MLPStack(args.hidden, args.layers, ps, backward_sleep_s)
    config = DistributedDataParallelConfig(bucket_size=args.bucket_size, **ddp_options)
    ddp = DistributedDataParallel(config, model, ps, comm_log=log)
    optimizer = get_megatron_optimizer(OptimizerConfig(), [ddp], ps)
    return ps, ddp, optimizer


def _backward(ddp, x) -> None:
    ddp(x).pow(2).mean().backward()


def _traffic(args) -> dict:
    """Elements moved per step by each stage, and rank 0's memory after the step."""
    out = {}
    x = torch.randn(TOKENS, args.hidden, generator=torch.Generator().manual_seed(1))
    for name, options in STAGES.items():
        log = CommLog()
        ps, ddp, optimizer = _setup(args, {**options, "overlap_grad_reduce": True}, log)
        psi = sum(p.numel() for p in ddp.parameters())
        optimizer.zero_grad()
        _backward(ddp, x)
        optimizer.step()  # warm-up step: allocates the optimizer state
        optimizer.zero_grad()
        log.reset()
        _backward(ddp, x)
        ddp.finish_grad_sync()
        optimizer.step()
        by_op: dict[str, list[float]] = {}
        for r in log.records:
            entry = by_op.setdefault(r.op, [0.0, 0.0])
            entry[0] += {"all_reduce": 2.0}.get(r.op, 1.0) * r.numel / psi
            entry[1] += r.ring_bytes_sent
        out[name] = {"psi": psi, "by_op": by_op, "volume": log.paper_volume() / psi,
                     "buckets": len(ddp.buffers_by_dtype[0].buckets), "memory": memory_footprint([ddp], optimizer)}
        ps.destroy()
    return out


def _overlap(args, backward_sleep_s: float) -> dict:
    """Backward alone vs backward + gradient sync with overlap off / on (plain DP)."""
    x = torch.randn(TOKENS, args.hidden, generator=torch.Generator().manual_seed(2))
    times: dict[str, list[float]] = {}
    hidden_share = []
    for overlap in (False, True):
        log = CommLog()
        ps, ddp, _ = _setup(args, {"zero_stage": 0, "overlap_grad_reduce": overlap}, log, backward_sleep_s)
        for step in range(TIMED_STEPS + 1):
            for label, sync in (("backward only", False), (f"overlap {'on' if overlap else 'off'}", True)):
                ddp.zero_grad_buffer()
                log.reset()
                torch.distributed.barrier()
                start = time.perf_counter()
                if sync:
                    _backward(ddp, x)
                    ddp.finish_grad_sync()
                else:
                    with ddp.no_sync():
                        _backward(ddp, x)
                elapsed = time.perf_counter() - start
                if step > 0:  # the first step warms up allocations and gloo pairs
                    times.setdefault(label, []).append(elapsed)
                if step > 0 and sync and overlap:
                    total = sum(t.wait_ended - t.launched for t in log.bucket_timings)
                    before_wait = sum(max(0.0, t.wait_started - t.launched) for t in log.bucket_timings)
                    hidden_share.append(before_wait / total if total > 0 else 0.0)
        ps.destroy()
    return {"times": {k: min(v) for k, v in times.items()},  # min: least disturbed by other processes
            "bucket_hidden_share": statistics.median(hidden_share)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dp", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--bucket-size", type=int, default=1_000_000, help="elements per bucket")
    parser.add_argument("--device-ms", type=float, default=10.0,
                        help="emulated device time per block in the second overlap run (sleep, CPU left free)")
    args = parser.parse_args()

    traffic = run_distributed(_traffic, args.dp, args, timeout=300)[0]
    psi = next(iter(traffic.values()))["psi"]
    print(f"DP = {args.dp}, Ψ = {psi:,} parameters (fp32), bucket_size = {args.bucket_size:,} elements")
    print(f"\n{'stage':<26}{'buckets':>8}{'volume/Ψ':>10}{'paper':>7}   per op: volume/Ψ, ring bytes sent per rank")
    for name, t in traffic.items():
        ops = ", ".join(f"{op} {v:.3f} ({b / 2**20:.1f} MiB)" for op, (v, b) in sorted(t["by_op"].items()))
        print(f"{name:<26}{t['buckets']:>8}{t['volume']:>10.3f}{EXPECTED[name]:>6.0f}Ψ   {ops}")

    header = "".join(f"{c:>10}" for c in ("params", "grads", "main", "optim", "total"))
    print(f"\n{'stage':<26}{header}   MiB on rank 0 after a step")
    for name, t in traffic.items():
        m = t["memory"]
        cells = [m.params, m.grads, m.main_params, m.optimizer_state, m.total]
        print(f"{name:<26}" + "".join(f"{c / 2**20:>10.2f}" for c in cells))

    runs = (("real CPU compute", 0.0), (f"+ {args.device_ms:g} ms emulated device time per block", args.device_ms))
    for label, sleep_ms in runs:
        overlap = run_distributed(_overlap, args.dp, args, sleep_ms / 1e3, timeout=300)[0]
        t = overlap["times"]
        backward, off, on = t["backward only"], t["overlap off"], t["overlap on"]
        comm = off - backward
        hidden = (off - on) / comm if comm > 0 else float("nan")
        print(f"\noverlap, plain DP, {label} (min of {TIMED_STEPS} steps):")
        print(f"  backward alone (baseline) {backward * 1e3:8.1f} ms")
        print(f"  + grad sync, overlap off  {off * 1e3:8.1f} ms  ({off / backward:.2f}x baseline; exposed comm "
              f"{comm * 1e3:.1f} ms)")
        print(f"  + grad sync, overlap on   {on * 1e3:8.1f} ms  ({on / backward:.2f}x baseline)")
        print(f"  hidden fraction of the gradient communication: {hidden:.0%} from the step times, "
              f"{overlap['bucket_hidden_share']:.0%} of bucket launch-to-done time before the wait (upper bound)")
    print(f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB")


if __name__ == "__main__":
    main()
