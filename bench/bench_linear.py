"""The CPU fp32 linear: oneDNN (``megatron_core.fusions.onednn_linear``) against ``F.linear`` (MKL).

For each product of a GPT layer and its output layer (forward x·Wᵀ + b, input gradient g·W, weight
gradient gᵀ·x) at the given tokens and hidden size, the two implementations are timed alternately
in one run and the bench prints GFLOP/s of each and the ratio oneDNN / MKL, then the same for a
whole linear layer's forward and backward through ``linear()`` against ``F.linear``. The library
uses oneDNN for the forward and the input gradient and MKL's ``mm`` for the weight gradient; on a
machine where this bench shows oneDNN slower, ``MCORE_ONEDNN_LINEAR=0`` turns it off.

Run: ``python bench/bench_linear.py [--threads 2] [--tokens 2048] [--hidden 256] [--vocab 4096]``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from megatron_core import device  # noqa: E402
from megatron_core.fusions.onednn_linear import linear, onednn_linear_available, onednn_product  # noqa: E402


def _median_ms(fns, rounds: int) -> list[float]:
    """Median milliseconds of each callable, the callables alternated round by round."""
    times: list[list[float]] = [[] for _ in fns]
    for r in range(rounds + 1):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            if r:  # round 0 warms up (oneDNN builds its kernel on the first call of a shape)
                times[i].append(time.perf_counter() - start)
    return [statistics.median(t) * 1e3 for t in times]


def _products(tokens: int, hidden: int, vocab: int, rounds: int) -> None:
    print(f"{'product':36s} {'MKL GFLOP/s':>12s} {'oneDNN GFLOP/s':>15s} {'oneDNN/MKL':>11s}")
    for name, k, n in (("QKV [h -> 3h]", hidden, 3 * hidden), ("attention proj [h -> h]", hidden, hidden),
                       ("fc1 [h -> 4h]", hidden, 4 * hidden), ("fc2 [4h -> h]", 4 * hidden, hidden),
                       ("output layer [h -> vocab]", hidden, vocab)):
        x, w, b, g = torch.randn(tokens, k), torch.randn(n, k), torch.randn(n), torch.randn(tokens, n)
        flops = 2 * tokens * k * n
        parts = (("forward", lambda x=x, w=w, b=b: torch.addmm(b, x, w.t()),
                  lambda x=x, w=w, b=b: onednn_product(x, w, b)),
                 ("input grad", lambda g=g, w=w: g.mm(w), lambda g=g, w=w: onednn_product(g, w.t())),
                 ("weight grad", lambda g=g, x=x: g.t().mm(x), lambda g=g, x=x: onednn_product(g.t(), x.t())))
        for part, mkl, dnn in parts:
            t_mkl, t_dnn = _median_ms([mkl, dnn], rounds)
            print(f"{name + ' ' + part:36s} {flops / t_mkl / 1e6:12.1f} {flops / t_dnn / 1e6:15.1f} "
                  f"{t_mkl / t_dnn:10.2f}x")


def _layers(tokens: int, hidden: int, vocab: int, rounds: int) -> None:
    print(f"\n{'layer forward + backward':36s} {'F.linear ms':>12s} {'linear() ms':>15s} {'speed-up':>11s}")
    for name, k, n in (("fc1 [h -> 4h]", hidden, 4 * hidden), ("fc2 [4h -> h]", 4 * hidden, hidden),
                       ("output layer [h -> vocab]", hidden, vocab)):
        x = torch.randn(tokens, k, requires_grad=True)
        w, b = torch.randn(n, k, requires_grad=True), torch.randn(n, requires_grad=True)
        g = torch.randn(tokens, n)
        t_torch, t_ours = _median_ms([lambda x=x, w=w, b=b, g=g: F.linear(x, w, b).backward(g),
                                      lambda x=x, w=w, b=b, g=g: linear(x, w, b).backward(g)], rounds)
        print(f"{name:36s} {t_torch:12.2f} {t_ours:15.2f} {t_torch / t_ours:10.2f}x")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per microbatch (batch x sequence)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    if not onednn_linear_available():
        print("oneDNN's linear op is not available here (or MCORE_ONEDNN_LINEAR=0): nothing to compare")
        return 1
    if args.threads:
        torch.set_num_threads(args.threads)
    device.configure_host_allocator()  # as a training rank on the CPU does
    print(f"fp32, {args.tokens} tokens, hidden {args.hidden}, vocabulary {args.vocab}, "
          f"{torch.get_num_threads()} thread(s); medians of {args.rounds} alternated rounds\n")
    with torch.no_grad():
        _products(args.tokens, args.hidden, args.vocab, args.rounds)
    _layers(args.tokens, args.hidden, args.vocab, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
