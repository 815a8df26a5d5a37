"""Parallel layout and process-group flags."""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Tensor, pipeline, virtual pipeline, sequence and data parallelism; backend and timeouts."""
    g = parser.add_argument_group("distributed", "parallel sizes and gradient sync")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None,
                   help="interleaved 1F1B: layers per virtual stage")
    g.add_argument("--sequence-parallel", action="store_true", help="split norms and dropout over TP along the sequence")
    g.add_argument("--use-distributed-optimizer", action="store_true", help="ZeRO: shard optimizer state over DP")
    g.add_argument("--overlap-grad-reduce", action="store_true", help="overlap DP grad reduction with backward")
    g.add_argument("--overlap-param-gather", action="store_true", help="overlap ZeRO param all-gather with forward")
    g.add_argument("--distributed-backend", default=None, choices=["nccl", "gloo"],
                   help="default: nccl with CUDA, else gloo")
    g.add_argument("--distributed-timeout-minutes", type=int, default=10)
    g.add_argument("--local-rank", type=int, default=None, help="set by old launchers; torchrun uses LOCAL_RANK")
