"""Config dataclasses of the training loop, mapped from validated Megatron-LM arguments.

The model, optimizer and DDP configs belong to their packages; ``megatron_core.training.build``
maps the flags onto them. The four here cover what only the trainer reads.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, fields


@dataclass
class TrainingConfig:
    """Batch sizes, length of training, evaluation cadence and when to stop."""

    micro_batch_size: int
    global_batch_size: int
    train_iters: int
    rampup_batch_size: list[int] | None = None
    train_samples: int | None = None
    eval_interval: int = 1000
    eval_iters: int = 100
    exit_interval: int | None = None
    exit_duration_in_mins: float | None = None
    exit_signal_handler: bool = True
    skip_train: bool = False
    seed: int = 1234


@dataclass
class DataConfig:
    """Where samples come from and how they are tokenized."""

    seq_length: int
    data_path: list[str] | None = None
    mock_data: bool = False
    split: str = "969,30,1"
    data_cache_path: str | None = None
    num_workers: int = 2
    eod_mask_loss: bool = False
    tokenizer_type: str | None = None
    tokenizer_model: str | None = None
    vocab_file: str | None = None
    merge_file: str | None = None
    vocab_size: int | None = None
    make_vocab_size_divisible_by: int = 128


@dataclass
class CheckpointConfig:
    """Where checkpoints go, how often, and what a load restores."""

    save: str | None = None
    save_interval: int | None = None
    no_save_optim: bool = False
    no_save_rng: bool = False
    load: str | None = None
    no_load_optim: bool = False
    no_load_rng: bool = False
    finetune: bool = False
    ckpt_step: int | None = None
    exit_on_missing_checkpoint: bool = False


@dataclass
class LoggingConfig:
    """Log-line cadence and TensorBoard."""

    log_interval: int = 100
    timing_log_level: int = 0
    tensorboard_dir: str | None = None
    tensorboard_log_interval: int = 1


@dataclass
class SchedulerConfig:
    """The learning-rate / weight-decay schedule, in samples (Megatron-LM's OptimizerParamScheduler)."""

    lr: float
    min_lr: float
    lr_decay_style: str
    lr_warmup_init: float
    lr_warmup_steps: float
    lr_decay_steps: float
    start_weight_decay: float
    end_weight_decay: float
    wd_incr_steps: float
    weight_decay_incr_style: str = "constant"
    override_opt_param_scheduler: bool = False
    use_checkpoint_opt_param_scheduler: bool = False


def _take(cls, args: argparse.Namespace, **overrides):
    values = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
    values.update(overrides)
    return cls(**values)


def training_config(args: argparse.Namespace) -> TrainingConfig:
    """TrainingConfig from validated args."""
    return _take(TrainingConfig, args)


def data_config(args: argparse.Namespace) -> DataConfig:
    """DataConfig from validated args."""
    return _take(DataConfig, args)


def checkpoint_config(args: argparse.Namespace) -> CheckpointConfig:
    """CheckpointConfig from validated args."""
    return _take(CheckpointConfig, args)


def logging_config(args: argparse.Namespace) -> LoggingConfig:
    """LoggingConfig from validated args."""
    return _take(LoggingConfig, args)


def scheduler_config(args: argparse.Namespace) -> SchedulerConfig:
    """The schedule in samples: iterations count ``--global-batch-size`` samples each (Megatron-LM's rule)."""
    gbs = args.global_batch_size
    if args.train_samples is not None:
        decay = args.lr_decay_samples if args.lr_decay_samples is not None else args.train_samples
        warmup = args.lr_warmup_samples
        wd_steps = args.train_samples
    else:
        decay = (args.lr_decay_iters if args.lr_decay_iters is not None else args.train_iters) * gbs
        warmup = args.lr_warmup_iters * gbs
        wd_steps = args.train_iters * gbs
    if args.lr_warmup_fraction is not None:
        warmup = args.lr_warmup_fraction * decay
    return SchedulerConfig(
        lr=args.lr if args.lr is not None else 0.0, min_lr=args.min_lr, lr_decay_style=args.lr_decay_style,
        lr_warmup_init=args.lr_warmup_init, lr_warmup_steps=warmup, lr_decay_steps=decay,
        start_weight_decay=args.start_weight_decay, end_weight_decay=args.end_weight_decay,
        wd_incr_steps=wd_steps, weight_decay_incr_style=args.weight_decay_incr_style,
        override_opt_param_scheduler=args.override_opt_param_scheduler,
        use_checkpoint_opt_param_scheduler=args.use_checkpoint_opt_param_scheduler)
