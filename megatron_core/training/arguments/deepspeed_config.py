"""``pretrain_gpt.py --deepspeed-config FILE``: the ZeRO, offload, precision, clipping, batch and
optimizer sections of a DeepSpeed JSON file, as Megatron-DeepSpeed users pass them.

The file is read by the engine's parser (``megatron_core.engine.deepspeed_to_megatron``: DeepSpeed's
keys, its batch-triple rule, ``"auto"`` values, one-line errors for unknown or unimplemented keys)
and written onto the flags before the rest of validation, so one mapping serves both front ends.
A flag given on the command line that disagrees with the file is an error naming both. The
``optimizer`` section (type, lr, betas, eps, weight_decay, momentum) sets the optimizer flags only when
the file has one; a ``scheduler`` section is not used (DeepSpeed's WarmupLR and friends count optimizer
steps, Megatron's schedule counts samples), which one warning line says.
"""
from __future__ import annotations

import argparse
import re
import sys
from typing import Any

from megatron_core.errors import ConfigError
from megatron_core.training.arguments.given import on_command_line

# flag dest -> the library field (OptimizerConfig / DistributedDataParallelConfig / batch) it sets
_COMPARED = {
    "micro_batch_size": "micro_batch_size", "global_batch_size": "global_batch_size", "fp16": "fp16", "bf16": "bf16",
    "loss_scale": "loss_scale", "initial_loss_scale": "initial_loss_scale", "min_loss_scale": "min_loss_scale",
    "loss_scale_window": "loss_scale_window", "hysteresis": "hysteresis", "clip_grad": "clip_grad",
    "consecutive_hysteresis": "consecutive_hysteresis",
    "zero_stage": "zero_stage", "overlap_grad_reduce": "overlap_grad_reduce", "offload_param": "offload_param",
    "optimizer_cpu_offload": "optimizer_cpu_offload", "nvme_offload_path": "nvme_offload_path",
    "overlap_cpu_optimizer_d2h_h2d": "overlap_cpu_optimizer_d2h_h2d",
    "stage3_prefetch_bucket_size": "stage3_prefetch_bucket_size",
    "stage3_param_persistence_threshold": "stage3_param_persistence_threshold",
}
_OPTIMIZER_FIELDS = ("fp16", "bf16", "loss_scale", "initial_loss_scale", "min_loss_scale", "loss_scale_window",
                     "hysteresis", "consecutive_hysteresis", "clip_grad", "optimizer_cpu_offload",
                     "optimizer_offload_fraction", "nvme_offload_path", "nvme_offload_buffer_count",
                     "overlap_cpu_optimizer_d2h_h2d")
# The optimizer section's fields, per optimizer type (the others keep the flags' values).
_OPTIMIZER_SECTION_FIELDS = {"adam": ("optimizer", "lr", "weight_decay", "adam_beta1", "adam_beta2", "adam_eps"),
                             "sgd": ("optimizer", "lr", "weight_decay", "sgd_momentum")}
# (reduce_bucket_size: _take_bucket_size, as the flag's name is not the field's)
_DDP_FIELDS = ("zero_stage", "overlap_grad_reduce", "offload_param", "stage3_prefetch_bucket_size",
               "stage3_param_persistence_threshold")


def apply_deepspeed_config(args: argparse.Namespace, parser_defaults: dict[str, Any]) -> None:
    """Set the ZeRO/offload/precision/clipping/batch flags of ``args`` from ``args.deepspeed_config``.

    Needs ``args.data_parallel_size`` (set by the parallel checks). Raises ConfigError for a bad file,
    an unimplemented key, or a command-line flag that disagrees with the file.
    """
    from megatron_core.engine import deepspeed_to_megatron
    from megatron_core.engine.auto import resolve_auto
    from megatron_core.engine.config import find_auto, load_config, read_json
    from megatron_core.training.initialize import rank_from_env

    raw = read_json(args.deepspeed_config)
    autos = [key for key, _ in find_auto(raw)]
    raw = resolve_auto(raw, *_auto_sources(args))
    _refuse_unresolved_auto(raw)
    try:
        file = load_config(raw, args.data_parallel_size)
    except ConfigError as exc:
        raise ConfigError(_with_auto_flag(str(exc), autos)) from None
    section = () if file.optimizer is None else _OPTIMIZER_SECTION_FIELDS[
        "sgd" if file.optimizer.type == "sgd" else "adam"]
    compared = {**_COMPARED, **{name: name for name in section}}
    given = {field: getattr(args, dest) for dest, field in compared.items()
             if on_command_line(args, dest, parser_defaults)}
    mapped = deepspeed_to_megatron(raw, args.data_parallel_size, flags=given)
    _check_stage_flags(args, mapped.ddp.zero_stage)
    args.micro_batch_size, args.global_batch_size = mapped.micro_batch_size, mapped.global_batch_size
    for name in _OPTIMIZER_FIELDS + section:
        setattr(args, name, getattr(mapped.optimizer, name))
    if file.scheduler is not None and rank_from_env() == 0:
        print(f"warning: --deepspeed-config: the scheduler section ({file.scheduler.type}) is not used by "
              f"pretrain_gpt.py; the learning-rate schedule comes from --lr, --lr-warmup-iters, --lr-decay-style "
              f"and --min-lr", file=sys.stderr, flush=True)
    for name in _DDP_FIELDS:
        setattr(args, name, getattr(mapped.ddp, name))
    _take_bucket_size(args, mapped.ddp.bucket_size)


def _auto_sources(args: argparse.Namespace) -> tuple[argparse.Namespace, dict[str, Any]]:
    """``(model, args)`` for ``engine.auto.resolve_auto``: the run's flags under the Hugging Face
    ``TrainingArguments`` names its ``"auto"`` rules read (``transformers.integrations.deepspeed``), and a model
    stub carrying ``--hidden-size`` for the ZeRO sizes. A flag left at None leaves its key ``"auto"`` (an error
    naming the key)."""
    micro, batch, dp = args.micro_batch_size, args.global_batch_size, args.data_parallel_size
    # Without --global-batch-size Megatron-LM's global batch is micro x DP: one microbatch per step.
    accumulation = 1 if batch is None else None if micro is None or batch % (micro * dp) else batch // (micro * dp)
    hf_args = {"per_device_train_batch_size": micro, "gradient_accumulation_steps": accumulation,
               "max_grad_norm": args.clip_grad, "learning_rate": args.lr, "adam_beta1": args.adam_beta1,
               "adam_beta2": args.adam_beta2, "adam_epsilon": args.adam_eps, "weight_decay": args.weight_decay,
               "warmup_steps": args.lr_warmup_iters, "max_steps": args.train_iters, "fp16": args.fp16,
               "bf16": args.bf16}
    model = argparse.Namespace(config=argparse.Namespace(hidden_size=args.hidden_size))
    return model, hf_args


# The flags _auto_sources reads for each "auto" key it can fill (engine.auto.ARG_OF_KEY's keys).
_FLAG_OF_AUTO_KEY = {
    "train_micro_batch_size_per_gpu": "--micro-batch-size",
    "gradient_accumulation_steps": "--global-batch-size (a multiple of --micro-batch-size x the DP size)",
    "gradient_clipping": "--clip-grad",
    "optimizer.params.lr": "--lr",
    "optimizer.params.betas": "--adam-beta1 and --adam-beta2",
    "optimizer.params.eps": "--adam-eps",
    "optimizer.params.weight_decay": "--weight-decay",
    "scheduler.params.warmup_max_lr": "--lr",
    "scheduler.params.warmup_num_steps": "--lr-warmup-iters",
    "scheduler.params.total_num_steps": "--train-iters",
    "zero_optimization.reduce_bucket_size": "--hidden-size",
    "zero_optimization.stage3_prefetch_bucket_size": "--hidden-size",
    "zero_optimization.stage3_param_persistence_threshold": "--hidden-size",
}


def _refuse_unresolved_auto(raw: dict) -> None:
    """A value the flags left ``"auto"``: one line naming the key and the flag that fills it (the engine's own
    message names ``initialize(args=...)``, which a pretrain_gpt.py user does not call)."""
    from megatron_core.engine.config import find_auto

    for key, _ in find_auto(raw)[:1]:
        flag = _FLAG_OF_AUTO_KEY.get(key)
        fill = f"give {flag}, or write the value in the file" if flag else "write the value in the file"
        raise ConfigError(f'--deepspeed-config: {key} is "auto" and no flag of this run fills it; {fill}')


def _with_auto_flag(message: str, autos: list[str]) -> str:
    """The file's check refusing a value an ``"auto"`` took from a flag (``gradient_clipping`` from a
    negative --clip-grad): ``message`` names that flag too, which the file does not show."""
    for key in autos:
        flag = _FLAG_OF_AUTO_KEY.get(key)
        if flag is not None and re.search(rf"\b{re.escape(key)}\b", message):
            return f'{message} (its "auto" took {flag}: give that flag, or write the value in the file)'
    return message


def _take_bucket_size(args: argparse.Namespace, file_size: int | None) -> None:
    """``zero_optimization.reduce_bucket_size`` (DeepSpeed's default 5e8 when the file has none, as for the other
    ZeRO keys) onto ``--ddp-bucket-size``, Megatron-LM's spelling of it; a flag given with another value is a
    ConfigError naming both."""
    if args.ddp_bucket_size is not None and args.ddp_bucket_size != file_size:
        raise ConfigError(f"--ddp-bucket-size {args.ddp_bucket_size} disagrees with the DeepSpeed config, which sets "
                          f"zero_optimization.reduce_bucket_size = {file_size}; drop the flag or change the file")
    args.ddp_bucket_size = file_size


def _check_stage_flags(args: argparse.Namespace, file_stage: int) -> None:
    """Megatron-LM's spellings of the ZeRO stage, ``--use-distributed-optimizer`` (stage 1 or above) and
    ``--data-parallel-sharding-strategy``, compared with the file's stage as ``--zero-stage`` is: agreeing is
    fine (tools/autotune.py's torchrun line for ZeRO-1 carries ``--use-distributed-optimizer`` beside its
    DeepSpeed JSON), disagreeing is a ConfigError naming both."""
    from megatron_core.training.arguments.to_config import zero_stage

    stage_flags = [flag for flag, on in (("--use-distributed-optimizer", args.use_distributed_optimizer),
                                         ("--data-parallel-sharding-strategy",
                                          args.data_parallel_sharding_strategy is not None)) if on]
    if not stage_flags:
        return
    stage = zero_stage(args)  # raises when the flags contradict each other
    if stage != file_stage and not (stage_flags == ["--use-distributed-optimizer"] and args.zero_stage is None
                                    and file_stage >= 1):
        raise ConfigError(f"{' and '.join(stage_flags)} (ZeRO stage {stage}) disagrees with the DeepSpeed config, "
                          f"which sets zero_optimization.stage = {file_stage}; drop the flag or change the file")
