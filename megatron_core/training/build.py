"""Map validated flags onto the model, optimizer and data-parallel configs of the other packages."""
from __future__ import annotations

import argparse
from typing import Any

import torch

from megatron_core.training.errors import ConfigError


def params_dtype(args: argparse.Namespace) -> torch.dtype:
    return torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32


def activation(args: argparse.Namespace) -> str:
    if args.swiglu and args.openai_gelu:
        raise ConfigError("give only one of --swiglu and --openai-gelu")
    return "swiglu" if args.swiglu else "gelu_tanh" if args.openai_gelu else "gelu"


def transformer_config(args: argparse.Namespace) -> Any:
    """``TransformerConfig`` from the model, regularization, parallel and recompute flags."""
    from megatron_core.transformer.config import TransformerConfig

    try:
        return TransformerConfig(
            num_layers=args.num_layers, hidden_size=args.hidden_size, num_attention_heads=args.num_attention_heads,
            ffn_hidden_size=args.ffn_hidden_size, num_query_groups=args.num_query_groups,
            kv_channels=args.kv_channels, normalization=args.normalization, layernorm_epsilon=args.norm_epsilon,
            activation=activation(args), add_bias_linear=args.add_bias_linear, add_qkv_bias=args.add_qkv_bias,
            position_embedding_type=args.position_embedding_type, rotary_base=float(args.rotary_base),
            rotary_percent=args.rotary_percent,
            share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
            attention_backend=args.attention_backend, hidden_dropout=args.hidden_dropout,
            attention_dropout=args.attention_dropout, init_method_std=args.init_method_std, init_seed=args.seed,
            sequence_parallel=args.sequence_parallel, recompute_granularity=args.recompute_granularity,
            recompute_method=args.recompute_method, recompute_num_layers=args.recompute_num_layers,
            params_dtype=params_dtype(args))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def optimizer_config(args: argparse.Namespace) -> Any:
    """``OptimizerConfig`` from the optimizer, mixed-precision and loss-scale flags."""
    from megatron_core.optimizer import OptimizerConfig

    try:
        return OptimizerConfig(
            optimizer=args.optimizer, lr=args.lr if args.lr is not None else 0.0, min_lr=args.min_lr,
            weight_decay=args.weight_decay, adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2,
            adam_eps=args.adam_eps, sgd_momentum=args.sgd_momentum, clip_grad=args.clip_grad, fp16=args.fp16,
            bf16=args.bf16, loss_scale=args.loss_scale, initial_loss_scale=args.initial_loss_scale,
            min_loss_scale=args.min_loss_scale, loss_scale_window=args.loss_scale_window,
            hysteresis=args.hysteresis, **offload_optimizer_options(args))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def ddp_config(args: argparse.Namespace) -> Any:
    """``DistributedDataParallelConfig``: ZeRO-1 under ``--use-distributed-optimizer``, fp32 grads with bf16."""
    from megatron_core.distributed import DistributedDataParallelConfig

    try:
        return DistributedDataParallelConfig(
            zero_stage=zero_stage(args), overlap_grad_reduce=args.overlap_grad_reduce,
            # As Megatron-LM: bf16 gradients are accumulated and reduced in fp32.
            grad_reduce_in_fp32=args.accumulate_allreduce_grads_in_fp32 or args.bf16, **zero_ddp_options(args))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def model_info(args: argparse.Namespace, vocab_size: int, padded_vocab_size: int) -> dict[str, Any]:
    """The ``model_info`` entry of a checkpoint (docs/design.md)."""
    return {
        "vocab_size": vocab_size, "padded_vocab_size": padded_vocab_size, "seq_length": args.seq_length,
        "max_position_embeddings": args.max_position_embeddings,
        "position_embedding_type": args.position_embedding_type,
        "share_embeddings_and_output_weights": not args.untie_embeddings_and_output_weights,
        "tensor_model_parallel_size": args.tensor_model_parallel_size,
        "pipeline_model_parallel_size": args.pipeline_model_parallel_size,
        "virtual_pipeline_model_parallel_size": args.virtual_pipeline_model_parallel_size,
    }


# ---- ZeRO stage, parameter gather and offload flags (zero3 branch) -------------------------------
def zero_stage(args: argparse.Namespace) -> int:
    """The one ZeRO stage from --zero-stage, --data-parallel-sharding-strategy and --use-distributed-optimizer."""
    from megatron_core.training.arguments.distributed import SHARDING_STRATEGIES

    said: dict[str, int] = {}
    if getattr(args, "zero_stage", None) is not None:
        said["--zero-stage"] = args.zero_stage
    if getattr(args, "data_parallel_sharding_strategy", None) is not None:
        said["--data-parallel-sharding-strategy"] = SHARDING_STRATEGIES[args.data_parallel_sharding_strategy]
    if len(set(said.values())) > 1:
        raise ConfigError(f"{' and '.join(f'{k} ({v})' for k, v in said.items())} name different ZeRO stages; "
                          f"pass one of them")
    stage = next(iter(said.values()), None)
    if args.use_distributed_optimizer:
        if stage == 0:
            raise ConfigError(f"--use-distributed-optimizer contradicts {next(iter(said))} selecting ZeRO stage 0; "
                              f"drop one of them")
        stage = stage or 1
    stage = stage or 0
    offload = [flag for flag, on in (("--optimizer-cpu-offload", getattr(args, "optimizer_cpu_offload", False)),
                                     ("--nvme-offload-path", getattr(args, "nvme_offload_path", None))) if on]
    if offload and stage == 0:
        raise ConfigError(f"{offload[0]} offloads the distributed optimizer's shard: add --use-distributed-optimizer "
                          f"or --zero-stage 1, 2 or 3")
    return stage


def zero_ddp_options(args: argparse.Namespace) -> dict[str, Any]:
    """``DistributedDataParallelConfig`` fields of --overlap-param-gather and the ZeRO-3 flags."""
    return {"overlap_param_gather": args.overlap_param_gather,
            "stage3_prefetch_bucket_size": getattr(args, "stage3_prefetch_bucket_size", 50_000_000),
            "stage3_param_persistence_threshold": getattr(args, "stage3_param_persistence_threshold", 0),
            "reshard_after_forward": getattr(args, "reshard_after_forward", True),
            "offload_param": getattr(args, "offload_param", False)}


def offload_optimizer_options(args: argparse.Namespace) -> dict[str, Any]:
    """``OptimizerConfig`` fields of the optimizer offload flags (CPU and NVMe)."""
    return {"optimizer_cpu_offload": getattr(args, "optimizer_cpu_offload", False),
            "optimizer_offload_fraction": getattr(args, "optimizer_offload_fraction", 1.0),
            "nvme_offload_path": getattr(args, "nvme_offload_path", None),
            "nvme_offload_buffer_count": getattr(args, "nvme_offload_buffer_count", 2)}
