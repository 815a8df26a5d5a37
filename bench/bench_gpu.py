"""Issue #15's GPU checks in one script: the Triton kernels on the device, and bf16 MFU of a 1.3B GPT
against megatron-core. Needs a CUDA device and Triton; nothing here runs in tests or CI.

``kernels`` and ``sweep``: each Triton kernel of ``megatron_core.fusions`` against its torch
version on the device (errors, time, bandwidth against the device's copy), and their launch
configurations; ``bench/gpu_kernels.py`` has both and says how they measure.

``step``: one training step of a GPT-2-style model of 1.31B parameters in 6N (24 layers, hidden
2048, 16 heads, sequence 2048, vocabulary 50304, dropout 0.1, tied embeddings), bf16 parameters,
fp32 gradient reduction and main parameters, Adam, 2 microbatches of 4 sequences, in a fresh
process, for ``--system``: ``ours`` (GPTModel, DDP, optimizer and schedule as pretrain_gpt builds
them; attention ``auto`` = ``scaled_dot_product_attention``), ``ours-unfused`` (explicit attention
materialising the scores, as megatron-core's local spec does), ``ours-fused`` (the same with the
Triton softmax) or ``mcore`` (megatron-core 0.16.1's GPTModel, local spec, DDP, optimizer and
schedule, wrapped in Float16Module as Megatron-LM does; without Transformer Engine or apex its
attention is unfused and its bias-GeLU and bias-dropout-add are its ``torch.compile``d fusions).
Model FLOPs per token 6N + 12·L·h·s (PaLM's convention, as bench_mfu.py), the same N for every
system; MFU against a bf16 8192³ product measured in the same run, and against the step's own
linear-layer products.

``e2e``: pretrain_gpt.py, checkpoint resume (also with ZeRO-1 and the optimizer on the host) and
generation on the device, each PASS or FAIL (``bench/gpu_e2e.py`` says what it compares).

``all`` (the default): the peaks, then ``--parts`` (kernels, sweep, e2e, and the step systems
alternated in fresh processes: ours, mcore, ours-unfused, ours-fused, ours, mcore, ...) until
``--budget-s`` is spent, and a summary.

    pip install --target /tmp/site megatron_core-0.16.1-*.whl   # megatron-core only for this bench
    PYTHONPATH=/tmp/site python bench/bench_gpu.py all --budget-s 420

The steps are built by ``bench/step_builders.py`` (shared with ``bench_peers.py``).
``BENCH_GPU_TINY=1 TRITON_INTERPRET=1`` runs it on a CPU at toy shapes (megatron-core patched as
in step_builders.py): a smoke test of the script before spending device time, not a measurement.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.dirname(os.path.abspath(__file__))]

import torch  # noqa: E402
from gpu_e2e import e2e  # noqa: E402
from gpu_kernels import DROPOUT, VOCAB, do_bench, kernels, sweep  # noqa: E402

LAYERS, HIDDEN, HEADS, SEQ, MICRO, MICROBATCHES = 24, 2048, 16, 2048, 4, 2
if os.environ.get("BENCH_GPU_TINY") == "1":  # a CPU smoke run of this script (TRITON_INTERPRET=1); not a measurement
    LAYERS, HIDDEN, HEADS, SEQ, MICRO = 2, 64, 4, 32, 2


def matmul_peak(shapes: dict[tuple[int, int, int], int], dev) -> float:
    """bf16 FLOP/s of the products [m, k] x [k, n], ``shapes`` {(m, k, n): count}, each timed alone."""
    flops = seconds = 0.0
    for (m, k, n), count in shapes.items():
        a = torch.randn(m, k, dtype=torch.bfloat16, device=dev)
        b = torch.randn(k, n, dtype=torch.bfloat16, device=dev)
        seconds += count * do_bench(lambda a=a, b=b: a @ b) / 1e3
        flops += count * 2 * m * k * n
    return flops / seconds


# --- training step -------------------------------------------------------------------------------

def model_parameters() -> int:
    """N of 6N: every parameter but the position table (the tied embedding counts once)."""
    per_layer = 12 * HIDDEN * HIDDEN + 13 * HIDDEN
    return LAYERS * per_layer + VOCAB * HIDDEN + 2 * HIDDEN


def model_flops_per_step() -> float:
    tokens = MICRO * MICROBATCHES * SEQ
    return (6 * model_parameters() + 12 * LAYERS * HIDDEN * SEQ) * tokens


def step_products() -> dict[tuple[int, int, int], int]:
    """{(m, k, n): count} of the forward, input-gradient and weight-gradient products of the step's
    linear layers, one microbatch (t tokens): [t, k] x [k, n], [t, n] x [n, k], [k, t] x [t, n]."""
    t = MICRO * SEQ
    out: dict[tuple[int, int, int], int] = {}
    for k, n, count in [(HIDDEN, 3 * HIDDEN, LAYERS), (HIDDEN, HIDDEN, LAYERS), (HIDDEN, 4 * HIDDEN, LAYERS),
                        (4 * HIDDEN, HIDDEN, LAYERS), (HIDDEN, VOCAB, 1)]:
        for shape in [(t, k, n), (t, n, k), (k, t, n)]:
            out[shape] = out.get(shape, 0) + count
    return out


def _batch(dev) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's global batch (inputs, labels) [MICROBATCHES * MICRO, SEQ], seeded, on ``dev``."""
    gen = torch.Generator(device=dev).manual_seed(0)
    ids = torch.randint(0, VOCAB, (MICROBATCHES * MICRO, SEQ + 1), generator=gen, device=dev)
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


def _build_step(system: str):
    """The step of ``--system`` (bench/step_builders.py, shared with bench_peers.py): bf16, one process."""
    from step_builders import GPTShape, Layout, mcore_step, ours_step

    from megatron_core import device
    shape = GPTShape(LAYERS, HIDDEN, HEADS, SEQ, VOCAB, DROPOUT)
    layout = Layout(micro=MICROBATCHES)
    batch = _batch(device.set_local_device(0))
    if system == "mcore":
        return mcore_step(shape, layout, batch, bf16=True, fused=True)
    backend = {"ours-unfused": "unfused", "ours-fused": "fused"}.get(system, "auto")
    return ours_step(shape, layout, batch, bf16=True, attention_backend=backend)


def train_step(args) -> dict:
    import torch.distributed as dist

    from megatron_core import device
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    dist.init_process_group(device.default_backend(), rank=0, world_size=1)
    start = time.perf_counter()
    step = _build_step(args.system)
    built = time.perf_counter() - start
    losses, times = [], []
    for _ in range(args.warmup + args.steps):
        device.synchronize()
        t0 = time.perf_counter()
        losses.append(step())  # float(): waits for the step's losses
        device.synchronize()
        times.append(time.perf_counter() - t0)
    out = dict(system=args.system, step_s=statistics.median(times[args.warmup:]), build_s=built,
               warmup_s=sum(times[:args.warmup]), losses=losses,
               max_allocated_gib=device.max_memory_allocated() / 2**30)
    if args.profile and device.cuda_available():
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step()
            device.synchronize()
        print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=args.profile), flush=True)
    warm = ", ".join(f"{t:.2f}" for t in times[:args.warmup])
    print(f"{args.system}: built in {built:.1f} s, warm-up steps {warm} s, "
          f"timed steps {', '.join(f'{t * 1e3:.1f}' for t in times[args.warmup:])} ms, "
          f"losses {', '.join(f'{v:.4f}' for v in losses)}", flush=True)
    dist.destroy_process_group()
    return out


# --- all -----------------------------------------------------------------------------------------

def run_all(args) -> None:
    from megatron_core import device
    deadline = time.monotonic() + args.budget_s
    dev = device.current_device()
    print(f"torch {torch.__version__}, device {dev}", flush=True)
    peak_8k = matmul_peak({(8192, 8192, 8192): 1}, dev)
    peak_step = matmul_peak(step_products(), dev)
    print(f"bf16 product peak: 8192^3 {peak_8k / 1e12:.0f} TFLOP/s; the step's linear products "
          f"{peak_step / 1e12:.0f} TFLOP/s", flush=True)
    if "kernels" in args.parts.split(","):
        _child(["kernels"], min(240, deadline - time.monotonic()))
    if "sweep" in args.parts.split(","):
        _child(["sweep"], min(240, deadline - time.monotonic()))
    if "e2e" in args.parts.split(","):
        _child(["e2e"], min(300, deadline - time.monotonic()))
    results: dict[str, list[dict]] = {}
    order = [s for s in ["ours", "mcore", "ours-unfused", "ours-fused"] + ["ours", "mcore"] * 3
             if s in args.parts.split(",")]
    for system in order:
        if deadline - time.monotonic() < 60:
            break
        first = system not in results
        argv = ["step", "--system", system, "--steps", str(args.steps), "--profile", str(args.profile if first else 0)]
        r = _child(argv, min(300, deadline - time.monotonic()))
        if r is not None:
            results.setdefault(system, []).append(r)
    print(f"\n1.3B GPT, bf16, {MICROBATCHES} x {MICRO} x {SEQ} tokens per step, "
          f"{model_flops_per_step() / 1e12:.1f} model TFLOP per step ({model_parameters() / 1e9:.3f}B in 6N)")
    best = {s: min(r["step_s"] for r in rs) for s, rs in results.items()}
    for system, rs in results.items():
        step_s = best[system]
        rate = model_flops_per_step() / step_s
        ratio = f"; ours is {step_s / best['ours']:.2f}x as fast" if "ours" in best and system != "ours" else ""
        runs = ", ".join(f"{r['step_s'] * 1e3:.1f}" for r in rs)
        print(f"{system:13s} step {step_s * 1e3:7.1f} ms (runs: {runs})"
              f" {MICRO * MICROBATCHES * SEQ / step_s:8.0f} tok/s  MFU {rate / peak_8k:5.1%} of 8192^3, "
              f"{rate / peak_step:5.1%} of step products; max allocated {rs[0]['max_allocated_gib']:.1f} GiB; "
              f"loss {rs[0]['losses'][0]:.3f} -> {rs[0]['losses'][-1]:.3f}{ratio}", flush=True)


def _child(argv: list[str], timeout: float) -> dict | None:
    """Run this script's subcommand in a fresh process, echoing its output as it comes (Python's
    warnings left out); its RESULT line parsed. Killed after ``timeout`` seconds."""
    if timeout < 30:
        print(f"skipped {' '.join(argv)}: too little time left", flush=True)
        return None
    print(f"\n== {' '.join(argv)} (timeout {timeout:.0f} s)", flush=True)
    proc = subprocess.Popen([sys.executable, __file__, *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    result = None
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("RESULT "):
            result = json.loads(line[7:])
        elif "warn" not in line.lower():
            print(line, end="", flush=True)
    timer.cancel()
    if proc.wait() != 0:
        print(f"FAILED rc {proc.returncode} (killed after {timeout:.0f} s)" if proc.returncode == -9
              else f"FAILED rc {proc.returncode}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("part", nargs="?", default="all", choices=["all", "kernels", "sweep", "e2e", "step"])
    parser.add_argument("--system", default="ours", choices=["ours", "ours-unfused", "ours-fused", "mcore"])
    parser.add_argument("--parts", default="kernels,e2e,ours,mcore,ours-unfused",
                        help="for all: which of kernels, sweep, e2e, ours, mcore, ours-unfused, ours-fused to run")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--profile", type=int, default=18,
                        help="kernels in the profile table of a step (ours' and mcore's first run; 0: none)")
    parser.add_argument("--budget-s", type=float, default=420, help="for all: wall-clock seconds to spend")
    args = parser.parse_args()
    from megatron_core import device
    if not device.cuda_available() and os.environ.get("BENCH_GPU_TINY") != "1":
        sys.exit("bench_gpu.py needs a CUDA device")
    if args.part == "kernels":
        r = kernels(args)
        print("RESULT " + json.dumps(dict(failed=r["failed"], bandwidth=r["bandwidth"])))
    elif args.part == "sweep":
        sweep(args)
    elif args.part == "e2e":
        print("RESULT " + json.dumps(e2e(args)))
    elif args.part == "step":
        print("RESULT " + json.dumps(train_step(args)))
    else:
        run_all(args)


if __name__ == "__main__":
    main()
