"""The autotuner's predictions against real runs: peak memory per rank and tokens/s per layout.

Each layout trains a small GPT (fp32, mock tokens, dropout on as pretrain_gpt.py's defaults) for a
few iterations on forked gloo ranks of this machine (the test harness's launcher), through the
library directly: the same model chunks, DDP wrapper, optimizer and pipeline schedules as
pretrain_gpt.py (its ``--zero-stage``), without a process launch per layout.

Memory: each rank resets its peak resident set (``/proc/self/clear_refs``) after the process group is
up and everything is imported, then builds and trains; the measured increase is ``VmHWM`` minus the
resident set at that point. The prediction is ``search.predict_rank_memory`` for that rank's pipeline
stage. Error per layout = (predicted - measured) / measured of the most loaded rank.

Speed: median seconds of the iterations after the first, against ``cost.step_time`` from one profile
taken in this process first; Spearman rank correlation of predicted vs measured tokens/s over the
layouts, and whether the predicted best is within 10% of the measured best.

Run: ``python bench/bench_autotune.py`` (about 5-10 minutes on 2 shared cores); ``--quick`` runs 4 layouts.
"""
from __future__ import annotations

import argparse
import ctypes
import dataclasses
import functools
import os
import statistics
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import torch  # noqa: E402
from harness import run_distributed  # noqa: E402

from megatron_core import parallel_state  # noqa: E402
from megatron_core.autotune.cost import profile, step_time  # noqa: E402
from megatron_core.autotune.layout import Layout, ModelSpec  # noqa: E402
from megatron_core.autotune.search import predict_rank_memory  # noqa: E402
from megatron_core.distributed import (  # noqa: E402
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
    no_sync_func,
)
from megatron_core.models.gpt import build_gpt_model_chunks  # noqa: E402
from megatron_core.optimizer import OptimizerConfig, get_megatron_optimizer  # noqa: E402
from megatron_core.pipeline_parallel import get_forward_backward_func  # noqa: E402
from megatron_core.training.flops import flops_per_iteration  # noqa: E402
from megatron_core.transformer.config import TransformerConfig  # noqa: E402

MiB = 1024 ** 2
M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
GRID = [  # 4 ranks: (tp, pp, vpp, zero, micro batch, recompute, sequence parallel)
    (1, 1, None, 0, 2, None, False), (1, 1, None, 1, 2, None, False), (1, 1, None, 2, 2, None, False),
    (1, 1, None, 1, 1, "full", False), (1, 1, None, 1, 2, "selective", False), (2, 1, None, 0, 2, None, False),
    (2, 1, None, 1, 4, None, True), (4, 1, None, 0, 2, None, False), (1, 2, None, 0, 1, None, False),
    (1, 2, 2, 1, 2, None, False), (1, 4, None, 0, 1, None, False), (1, 4, 2, 0, 1, None, False),
    (2, 2, None, 1, 2, None, True), (2, 2, None, 0, 2, "full", False), (1, 2, None, 2, 2, "full", False),
    (1, 2, 2, 0, 1, "selective", False)]


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


class _AnonPeak:
    """Peak anonymous resident memory, sampled every millisecond by a thread. VmHWM would also count
    libtorch's code pages touched for the first time (file-backed), which are not the run's memory."""

    def __init__(self) -> None:
        self.peak, self.running = _status("RssAnon:"), True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while self.running:
            self.peak = max(self.peak, _status("RssAnon:"))
            time.sleep(0.001)

    def stop(self) -> int:
        self.running = False
        self.thread.join()
        return max(self.peak, _status("RssAnon:"))


def _loss(out):
    return out.mean(), {"lm loss": out.mean().detach()}


def _forward_step(data_iterator, model):
    tokens = next(data_iterator)
    return model(tokens, labels=tokens), _loss


def _rank(spec: ModelSpec, layout: Layout, iters: int) -> dict:
    """Build and train on this rank; peak RSS increase and seconds per iteration."""
    ps = parallel_state.ParallelState(layout.tp, layout.pp, layout.vpp)
    ps.manual_seed(1)
    baseline = _status("RssAnon:")
    sampler = _AnonPeak()
    config = dataclasses.replace(spec.config, sequence_parallel=layout.sequence_parallel,
                                 recompute_granularity=layout.recompute,
                                 recompute_method="uniform" if layout.recompute == "full" else None,
                                 recompute_num_layers=1 if layout.recompute == "full" else None)
    chunks = build_gpt_model_chunks(config, spec.vocab_size, spec.max_position_embeddings, ps,
                                    make_vocab_size_divisible_by=spec.make_vocab_size_divisible_by)
    ddp = DistributedDataParallelConfig(zero_stage=layout.zero_stage)
    wrapped = [DistributedDataParallel(ddp, c, ps) for c in chunks]
    optimizer = get_megatron_optimizer(OptimizerConfig(lr=1e-4), wrapped, ps)
    m = spec.num_microbatches(layout)
    schedule = get_forward_backward_func(ps)
    times = []
    for step in range(iters):
        g = torch.Generator().manual_seed(step * 100 + ps.dp_rank)
        batches = [torch.randint(0, spec.vocab_size, (layout.micro_batch_size, spec.seq_length), generator=g)
                   for _ in range(m)]
        start = time.perf_counter()
        optimizer.zero_grad()
        iterators = [iter(batches) for _ in wrapped]
        schedule(forward_step_func=_forward_step, data_iterator=iterators if len(wrapped) > 1 else iterators[0],
                 model=wrapped, num_microbatches=m, seq_length=spec.seq_length,
                 micro_batch_size=layout.micro_batch_size, no_sync_func=no_sync_func(wrapped),
                 finalize_model_grads_func=functools.partial(finalize_model_grads, parallel_state=ps))
        optimizer.step()
        torch.distributed.barrier()
        times.append(time.perf_counter() - start)
    out = {"pp_rank": ps.pp_rank, "increase": sampler.stop() - baseline, "seconds": statistics.median(times[1:])}
    ps.destroy()
    return out


def _spearman(xs: list[float], ys: list[float]) -> float:
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        for pos, i in enumerate(order):
            r[i] = pos
        return r
    rx, ry = ranks(xs), ranks(ys)
    mx, my = statistics.mean(rx), statistics.mean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    return cov / (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=192)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=4095)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="the first 4 layouts only")
    args = parser.parse_args()
    config = TransformerConfig(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=4)
    spec = ModelSpec(config, args.vocab, args.seq, args.seq, args.global_batch, make_vocab_size_divisible_by=128)
    grid = GRID[:4] if args.quick else GRID
    layouts = [Layout(tp, pp, 4 // (tp * pp), vpp, z, mb, rc, sp) for tp, pp, vpp, z, mb, rc, sp in grid]
    torch.set_num_threads(1)
    # glibc keeps freed blocks below its (self-raising) mmap threshold in the heap; the profile below
    # would leave such free, resident memory behind for the forked ranks to reuse unseen. A fixed
    # 64 KiB threshold returns every tensor-sized block to the system when it is freed.
    ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 64 * 1024)
    prof = profile(spec, layouts, 4)
    c = spec.config
    flops = flops_per_iteration(spec.global_batch_size, spec.seq_length, c.num_layers, c.hidden_size, c.ffn_hidden_size,
                                c.num_attention_heads, c.kv_channels, c.num_query_groups, False, spec.padded_vocab(1))
    print(f"GPT {args.layers} layers, hidden {args.hidden}, seq {args.seq}, vocab {spec.padded_vocab(1)}, "
          f"global batch {args.global_batch}, 4 CPU ranks, fp32")
    print(f"{'layout':28} {'pred MiB':>9} {'meas MiB':>9} {'mem err':>8} {'pred tok/s':>11} {'meas tok/s':>11}")
    rows = []
    for layout in layouts:
        results = run_distributed(_rank, 4, spec, layout, args.iters, timeout=900)
        worst = max(results, key=lambda r: r["increase"])
        predicted = predict_rank_memory(spec, layout, worst["pp_rank"])
        measured = worst["increase"]
        seconds = max(r["seconds"] for r in results)
        pred_s, _ = step_time(spec, layout, prof, flops)
        tokens = spec.global_batch_size * spec.seq_length
        rows.append((layout, predicted, measured, tokens / pred_s, tokens / seconds))
        error = 100 * (predicted - measured) / measured
        print(f"{layout.describe():28} {predicted / MiB:9.1f} {measured / MiB:9.1f} {error:7.1f}% "
              f"{tokens / pred_s:11.1f} {tokens / seconds:11.1f}", flush=True)
    errors = [abs(p - m) / m for _, p, m, _, _ in rows]
    print(f"memory: mean |error| {100 * statistics.mean(errors):.1f}%, max {100 * max(errors):.1f}%, "
          f"{sum(e <= 0.10 for e in errors)}/{len(errors)} layouts within 10%")
    rho = _spearman([r[3] for r in rows], [r[4] for r in rows])
    pick = max(rows, key=lambda r: r[3])
    best = max(r[4] for r in rows)
    print(f"speed: Spearman rank correlation predicted vs measured tokens/s {rho:.2f}; predicted best "
          f"{pick[0].describe()} measures {pick[4]:.1f} tokens/s = {100 * pick[4] / best:.0f}% of the measured best "
          f"({'within' if pick[4] >= 0.9 * best else 'NOT within'} 10%)")


if __name__ == "__main__":
    main()
