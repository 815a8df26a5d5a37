"""``megatron_core.zero.GatheredParameters``: DeepSpeed's ``deepspeed.zero.GatheredParameters``.

Under ZeRO-3 (``DistributedDataParallelConfig.zero_stage == 3``, the engine's ``"stage": 3``) a
parameter holds its full value only while a module that uses it runs: outside forward and backward
its storage is freed and this rank keeps a 1/DP shard. This context gathers the given parameters
for reading (or changing) outside a forward pass::

    with megatron_core.zero.GatheredParameters(engine.module.lm_head.weight):
        norm = engine.module.lm_head.weight.norm()  # the full weight on every rank

    with megatron_core.zero.GatheredParameters(list(block.parameters()), modifier_rank=0):
        if torch.distributed.get_rank() == 0:
            block.weight.mul_(0.5)  # rank 0's values are broadcast and re-sharded on exit

Parameters not under ZeRO-3 (other stages, modules not wrapped) are full already: the context does
nothing for them, as DeepSpeed's. Entering is a collective over the data-parallel group (every rank must
enter with the same parameters), and no optimizer step (nor a ``load_checkpoint`` that restores the
optimizer) may run inside the block. A checkpoint is saved after a ``modifier_rank`` block, not inside
it (``save_checkpoint`` there is a ConfigError): inside, rank R's changes are in its gathered parameters
only, not yet in the shards or the optimizer.

:func:`safe_get_full_grad` is DeepSpeed's ``deepspeed.utils.safe_get_full_grad``: under ZeRO-2/3 a
parameter's reduced gradient lives in pieces on the DP ranks (``param.main_grad`` is freed once its
bucket is reduced), and this assembles it.

:func:`register_external_parameter` is DeepSpeed's too: a module whose forward reads another
module's parameter as an attribute (not as an argument) must say so. ``deepspeed.zero.Init`` has no
counterpart (an AttributeError says why): the model is built whole and ``initialize`` shards it.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist

from megatron_core.distributed.param_and_grad_buffer import GRAD_BUFFER_ATTR, MAIN_GRAD_ATTR
from megatron_core.distributed.param_gather import GATHER_MANAGER_ATTR, ParamGatherManager, Unit
from megatron_core.errors import ConfigError


class GatheredParameters:
    """Full values of ZeRO-3 ``params`` inside the block (DeepSpeed's argument names and meaning).

    ``params``: a parameter or an iterable of them (None entries are skipped). ``modifier_rank``:
    None to read only (changes are dropped on exit, with the gathered storage), or the data-parallel
    rank whose values are kept (its global rank without tensor parallelism, as in DeepSpeed): on
    exit they are broadcast over the data-parallel group, become every rank's kept shard, and the
    distributed optimizer's fp32 main copy follows, so training continues from them. ``fwd_module``
    (DeepSpeed's registration of parameters used outside their module) is accepted and not needed:
    any module's forward gathers a managed parameter passed to it. ``enabled=False`` makes the block do nothing.
    """

    def __init__(self, params: torch.Tensor | Iterable[torch.Tensor | None] | None, modifier_rank: int | None = None,
                 fwd_module: Any = None, enabled: bool = True) -> None:
        del fwd_module
        if params is None or isinstance(params, torch.Tensor):
            params = [params]  # None (e.g. a module's absent bias) is not a ZeRO-3 parameter, as in DeepSpeed
        self.modifier_rank = modifier_rank
        members: dict[int, tuple[ParamGatherManager, list[torch.Tensor]]] = {}  # by manager
        for p in params if enabled else ():
            manager = getattr(p, GATHER_MANAGER_ATTR, None)  # None for a parameter not under ZeRO-3
            if p is not None and manager is not None:
                members.setdefault(id(manager), (manager, []))[1].append(p)
        # (manager, its units holding the parameters, the parameters)
        self.groups: list[tuple[ParamGatherManager, list[Unit], list[torch.Tensor]]] = [
            (manager, manager.units_of(ps), ps) for manager, ps in members.values()]

    def __enter__(self) -> None:
        for manager, units, _ in self.groups:
            manager.pin(units, modifies=self.modifier_rank is not None)

    def __exit__(self, exc_type, exc, tb) -> None:
        for manager, units, members in self.groups:
            try:
                if exc_type is None and self.modifier_rank is not None:
                    with torch.no_grad():
                        group = units[0][0].dp_group
                        source = dist.get_global_rank(group, self.modifier_rank)
                        for p in members:
                            dist.broadcast(p.data, src=source, group=group)
                        for buffer, bucket in units:
                            buffer.write_shard(bucket)
            finally:
                manager.unpin(units, modifies=self.modifier_rank is not None)


def refuse_inside_gathered_block(ddp: Any, what: str, cause: str, after: str) -> None:
    """ConfigError (one line) when ``ddp`` (the DDP wrapper, or None) has a :class:`GatheredParameters` block open:
    ``cause`` (an optimizer step, or a checkpoint load restoring the optimizer) frees every gathered bucket, the
    block's too; its parameters then had no storage, and a ``modifier_rank`` block's broadcast on exit crashed gloo
    ('writev: Bad address'). ``what`` names the call, ``after`` is the fix the line ends with."""
    gather = getattr(ddp, "param_gather", None)
    if gather is not None and gather.pinned:
        raise ConfigError(f"{what} inside a megatron_core.zero.GatheredParameters block: {cause} re-shards the "
                          f"parameters the block holds; {after}")


def register_external_parameter(module: torch.nn.Module, parameter: torch.Tensor) -> None:
    """Gather ``parameter`` whenever ``module`` (part of the wrapped model) runs forward, although it
    belongs to another module (DeepSpeed's ``deepspeed.zero.register_external_parameter``). Forward
    hooks gather a module's own parameters and managed parameters passed to it as arguments; one read
    as ``self.other.weight`` inside ``forward`` needs this. A no-op for parameters not under ZeRO-3.
    Raises ValueError when ``module`` is not part of the model that holds ``parameter``."""
    manager = getattr(parameter, GATHER_MANAGER_ATTR, None)
    if manager is not None:
        manager.add_external(module, parameter)


def __getattr__(name: str) -> Any:
    if name == "Init":
        raise AttributeError("megatron_core.zero.Init (deepspeed.zero.Init) has no counterpart: build the model "
                             "whole on each rank and pass it to megatron_core.initialize, which shards it at ZeRO-3")
    raise AttributeError(f"module 'megatron_core.zero' has no attribute {name!r}")


def _not_available(stage: int) -> ConfigError:
    return ConfigError(f"safe_get_full_grad: under ZeRO stage {stage} gradients are only available immediately "
                       f"after backward and before engine step (as in DeepSpeed); call it between "
                       f"engine.backward(loss) at the gradient accumulation boundary and engine.step()")


def safe_get_full_grad(param: torch.nn.Parameter) -> torch.Tensor | None:
    """The whole reduced gradient of ``param`` (DeepSpeed's ``deepspeed.utils.safe_get_full_grad``).

    Call it after ``engine.backward`` at the accumulation boundary (or after ``finalize_model_grads``)
    and before ``engine.step()``. Returns a new tensor of ``param``'s shape in the gradient buffer's
    dtype (fp32 unless gradients are reduced in bf16), averaged over data-parallel ranks and, under
    fp16, still multiplied by the loss scale (``engine.get_loss_scale()``), as the optimizer sees it
    before unscaling; None for a parameter that takes no gradient. Under ZeRO-2/3 this is a
    collective over the data-parallel group (every rank calls it for the same parameter): each rank
    holds the pieces in its shard. Elsewhere it is a copy of ``main_grad`` (or ``grad``).

    Where no backward has run since the last ``step()`` (or ever) it answers as DeepSpeed 0.19: None at
    ZeRO-0 (DeepSpeed's engine sets ``grad`` to None after the step); a ConfigError (a ValueError, DeepSpeed's
    type and words) at ZeRO-1/2, on every rank; zeros at ZeRO-3 (DeepSpeed's partition buffer before the first
    backward; after a step DeepSpeed's still holds the last step's gradient, here zeroed by the step).
    Between the micro steps of a gradient accumulation (before the boundary's backward), as DeepSpeed 0.19.8:
    ZeRO-0/1 give this rank's gradient accumulated so far (not reduced over DP), ZeRO-2 the ConfigError
    (its micro steps are reduce-scattered into the shard, DeepSpeed's not yet averaged), ZeRO-3 the
    accumulated average so far.
    """
    if not param.requires_grad:
        return None
    buffer = getattr(param, GRAD_BUFFER_ATTR, None)
    stage = None if buffer is None else buffer.config.zero_stage
    if buffer is not None and not buffer.has_grads:
        if stage in (1, 2):
            raise _not_available(stage)
        return torch.zeros(param.shape, dtype=buffer.grad_dtype, device=buffer.device) if stage == 3 else None
    if buffer is not None and stage == 2 and not buffer.synced:
        raise _not_available(stage)
    if buffer is None or not buffer.partition_grads:
        grad = getattr(param, MAIN_GRAD_ATTR, None)
        grad = param.grad if grad is None else grad
        return None if grad is None else grad.detach().clone()
    full = torch.zeros(param.numel(), dtype=buffer.grad_dtype, device=buffer.device)
    piece = buffer.local_piece(param)
    if piece is not None:
        full[piece.param_start:piece.param_end] = buffer.grad_shard[piece.shard_start:piece.shard_start + piece.numel]
    if buffer.dp_size > 1:
        dist.all_reduce(full, group=buffer.dp_group)  # every element lives on exactly one rank
    return full.view(param.shape)
