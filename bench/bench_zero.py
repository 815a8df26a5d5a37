"""ZeRO 0/1/2/3 and offload on a ~100M-parameter GPT: traffic, hidden gathers, memory, capacity, speed.

Ranks are forked on this machine (the test harness's launcher) and talk gloo; the model is GPT-2
shaped (hidden 768, 10 layers, vocabulary 32000, tied embeddings: Ψ ≈ 96M), bf16 parameters with
fp32 main parameters and Adam (K = 12), gradients reduced in bf16, buckets of 10M elements. Every
setting runs in fresh processes; for each it prints, per rank:

1. Traffic: per step, every DP collective counted by ``CommLog`` in the ZeRO paper's units
   (all-gather / reduce-scatter 1x the full tensor, all-reduce 2x), divided by Ψ. Expected 2Ψ
   for DP and ZeRO-1/2, 3Ψ for ZeRO-3 with one microbatch (gather for forward, gather again for
   backward, reduce-scatter; less the buckets still gathered when backward starts, which it
   reuses: the whole model when it fits one bucket), and 3MΨ with M microbatches (forward and
   backward of every microbatch regather, and its gradients are reduce-scattered: ZeRO-2/3 free the
   full gradients per microbatch, as DeepSpeed does), or (M + 1)Ψ with
   ``reshard_after_forward=False``, which keeps the gathered buckets for the whole step.
2. Hidden gather time (ZeRO-3): time blocked waiting on all-gathers before a module may run,
   with prefetch against without it, measured in the same run; hidden = 1 - with / without.
3. Memory: model-state bytes from ``memory_footprint`` (between steps; the gathered window is
   reported apart, its peak sampled during the step) beside the formula, and the peak resident
   set of the training steps (VmHWM after resetting it through /proc/self/clear_refs once the
   model is built, so construction is not counted), and the most gradient bytes held during
   backward (``memory_footprint``'s gradients sampled after every gradient hook: ZeRO-2/3 hold the
   shard and the buckets in use, DP and ZeRO-1 the full buffer). Large allocations are forced to mmap so that
   freed (and NVMe-swapped) storage is returned to the system and shows in the resident set.
4. Capacity: from the formulas (bytes per parameter per rank in memory: DP 16, ZeRO-1 4+12/Nd,
   ZeRO-2 2+14/Nd, ZeRO-3 16/Nd, ZeRO-3 + CPU offload 20/Nd of which 4/Nd on the accelerator,
   ZeRO-3 + NVMe 8/Nd of which 4/Nd on the accelerator, plus a window of buckets during the step)
   and a stated accelerator budget per rank, the largest Ψ each setting holds, ignoring
   activations and the gathered window, with the host memory that Ψ then needs.
5. tokens/s of each setting against plain DP in the same run (2 shared CPU cores: the ratio is
   what matters, and even it is dominated by gloo's CPU cost competing with compute).

6. ``--overlap-cpu-optimizer-d2h-h2d``: the iteration and ``optimizer.step()`` times of ZeRO-3 + CPU
   offload with the flag against without it, in the same run.

Run: ``python bench/bench_zero.py [--dp 2 4] [--steps 3]`` (several minutes on 2 cores); only the
offload pair: ``--dp 2 --settings "ZeRO-3 + CPU offload" "ZeRO-3 + CPU offload, overlapped copies"``.
"""
from __future__ import annotations

import argparse
import ctypes
import dataclasses
import functools
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
os.environ.setdefault("MCORE_FORCE_CPU", "1")

import torch  # noqa: E402
from harness import run_distributed  # noqa: E402

from megatron_core import parallel_state as ps_mod  # noqa: E402
from megatron_core.distributed import (  # noqa: E402
    CommLog,
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
    no_sync_func,
)
from megatron_core.models.gpt import build_gpt_model_chunks  # noqa: E402
from megatron_core.models.presets import gpt2_config  # noqa: E402
from megatron_core.optimizer import OptimizerConfig, get_megatron_optimizer, memory_footprint  # noqa: E402
from megatron_core.pipeline_parallel import get_forward_backward_func  # noqa: E402

BUCKET = 10_000_000
SETTINGS = {
    # name: (DDP options, optimizer options)
    "DP (ZeRO-0)": ({"zero_stage": 0}, {}),
    "ZeRO-1": ({"zero_stage": 1}, {}),
    "ZeRO-2": ({"zero_stage": 2}, {}),
    "ZeRO-3": ({"zero_stage": 3}, {}),
    "ZeRO-3 no prefetch": ({"zero_stage": 3, "stage3_prefetch_bucket_size": 0}, {}),
    "ZeRO-3 keep gathered": ({"zero_stage": 3, "reshard_after_forward": False}, {}),
    "ZeRO-3 + CPU offload": ({"zero_stage": 3, "offload_param": True}, {"optimizer_cpu_offload": True}),
    "ZeRO-3 + CPU offload, overlapped copies": ({"zero_stage": 3, "offload_param": True},
                                                {"optimizer_cpu_offload": True, "overlap_cpu_optimizer_d2h_h2d": True}),
    "ZeRO-3 + NVMe": ({"zero_stage": 3, "offload_param": True}, {"nvme_offload_path": "{nvme}"}),
}


def bytes_per_param(name: str, nd: int, where: str = "memory") -> float:
    """Model-state bytes per parameter per rank (the ZeRO paper's formulas, K = 12).

    ``where="memory"``: everything in this rank's memory (device and host: one memory on CPU);
    CPU offload adds a 4-byte fp32 host copy of the gradient shard, NVMe keeps the 12 bytes of
    main parameters and Adam moments in files. ``where="device"``: what stays on the accelerator.
    """
    if where == "device" and ("offload" in name or "NVMe" in name):
        return 4 / nd  # bf16 parameter and gradient shards
    return {"DP (ZeRO-0)": 16.0, "ZeRO-1": 4 + 12 / nd, "ZeRO-2": 2 + 14 / nd,
            "ZeRO-3 + CPU offload": 20 / nd, "ZeRO-3 + NVMe": 8 / nd}.get(name.split(",")[0], 16 / nd)


def _vm(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    return 0


def _batches(step: int, count: int, vocab: int, seq: int):
    g = torch.Generator().manual_seed(1000 + step)
    return [{"tokens": torch.randint(0, vocab, (1, seq), generator=g),
             "labels": torch.randint(0, vocab, (1, seq), generator=g)} for _ in range(count)]


def _forward_step(data_iterator, model):
    batch = next(data_iterator)

    def loss_func(output):
        loss = output.float().mean()
        return loss, {"lm loss": loss.detach()}
    return model(batch["tokens"], labels=batch["labels"]), loss_func


def _rank(args, name: str, microbatches: int, nvme_dir: str) -> dict:
    torch.manual_seed(0)
    ddp_opts, opt_opts = SETTINGS[name]
    opt_opts = {k: (v.replace("{nvme}", nvme_dir) if isinstance(v, str) else v) for k, v in opt_opts.items()}
    ps = ps_mod.ParallelState(1, 1)
    config = gpt2_config(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=12,
                         hidden_dropout=0.0, attention_dropout=0.0)
    (chunk,) = build_gpt_model_chunks(config, args.vocab, args.seq, ps)
    chunk.to(torch.bfloat16)
    psi = sum(p.numel() for p in chunk.parameters())
    log = CommLog()
    ddp = DistributedDataParallel(DistributedDataParallelConfig(bucket_size=BUCKET, overlap_grad_reduce=True,
                                                                **ddp_opts), chunk, ps, comm_log=log)
    optimizer = get_megatron_optimizer(OptimizerConfig(bf16=True, lr=1e-4, **opt_opts), [ddp], ps)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set: construction is not what is measured
    window = {"peak": 0}

    def sample(*_):
        window["peak"] = max(window["peak"], memory_footprint([ddp]).gathered_params)

    for layer in chunk.decoder.layers:
        layer.register_forward_hook(sample)
    grads = {"peak": 0}

    def sample_grads(*_):
        grads["peak"] = max(grads["peak"], memory_footprint([ddp]).grads)

    for p in chunk.parameters():
        p.register_post_accumulate_grad_hook(sample_grads)  # after the DDP wrapper's own hook
    schedule = get_forward_backward_func(ps)
    times, comm, step_times = [], [], []
    for step in range(args.steps + 1):
        log.reset()
        start = time.perf_counter()
        optimizer.zero_grad()
        data = iter(_batches(step, microbatches, args.vocab, args.seq))
        schedule(forward_step_func=_forward_step, data_iterator=data,
                 model=[ddp], num_microbatches=microbatches, seq_length=args.seq, micro_batch_size=1,
                 no_sync_func=no_sync_func([ddp]),
                 finalize_model_grads_func=functools.partial(finalize_model_grads, parallel_state=ps))
        step_start = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - start)
        step_times.append(time.perf_counter() - step_start)
        comm.append(log.paper_volume("param") + log.paper_volume("grad"))
    footprint = memory_footprint([ddp], optimizer)
    gather = ddp.param_gather
    result = {"psi": psi, "step_s": sum(times[1:]) / args.steps, "optimizer_s": sum(step_times[1:]) / args.steps,
              "volume": comm[-1] / psi,
              "footprint": dataclasses.asdict(footprint), "peak_rss": _vm("VmHWM"), "rss": _vm("VmRSS"),
              "window_peak": window["peak"], "grads_peak": grads["peak"],
              "wait_s": (gather.wait_seconds / (args.steps + 1)) if gather is not None else 0.0,
              "tokens": microbatches * args.seq * ps.dp_size}
    ps.destroy()
    return result


def _mallopt_mmap() -> None:
    """Large allocations through mmap with a fixed threshold, so freed tensors leave the resident set."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = 1 MiB (setting it disables the dynamic threshold)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dp", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--budget-gib", type=float, default=80.0, help="memory per rank for the capacity table")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS))
    args = parser.parse_args()
    _mallopt_mmap()
    for nd in args.dp:
        results = {}
        for name in args.settings:
            with tempfile.TemporaryDirectory(prefix="bench_zero_nvme_") as nvme:
                results[name] = run_distributed(_rank, nd, args, name, 1, nvme, timeout=1800)
        _report(args, nd, results)
        _report_overlapped_copies(results)
        if "ZeRO-3" not in args.settings:
            continue
        with tempfile.TemporaryDirectory(prefix="bench_zero_nvme_") as nvme:
            _report_microbatches(args, nd, {m: run_distributed(_rank, nd, args, "ZeRO-3", m, nvme, timeout=1800)
                                            for m in (2, 4)})


def _report(args, nd: int, results: dict) -> None:
    psi = results[next(iter(results))][0]["psi"]
    base = results.get("DP (ZeRO-0)")
    base_tps = base[0]["tokens"] / max(r["step_s"] for r in base) if base else None
    print(f"\n== Nd = {nd}, Ψ = {psi / 1e6:.1f}M parameters (bf16, fp32 main + Adam, K = 12), 1 microbatch of "
          f"{args.seq} tokens per rank ==")
    print("model state = params + grads + main params + optimizer state in memory after a step (host copies "
          "included: on CPU they share the one memory); formula = bytes_per_param(setting) x Ψ")
    width = max(24, *(len(name) for name in results))
    print(f"{'setting':{width}} {'traffic/Ψ':>9} {'model state MB':>14} {'formula MB':>10} {'gathered peak MB':>16} "
          f"{'host MB':>8} {'backward grads MB':>17} {'peak RSS MB':>11} {'tokens/s':>9} {'vs DP':>6}")
    for name, ranks in results.items():
        r0 = ranks[0]
        fp = r0["footprint"]
        state = fp["params"] + fp["grads"] + fp["main_params"] + fp["optimizer_state"]
        tps = r0["tokens"] / max(r["step_s"] for r in ranks)
        ratio = f"{tps / base_tps:6.2f}" if base_tps else "     -"
        print(f"{name:{width}} {r0['volume']:9.2f} {state / 1e6:14.1f} {bytes_per_param(name, nd) * psi / 1e6:10.1f} "
              f"{r0['window_peak'] / 1e6:16.1f} {fp['host'] / 1e6:8.1f} {r0['grads_peak'] / 1e6:17.1f} "
              f"{max(r['peak_rss'] for r in ranks) / 1e6:11.0f} "
              f"{tps:9.0f} {ratio}")
    if "ZeRO-3" in results and "ZeRO-3 no prefetch" in results:
        with_p = sum(r["wait_s"] for r in results["ZeRO-3"]) / nd
        without = sum(r["wait_s"] for r in results["ZeRO-3 no prefetch"]) / nd
        hidden = 1 - with_p / without if without > 0 else float("nan")
        print(f"ZeRO-3 gather wait per step: {with_p * 1e3:.0f} ms with prefetch, {without * 1e3:.0f} ms without "
              f"-> {hidden:.0%} of the gather wait hidden")
    budget = args.budget_gib * 2 ** 30
    parts = []
    for name in results:
        if "prefetch" in name or "keep" in name:
            continue
        fits = budget / bytes_per_param(name, nd, "device")
        host = fits * (bytes_per_param(name, nd) - 4 / nd) / 2 ** 30
        parts.append(f"{name}: {fits / 1e9:.1f}B" + (f" [{host:.0f} GiB host]" if "ffload" in name or "NVMe" in name
                                                      else ""))
    print(f"largest model in {args.budget_gib:.0f} GiB of accelerator memory per rank (model states only, formulas; "
          f"host memory needed per rank for it in brackets): " + ", ".join(parts))


def _report_overlapped_copies(results: dict) -> None:
    """--overlap-cpu-optimizer-d2h-h2d against the same offload without it (same run, slowest rank)."""
    plain, overlapped = results.get("ZeRO-3 + CPU offload"), results.get("ZeRO-3 + CPU offload, overlapped copies")
    if plain is None or overlapped is None:
        return
    figures = []
    for label, what in (("iteration", "step_s"), ("optimizer", "optimizer_s")):
        a, b = max(r[what] for r in plain), max(r[what] for r in overlapped)
        figures.append(f"{label} {a * 1e3:.0f} ms -> {b * 1e3:.0f} ms ({b / a:.2f}x)")
    print("ZeRO-3 + CPU offload, --overlap-cpu-optimizer-d2h-h2d against without it (iteration = forward, backward "
          "and step; optimizer = optimizer.step()): " + ", ".join(figures))


def _report_microbatches(args, nd: int, results: dict) -> None:
    for m, ranks in results.items():
        print(f"ZeRO-3 with {m} microbatches (gradient accumulation / pipeline microbatches): traffic "
              f"{ranks[0]['volume']:.2f}Ψ per step (expected 3MΨ = {3 * m}Ψ: every microbatch regathers for "
              f"forward and backward and reduce-scatters its gradients; reshard_after_forward=False: (M+1)Ψ)")


if __name__ == "__main__":
    main()
