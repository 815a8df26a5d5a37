"""Logging, TensorBoard and evaluation flags."""
from __future__ import annotations

import argparse

from megatron_core.training.config import TIMING_LOG_OPTIONS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """How often to log and evaluate, and where TensorBoard events go."""
    g = parser.add_argument_group("logging", "progress lines, TensorBoard and evaluation")
    g.add_argument("--log-interval", type=int, default=100, help="iterations between log lines")
    g.add_argument("--log-throughput", action="store_true",
                   help="accepted for compatibility: tokens/s and TFLOP/s are always logged")
    g.add_argument("--timing-log-level", type=int, default=0, choices=[0, 1, 2],
                   help="1 or 2: print every rank's forward-backward/optimizer times after each log line")
    g.add_argument("--timing-log-option", default="minmax", choices=TIMING_LOG_OPTIONS,
                   help="with --timing-log-level 1 or 2: Megatron-LM's block after the line shows the slowest "
                        "rank's times (max), the fastest and slowest (minmax) or each rank's (all)")
    g.add_argument("--tensorboard-dir", default=None, help="write TensorBoard events here (needs tensorboard)")
    g.add_argument("--tensorboard-log-interval", type=int, default=1)
    g.add_argument("--tensorboard-queue-size", type=int, default=1000,
                   help="events TensorBoard's writer holds before it writes them out")
    g.add_argument("--log-params-norm", action="store_true",
                   help="log the L2 norm of the parameters (fp32 main values, each counted once) with each line")
    g.add_argument("--log-num-zeros-in-grad", action="store_true",
                   help="log the number of zero gradient elements with each line")
    g.add_argument("--log-timers-to-tensorboard", action="store_true",
                   help="write the forward-backward and optimizer times (seconds per iteration) to TensorBoard")
    g.add_argument("--log-memory-to-tensorboard", action="store_true",
                   help="write memory use to TensorBoard: the CUDA allocator's counters on a GPU, the process's "
                        "resident memory on the CPU")
    g.add_argument("--log-world-size-to-tensorboard", action="store_true", help="write the world size to TensorBoard")
    g.add_argument("--log-validation-ppl-to-tensorboard", action="store_true",
                   help="accepted: the validation perplexity is always written to TensorBoard")
    g.add_argument("--eval-interval", type=int, default=1000, help="iterations between validation runs")
    g.add_argument("--eval-iters", type=int, default=100, help="validation iterations per run (0: none)")
    g.add_argument("--eval-at-start", action="store_true", help="also evaluate before the first iteration")
