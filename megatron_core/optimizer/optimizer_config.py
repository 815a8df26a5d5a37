"""Optimizer options, named after Megatron-LM's command-line flags (``--adam-beta1`` -> ``adam_beta1``)."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class OptimizerConfig:
    """Optimizer, mixed precision, loss scaling, clipping and sharding options.

    Loss scaling (fp16 only; bf16 and fp32 need none): ``loss_scale`` set gives a static scale;
    ``None`` (or 0, as in DeepSpeed's config) a dynamic one with DeepSpeed's documented defaults:
    initial 2^16, doubled after ``loss_scale_window`` = 1000 steps without overflow, halved after
    ``hysteresis`` = 2 overflowing steps, never below ``min_loss_scale`` = 1. (Megatron-LM starts at
    2^32; pass ``initial_loss_scale=2**32`` to match it.)

    Offload of the distributed optimizer's shard (Megatron-LM's flags; DeepSpeed ZeRO-Offload /
    ZeRO-Infinity ``offload_optimizer``); the model chunks must use ``zero_stage >= 1``:

    - ``optimizer_cpu_offload`` (``--optimizer-cpu-offload``; DeepSpeed ``device="cpu"``): fp32 main
      parameters, Adam moments and step of the offloaded buckets live in host memory and the step
      runs there with torch's fused CPU AdamW; the reduced gradient shard of each bucket is copied
      to a host fp32 buffer, the updated shard copied back before the parameter all-gather.
    - ``optimizer_offload_fraction`` (``--optimizer-offload-fraction``, [0, 1], default 1): share of
      this rank's shard elements offloaded, bucket by bucket in layout order (exact up to a bucket);
      the rest stays on the device with the device optimizer.
    - ``nvme_offload_path`` (``--nvme-offload-path``; DeepSpeed ``device="nvme"``, ``nvme_path``):
      implies CPU offload, and the main parameters and Adam moments of every offloaded bucket live
      in a file under this directory between steps (freed from memory); the step swaps them in a
      bucket at a time with read-ahead and write-behind on I/O threads. Adam only.
    - ``overlap_cpu_optimizer_d2h_h2d`` (``--overlap-cpu-optimizer-d2h-h2d``; DeepSpeed ``overlap_comm``
      with ``offload_optimizer``): needs ``optimizer_cpu_offload`` (or NVMe). Each offloaded bucket's
      reduced gradient shard is copied to the host as soon as its reduce-scatter has completed
      (during backward with ``overlap_grad_reduce``), asynchronously, and the host step runs bucket
      by bucket with each bucket's updated shard copied back while the next one steps. Same results.
    - ``nvme_offload_buffer_count`` (``--nvme-offload-buffer-count``; DeepSpeed ``buffer_count``,
      default 2): buckets resident at once during the NVMe step (the one being updated and those
      read ahead), plus the one being written back.

    Decoupled learning rate (Megatron-LM's ``--decoupled-lr`` / ``--decoupled-min-lr``, megatron.core's
    ``OptimizerConfig.decoupled_lr`` / ``decoupled_min_lr``): ``decoupled_lr`` set puts the parameters
    marked ``is_embedding_or_output_parameter`` (the input word embedding on the first pipeline stage,
    the output layer on the last, the tied copy of the word embedding included) in a group of their
    own whose ``max_lr`` is ``decoupled_lr`` and ``min_lr`` is ``decoupled_min_lr`` (``min_lr`` when
    None); the LR scheduler runs the same warmup and decay between those bounds.

    Whether the optimizer is sharded over DP is not an option here: the model chunks'
    ``DistributedDataParallelConfig.zero_stage`` decides it (one knob for one choice).
    """

    optimizer: str = "adam"
    lr: float = 1e-3
    min_lr: float = 0.0
    decoupled_lr: float | None = None
    decoupled_min_lr: float | None = None
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    sgd_momentum: float = 0.9
    # max global L2 norm; 0 or negative: no clipping (Megatron-LM clips only when clip_grad > 0.0, DeepSpeed's
    # gradient_clipping likewise)
    clip_grad: float = 1.0
    fp16: bool = False
    bf16: bool = False
    loss_scale: float | None = None
    initial_loss_scale: float = 2.0 ** 16
    min_loss_scale: float = 1.0
    loss_scale_window: int = 1000
    hysteresis: int = 2
    consecutive_hysteresis: bool = False  # DeepSpeed's fp16 key: a step without overflow restores the hysteresis
    # DeepSpeed's count of loss_scale_window (first growth one clean step later than Megatron's); the engine's
    deepspeed_loss_scale_window: bool = False
    log_num_zeros_in_grad: bool = False
    # ---- offload of the distributed optimizer's shard (see the class docstring) -----------------
    optimizer_cpu_offload: bool = False
    optimizer_offload_fraction: float = 1.0
    nvme_offload_path: str | None = None
    nvme_offload_buffer_count: int = 2
    overlap_cpu_optimizer_d2h_h2d: bool = False

    def __post_init__(self) -> None:
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"OptimizerConfig.optimizer (--optimizer) must be 'adam' or 'sgd', got {self.optimizer!r}")
        if self.decoupled_min_lr is not None and self.decoupled_lr is None:
            raise ValueError("OptimizerConfig.decoupled_min_lr (--decoupled-min-lr) is the floor of the "
                             "decoupled_lr (--decoupled-lr) group; set decoupled_lr too or drop it")
        if self.decoupled_lr is not None and not 0.0 <= self.decoupled_min_lr_or_min_lr <= self.decoupled_lr:
            raise ValueError(f"OptimizerConfig: need 0 <= decoupled_min_lr (--decoupled-min-lr, else --min-lr) "
                             f"{self.decoupled_min_lr_or_min_lr} <= decoupled_lr (--decoupled-lr) {self.decoupled_lr}")
        if self.fp16 and self.bf16:
            raise ValueError("OptimizerConfig: --fp16 and --bf16 are mutually exclusive; pick one")
        if self.loss_scale == 0:
            self.loss_scale = None  # DeepSpeed's convention for "dynamic"
        if self.loss_scale is not None and self.loss_scale < 0:
            raise ValueError(f"OptimizerConfig.loss_scale (--loss-scale) must be positive or None, "
                             f"got {self.loss_scale}")
        if not 0.0 <= self.optimizer_offload_fraction <= 1.0:
            raise ValueError(f"--optimizer-offload-fraction (optimizer_offload_fraction) must be in [0, 1], "
                             f"got {self.optimizer_offload_fraction}")
        if self.nvme_offload_buffer_count < 1:
            raise ValueError(f"--nvme-offload-buffer-count (nvme_offload_buffer_count) must be >= 1, "
                             f"got {self.nvme_offload_buffer_count}")
        if self.nvme_offload_path is not None:
            self.optimizer_cpu_offload = True  # NVMe holds what CPU offload would keep in host memory
        if self.overlap_cpu_optimizer_d2h_h2d and not self.optimizer_cpu_offload:
            raise ValueError("--overlap-cpu-optimizer-d2h-h2d overlaps the host copies of --optimizer-cpu-offload: "
                             "add --optimizer-cpu-offload (or --nvme-offload-path) or drop it")
        if self.hysteresis < 1 or self.loss_scale_window < 1:
            raise ValueError("OptimizerConfig.hysteresis (--hysteresis) and loss_scale_window (--loss-scale-window) "
                             "must be >= 1")
        if self.min_loss_scale <= 0 or self.initial_loss_scale < self.min_loss_scale:
            raise ValueError(f"OptimizerConfig: need 0 < min_loss_scale ({self.min_loss_scale}) <= initial_loss_scale "
                             f"({self.initial_loss_scale})")

    @property
    def decoupled_min_lr_or_min_lr(self) -> float:
        """The floor of the decoupled group: ``decoupled_min_lr``, else ``min_lr`` (megatron.core's default)."""
        return self.min_lr if self.decoupled_min_lr is None else self.decoupled_min_lr
