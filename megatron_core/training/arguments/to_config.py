"""Map a validated ``pretrain_gpt.py`` command line onto the typed :class:`RunConfig` tree.

The one place where flags meet the library: after ``validate_args`` has filled in derived values,
``config_from_args`` builds every section once, and nothing past it reads the namespace.
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any, TypeVar

import torch

from megatron_core.distributed.distributed_data_parallel_config import DistributedDataParallelConfig
from megatron_core.errors import ConfigError
from megatron_core.optimizer.optimizer_config import OptimizerConfig
from megatron_core.training.config import (
    CheckpointConfig,
    DataConfig,
    LoggingConfig,
    ModelConfig,
    ParallelConfig,
    RunConfig,
    SchedulerConfig,
    TrainingConfig,
)
from megatron_core.transformer.config import TransformerConfig

_Section = TypeVar("_Section", bound=Any)


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The run's typed configuration from flags checked by ``validate_args``; raises ConfigError."""
    try:
        return RunConfig(
            model=ModelConfig(transformer=transformer_config(args),
                              max_position_embeddings=args.max_position_embeddings,
                              spec=tuple(args.spec) if getattr(args, "spec", None) else None),
            training=_section(TrainingConfig, args), data=_section(DataConfig, args),
            scheduler=scheduler_config(args), parallel=parallel_config(args), ddp=ddp_config(args),
            optimizer=optimizer_config(args), checkpoint=_section(CheckpointConfig, args),
            logging=_section(LoggingConfig, args))
    except ValueError as exc:  # a library dataclass refused a combination
        raise ConfigError(str(exc)) from None


def _section(cls: type[_Section], args: argparse.Namespace) -> _Section:
    """A section whose field names are the flags' names (``--micro-batch-size`` -> ``micro_batch_size``)."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})


def params_dtype(args: argparse.Namespace) -> torch.dtype:
    """bf16 / fp16 / fp32 weights from ``--bf16`` / ``--fp16``."""
    return torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32


def activation(args: argparse.Namespace) -> str:
    """The MLP activation named by ``--swiglu`` / ``--openai-gelu`` (default GeLU)."""
    if args.swiglu and args.openai_gelu:
        raise ConfigError("give only one of --swiglu and --openai-gelu")
    if getattr(args, "squared_relu", False):
        return "squared_relu"
    return "swiglu" if args.swiglu else "gelu_tanh" if args.openai_gelu else "gelu"


def transformer_config(args: argparse.Namespace) -> TransformerConfig:
    """``TransformerConfig`` from the model, regularization, parallel and recompute flags."""
    return TransformerConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size, num_attention_heads=args.num_attention_heads,
        ffn_hidden_size=args.ffn_hidden_size, num_query_groups=args.num_query_groups,
        kv_channels=args.kv_channels, normalization=args.normalization, layernorm_epsilon=args.norm_epsilon,
        layernorm_zero_centered_gamma=args.apply_layernorm_1p,
        activation=activation(args), add_bias_linear=args.add_bias_linear, add_qkv_bias=args.add_qkv_bias,
        qk_layernorm=args.qk_layernorm,
        position_embedding_type=args.position_embedding_type, rotary_base=float(args.rotary_base),
        rotary_percent=args.rotary_percent, rope_scaling=args.use_rope_scaling,
        rope_scaling_factor=args.rope_scaling_factor,
        seq_len_interpolation_factor=args.rotary_seq_len_interpolation_factor,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        attention_backend=args.attention_backend, hidden_dropout=args.hidden_dropout,
        attention_dropout=args.attention_dropout, init_method_std=args.init_method_std, init_seed=args.seed,
        sequence_parallel=args.sequence_parallel, recompute_granularity=args.recompute_granularity,
        recompute_method=args.recompute_method, recompute_num_layers=args.recompute_num_layers,
        params_dtype=params_dtype(args), fp32_residual_connection=args.fp32_residual_connection)


def optimizer_config(args: argparse.Namespace) -> OptimizerConfig:
    """``OptimizerConfig`` from the optimizer, mixed-precision and loss-scale flags."""
    return OptimizerConfig(
        optimizer=args.optimizer, lr=args.lr if args.lr is not None else 0.0, min_lr=args.min_lr,
        decoupled_lr=args.decoupled_lr, decoupled_min_lr=args.decoupled_min_lr, weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2,
        adam_eps=args.adam_eps, sgd_momentum=args.sgd_momentum, clip_grad=args.clip_grad, fp16=args.fp16,
        bf16=args.bf16, loss_scale=args.loss_scale, initial_loss_scale=args.initial_loss_scale,
        min_loss_scale=args.min_loss_scale, loss_scale_window=args.loss_scale_window,
        hysteresis=args.hysteresis, consecutive_hysteresis=args.consecutive_hysteresis,
        optimizer_cpu_offload=args.optimizer_cpu_offload,
        optimizer_offload_fraction=args.optimizer_offload_fraction, nvme_offload_path=args.nvme_offload_path,
        nvme_offload_buffer_count=args.nvme_offload_buffer_count,
        overlap_cpu_optimizer_d2h_h2d=args.overlap_cpu_optimizer_d2h_h2d,
        log_num_zeros_in_grad=args.log_num_zeros_in_grad)


def ddp_config(args: argparse.Namespace) -> DistributedDataParallelConfig:
    """``DistributedDataParallelConfig``: the ZeRO stage, parameter gathering and fp32 grads with bf16."""
    return DistributedDataParallelConfig(
        zero_stage=zero_stage(args), overlap_grad_reduce=args.overlap_grad_reduce,
        # As Megatron-LM: bf16 gradients are accumulated and reduced in fp32, unless --grad-reduce-in-bf16.
        grad_reduce_in_fp32=args.accumulate_allreduce_grads_in_fp32 or (args.bf16 and not args.grad_reduce_in_bf16),
        overlap_param_gather=args.overlap_param_gather,
        stage3_prefetch_bucket_size=args.stage3_prefetch_bucket_size,
        stage3_param_persistence_threshold=args.stage3_param_persistence_threshold,
        reshard_after_forward=args.reshard_after_forward, offload_param=args.offload_param,
        calculate_per_token_loss=args.calculate_per_token_loss,
        **({} if args.ddp_bucket_size is None else {"bucket_size": args.ddp_bucket_size}))


def zero_stage(args: argparse.Namespace) -> int:
    """The one ZeRO stage from ``--zero-stage`` (Megatron-DeepSpeed), ``--data-parallel-sharding-strategy``
    (Megatron-FSDP) and ``--use-distributed-optimizer`` (stage 1); contradictions are a ConfigError."""
    from megatron_core.training.arguments.distributed import SHARDING_STRATEGIES

    said: dict[str, int] = {}  # "--flag value" as given -> the stage it names
    if args.zero_stage is not None:
        said[f"--zero-stage {args.zero_stage}"] = args.zero_stage
    if args.data_parallel_sharding_strategy is not None:
        strategy = args.data_parallel_sharding_strategy
        said[f"--data-parallel-sharding-strategy {strategy}"] = SHARDING_STRATEGIES[strategy]
    if len(set(said.values())) > 1:
        raise ConfigError(f"{' and '.join(f'{k} (ZeRO stage {v})' for k, v in said.items())} name different "
                          f"ZeRO stages; pass one of them")
    stage = next(iter(said.values()), None)
    if args.use_distributed_optimizer:
        if stage == 0:
            raise ConfigError(f"--use-distributed-optimizer contradicts {next(iter(said))} selecting ZeRO stage 0; "
                              f"drop one of them")
        stage = stage or 1
    stage = stage or 0
    offload = [flag for flag, on in (("--optimizer-cpu-offload", args.optimizer_cpu_offload),
                                     ("--nvme-offload-path", args.nvme_offload_path)) if on]
    if offload and stage == 0:
        raise ConfigError(f"{offload[0]} offloads the distributed optimizer's shard: add --use-distributed-optimizer "
                          f"or --zero-stage 1, 2 or 3")
    return stage


def parallel_config(args: argparse.Namespace) -> ParallelConfig:
    """The layout; ``validate_args`` has set the world size, the virtual stages and the backend."""
    return ParallelConfig(
        world_size=args.world_size, tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
        distributed_backend=args.distributed_backend, distributed_timeout_minutes=args.distributed_timeout_minutes)


def scheduler_config(args: argparse.Namespace) -> SchedulerConfig:
    """The schedule in samples: iterations count ``--global-batch-size`` samples each (Megatron-LM's rule)."""
    gbs = args.global_batch_size
    if args.train_samples is not None:
        decay = args.lr_decay_samples if args.lr_decay_samples is not None else args.train_samples
        warmup = args.lr_warmup_samples
        wd_steps = args.train_samples
        wsd = args.lr_wsd_decay_samples
    else:
        decay = (args.lr_decay_iters if args.lr_decay_iters is not None else args.train_iters) * gbs
        warmup = args.lr_warmup_iters * gbs
        wd_steps = args.train_iters * gbs
        wsd = args.lr_wsd_decay_iters * gbs if args.lr_wsd_decay_iters is not None else None
    if args.lr_warmup_fraction is not None:
        warmup = args.lr_warmup_fraction * decay
    return SchedulerConfig(
        lr=args.lr if args.lr is not None else 0.0, min_lr=args.min_lr, lr_decay_style=args.lr_decay_style,
        lr_warmup_init=args.lr_warmup_init, lr_warmup_steps=warmup, lr_decay_steps=decay,
        start_weight_decay=args.start_weight_decay, end_weight_decay=args.end_weight_decay,
        wd_incr_steps=wd_steps, weight_decay_incr_style=args.weight_decay_incr_style,
        override_opt_param_scheduler=args.override_opt_param_scheduler,
        use_checkpoint_opt_param_scheduler=args.use_checkpoint_opt_param_scheduler,
        wsd_decay_steps=wsd, lr_wsd_decay_style=args.lr_wsd_decay_style)
