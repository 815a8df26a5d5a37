"""The DeepSpeed JSON keys the engine knows, and the typed checks shared by the config sections.

Three kinds of key (DeepSpeed's names, https://www.deepspeed.ai/docs/config-json/):

- implemented: parsed into a field of :mod:`megatron_core.engine.config`'s dataclasses;
- known but not implemented here: accepted only with DeepSpeed's default value (the feature off),
  any other value is a :class:`ConfigError` saying the framework does not implement it;
- unknown: a :class:`ConfigError` naming the key and the closest known one (a typo is never ignored).
"""

from __future__ import annotations

import difflib
from typing import Any

from megatron_core.errors import ConfigError

# Known DeepSpeed keys this framework does not implement, with the value that means "off"
# (DeepSpeed's default). Top level, then per section.
NOT_IMPLEMENTED_TOP: dict[str, Any] = {
    "prescale_gradients": False,
    "gradient_predivide_factor": 1.0,
    "sparse_gradients": False,
    "amp": {"enabled": False},
    "flops_profiler": {"enabled": False},
    "comms_logger": {"enabled": False},
    "wandb": {"enabled": False},
    "comet": {"enabled": False},
    "elasticity": {"enabled": False},
    "memory_breakdown": False,
    "dump_state": False,
    "seq_parallel_communication_data_type": "fp32",
    "disable_allgather": False,
    "sequence_parallel_size": 1,  # DeepSpeed-Ulysses
    "compile": {"enabled": False},
    "pipeline": {},
    "checkpoint": {"tag_validation": "Warn", "load_universal": False, "use_node_local_storage": False},
    # Asynchronous I/O tuning for NVMe offload (DeepSpeed's defaults; newer releases name thread_count
    # intra_op_parallelism).
    "aio": {
        "block_size": 1_048_576,
        "queue_depth": 8,
        "thread_count": 1,
        "intra_op_parallelism": 1,
        "single_submit": False,
        "overlap_events": True,
        "use_gds": False,
    },
    "autotuning": {"enabled": False},
    "curriculum_learning": {"enabled": False},
    "data_efficiency": {"enabled": False},
    "sparse_attention": None,
    "progressive_layer_drop": {"enabled": False},
    "eigenvalue": {"enabled": False},
    "compression_training": {},
    "nebula": {"enabled": False},
    "hybrid_engine": {"enabled": False},
    "graph_harvesting": False,
    "managed_gradient_accumulation": True,  # DeepSpeed 0.19: False makes every step() a boundary
    "timers": {},
}
NOT_IMPLEMENTED_ZERO: dict[str, Any] = {
    "reduce_scatter": True,
    "allgather_partitions": True,
    "load_from_fp32_weights": True,
    "round_robin_gradients": False,
    "elastic_checkpoint": False,
    "ignore_unused_parameters": True,
    "legacy_stage1": False,
    "zero_hpz_partition_size": 1,
    "zero_quantized_weights": False,
    "zero_quantized_gradients": False,
    "mics_shard_size": -1,
    "mics_hierarchical_params_gather": False,
    "memory_efficient_linear": True,
    "stage3_module_granularity_threshold": 0,
}
NOT_IMPLEMENTED_FP16: dict[str, Any] = {"auto_cast": False, "fp16_master_weights_and_grads": False}
NOT_IMPLEMENTED_BF16: dict[str, Any] = {"immediate_grad_update": False, "check_grad_overflow": False,
                                        "check_overflow": False}  # the older name of check_grad_overflow
NOT_IMPLEMENTED_ACTIVATION_CHECKPOINTING: dict[str, Any] = {
    "partition_activations": False,
    "cpu_checkpointing": False,
    "contiguous_memory_optimization": False,
    "number_checkpoints": None,
    "synchronize_checkpoint_boundary": False,
    "profile": False,
}
NOT_IMPLEMENTED_TENSOR_PARALLEL: dict[str, Any] = {
    "tp_grain_size": 1,
    "tp": {},
    "dtype": None,
    "keep_module_on_host": False,
    "partition_config": None,
}
NOT_IMPLEMENTED_OFFLOAD: dict[str, Any] = {
    "fast_init": False,
    "ratio": 1.0,
    "pipeline_read": False,
    "pipeline_write": False,
    "buffer_size": 100_000_000,
    "max_in_cpu": 1_000_000_000,
}


def where(path: str, key: str) -> str:
    """``section.key`` as the user wrote it in the JSON file."""
    return f"{path}.{key}" if path else key


def is_off(value: Any, default: Any) -> bool:
    """Whether ``value`` of a known, unimplemented key leaves the feature off (DeepSpeed's default).

    A section whose default is ``{"enabled": False, ...}`` is off when its ``enabled`` is false,
    whatever its other keys (real configs carry ``"flops_profiler": {"enabled": false,
    "profile_step": 1, ...}``); another section is off when every key it has holds its default.
    """
    if value == default or value == "auto":
        return True
    if isinstance(default, dict) and isinstance(value, dict):
        if default.get("enabled") is False:
            return value.get("enabled", False) in (False, "auto")
        return all(key in default and is_off(item, default[key]) for key, item in value.items())
    return False


def json_object(section: Any, path: str) -> dict:
    """``section`` (a config section, None read as empty) checked to be a JSON object. Raises ConfigError."""
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise ConfigError(f"DeepSpeed config: {path or 'the config'} must be a JSON object, got {section!r}")
    return section


def check_keys(section: dict, path: str, implemented: set[str], not_implemented: dict[str, Any]) -> None:
    """Raise for an unknown key (naming the closest known one) or a non-default unimplemented one."""
    json_object(section, path)
    for key, value in section.items():
        if key in implemented:
            continue
        if key in not_implemented:
            if not is_off(value, not_implemented[key]):
                raise ConfigError(
                    f"DeepSpeed config: {where(path, key)} = {value!r} is a DeepSpeed option this "
                    f"framework does not implement; remove it (or set it to {not_implemented[key]!r})"
                )
            continue
        known = sorted(implemented | set(not_implemented))
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
        listed = f"the keys known here: {', '.join(known)}" if len(known) <= 12 else \
            "docs/engine.md lists the supported keys"
        hint = f"; did you mean {where(path, close[0])!r}?" if close else f"; remove it ({listed})"
        raise ConfigError(f"DeepSpeed config: unknown key {where(path, key)!r}{hint}")


def typed(section: dict, path: str, key: str, kind: type | tuple, default: Any) -> Any:
    """``section[key]`` checked against ``kind`` (ints accepted for floats, bools never for numbers)."""
    if key not in section or section[key] is None:
        return default
    value = section[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if not ok:
        names = " or ".join(k.__name__ for k in kinds)
        raise ConfigError(f"DeepSpeed config: {where(path, key)} must be {names}, got {value!r}")
    return value


def number_at_least(section: dict, path: str, key: str, default: Any, low: float, kind: type = int) -> Any:
    """An int (or float with ``kind=float``) >= ``low``; large ints written as 5e8 in JSON are accepted."""
    value = section.get(key, default)
    if kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    value = typed({key: value}, path, key, kind, default)
    if value is not None and value < low:
        raise ConfigError(f"DeepSpeed config: {where(path, key)} must be >= {low}, got {value}")
    return value


def choice(section: dict, path: str, key: str, default: str, options: tuple[str, ...]) -> str:
    """A string among ``options`` (case-insensitive as DeepSpeed compares them), lower-cased."""
    value = typed(section, path, key, str, default)
    if value.lower() not in options:
        raise ConfigError(f"DeepSpeed config: {where(path, key)} = {value!r}: choose one of {', '.join(options)}")
    return value.lower()


def communication_data_type(raw: dict, fp16: bool, bf16: bool) -> str | None:
    """DeepSpeed's gradient-reduction dtype. Gradients reduce in fp32 for fp32 and bf16 training and in fp16
    for fp16 training; ``"fp32"`` (any precision) and the training dtype's own choice are accepted."""
    value = typed(raw, "", "communication_data_type", str, None)
    if value is None:
        return None
    value = value.lower()
    if value not in ("fp32", "fp16", "bf16"):
        raise ConfigError(f"DeepSpeed config: communication_data_type = {value!r}: choose one of fp32, fp16, bf16")
    if value == "fp32" or (value == "fp16" and fp16):
        return value
    now = "fp16" if fp16 else "fp32"
    raise ConfigError(f"DeepSpeed config: communication_data_type = {value!r} is not implemented with "
                      f"{'fp16' if fp16 else 'bf16' if bf16 else 'fp32'} training (gradients reduce in {now} "
                      f"here); remove it or set it to 'fp32'")


# DeepSpeed's DtypeEnum spellings (deepspeed/runtime/config.py) of the dtypes gradients can accumulate in.
_DTYPE_NAMES = {"fp32": ("fp32", "float32", "float", "torch.float32"),
                "fp16": ("fp16", "float16", "half", "torch.float16"),
                "bf16": ("bf16", "bfloat16", "torch.bfloat16")}


def grad_accum_dtype(raw: dict, fp16: bool, bf16: bool, communication: str | None) -> str | None:
    """``data_types.grad_accum_dtype`` as ``"fp32"``, ``"fp16"`` or ``"bf16"`` (None when not given): the dtype of
    the gradient buffers, where micro steps accumulate and which are reduced over DP.

    DeepSpeed 0.19.8 accumulates in the training dtype or, for bf16 at ZeRO-1 set to ``"fp32"``, in fp32 (its
    BF16_Optimizer); without ZeRO other mixes are its NotImplementedError (its ZeRO-1/2/3 optimizers otherwise
    ignore the key). Here ``"fp32"`` works with every precision; other mixes are a ConfigError. The training dtype with
    ``communication_data_type: "fp32"`` is refused too: one buffer both accumulates and is reduced here.
    """
    section = json_object(raw.get("data_types"), "data_types")
    check_keys(section, "data_types", {"grad_accum_dtype"}, {})
    value = typed(section, "data_types", "grad_accum_dtype", str, None)
    if value is None:
        return None
    name = next((key for key, names in _DTYPE_NAMES.items() if value.lower() in names), None)
    training = "fp16" if fp16 else "bf16" if bf16 else "fp32"
    if name not in ("fp32", training):
        raise ConfigError(f"DeepSpeed config: data_types.grad_accum_dtype = {value!r} with {training} training is not "
                          f"implemented; use 'fp32' or the training dtype {training!r}, or remove it")
    if name != "fp32" and communication == "fp32":
        raise ConfigError(f"DeepSpeed config: data_types.grad_accum_dtype = {value!r} with communication_data_type "
                          f"'fp32' is not implemented (gradients are reduced in the buffer they accumulate in); "
                          f"drop one")
    return name
