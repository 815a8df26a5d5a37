"""A DeepSpeed JSON config as typed dataclasses, validated once (DeepSpeed's key names and defaults).

:func:`load_config` reads a path or dict, resolves ``"auto"`` values (:mod:`.auto`), checks every key
(:mod:`.config_keys`: an unknown key names the closest known one, a known key the framework does not
implement is refused unless it has DeepSpeed's "off" value) and solves the batch triple
``train_batch_size = train_micro_batch_size_per_gpu x gradient_accumulation_steps x DP size``.
:mod:`.library_configs` maps the result onto the library's ``DistributedDataParallelConfig`` and
``OptimizerConfig``. Reference: https://www.deepspeed.ai/docs/config-json/.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any

from megatron_core.engine import config_keys as keys
from megatron_core.engine.config_keys import check_keys, choice, number_at_least, typed
from megatron_core.engine.scheduler_config import SchedulerSection, scheduler_section
from megatron_core.errors import ConfigError

OPTIMIZER_TYPES = ("adam", "adamw", "sgd")
OTHER_DEEPSPEED_OPTIMIZERS = (
    "lamb",
    "onebitadam",
    "zerooneadam",
    "onebitlamb",
    "adagrad",
    "lion",
    "muadam",
    "muadamw",
    "musgd",
    "muon",
    "cpuadam",
)
@dataclasses.dataclass
class OptimizerSection:
    """``optimizer``: ``Adam``/``AdamW`` (decoupled weight decay, DeepSpeed's ``adam_w_mode`` default) or ``SGD``."""

    type: str = "adamw"  # lower-cased: adam, adamw or sgd
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    momentum: float = 0.0


@dataclasses.dataclass
class FP16Section:
    """``fp16``: ``loss_scale`` 0 is dynamic, starting at ``2**initial_scale_power``."""

    enabled: bool = False
    loss_scale: float = 0.0
    initial_scale_power: int = 16
    loss_scale_window: int = 1000
    hysteresis: int = 2
    consecutive_hysteresis: bool = False
    min_loss_scale: float = 1.0


@dataclasses.dataclass
class OffloadSection:
    """``offload_optimizer`` / ``offload_param``: ``device`` none, cpu or nvme."""

    device: str = "none"
    nvme_path: str | None = None
    pin_memory: bool = False
    buffer_count: int = 4
    # DeepSpeed's deprecated boolean key that set this section (cpu_offload, cpu_offload_param), if any:
    # errors name the key the user wrote.
    written_as: str | None = None


@dataclasses.dataclass
class ZeroSection:
    """``zero_optimization`` (sizes in elements, as DeepSpeed counts them)."""

    stage: int = 0
    reduce_bucket_size: int = 500_000_000
    allgather_bucket_size: int = 500_000_000
    overlap_comm: bool = False
    contiguous_gradients: bool = True
    offload_optimizer: OffloadSection = dataclasses.field(default_factory=OffloadSection)
    offload_param: OffloadSection = dataclasses.field(default_factory=OffloadSection)
    stage3_prefetch_bucket_size: int = 50_000_000
    stage3_param_persistence_threshold: int = 100_000
    stage3_max_live_parameters: int = 1_000_000_000
    stage3_max_reuse_distance: int = 1_000_000_000
    stage3_gather_16bit_weights_on_model_save: bool = False
    sub_group_size: int = 1_000_000_000


@dataclasses.dataclass
class MonitorSection:
    """``tensorboard`` / ``csv_monitor``: where the engine writes loss, learning rate and loss scale."""

    enabled: bool = False
    output_path: str = ""
    job_name: str = "DeepSpeedJobName"


@dataclasses.dataclass
class EngineConfig:
    """A whole DeepSpeed config after validation; the batch triple is solved for ``dp_size``."""

    train_batch_size: int
    train_micro_batch_size_per_gpu: int
    gradient_accumulation_steps: int
    dp_size: int
    optimizer: OptimizerSection | None = None
    scheduler: SchedulerSection | None = None
    fp16: FP16Section = dataclasses.field(default_factory=FP16Section)
    bf16_enabled: bool = False
    gradient_clipping: float = 1.0  # DeepSpeed's default since 0.19 (deepspeedai/DeepSpeed#8068); 0 or negative: off
    zero_optimization: ZeroSection = dataclasses.field(default_factory=ZeroSection)
    autotp_size: int = 1
    steps_per_print: int = 10
    wall_clock_breakdown: bool = False
    tensorboard: MonitorSection = dataclasses.field(default_factory=MonitorSection)
    csv_monitor: MonitorSection = dataclasses.field(default_factory=MonitorSection)
    communication_data_type: str | None = None  # "fp32": reduce gradients in fp32 (None: the training dtype's rule)
    grad_accum_dtype: str | None = None  # data_types.grad_accum_dtype: "fp32", "fp16", "bf16" (None: the default rule)
    dataloader_drop_last: bool = False  # the training_data loader drops each rank's last, short micro batch


# ---- sections ---------------------------------------------------------------------------------
def _optimizer(raw: dict | None) -> OptimizerSection | None:
    if raw is None:
        return None
    check_keys(raw, "optimizer", {"type", "params"}, {})
    kind = typed(raw, "optimizer", "type", str, None)
    if kind is None:
        raise ConfigError("DeepSpeed config: optimizer.type is missing; use Adam, AdamW or SGD")
    if kind.lower() in OTHER_DEEPSPEED_OPTIMIZERS:
        raise ConfigError(
            f"DeepSpeed config: optimizer.type {kind!r} is a DeepSpeed optimizer this framework does "
            f"not implement; use Adam, AdamW or SGD"
        )
    if kind.lower() not in OPTIMIZER_TYPES:
        raise ConfigError(f"DeepSpeed config: optimizer.type {kind!r} is unknown; use Adam, AdamW or SGD")
    params = raw.get("params", {})
    path = "optimizer.params"
    if kind.lower() == "sgd":
        check_keys(params, path, {"lr", "momentum", "weight_decay"}, {"dampening": 0.0, "nesterov": False})
    else:
        check_keys(
            params,
            path,
            {"lr", "betas", "eps", "weight_decay", "torch_adam", "fused"},
            {"adam_w_mode": True, "amsgrad": False, "bias_correction": True},
        )
    # DeepSpeed builds torch.optim.AdamW(**params) for torch_adam, whose weight decay defaults to 0.01; its
    # FusedAdam and DeepSpeedCPUAdam default to 0 (get_optimizer_configuration in its engine.py).
    torch_adam = kind.lower() != "sgd" and typed(params, path, "torch_adam", bool, False)
    betas = typed(params, path, "betas", list, [0.9, 0.999])
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
        raise ConfigError(f"DeepSpeed config: optimizer.params.betas must be two numbers in [0, 1), got {betas!r}")
    section = OptimizerSection(
        kind.lower(),
        number_at_least(params, path, "lr", 1e-3, 0.0, float),
        (float(betas[0]), float(betas[1])),
        number_at_least(params, path, "eps", 1e-8, 0.0, float),
        number_at_least(params, path, "weight_decay", 0.01 if torch_adam else 0.0, 0.0, float),
        number_at_least(params, path, "momentum", 0.0, 0.0, float),
    )
    return section


def _fp16(raw: dict) -> FP16Section:
    path = "fp16"
    fields = {f.name for f in dataclasses.fields(FP16Section)}
    check_keys(raw, path, fields, keys.NOT_IMPLEMENTED_FP16)
    section = FP16Section(
        typed(raw, path, "enabled", bool, False),
        number_at_least(raw, path, "loss_scale", 0.0, 0.0, float),
        number_at_least(raw, path, "initial_scale_power", 16, 0),
        number_at_least(raw, path, "loss_scale_window", 1000, 1),
        number_at_least(raw, path, "hysteresis", 2, 1),
        typed(raw, path, "consecutive_hysteresis", bool, False),
        number_at_least(raw, path, "min_loss_scale", 1.0, 0.0, float),
    )
    return section


def _offload(raw: dict | None, path: str, written_as: str | None = None) -> OffloadSection:
    raw = raw or {}
    check_keys(raw, path, {"device", "nvme_path", "pin_memory", "buffer_count"}, keys.NOT_IMPLEMENTED_OFFLOAD)
    section = OffloadSection(
        choice(raw, path, "device", "none", ("none", "cpu", "nvme")),
        typed(raw, path, "nvme_path", str, None),
        typed(raw, path, "pin_memory", bool, False),
        number_at_least(raw, path, "buffer_count", 4, 1),
        written_as,
    )
    if section.device == "nvme" and not section.nvme_path:
        raise ConfigError(f"DeepSpeed config: {path}.device = 'nvme' needs {path}.nvme_path (a directory)")
    return section


# DeepSpeed's deprecated ZeRO keys, still read there: older name -> (section it sets, what it sets).
_OLD_ZERO_SECTIONS = {"cpu_offload": "offload_optimizer", "cpu_offload_param": "offload_param"}


def _old_zero_names(raw: dict) -> tuple[dict, dict[str, str]]:
    """``raw`` with DeepSpeed's older ZeRO key names rewritten to the current ones (a copy), and the
    offload sections an older key set (section -> that key)."""
    raw = dict(raw)
    old_gather, gather = "stage3_gather_fp16_weights_on_model_save", "stage3_gather_16bit_weights_on_model_save"
    for old, current in ((old_gather, gather), *_OLD_ZERO_SECTIONS.items()):
        if old in raw and current in raw:  # DeepSpeed asserts the same
            raise ConfigError(f"DeepSpeed config: zero_optimization.{old} is the older name of "
                              f"zero_optimization.{current}: give one of them")
    if old_gather in raw:
        raw[gather] = raw.pop(old_gather)
    pin = typed(raw, "zero_optimization", "cpu_offload_use_pin_memory", bool, None)
    raw.pop("cpu_offload_use_pin_memory", None)
    written_as = {}
    for old, section in _OLD_ZERO_SECTIONS.items():
        if old not in raw:
            continue
        if typed(raw, "zero_optimization", old, bool, False):
            raw[section] = {"device": "cpu", **({"pin_memory": pin} if pin is not None else {})}
            written_as[section] = old
        del raw[old]
    return raw, written_as


def _zero(raw: dict | bool) -> ZeroSection:
    path = "zero_optimization"
    if isinstance(raw, bool):  # DeepSpeed's deprecated format, still read there: true is stage 1, false stage 0
        raw = {"stage": 1} if raw else {}
    raw, written_as = _old_zero_names(keys.json_object(raw, path))
    fields = {f.name for f in dataclasses.fields(ZeroSection)}
    check_keys(raw, path, fields, keys.NOT_IMPLEMENTED_ZERO)
    stage = number_at_least(raw, path, "stage", 0, 0)
    if stage > 3:
        raise ConfigError(f"DeepSpeed config: zero_optimization.stage must be 0, 1, 2 or 3, got {stage}")
    defaults = ZeroSection()
    # A bucket of 0 elements holds no gradient (DeepSpeed's own check is only >= 0).
    ints = {"reduce_bucket_size": number_at_least(raw, path, "reduce_bucket_size", defaults.reduce_bucket_size, 1)}
    ints |= {
        name: number_at_least(raw, path, name, getattr(defaults, name), 0)
        for name in (
            "allgather_bucket_size",
            "stage3_prefetch_bucket_size",
            "stage3_param_persistence_threshold",
            "stage3_max_live_parameters",
            "stage3_max_reuse_distance",
            "sub_group_size",
        )
    }
    bools = {
        name: typed(raw, path, name, bool, getattr(defaults, name))
        for name in ("overlap_comm", "contiguous_gradients", "stage3_gather_16bit_weights_on_model_save")
    }
    return ZeroSection(
        stage=stage,
        offload_optimizer=_offload(raw.get("offload_optimizer"), f"{path}.offload_optimizer",
                                   written_as.get("offload_optimizer")),
        offload_param=_offload(raw.get("offload_param"), f"{path}.offload_param", written_as.get("offload_param")),
        **ints,
        **bools,
    )


def _monitor(raw: dict | None, path: str) -> MonitorSection:
    raw = raw or {}
    check_keys(raw, path, {"enabled", "output_path", "job_name"}, {})
    return MonitorSection(
        typed(raw, path, "enabled", bool, False),
        typed(raw, path, "output_path", str, ""),
        typed(raw, path, "job_name", str, "DeepSpeedJobName"),
    )


# ---- the batch triple -------------------------------------------------------------------------
def solve_batch_triple(train: int | None, micro: int | None, gas: int | None, dp_size: int) -> tuple[int, int, int]:
    """``(train_batch_size, micro_batch_per_gpu, gradient_accumulation_steps)`` from any two (DeepSpeed's rules).

    Only ``train_batch_size`` given: no accumulation; only the micro batch: no accumulation.
    Raises ConfigError naming the three values when they disagree or do not divide.
    """
    triple = ", ".join(f"{name} not given" if value is None else f"{name}={value}" for name, value in (
        ("train_batch_size", train), ("train_micro_batch_size_per_gpu", micro), ("gradient_accumulation_steps", gas)))
    # The fix when train_batch_size is given with one of the other two: a multiple of that one x DP.
    given = ("train_micro_batch_size_per_gpu", micro) if gas is None else ("gradient_accumulation_steps", gas)
    derived = (micro is None) != (gas is None)
    for name, value in (
        ("train_batch_size", train),
        ("train_micro_batch_size_per_gpu", micro),
        ("gradient_accumulation_steps", gas),
    ):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"DeepSpeed config: {name} must be a positive integer, got {value!r}")
    if train is None and micro is None:
        raise ConfigError(
            "DeepSpeed config: give train_batch_size or train_micro_batch_size_per_gpu (with "
            "gradient_accumulation_steps the other is derived)"
        )
    if train is not None and micro is not None and gas is None:
        gas = train // (micro * dp_size)
    elif train is not None and micro is None:
        gas = gas or 1
        micro = train // (gas * dp_size)
    elif train is None:
        assert micro is not None
        gas = gas or 1
        train = micro * gas * dp_size
    if not micro or not gas or train != micro * gas * dp_size:
        if derived and given[1] is not None and train is not None:
            unit = given[1] * dp_size
            raise ConfigError(
                f"DeepSpeed config: inconsistent batch sizes {triple} with {dp_size} data-parallel ranks: "
                f"train_batch_size must be a multiple of {given[0]} x {dp_size} = {unit} (e.g. "
                f"{max(1, -(-train // unit)) * unit}), or give the three so that train_batch_size = "
                f"train_micro_batch_size_per_gpu x gradient_accumulation_steps x {dp_size}")
        raise ConfigError(
            f"DeepSpeed config: inconsistent batch sizes {triple} with {dp_size} data-parallel "
            f"ranks: need train_batch_size = micro batch x gradient_accumulation_steps x {dp_size}"
        )
    return train, micro, gas


# ---- the whole file ---------------------------------------------------------------------------
TOP_LEVEL = {
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "optimizer",
    "scheduler",
    "fp16",
    "bf16",
    "gradient_clipping",
    "zero_optimization",
    "activation_checkpointing",
    "tensor_parallel",
    "steps_per_print",
    "wall_clock_breakdown",
    "tensorboard",
    "csv_monitor",
    "communication_data_type",
    "data_types",
    "dataloader_drop_last",
    # Permissions for a client optimizer under ZeRO / on the host (LLaMA-Factory's configs set both):
    # every optimizer this engine takes runs at every stage and with offload, others are refused anyway.
    "zero_allow_untested_optimizer",
    "zero_force_ds_cpu_optimizer",
}


def _old_names(raw: dict) -> dict:
    """DeepSpeed's older spelling ``"bfloat16"`` of the ``"bf16"`` section (DeepSpeed still reads it)."""
    if "bfloat16" in raw:
        if "bf16" in raw:
            raise ConfigError('DeepSpeed config: both "bf16" and its older name "bfloat16" are given; keep "bf16"')
        raw["bf16"] = raw.pop("bfloat16")
    return raw


def _refuse_duplicate_keys(path: str, pairs: list[tuple[str, Any]]) -> dict:
    """One JSON object's pairs as a dict; a key given twice is an error, as DeepSpeed's
    ``dict_raise_error_on_duplicate_keys`` (``json.load`` alone keeps the last value silently)."""
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise ConfigError(f"DeepSpeed config file {path!r} gives the key {key!r} twice in one object; keep one")
        seen[key] = value
    return seen


def read_json(config: str | os.PathLike | dict) -> dict:
    """The config as a dict: a path to a JSON file, or a dict (copied). Raises ConfigError."""
    if isinstance(config, dict):
        return _old_names(json.loads(json.dumps(config)))
    if not isinstance(config, (str, os.PathLike)):
        raise ConfigError(f"DeepSpeed config must be a path to a JSON file or a dict, got {type(config).__name__}")
    try:
        with open(config, encoding="utf-8") as f:
            data = json.load(f, object_pairs_hook=functools.partial(_refuse_duplicate_keys, os.fspath(config)))
    except FileNotFoundError:
        raise ConfigError(f"DeepSpeed config file {os.fspath(config)!r} does not exist") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"DeepSpeed config file {os.fspath(config)!r} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"DeepSpeed config file {os.fspath(config)!r} must hold a JSON object")
    return _old_names(data)


def parse_config(raw: dict, dp_size: int) -> EngineConfig:
    """Validate a config dict whose ``"auto"`` values are resolved (see :func:`load_config`)."""
    section = raw.get("checkpoint")
    if isinstance(section, dict) and section.get("load_universal") is True:
        # DeepSpeed's switch for a folder converted by ds_to_universal.py: what that conversion gives
        # (another DP / ZeRO / TP layout) is what every engine checkpoint loads into as saved.
        raise ConfigError(
            "DeepSpeed config: checkpoint.load_universal = true is not needed: engine checkpoints load at "
            "another DP size, ZeRO stage or AutoTP size as saved (no ds_to_universal step); remove it"
        )
    check_keys(raw, "", TOP_LEVEL, keys.NOT_IMPLEMENTED_TOP)
    for permission in ("zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer"):
        typed(raw, "", permission, bool, None)
    for key, _ in find_auto(raw)[:1]:
        from megatron_core.engine.auto import ARG_OF_KEY  # noqa: PLC0415 - auto imports this module's names

        source = f"args.{ARG_OF_KEY[key]}" if key in ARG_OF_KEY else "the value"
        raise ConfigError(
            f'DeepSpeed config: {key} is "auto" and nothing resolves it; pass args= with {source} '
            f"to initialize(), or write the value in the file"
        )
    train, micro, gas = solve_batch_triple(
        raw.get("train_batch_size"),
        raw.get("train_micro_batch_size_per_gpu"),
        raw.get("gradient_accumulation_steps"),
        dp_size,
    )
    bf16 = raw.get("bf16") or {}
    check_keys(bf16, "bf16", {"enabled"}, keys.NOT_IMPLEMENTED_BF16)
    check_keys(
        raw.get("activation_checkpointing") or {},
        "activation_checkpointing",
        set(),
        keys.NOT_IMPLEMENTED_ACTIVATION_CHECKPOINTING,
    )
    tp = raw.get("tensor_parallel") or {}
    check_keys(tp, "tensor_parallel", {"autotp_size"}, keys.NOT_IMPLEMENTED_TENSOR_PARALLEL)
    config = EngineConfig(
        train,
        micro,
        gas,
        dp_size,
        _optimizer(raw.get("optimizer")),
        scheduler_section(raw.get("scheduler")),
        _fp16(raw.get("fp16") or {}),
        typed(bf16, "bf16", "enabled", bool, False),
        typed(raw, "", "gradient_clipping", float, 1.0),  # unchecked, as DeepSpeed: <= 0 clips nothing
        _zero(raw.get("zero_optimization", {})),
        number_at_least(tp, "tensor_parallel", "autotp_size", 1, 1),
        number_at_least(raw, "", "steps_per_print", 10, 1),
        typed(raw, "", "wall_clock_breakdown", bool, False),
        _monitor(raw.get("tensorboard"), "tensorboard"),
        _monitor(raw.get("csv_monitor"), "csv_monitor"),
    )
    if config.fp16.enabled and config.bf16_enabled:
        raise ConfigError("DeepSpeed config: fp16.enabled and bf16.enabled are both true; enable one")
    config.communication_data_type = keys.communication_data_type(raw, config.fp16.enabled, config.bf16_enabled)
    config.grad_accum_dtype = keys.grad_accum_dtype(raw, config.fp16.enabled, config.bf16_enabled,
                                                    config.communication_data_type)
    config.dataloader_drop_last = typed(raw, "", "dataloader_drop_last", bool, False)
    return config


def find_auto(node: Any, path: str = "") -> list[tuple[str, Any]]:
    """``(dotted key, "auto")`` for every value of ``node`` still ``"auto"``, in the file's order."""
    if isinstance(node, dict):
        return [hit for k, v in node.items() for hit in find_auto(v, keys.where(path, k))]
    return [(path, node)] if node == "auto" else []


def load_config(config: str | os.PathLike | dict, dp_size: int, model: Any = None, args: Any = None) -> EngineConfig:
    """Read, resolve ``"auto"`` from ``model``/``args`` (Hugging Face's rules), validate. Raises ConfigError."""
    from megatron_core.engine.auto import resolve_auto  # noqa: PLC0415 - auto imports this module's names

    return parse_config(resolve_auto(read_json(config), model, args), dp_size)
