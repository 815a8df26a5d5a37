"""``megatron_core.initialize``: DeepSpeed's ``deepspeed.initialize`` on the library's parts.

Order of construction (each a short step): process group (torchrun's variables, or one process),
``ParallelState`` (AutoTP size x DP), config (``"auto"`` resolved, validated, batch triple solved for
the DP size), AutoTP layer swap, dtype and device, ``DistributedDataParallel`` (ZeRO stage from the
config), ``get_megatron_optimizer``, scheduler, data loader.
"""

from __future__ import annotations

import argparse
import atexit
import os
import sys
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from megatron_core import device as device_mod
from megatron_core.distributed import DistributedDataParallel
from megatron_core.engine.client_objects import (
    check_model_parameters,
    model_param_groups,
    optimizer_config_from_client,
    param_groups_of,
    share_param_groups,
)
from megatron_core.engine.config import EngineConfig, load_config, read_json
from megatron_core.engine.config_keys import json_object
from megatron_core.engine.engine import Engine
from megatron_core.engine.library_configs import as_deepspeed_keys, ddp_config_from, optimizer_config_from
from megatron_core.engine.lr_schedules import build_scheduler
from megatron_core.errors import ConfigError, report_uncaught_config_errors
from megatron_core.optimizer import get_megatron_optimizer
from megatron_core.parallel_state import ParallelState
from megatron_core.training.agreement import agreed
from megatron_core.training.initialize import initialize_distributed


def add_config_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add DeepSpeed's flags to a user's parser: ``--deepspeed``, ``--deepspeed_config FILE`` and the deprecated
    ``--deepscale`` / ``--deepscale_config FILE``, as ``deepspeed.add_config_arguments`` (no ``--local_rank``:
    a script defines its own, before or after this call, and torchrun passes ``LOCAL_RANK`` in the environment)."""
    group = parser.add_argument_group("DeepSpeed-style engine")
    group.add_argument("--deepspeed", action="store_true", help="train through megatron_core.initialize")
    group.add_argument(
        "--deepspeed_config", "--deepspeed-config", default=None, type=str, help="DeepSpeed JSON config file"
    )
    group.add_argument("--deepscale", action="store_true", help="deprecated name of --deepspeed")
    group.add_argument("--deepscale_config", default=None, type=str, help="deprecated name of --deepspeed_config")
    return parser


def _config_source(config: Any, args: Any) -> Any:
    from_args = getattr(args, "deepspeed_config", None) if args is not None else None
    old_name = getattr(args, "deepscale_config", None) if args is not None else None
    if from_args and old_name:
        raise ConfigError("initialize: both --deepspeed_config and its deprecated name --deepscale_config are "
                          "given; keep --deepspeed_config")
    from_args = from_args or old_name
    if config is not None:
        if from_args:
            raise ConfigError(
                "initialize: give the DeepSpeed config either as config= or as args.deepspeed_config, not both"
            )
        return config
    if from_args:
        return from_args
    raise ConfigError("initialize: no DeepSpeed config; pass config=PATH_OR_DICT or args with --deepspeed_config FILE")


def _autotp_size(raw: dict) -> int:
    size = json_object(raw.get("tensor_parallel"), "tensor_parallel").get("autotp_size", 1)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigError(f"DeepSpeed config: tensor_parallel.autotp_size must be a positive integer, got {size!r}")
    world = dist.get_world_size()
    if world % size:
        raise ConfigError(f"DeepSpeed config: tensor_parallel.autotp_size {size} does not divide the {world} ranks")
    return size


def _prepare_model(model: torch.nn.Module, config: EngineConfig, parallel_state: ParallelState) -> torch.nn.Module:
    if config.autotp_size > 1:
        from megatron_core.engine.autotp import apply_autotp  # noqa: PLC0415 - needs transformers' model classes

        model = apply_autotp(model, parallel_state)
    model = model.to(device_mod.current_device())
    dtype = torch.float16 if config.fp16.enabled else torch.bfloat16 if config.bf16_enabled else None
    if dtype is not None:
        # Parameters only, as DeepSpeed 0.19.8: buffers keep their dtype (a Llama's rotary inv_freq stays fp32;
        # rounded to bf16 it moved every loss).
        for param in model.parameters():
            if param.is_floating_point():
                param.data = param.data.to(dtype)
    return model


def _scheduler(lr_scheduler: Any, config: EngineConfig, optimizer: Any) -> Any:
    if lr_scheduler is not None and config.scheduler is not None:
        raise ConfigError("initialize: a client lr_scheduler and a 'scheduler' section in the config; give one")
    if config.scheduler is not None:
        return build_scheduler(config.scheduler.type, config.scheduler.params, optimizer)
    if lr_scheduler is not None and callable(lr_scheduler) and not hasattr(lr_scheduler, "step"):
        # DeepSpeed's callable form gets the torch optimizer (its ``basic_optimizer``): torch's schedulers
        # need one, and its param groups are the ones the library optimizer steps with.
        return lr_scheduler(optimizer.inner)
    return lr_scheduler


def init_distributed(
    dist_backend: str | None = None,
    auto_mpi_discovery: bool = True,
    distributed_port: int | None = None,
    verbose: bool = True,
    timeout: timedelta = timedelta(minutes=30),
    init_method: str | None = None,
    dist_init_required: bool | None = None,
    config: Any = None,
    rank: int = -1,
    world_size: int = -1,
) -> None:
    """DeepSpeed's ``deepspeed.init_distributed``: make the default process group (a no-op when one exists).

    The backend is ``dist_backend`` or the device's (NCCL with CUDA, else gloo); ``init_method`` with
    ``rank`` and ``world_size`` are passed to ``init_process_group``; without it, torchrun's variables
    or a one-process group (as :func:`initialize`). A group made here is torn down at exit after a
    barrier, as the one :func:`initialize` makes. DeepSpeed's MPI discovery is not done: processes
    started by mpirun or srun without torchrun's variables are an error (``check_launcher``);
    ``auto_mpi_discovery``, ``distributed_port``, ``verbose`` and ``config`` are accepted for
    compatibility. Raises ConfigError for a backend this machine cannot run.
    """
    report_uncaught_config_errors()
    if dist.is_initialized() or dist_init_required is False:
        return
    backend = dist_backend or device_mod.default_backend()
    if backend == "nccl" and not device_mod.cuda_available():
        raise ConfigError("init_distributed: dist_backend='nccl' needs CUDA, which this machine lacks; drop "
                          "dist_backend (gloo is picked on CPU)")
    if init_method is None:
        context = initialize_distributed(backend, timeout_minutes=timeout.total_seconds() / 60)
        owns = context.owns_process_group
    else:
        if rank < 0 or world_size < 1:
            raise ConfigError(f"init_distributed: init_method={init_method!r} needs rank= and world_size= "
                              f"(got {rank} and {world_size})")
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size, timeout=timeout)
        device_mod.set_local_device(int(os.environ.get("LOCAL_RANK", "0")))
        owns = True
    if owns:
        atexit.register(_shutdown_at_exit, None)


def _shutdown_at_exit(parallel_state: ParallelState | None) -> None:
    """At interpreter exit, what ``pretrain_gpt.py``'s ``finally`` does (``training.initialize.shutdown``).

    DeepSpeed-style scripts end without tearing the process group down; gloo then destroys its
    connections while a peer may still be using them, and about one exit in four aborted with C++'s
    "terminate called without an active exception" (SIGABRT). On a clean exit every rank first meets
    at a barrier, then the engine's groups and the default group are destroyed. After an uncaught
    exception (``sys.last_value`` is set before ``atexit`` runs), or when the barrier finds a peer gone,
    nothing is done: the failing rank's own error is the message.
    """
    if not dist.is_initialized():
        return
    failed = getattr(sys, "last_value", None) is not None or getattr(sys, "last_exc", None) is not None
    if failed:
        return
    if dist.get_world_size() > 1:
        try:
            dist.barrier()
        except RuntimeError:  # a peer failed (its own error says why): nothing left to tear down in order
            return
    if parallel_state is not None:
        parallel_state.destroy()
    dist.destroy_process_group()  # the default group and any left (init_distributed's: the engine's too)


def _check_arguments(model: Any, config: Any, config_params: Any, mpu: Any, mesh_param: Any,
                     dist_init_required: bool | None) -> None:
    """:func:`initialize`'s argument checks (ConfigError, one line each)."""
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"initialize: model= must be a torch.nn.Module, got {type(model).__name__}")
    if config is not None and config_params is not None:
        raise ConfigError("initialize: give config= or config_params=, not both")
    for name, value in (("mpu", mpu), ("mesh_param", mesh_param)):
        if value is not None:
            raise ConfigError(f"initialize: {name}= (model-parallel groups made outside) is not implemented; drop it "
                              f"and use the config's tensor_parallel.autotp_size for tensor parallelism")
    if dist_init_required is False and not dist.is_initialized():
        raise ConfigError("initialize: dist_init_required=False but no process group exists; call "
                          "torch.distributed.init_process_group first or drop the argument")


def initialize(
    model: torch.nn.Module,
    optimizer: Any = None,
    model_parameters: Any = None,
    lr_scheduler: Any = None,
    training_data: Any = None,
    collate_fn: Any = None,
    config: Any = None,
    args: Any = None,
    config_params: Any = None,
    dist_init_required: bool | None = None,
    distributed_port: int | None = None,
    mpu: Any = None,
    mesh_param: Any = None,
) -> tuple[Engine, Any, Any, Any]:
    """Wrap ``model`` for training from a DeepSpeed config; returns ``(engine, optimizer, dataloader, lr_scheduler)``.

    ``config``: a path to a DeepSpeed JSON file or a dict (``config_params`` is DeepSpeed's older name;
    ``args.deepspeed_config`` is read when neither is given). ``args`` also resolves ``"auto"`` values
    (Hugging Face ``TrainingArguments`` names). ``optimizer``: None (the config's ``optimizer`` section)
    or a torch AdamW / Adam without decay / SGD whose settings are used. ``model_parameters`` must be
    the model's trainable parameters (tensors, ``(name, tensor)`` pairs or group dicts with a ``weight_decay``;
    frozen ones among them are left out, as DeepSpeed).
    The optimizer's param groups are DeepSpeed's: the client optimizer's, else those of ``model_parameters``
    (all parameters when None), a plain list being one group whose every parameter, biases and norm weights
    included, is decayed by the optimizer's ``weight_decay``. ``lr_scheduler``: an object with ``step()``, or a callable
    ``fn(optimizer)``. ``training_data``: a map-style dataset, sharded over DP ranks with a
    ``DistributedSampler`` and batched by ``train_micro_batch_size_per_gpu`` (``dataloader_drop_last``: without
    each rank's last, short batch).
    DeepSpeed's ``dist_init_required`` (False: the caller has made the process group) and
    ``distributed_port`` (torchrun's ``MASTER_PORT`` is what is used) are accepted; ``mpu`` and
    ``mesh_param`` (external model-parallel groups) are not implemented.
    Raises ConfigError (one line) for every configuration problem.
    """
    report_uncaught_config_errors()
    _check_arguments(model, config, config_params, mpu, mesh_param, dist_init_required)
    # The CLI's process-group setup (torchrun's env:// or one process; cores shared among local
    # ranks; a launcher watchdog); a no-op past binding the device when the user made the group.
    context = initialize_distributed(device_mod.default_backend(), timeout_minutes=30.0)
    raw = read_json(_config_source(config if config is not None else config_params, args))
    tp = _autotp_size(raw)
    parallel_state = ParallelState(tensor_model_parallel_size=tp)
    if context.owns_process_group:
        atexit.register(_shutdown_at_exit, parallel_state)
    engine_config = load_config(raw, parallel_state.dp_size, model, args)
    opt_config = optimizer_config_from(engine_config)
    if optimizer is not None:
        if engine_config.optimizer is not None:
            raise ConfigError("initialize: a client optimizer and an 'optimizer' section in the config; give one")
        opt_config = optimizer_config_from_client(optimizer, opt_config, model)
    elif engine_config.optimizer is None:
        raise ConfigError("initialize: no optimizer; add an 'optimizer' section to the config or pass optimizer=")
    if model_parameters is not None:
        model_parameters = list(model_parameters)  # model.parameters() is read twice (DeepSpeed lists it too)
    check_model_parameters(model_parameters, model)
    groups = param_groups_of(model_parameters, optimizer, model, opt_config.weight_decay)
    to_dict = getattr(getattr(model, "config", None), "to_dict", None)
    hf_config = to_dict() if callable(to_dict) else None  # a transformers model: consolidation writes an HF folder
    model = _prepare_model(model, engine_config, parallel_state)
    # agreed: a model that differs within some DP groups only (AutoTP) stops every rank, not only those groups'
    ddp = agreed(DistributedDataParallel, ddp_config_from(engine_config), model, parallel_state)
    try:
        megatron_optimizer = get_megatron_optimizer(opt_config, [ddp], parallel_state,
                                                    model_param_groups(groups, model))
    except ConfigError as exc:  # the same error on every rank (the NVMe checks agree across ranks)
        raise as_deepspeed_keys(exc) from None
    if optimizer is not None:
        share_param_groups(optimizer, megatron_optimizer.param_groups)
    scheduler = _scheduler(lr_scheduler, engine_config, megatron_optimizer)
    engine = Engine(ddp, megatron_optimizer, scheduler, engine_config, parallel_state, hf_config)
    engine.collate_fn = collate_fn
    engine.client_optimizer_name = None if optimizer is None else type(optimizer).__name__
    engine.param_group_names = [names for names, _ in groups]  # DeepSpeed's optimizer numbering (its checkpoints)
    loader = None if training_data is None else engine.deepspeed_io(training_data)
    return engine, megatron_optimizer, loader, scheduler
