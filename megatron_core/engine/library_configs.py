"""A validated DeepSpeed config mapped onto the library's typed configs (one implementation of each feature).

Used by the engine and by ``pretrain_gpt.py --deepspeed-config FILE``: the ZeRO, offload, precision,
clipping, optimizer and batch sections become a :class:`DistributedDataParallelConfig`, the
:class:`OptimizerConfig` fields, and the micro / global batch sizes. DeepSpeed key -> field:

==========================================  =============================================================
zero_optimization.stage                     DistributedDataParallelConfig.zero_stage
zero_optimization.reduce_bucket_size        DistributedDataParallelConfig.bucket_size (elements)
zero_optimization.overlap_comm              DistributedDataParallelConfig.overlap_grad_reduce; with
                                            offload_optimizer also OptimizerConfig.overlap_cpu_optimizer_d2h_h2d
bf16.enabled                                OptimizerConfig.bf16, DistributedDataParallelConfig.grad_reduce_in_fp32
                                            (fp32 as Megatron-LM; DeepSpeed's default is bf16)
communication_data_type "fp32"              DistributedDataParallelConfig.grad_reduce_in_fp32 (also under fp16)
data_types.grad_accum_dtype                 DistributedDataParallelConfig.grad_reduce_in_fp32 ("fp32"; the training
                                            dtype: False, e.g. bf16 gradients accumulated in bf16)
fp16.enabled / loss_scale / initial_scale_  OptimizerConfig.fp16 / loss_scale (0 = dynamic) / initial_loss_scale
power / loss_scale_window / hysteresis /    = 2**power / loss_scale_window / hysteresis / min_loss_scale /
min_loss_scale / consecutive_hysteresis     consecutive_hysteresis
gradient_clipping                           OptimizerConfig.clip_grad (<= 0 = off; 1.0 when left out, DeepSpeed 0.19)
optimizer Adam/AdamW/SGD params             OptimizerConfig.optimizer 'adam' (decoupled decay) / 'sgd', lr,
                                            adam_beta1/2, adam_eps, weight_decay, sgd_momentum
train_micro_batch_size_per_gpu              micro_batch_size (Megatron's --micro-batch-size)
train_batch_size                            global_batch_size (--global-batch-size)
==========================================  =============================================================
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

from megatron_core.distributed import DistributedDataParallelConfig
from megatron_core.engine.config import EngineConfig, ZeroSection, load_config
from megatron_core.errors import ConfigError
from megatron_core.optimizer import OptimizerConfig
from megatron_core.training.initialize import rank_from_env

DEEPSPEED_BUCKET_DEFAULT = 500_000_000


@dataclasses.dataclass
class LibraryConfigs:
    """What a DeepSpeed config sets in the library: DDP/ZeRO options, optimizer options, batch sizes."""

    ddp: DistributedDataParallelConfig
    optimizer: OptimizerConfig
    micro_batch_size: int
    global_batch_size: int
    gradient_accumulation_steps: int


def _check_unimplemented(config: EngineConfig) -> None:
    zero = config.zero_optimization
    if zero.stage == 3:
        try:
            DistributedDataParallelConfig(zero_stage=3)
        except ValueError:
            raise ConfigError(
                "DeepSpeed config: zero_optimization.stage 3 (sharded parameters) is not implemented "
                "by this library yet; use stage 0, 1 or 2"
            ) from None
    if zero.offload_param.device == "nvme":
        raise ConfigError(
            "DeepSpeed config: zero_optimization.offload_param.device = 'nvme' is not implemented "
            "(parameters offload to 'cpu' only)"
        )
    if not zero.contiguous_gradients:
        raise ConfigError(
            "DeepSpeed config: zero_optimization.contiguous_gradients = false is not implemented: "
            "gradients always live in contiguous buffers; remove the key"
        )
    if zero.allgather_bucket_size not in (DEEPSPEED_BUCKET_DEFAULT, zero.reduce_bucket_size):
        raise ConfigError(
            "DeepSpeed config: zero_optimization.allgather_bucket_size differs from reduce_bucket_size; "
            "this library all-gathers parameters by the gradient buckets: set both to the same value"
        )


def _library_fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _needs(cls: type, field: str, key: str) -> None:
    """Raise the one-line 'not implemented' error when the library's config lacks ``field``."""
    if field not in _library_fields(cls):
        raise ConfigError(
            f"DeepSpeed config: {key} is not implemented by this library yet ({cls.__name__} has no "
            f"{field!r}); remove it"
        )


_STAGE3_CACHE = ("a bound on DeepSpeed's cache of gathered parameters; here a parameter bucket is freed once no "
                 "running module needs it and at most stage3_prefetch_bucket_size elements are gathered ahead")
# DeepSpeed's memory/speed knobs with no counterpart here: the results do not depend on them, so a config that
# sets them (e.g. axolotl's zero3_bf16.json: all three 0) runs, with one warning line naming each.
TUNING_ONLY = {
    "stage3_max_live_parameters": _STAGE3_CACHE,
    "stage3_max_reuse_distance": _STAGE3_CACHE,
    "sub_group_size": "DeepSpeed's grouping of the optimizer step; here the step runs whole, or bucket by bucket "
                      "with the optimizer offloaded",
}


def ignored_tuning_keys(config: EngineConfig) -> list[str]:
    """One warning line for each :data:`TUNING_ONLY` key the config sets away from DeepSpeed's default
    (the stage-3 cache bounds only under stage 3, where DeepSpeed reads them)."""
    zero, defaults = config.zero_optimization, ZeroSection()
    return [f"warning: DeepSpeed config: zero_optimization.{key} = {getattr(zero, key)} is ignored: {why} "
            f"(results are the same)"
            for key, why in TUNING_ONLY.items()
            if getattr(zero, key) != getattr(defaults, key) and (zero.stage == 3 or key == "sub_group_size")]


def grads_in_fp32(config: EngineConfig) -> bool:
    """Whether gradients accumulate and are reduced in fp32: ``data_types.grad_accum_dtype`` when given, else
    under bf16 (Megatron-LM's rule and DeepSpeed's BF16_Optimizer's; DeepSpeed 0.19.8's default is the model dtype)
    or with ``communication_data_type: "fp32"``."""
    if config.grad_accum_dtype is not None:
        return config.grad_accum_dtype == "fp32"
    return config.bf16_enabled or config.communication_data_type == "fp32"


def ddp_config_from(config: EngineConfig) -> DistributedDataParallelConfig:
    """The DDP wrapper's options for the config's ZeRO section and precision (ZeRO-3 and offload when present).

    Prints :func:`ignored_tuning_keys`' lines on rank 0 (stderr)."""
    _check_unimplemented(config)
    if rank_from_env() == 0:
        for line in ignored_tuning_keys(config):
            print(line, file=sys.stderr, flush=True)
    zero = config.zero_optimization
    extra: dict[str, Any] = {}
    if zero.offload_param.device != "none" and zero.stage != 3:
        key, off = offload_key(config, "offload_param")
        raise ConfigError(f"DeepSpeed config: {key} offloads ZeRO-3's parameter shards: set zero_optimization.stage "
                          f"to 3, or {off}")
    if zero.stage == 3:
        for key in ("stage3_prefetch_bucket_size", "stage3_param_persistence_threshold"):
            _needs(DistributedDataParallelConfig, key, f"zero_optimization.{key}")
            extra[key] = getattr(zero, key)
    if zero.offload_param.device == "cpu":
        _needs(DistributedDataParallelConfig, "offload_param", "zero_optimization.offload_param.device = 'cpu'")
        extra["offload_param"] = True
    try:
        return DistributedDataParallelConfig(
            zero_stage=zero.stage,
            grad_reduce_in_fp32=grads_in_fp32(config),
            overlap_grad_reduce=zero.overlap_comm,
            bucket_size=zero.reduce_bucket_size,
            **extra,
        )
    except ValueError as exc:
        raise ConfigError(f"DeepSpeed config: {exc}") from None


def offload_key(config: EngineConfig, section: str) -> tuple[str, str]:
    """``(the setting, how to turn it off)`` of ``zero_optimization.<section>`` as the user wrote it: DeepSpeed's
    older ``cpu_offload`` / ``cpu_offload_param`` when that set the section, else its ``device``."""
    offload = getattr(config.zero_optimization, section)
    if offload.written_as is not None:
        return f"zero_optimization.{offload.written_as} = true", f"{offload.written_as} to false"
    return f"zero_optimization.{section}.device = {offload.device!r}", f"{section}.device to 'none'"


# The library names its offload inputs by pretrain_gpt.py's flags; an engine user wrote these JSON keys.
_FLAGS_AS_KEYS = {"--nvme-offload-path": "zero_optimization.offload_optimizer.nvme_path"}


def as_deepspeed_keys(exc: ConfigError) -> ConfigError:
    """``exc`` with the library's flag names replaced by the DeepSpeed keys that set them (unchanged otherwise)."""
    message = str(exc)
    if not any(flag in message for flag in _FLAGS_AS_KEYS):
        return exc
    for flag, key in _FLAGS_AS_KEYS.items():
        message = message.replace(flag, key)
    return ConfigError(message if message.startswith("DeepSpeed config: ") else f"DeepSpeed config: {message}")


def _offload_optimizer_fields(config: EngineConfig) -> dict[str, Any]:
    """``offload_optimizer`` -> OptimizerConfig's offload fields (DeepSpeed's cpu / nvme devices)."""
    offload = config.zero_optimization.offload_optimizer
    key, off = offload_key(config, "offload_optimizer")
    # DeepSpeed's overlap_comm also overlaps ZeRO-Offload's gradient copies to the host with backward.
    overlap = {"overlap_cpu_optimizer_d2h_h2d": config.zero_optimization.overlap_comm}
    if offload.device != "none" and config.zero_optimization.stage == 0:
        # ZeRO-Offload moves the distributed optimizer's shard (what get_megatron_optimizer says in flags).
        raise ConfigError(f"DeepSpeed config: {key} offloads the ZeRO optimizer's shard: set zero_optimization.stage "
                          f"to 1, 2 or 3, or {off}")
    if offload.device == "cpu":
        _needs(OptimizerConfig, "optimizer_cpu_offload", key)
        return {"optimizer_cpu_offload": True, **overlap}
    if offload.device == "nvme":
        _needs(OptimizerConfig, "nvme_offload_path", key)
        return {"nvme_offload_path": offload.nvme_path, "nvme_offload_buffer_count": offload.buffer_count, **overlap}
    return {}


def optimizer_config_from(config: EngineConfig, default_lr: float | None = None) -> OptimizerConfig:
    """The optimizer's options; without an ``optimizer`` section Adam with ``default_lr``. Raises ConfigError."""
    opt = config.optimizer
    fp16 = config.fp16
    values: dict[str, Any] = dict(
        clip_grad=config.gradient_clipping,
        fp16=fp16.enabled,
        bf16=config.bf16_enabled,
        loss_scale=fp16.loss_scale or None,
        initial_loss_scale=2.0**fp16.initial_scale_power,
        min_loss_scale=fp16.min_loss_scale,
        loss_scale_window=fp16.loss_scale_window,
        hysteresis=fp16.hysteresis,
        consecutive_hysteresis=fp16.consecutive_hysteresis,
        deepspeed_loss_scale_window=True,  # DeepSpeed's DynamicLossScaler counts the window one step later
    )
    if fp16.enabled and fp16.loss_scale == 0 and values["initial_loss_scale"] < fp16.min_loss_scale:
        raise ConfigError(
            f"DeepSpeed config: fp16.initial_scale_power {fp16.initial_scale_power} gives a scale below "
            f"fp16.min_loss_scale {fp16.min_loss_scale}"
        )
    values.update(_offload_optimizer_fields(config))
    if opt is None:
        values.update(optimizer="adam", lr=default_lr if default_lr is not None else 1e-3, weight_decay=0.0)
    elif opt.type == "sgd":
        values.update(optimizer="sgd", lr=opt.lr, weight_decay=opt.weight_decay, sgd_momentum=opt.momentum)
    else:
        values.update(
            optimizer="adam",
            lr=opt.lr,
            weight_decay=opt.weight_decay,
            adam_beta1=opt.betas[0],
            adam_beta2=opt.betas[1],
            adam_eps=opt.eps,
        )
    try:
        return OptimizerConfig(**values)
    except ValueError as exc:
        raise ConfigError(f"DeepSpeed config: {exc}") from None


def library_configs_from(config: EngineConfig) -> LibraryConfigs:
    """Every library config a DeepSpeed config determines."""
    return LibraryConfigs(
        ddp_config_from(config),
        optimizer_config_from(config),
        config.train_micro_batch_size_per_gpu,
        config.train_batch_size,
        config.gradient_accumulation_steps,
    )


def deepspeed_to_megatron(path_or_dict: Any, dp_size: int, flags: dict[str, Any] | None = None) -> LibraryConfigs:
    """``pretrain_gpt.py --deepspeed-config FILE``: the file's ZeRO/offload/precision/batch/optimizer settings.

    ``flags``: the Megatron flags the user gave explicitly on the command line, by ``OptimizerConfig`` /
    ``DistributedDataParallelConfig`` field name or ``micro_batch_size`` / ``global_batch_size``
    (e.g. ``{"zero_stage": 1, "fp16": True}``). A flag that disagrees with the file is a ConfigError
    naming both; agreeing ones are fine. Raises ConfigError for any problem of the file itself.
    """
    mapped = library_configs_from(load_config(path_or_dict, dp_size))
    for name, value in (flags or {}).items():
        for holder in (mapped.ddp, mapped.optimizer, mapped):
            if hasattr(holder, name):
                ours = getattr(holder, name)
                if ours != value:
                    raise ConfigError(
                        f"--{name.replace('_', '-')} {value!r} disagrees with the DeepSpeed config, which "
                        f"sets {name} = {ours!r}; drop the flag or change the file"
                    )
                break
        else:
            raise ConfigError(f"--{name.replace('_', '-')} is not set by a DeepSpeed config; nothing to compare")
    return mapped
