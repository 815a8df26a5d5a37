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
    g.add_argument("--sequence-parallel", action="store_true",
                   help="split norms and dropout over TP along the sequence")
    g.add_argument("--deepspeed-config", "--deepspeed_config", dest="deepspeed_config", default=None, metavar="FILE",
                   help="take the ZeRO, offload, precision, clipping and batch settings from a DeepSpeed JSON "
                        "config (flags that disagree with it are an error)")
    g.add_argument("--deepspeed", action="store_true",
                   help="Megatron-DeepSpeed's switch for --deepspeed_config (accepted; the file applies with or "
                        "without it)")
    g.add_argument("--use-distributed-optimizer", action="store_true", help="ZeRO: shard optimizer state over DP")
    g.add_argument("--overlap-grad-reduce", action="store_true", help="overlap DP grad reduction with backward")
    g.add_argument("--overlap-param-gather", action="store_true", help="overlap ZeRO param all-gather with forward")
    g.add_argument("--ddp-bucket-size", type=int, default=None, metavar="ELEMENTS",
                   help="elements per gradient bucket (Megatron-LM's flag; DeepSpeed's reduce_bucket_size); under "
                        "ZeRO-3 also the unit of the parameter all-gather. Default: 40M")
    g.add_argument("--distributed-backend", default=None, choices=["nccl", "gloo"],
                   help="default: nccl with CUDA, else gloo")
    g.add_argument("--distributed-timeout-minutes", type=int, default=10)
    g.add_argument("--local-rank", type=int, default=None, help="set by old launchers; torchrun uses LOCAL_RANK")
    add_zero_arguments(parser)


# ---- ZeRO stages, parameter gather and offload (zero3 branch; port onto the config tree) ---------
SHARDING_STRATEGIES = {"no_shard": 0, "optim": 1, "optim_grads": 2, "optim_grads_params": 3}


def add_zero_arguments(parser: argparse.ArgumentParser) -> None:
    """ZeRO stage (DeepSpeed and Megatron-FSDP spellings), ZeRO-3 gathering, CPU and NVMe offload."""
    g = parser.add_argument_group("zero", "ZeRO stages, parameter gathering and offload")
    g.add_argument("--zero-stage", type=int, default=None, choices=[0, 1, 2, 3],
                   help="ZeRO stage as Megatron-DeepSpeed writes it (1 = --use-distributed-optimizer)")
    g.add_argument("--data-parallel-sharding-strategy", default=None, choices=list(SHARDING_STRATEGIES),
                   help="Megatron-FSDP spelling of the ZeRO stage: "
                        "no_shard=0 optim=1 optim_grads=2 optim_grads_params=3")
    g.add_argument("--stage3-prefetch-bucket-size", type=int, default=50_000_000,
                   help="ZeRO-3: elements of the next buckets whose all-gather is launched ahead (0: no prefetch)")
    g.add_argument("--stage3-param-persistence-threshold", type=int, default=0,
                   help="ZeRO-3: buckets of at most this many elements stay gathered")
    g.add_argument("--no-reshard-after-forward", action="store_false", dest="reshard_after_forward",
                   help="ZeRO-3: keep gathered buckets until the optimizer step instead of regathering for backward")
    g.add_argument("--offload-param", action="store_true",
                   help="ZeRO-3: keep the parameter shards in host memory, copied in on each gather")
    g.add_argument("--optimizer-cpu-offload", action="store_true",
                   help="fp32 main parameters and optimizer state in host memory, the step on the host")
    g.add_argument("--optimizer-offload-fraction", type=float, default=1.0,
                   help="with --optimizer-cpu-offload: fraction of the main parameters offloaded, in [0, 1]")
    g.add_argument("--overlap-cpu-optimizer-d2h-h2d", action="store_true",
                   help="with --optimizer-cpu-offload: copy each bucket's reduced gradients to the host as soon as "
                        "it is reduced, step bucket by bucket and copy updated parameters back while the next steps")
    g.add_argument("--nvme-offload-path", default=None, metavar="DIR",
                   help="ZeRO-Infinity: optimizer state (and ZeRO-3 parameter shards) in files under DIR")
    g.add_argument("--nvme-offload-buffer-count", type=int, default=2,
                   help="with --nvme-offload-path: groups of buffers resident at once (2 = double buffering)")
