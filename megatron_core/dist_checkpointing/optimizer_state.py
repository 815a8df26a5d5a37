"""Optimizer state per parameter piece, for the torch_dist checkpoint, whatever the ZeRO stage.

Under ZeRO-1/2/3 each DP rank owns flat pieces of the buffers (``ShardPiece``): it writes and reads
exactly those, as chunks of the per-parameter global tensors (``sharded.piece_slices``; Megatron-LM's
``fully_sharded_model_space``, DeepSpeed's per-rank shards), without gathering anything over DP. The
global tensors are the parameter's shape, as before, so a checkpoint does not depend on the DP size,
the ZeRO stage or the bucket layout, and resumes under any of them.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from megatron_core.collectives import all_reduce_host
from megatron_core.parallel_state import ParallelState

MAIN = "main"  # the fp32 main parameter


def _per_param_keys(optimizer: Any, parallel_state: ParallelState) -> list[str]:
    """The per-element state keys (``exp_avg``, ``exp_avg_sq``, ``momentum_buffer``), agreed on by all ranks."""
    keys: set[str] = set()
    for state in optimizer.inner.state.values():
        keys.update(k for k, v in state.items() if torch.is_tensor(v) and v.dim() > 0)
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, sorted(keys))
    return sorted(set().union(*everyone))


def _step(optimizer: Any) -> float:
    """The optimizer's step count (the same for every parameter), -1 before the first step; agreed on by all ranks."""
    step = -1.0
    for state in optimizer.inner.state.values():
        if "step" in state:
            step = max(step, float(state["step"]))
    value = torch.tensor([step], dtype=torch.float64)
    all_reduce_host(value, op=dist.ReduceOp.MAX)
    return float(value.item())


def resident_state(optimizer: Any) -> Any:
    """The optimizer's state in memory inside the block (NVMe offload swaps it out between steps)."""
    resident = getattr(optimizer, "resident", None)
    return resident() if resident is not None else contextlib.nullcontext()


@dataclass
class StatePiece:
    """Elements ``[start, end)`` of a (TP-local) model parameter flattened, as this rank's optimizer holds them.

    Under ZeRO-1/2/3 the piece of the parameter inside this rank's shard (``ShardPiece``); without
    ZeRO the whole parameter.
    """

    param: torch.nn.Parameter
    main: torch.Tensor  # the optimizer's main parameter for these elements (the parameter itself in fp32 without ZeRO)
    start: int
    end: int
    model: torch.Tensor  # the model's values of these elements, flat: a view of the parameter or of its shard


def state_pieces(optimizer: Any) -> list[StatePiece]:
    """Every main parameter of ``optimizer`` (a MegatronOptimizer or DistributedOptimizer) as a :class:`StatePiece`."""
    if not hasattr(optimizer, "sharded"):
        return [StatePiece(model, main, 0, model.numel(), model.detach().reshape(-1))
                for main, model in optimizer.pairs]
    out = []
    for sb in optimizer.sharded:
        for piece, main in zip(sb.pieces, sb.mains, strict=True):
            offset = piece.shard_start - piece.bucket.local_offset
            model = sb.buffer.shard_param(piece.bucket)[offset:offset + piece.numel]
            out.append(StatePiece(piece.param, main, piece.param_start, piece.param_end, model))
    return out


def param_state_pieces(optimizer: Any, parallel_state: ParallelState, copy: bool
                       ) -> tuple[list[tuple[StatePiece, dict[str, torch.Tensor]]], list[str], float]:
    """``([(piece, {"main": fp32, key: state})], keys, step)``: each tensor flat (``end - start``
    elements), a view of the optimizer's own (``copy``: a copy), zeros for a state not created yet.
    Only this rank's shard is read: nothing is gathered over DP. Collective over the world (the keys
    and the step are agreed on). Call inside ``optimizer.resident()`` and write before leaving it
    (NVMe offload swaps the state out on exit)."""
    keys = _per_param_keys(optimizer, parallel_state)
    step = _step(optimizer)
    sharded = hasattr(optimizer, "sharded")
    out = []
    for piece in state_pieces(optimizer):
        state = optimizer.inner.state.get(piece.main, {})
        flat = {MAIN: piece.main.detach().float().reshape(-1)}
        for k in keys:
            value = state[k].detach().reshape(-1) if k in state else torch.zeros(piece.end - piece.start)
            flat[k] = value.float() if sharded else value  # ZeRO-1/2/3's state was always saved as fp32
        out.append((piece, {k: v.clone() for k, v in flat.items()} if copy else flat))
    return out, keys, step


def state_targets(optimizer: Any, keys: list[str]) -> list[tuple[StatePiece, dict[str, torch.Tensor]]]:
    """Zeroed fp32 tensors for :func:`param_state_pieces`'s entries, to load into (this rank's pieces only)."""
    return [(piece, {k: torch.zeros(piece.end - piece.start, dtype=torch.float32) for k in (MAIN, *keys)})
            for piece in state_pieces(optimizer)]


def scatter_param_states(optimizer: Any, loaded: list[tuple[StatePiece, dict[str, torch.Tensor]]],
                         step: float) -> None:
    """Put :func:`state_targets`'s loaded tensors into this rank's optimizer (main parameters and state)."""
    step_entry = {} if step < 0 else {"step": torch.tensor(step, dtype=torch.float32)}
    step_on_device = steps_on_device(optimizer.inner)
    with torch.no_grad(), resident_state(optimizer):
        for piece, flat in loaded:
            main = piece.main
            if main is not piece.param:
                main.copy_(flat[MAIN].view_as(main))
            entry = {k: v.view_as(main) for k, v in flat.items() if k != MAIN}
            if entry or step_entry:  # SGD's momentum_buffer comes without a step
                set_state(optimizer, main, {**entry, **step_entry}, step_on_device[id(main)], owned=True)


def set_state(optimizer: Any, main: torch.Tensor, entry: dict[str, torch.Tensor], step_on_device: bool,
              owned: bool = False) -> None:
    """``optimizer.inner.state[main] = entry`` (copies), in place where the state exists: under NVMe
    offload its tensors are views of the swap buffers, which must keep being the ones the step uses.
    ``owned``: the entry's tensors other than ``step`` are the caller's fresh ones, kept without a copy
    where they already are on the parameter's device (a load's targets: no second copy of the state)."""
    state = optimizer.inner.state.get(main)
    if state and all(k in state and state[k].shape == v.shape for k, v in entry.items()):
        for k, v in entry.items():
            state[k].copy_(v)
        return
    optimizer.inner.state[main] = placed_state(entry, main, step_on_device, copy=not owned)


def steps_on_device(inner: torch.optim.Optimizer) -> dict[int, bool]:
    """id(param) -> whether its group keeps ``step`` on the parameter's device (fused or capturable)."""
    return {id(p): bool(g.get("fused") or g.get("capturable")) for g in inner.param_groups for p in g["params"]}


def placed_state(entry: dict[str, torch.Tensor], main: torch.Tensor, step_on_device: bool,
                 copy: bool = True) -> dict[str, torch.Tensor]:
    """Loaded (CPU) state tensors where torch's ``Optimizer.load_state_dict`` puts them: on the
    parameter's device, except ``step``, a CPU scalar unless ``step_on_device`` (torch's fused AdamW
    needs it on the parameter's device). ``step`` is always a copy (one per parameter); the others are
    copies unless ``copy`` is False (then moved only where they are not on the device already)."""
    def placed(k: str, v: torch.Tensor) -> torch.Tensor:
        if k == "step":
            return v.to(device=main.device, copy=True) if step_on_device else v.clone()
        return v.to(device=main.device, copy=copy)
    return {k: placed(k, v) for k, v in entry.items()}


def common_optimizer_state(optimizer: Any) -> dict:
    """What every rank shares: the loss scaler and each group's hyper-parameters (not the parameters)."""
    return {"grad_scaler": optimizer._common_state()["grad_scaler"],
            "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in optimizer.inner.param_groups]}


def load_common_optimizer_state(optimizer: Any, state: dict) -> None:
    """Restore :func:`common_optimizer_state` (groups matched in order)."""
    optimizer._load_common_state({"grad_scaler": state["grad_scaler"]})
    for group, saved in zip(optimizer.inner.param_groups, state["param_groups"], strict=False):
        group.update(saved)
