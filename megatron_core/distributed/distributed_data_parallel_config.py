"""Options of the data-parallel wrapper, and how the ZeRO stages map onto Megatron-LM's flags."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class DistributedDataParallelConfig:
    """How gradients are bucketed, reduced over data-parallel ranks and sharded (ZeRO stage).

    ZeRO stages (Rajbhandari et al. 2020) and Megatron-LM's flags:

    - ``zero_stage=0``: plain data parallelism. Every rank keeps full gradients and full optimizer
      state; each bucket is all-reduced.
    - ``zero_stage=1``: fp32 main parameters and optimizer state are sharded over DP; each rank
      updates its shard and the parameters are all-gathered. The full gradient buffer is kept.
      By default each bucket is reduce-scattered (the rank only needs its shard's sum), which is
      Megatron-LM's ``--use-distributed-optimizer`` and costs the paper's 2Ψ per step; with
      ``zero1_all_reduce_grads=True`` gradients are all-reduced instead (every rank ends with the
      full reduced gradient; 3Ψ with the parameter all-gather).
    - ``zero_stage=2``: as stage 1, and gradients are partitioned (DeepSpeed's ZeRO-2): each
      bucket's full gradient has a storage of its own, allocated by its first gradient of a
      backward, reduce-scattered from the gradient hooks (asynchronously with
      ``overlap_grad_reduce``, at most one in flight; else at once) and freed once its shard has
      been added into the kept ``grad_shard``. Every microbatch is reduced (``no_sync`` only marks
      the last backward), so the gradients held at any time are the shard plus the buckets in use;
      the cost is one reduce-scatter per microbatch. See ``param_and_grad_buffer`` and docs/zero.md.

    - ``zero_stage=3``: as stage 2, and the parameters are sharded too: each DP rank keeps only its
      shard of every bucket's parameters (``ParamAndGradBuffer.param_shard``). Before a module runs,
      the buckets holding its parameters are all-gathered into per-bucket storage; the following
      buckets (``stage3_prefetch_bucket_size`` elements) are prefetched asynchronously; after the
      forward the storage is freed (``reshard_after_forward``) and gathered again for backward,
      and freed once every parameter of the bucket has its gradient. See ``param_gather``.

    ``zero_stage`` is the one knob: Megatron-LM's ``--use-distributed-optimizer`` is stage 1, and
    ``use_distributed_optimizer`` is a read-only view of ``zero_stage >= 1``. Megatron-FSDP's
    ``--data-parallel-sharding-strategy`` maps as no_shard=0, optim=1, optim_grads=2,
    optim_grads_params=3 (the flag mapping is in ``training/arguments/to_config.py``).

    Parameter gathering and ZeRO-3 (names from Megatron-LM, DeepSpeed and FSDP):

    - ``overlap_param_gather`` (Megatron-LM ``--overlap-param-gather``; ZeRO 1-3): the all-gather of
      the updated parameters after the step is launched asynchronously bucket by bucket and each
      bucket is waited on just before its first use in the next forward. ZeRO-3 gathers on demand
      in any case; there the flag changes nothing.
    - ``stage3_prefetch_bucket_size`` (DeepSpeed, elements, default 5e7): how many elements of the
      buckets that follow the one in use (forward order, reverse order in backward) are gathered
      ahead; 0 disables prefetching.
    - ``stage3_param_persistence_threshold`` (DeepSpeed's key, elements; default 0 here, nothing
      persistent: DeepSpeed's own default, 1e5, applies to a DeepSpeed JSON without the key): buckets
      of at most this many elements are never freed (gathered once per step). Per bucket, not per
      parameter.
    - ``reshard_after_forward`` (FSDP, default True): free each bucket after forward and gather it
      again for backward, per microbatch: traffic 3MΨ per step with M microbatches (the
      gradients of each are reduce-scattered too). False keeps every gathered bucket until the
      optimizer step: (M+1)Ψ, but the full parameters are resident during the step.
    - ``offload_param`` (DeepSpeed ``offload_param.device="cpu"``; ZeRO-3 only): the parameter
      shards live in host memory and are copied to the device when gathered.

    Gradients under ZeRO-3 are handled as under ZeRO-2 (partitioned, freed bucket by bucket during
    backward); ``finalize_model_grads``' TP / tied-embedding all-reduces and per-token scaling act on
    the kept shard.
    """

    zero_stage: int = 0
    zero1_all_reduce_grads: bool = False
    # Gradients are accumulated and reduced in fp32 for bf16/fp16 parameters
    # (Megatron's --accumulate-allreduce-grads-in-fp32).
    grad_reduce_in_fp32: bool = False
    # Launch each bucket's collective from the backward hooks as soon as its gradients are ready.
    overlap_grad_reduce: bool = False
    # Elements per bucket; None puts each buffer in a single bucket.
    bucket_size: int | None = 40_000_000
    # Sum instead of average over DP: per-token loss averaging divides by the global token count
    # afterwards (finalize_model_grads(..., num_tokens=...)).
    calculate_per_token_loss: bool = False

    # ---- parameter gathering and ZeRO-3 (see the class docstring) ------------------------------
    overlap_param_gather: bool = False
    stage3_prefetch_bucket_size: int = 50_000_000
    stage3_param_persistence_threshold: int = 0
    reshard_after_forward: bool = True
    offload_param: bool = False

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"DistributedDataParallelConfig.zero_stage (--zero-stage) must be 0, 1, 2 or 3, "
                             f"got {self.zero_stage}")
        if self.overlap_param_gather and self.zero_stage == 0:
            raise ValueError("--overlap-param-gather (overlap_param_gather) needs the distributed optimizer: "
                             "set --use-distributed-optimizer or --zero-stage 1, 2 or 3")
        if self.offload_param and self.zero_stage != 3:
            raise ValueError(f"--offload-param (offload_param) needs --zero-stage 3 (parameter sharding), "
                             f"got zero_stage={self.zero_stage}")
        if self.stage3_prefetch_bucket_size < 0 or self.stage3_param_persistence_threshold < 0:
            raise ValueError("--stage3-prefetch-bucket-size and --stage3-param-persistence-threshold must be >= 0")
        if self.zero1_all_reduce_grads and self.zero_stage != 1:
            raise ValueError("zero1_all_reduce_grads only applies to zero_stage=1; stage 2 must reduce-scatter "
                             "(it keeps only the gradient shard) and stage 0 always all-reduces")
        if self.bucket_size is not None and self.bucket_size < 1:
            raise ValueError(f"DistributedDataParallelConfig.bucket_size (--ddp-bucket-size) must be >= 1 element "
                             f"or None (one bucket), got {self.bucket_size}")

    @property
    def use_distributed_optimizer(self) -> bool:
        """Whether main parameters and optimizer state are sharded over DP (``zero_stage >= 1``)."""
        return self.zero_stage >= 1

    @property
    def reduce_scatter_grads(self) -> bool:
        """Whether buckets are reduce-scattered (each rank gets its shard's sum) or all-reduced."""
        return self.zero_stage >= 2 or (self.zero_stage == 1 and not self.zero1_all_reduce_grads)
