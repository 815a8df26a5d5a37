"""TP-2 training steps with ColumnParallelLinear's previous forward against the current one.

Previous: the input goes through ``copy_to_tensor_model_parallel_region`` (identity; all-reduce of
a clone of grad_input in backward) or, under sequence parallelism, through the all-gather mapping
whose output F.linear keeps for backward; then ``F.linear``. Current:
``LinearWithGradAccumulationAndAsyncCommunication`` (all-reduce of grad_input without a clone; under SP
only the local input shard kept and re-gathered in backward; collectives overlapped with the
matmuls off gloo). One GPT-2-shaped model (batch 8 x 256, 4 layers, hidden 256, vocab 4096, fp32,
dropout 0.1) on two gloo ranks with one thread each; the two forwards are switched step by step
(A B B A ...), so machine noise hits both; medians and their ratio are printed.

Run: ``python bench/bench_tp_column_linear.py [--steps 12] [--sp]``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
os.environ.setdefault("MCORE_FORCE_CPU", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from harness import run_distributed  # noqa: E402

from megatron_core import parallel_state  # noqa: E402
from megatron_core.tensor_parallel import ColumnParallelLinear  # noqa: E402
from megatron_core.tensor_parallel.mappings import (  # noqa: E402
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)

CURRENT = ColumnParallelLinear.forward


def previous_forward(self, x, weight=None):
    """ColumnParallelLinear.forward before LinearWithGradAccumulationAndAsyncCommunication."""
    weight = self.weight if weight is None else weight
    if self.sequence_parallel:
        x = gather_from_sequence_parallel_region(x, self.tp_group, tensor_parallel_output_grad=True)
    else:
        x = copy_to_tensor_model_parallel_region(x, self.tp_group)
    out = F.linear(x, weight, None if self.skip_bias_add else self.bias)
    return out, (self.bias if self.skip_bias_add else None)


def _run(steps: int, sp: bool) -> dict:
    from megatron_core.models.gpt import GPTModel
    from megatron_core.models.presets import gpt2_config
    torch.set_num_threads(1)
    ps = parallel_state.initialize_model_parallel(2, 1)
    ps.manual_seed(1234)
    config = gpt2_config(4, 256, 4, sequence_parallel=sp)
    config.validate_parallel(2)
    model = GPTModel(config, 4096, 256, parallel_state=ps).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, 4096, (8, 257), generator=torch.Generator().manual_seed(0))
    x, y = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
    variants = {"previous": previous_forward, "current": CURRENT}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for i in range(steps + 1):  # round 0 warms up
        for name in (list(variants) if i % 2 == 0 else list(variants)[::-1]):
            ColumnParallelLinear.forward = variants[name]
            dist.barrier()
            start = time.perf_counter()
            model(x, labels=y).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            dist.barrier()
            if i >= 1:
                times[name].append(time.perf_counter() - start)
    ColumnParallelLinear.forward = CURRENT
    parallel_state.destroy_model_parallel()
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--sp", action="store_true", help="sequence parallelism on")
    args = parser.parse_args()
    r = run_distributed(_run, 2, args.steps, args.sp, timeout=3600)[0]
    for name, t in r.items():
        print(f"{name:9s} {8 * 256 / t:7.0f} tokens/s  (median step {t * 1e3:7.1f} ms over {args.steps})")
    print(f"current / previous: {r['previous'] / r['current']:.3f}x tokens/s (TP 2{', SP' if args.sp else ''})")


if __name__ == "__main__":
    main()
