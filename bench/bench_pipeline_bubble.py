"""Measured pipeline bubble of 1F1B and interleaved 1F1B against (p - 1) / (v m).

Every rank is forked on this machine (the test harness's launcher) and talks gloo. Many ranks on
two cores would time-share the CPU, so stage compute is EMULATED WITH SLEEP: a stage's forward
sleeps ``FORWARD_MS / v`` per microbatch and its backward ``BACKWARD_MS / v``, as equal-speed
devices would take; the tensors passed between stages are tiny, so communication costs little.

Baseline, measured in the same run: the same per-rank work for m microbatches without pipelining
(one rank, no communication). The bubble fraction of a layout is ``step time / baseline - 1``; the
per-rank idle column is the share of the step a rank spent outside compute (waiting on its
neighbours). Memory: the peak activations rank 0 held at once, in units of one microbatch's
activations for a whole stage (1F1B bounds it by the pipeline depth p instead of m; interleaving
holds somewhat more), and the peak RSS.

Run: ``python bench/bench_pipeline_bubble.py`` (about a minute).
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
from harness import run_distributed  # noqa: E402

from megatron_core import parallel_state  # noqa: E402
from megatron_core.pipeline_parallel import get_forward_backward_func  # noqa: E402

FORWARD_MS, BACKWARD_MS = 20.0, 40.0
SEQ, MICRO_BATCH, HIDDEN = 16, 1, 64
STEPS, WARMUP_STEPS = 3, 1


class _Sleep(torch.autograd.Function):
    """Identity whose forward and backward take a fixed time, like a device kernel would."""

    @staticmethod
    def forward(ctx, x, stats, forward_s, backward_s):
        ctx.stats, ctx.backward_s = stats, backward_s
        stats["in_flight"] += 1
        stats["peak_in_flight"] = max(stats["peak_in_flight"], stats["in_flight"])
        _timed_sleep(stats, forward_s)
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        _timed_sleep(ctx.stats, ctx.backward_s)
        ctx.stats["in_flight"] -= 1
        return grad, None, None, None


def _timed_sleep(stats: dict, seconds: float) -> None:
    start = time.perf_counter()
    time.sleep(seconds)
    stats["compute_s"] += time.perf_counter() - start


class _Stage(torch.nn.Module):
    """One model chunk: a scale (so there are gradients) and a fixed amount of emulated compute."""

    def __init__(self, stats: dict, virtual_stages: int, post_process: bool) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(HIDDEN))
        self.stats, self.v, self.post_process = stats, virtual_stages, post_process
        self.input_tensor = None

    def set_input_tensor(self, tensor: torch.Tensor) -> None:
        self.input_tensor = tensor

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        x = batch if self.input_tensor is None else self.input_tensor
        y = _Sleep.apply(x * self.weight, self.stats, FORWARD_MS / 1e3 / self.v, BACKWARD_MS / 1e3 / self.v)
        return y.float().pow(2).mean() if self.post_process else y


def _loss(output: torch.Tensor):
    return output, {"loss": output.detach()}


def _forward_step(data_iterator, model):
    return model(next(data_iterator)), _loss


def _run(pp: int, vpp: int, num_microbatches: int) -> dict:
    ps = parallel_state.initialize_model_parallel(1, pp, vpp if vpp > 1 else None)
    stats = {"compute_s": 0.0, "in_flight": 0, "peak_in_flight": 0}
    chunks = [_Stage(stats, vpp, ps.is_pipeline_last_stage(v if vpp > 1 else None)) for v in range(vpp)]
    schedule = get_forward_backward_func(ps)
    batch = torch.randn(SEQ, MICRO_BATCH, HIDDEN)
    step_times, compute_times = [], []
    for step in range(WARMUP_STEPS + STEPS):
        iterators = [iter([batch] * num_microbatches) for _ in chunks]
        stats["compute_s"] = 0.0
        torch.distributed.barrier()  # start every rank's step together
        start = time.perf_counter()
        schedule(forward_step_func=_forward_step, data_iterator=iterators if vpp > 1 else iterators[0],
                 model=chunks, num_microbatches=num_microbatches, seq_length=SEQ, micro_batch_size=MICRO_BATCH,
                 hidden_size=HIDDEN)
        elapsed = time.perf_counter() - start
        if step >= WARMUP_STEPS:
            step_times.append(elapsed)
            compute_times.append(stats["compute_s"])
    return {"step_s": statistics.median(step_times), "compute_s": statistics.median(compute_times),
            "peak_in_flight": stats["peak_in_flight"],
            "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    argparse.ArgumentParser(description=__doc__.split("\n")[0]).parse_args()  # --help; the bench takes no flags
    print(f"Emulated compute (sleep): forward {FORWARD_MS:.0f} ms + backward {BACKWARD_MS:.0f} ms per microbatch per "
          f"pipeline rank, split over its virtual stages; activations [{SEQ}, {MICRO_BATCH}, {HIDDEN}] fp32.")
    print(f"Load average at start: {os.getloadavg()[0]:.1f} (other work on the machine delays wake-ups and "
          f"inflates the measured bubble).")
    header = (f"{'p':>2} {'v':>2} {'m':>3} | {'step ms':>8} {'baseline ms':>11} {'bubble':>7} {'(p-1)/(vm)':>10} | "
              f"{'idle % min/max rank':>19} | {'peak act rank0':>14} {'RSS MB':>7}")
    print(header)
    print("-" * len(header))
    baselines = {}
    for pp in (2, 4):
        for vpp in (1, 2):
            for m in (4, 8):
                if m not in baselines:
                    (base,) = run_distributed(_run, 1, 1, 1, m, timeout=120)
                    baselines[m] = base["step_s"]
                results = run_distributed(_run, pp, pp, vpp, m, timeout=300)
                step = max(r["step_s"] for r in results)
                idle = [100 * (1 - r["compute_s"] / r["step_s"]) for r in results]
                print(f"{pp:>2} {vpp:>2} {m:>3} | {1e3 * step:>8.1f} {1e3 * baselines[m]:>11.1f} "
                      f"{step / baselines[m] - 1:>7.3f} {(pp - 1) / (vpp * m):>10.3f} | "
                      f"{min(idle):>8.1f} / {max(idle):>8.1f} | {results[0]['peak_in_flight'] / vpp:>14.1f} "
                      f"{max(r['maxrss_mb'] for r in results):>7.0f}")
    print("\nThe schedules' own order gives exactly (p-1)/(vm) (tests/test_pipeline_schedule_order.py replays it with "
          "free communication). Measured here, each exchange adds its latency, and some stall for a few ms while "
          "both ranks sleep-wait (seen in traces on this VM); interleaving makes v times as many exchanges, so its "
          "measured bubble sits further above the formula.")

if __name__ == "__main__":
    main()
