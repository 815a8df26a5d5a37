"""Optimizer state per parameter, in the parameter's (TP-local) shape, whatever the ZeRO stage.

Under ZeRO-1/2 each DP rank owns flat pieces of the buffers; they are gathered over DP into whole
per-parameter tensors before saving and cut back to this rank's pieces after loading (Megatron-LM's
``dp_zero_gather_scatter`` layout). A checkpoint therefore does not depend on the DP size, the ZeRO
stage or the bucket layout, and resumes under any of them.
"""
from __future__ import annotations

import contextlib
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


def _resident(optimizer: Any) -> Any:
    """The optimizer's state in memory inside the block (NVMe offload swaps it out between steps)."""
    resident = getattr(optimizer, "resident", None)
    return resident() if resident is not None else contextlib.nullcontext()


def gather_param_states(optimizer: Any, parallel_state: ParallelState
                        ) -> tuple[dict[int, dict[str, torch.Tensor]], list[str], float]:
    """``({id(model param): {"main": fp32, key: tensor}}, keys, step)``: every tensor shaped like its
    parameter (this TP rank's part). Collective over the world (and the DP group under ZeRO)."""
    with _resident(optimizer):
        return _gather_param_states(optimizer, parallel_state)


def _gather_param_states(optimizer: Any, parallel_state: ParallelState
                         ) -> tuple[dict[int, dict[str, torch.Tensor]], list[str], float]:
    keys = _per_param_keys(optimizer, parallel_state)
    step = _step(optimizer)
    out: dict[int, dict[str, torch.Tensor]] = {}
    if hasattr(optimizer, "sharded"):
        for sb in optimizer.sharded:
            buffer = sb.buffer
            flats = {k: torch.zeros(buffer.numel, dtype=torch.float32) for k in (MAIN, *keys)}
            for piece, main in zip(sb.pieces, sb.mains, strict=True):
                start = buffer.param_ranges[id(piece.param)][0] + piece.param_start
                flats[MAIN][start:start + piece.numel] = main.detach().reshape(-1)
                state = optimizer.inner.state.get(main, {})
                for k in keys:
                    if k in state:
                        flats[k][start:start + piece.numel] = state[k].reshape(-1)
            for flat in flats.values():
                if parallel_state.dp_size > 1:
                    all_reduce_host(flat, parallel_state.dp_group)  # each element comes from one rank
            for p in buffer.params:
                s, e, _ = buffer.param_ranges[id(p)]
                out[id(p)] = {k: flat[s:e].view(p.shape) for k, flat in flats.items()}
        return out, keys, step
    for main, model in optimizer.pairs:
        state = optimizer.inner.state.get(main, {})
        entry = {MAIN: main.detach().float().clone()}
        for k in keys:
            entry[k] = state[k].detach().clone() if k in state else torch.zeros_like(entry[MAIN])
        out[id(model)] = entry
    return out, keys, step


def scatter_param_states(optimizer: Any, states: dict[int, dict[str, torch.Tensor]], step: float) -> None:
    """Inverse of :func:`gather_param_states` on this rank's optimizer (any ZeRO stage / DP size)."""
    step_entry = {} if step < 0 else {"step": torch.tensor(step, dtype=torch.float32)}
    step_on_device = steps_on_device(optimizer.inner)
    with torch.no_grad(), _resident(optimizer):
        if hasattr(optimizer, "sharded"):
            for sb in optimizer.sharded:
                for piece, main in zip(sb.pieces, sb.mains, strict=True):
                    full = states[id(piece.param)]
                    lo, hi = piece.param_start, piece.param_end
                    main.copy_(full[MAIN].reshape(-1)[lo:hi])
                    entry = {k: v.reshape(-1)[lo:hi].view_as(main) for k, v in full.items() if k != MAIN}
                    if entry or step_entry:
                        set_state(optimizer, main, {**entry, **step_entry}, step_on_device[id(main)])
            return
        for main, model in optimizer.pairs:
            full = states[id(model)]
            if main is not model:
                main.copy_(full[MAIN])
            entry = {k: v.view_as(main) for k, v in full.items() if k != MAIN}
            if entry or step_entry:  # SGD's momentum_buffer comes without a step
                set_state(optimizer, main, {**entry, **step_entry}, step_on_device[id(main)])


def set_state(optimizer: Any, main: torch.Tensor, entry: dict[str, torch.Tensor], step_on_device: bool) -> None:
    """``optimizer.inner.state[main] = entry`` (copies), in place where the state exists: under NVMe
    offload its tensors are views of the swap buffers, which must keep being the ones the step uses."""
    state = optimizer.inner.state.get(main)
    if state and all(k in state and state[k].shape == v.shape for k, v in entry.items()):
        for k, v in entry.items():
            state[k].copy_(v)
        return
    optimizer.inner.state[main] = placed_state(entry, main, step_on_device)


def steps_on_device(inner: torch.optim.Optimizer) -> dict[int, bool]:
    """id(param) -> whether its group keeps ``step`` on the parameter's device (fused or capturable)."""
    return {id(p): bool(g.get("fused") or g.get("capturable")) for g in inner.param_groups for p in g["params"]}


def placed_state(entry: dict[str, torch.Tensor], main: torch.Tensor, step_on_device: bool) -> dict[str, torch.Tensor]:
    """Copies of loaded (CPU) state tensors where torch's ``Optimizer.load_state_dict`` puts them: on
    the parameter's device, except ``step``, a CPU scalar unless ``step_on_device`` (torch's fused
    AdamW needs it on the parameter's device)."""
    return {k: v.clone() if k == "step" and not step_on_device else v.to(device=main.device, copy=True)
            for k, v in entry.items()}


def common_optimizer_state(optimizer: Any) -> dict:
    """What every rank shares: the loss scaler and each group's hyper-parameters (not the parameters)."""
    return {"grad_scaler": optimizer._common_state()["grad_scaler"],
            "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in optimizer.inner.param_groups]}


def load_common_optimizer_state(optimizer: Any, state: dict) -> None:
    """Restore :func:`common_optimizer_state` (groups matched in order)."""
    optimizer._load_common_state({"grad_scaler": state["grad_scaler"]})
    for group, saved in zip(optimizer.inner.param_groups, state["param_groups"], strict=False):
        group.update(saved)
