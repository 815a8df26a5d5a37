"""The optimizer state DeepSpeed 0.19.8 keeps in ``mp_rank_00_model_states.pt``'s ``optimizer`` without ZeRO.

Without ZeRO, DeepSpeed's ``_save_checkpoint`` stores ``self.optimizer.state_dict()`` in the model file, and
which optimizer that is depends on the dtype (``runtime/engine.py`` ``_do_optimizer_sanity_check``):

- fp32: the torch optimizer itself: its ``state_dict`` (``state`` numbered across the param groups in order,
  ``param_groups``); ``module`` holds the fp32 weights.
- fp16, and bf16 with gradients accumulated in bf16 (its default): ``FP16_UnfusedOptimizer`` for a torch
  optimizer (``runtime/fp16/unfused_optimizer.py`` ``state_dict``): ``optimizer_state_dict`` (the torch
  optimizer's, over the fp32 copies), ``fp32_groups`` (per param group the fp32 master copy of each parameter,
  the torch groups' order), ``dynamic_loss_scale``, ``cur_scale``, ``cur_iter`` and, for a dynamic scale,
  ``last_overflow_iter``, ``scale_factor``, ``scale_window``; ``module`` holds the fp16 / bf16 weights.

Verified against real DeepSpeed runs (``bench/ds_checkpoint_peer.py``, docs/engine.md). Not read, one line each:
``FP16_Optimizer``'s ``fp32_groups_flat`` (DeepSpeed's ``FusedAdam``, which needs a GPU) and ``BF16_Optimizer``'s
partitions in the model file (bf16 with pipeline parallelism).
"""

from __future__ import annotations

from typing import Any

import torch

from megatron_core.errors import ConfigError

# The optimizer state this engine's Adam / AdamW and SGD keep per element (torch's names, also DeepSpeed's).
ELEMENT_STATE = ("exp_avg", "exp_avg_sq", "momentum_buffer")
FIX = "load it into DeepSpeed, or write its weights with the zero_to_fp32.py beside it and load them before initialize"


def scalars(state: dict) -> dict:
    """The per-parameter scalars of a torch optimizer's state (Adam's ``step``), refusing unknown tensors."""
    return {k: torch.as_tensor(v).clone() for k, v in state.items()
            if k not in ELEMENT_STATE and (not torch.is_tensor(v) or v.dim() == 0)}


def torch_state_dict(saved: dict, path: str) -> tuple[dict, list[torch.Tensor] | None]:
    """``(torch optimizer state_dict, fp32 master copies in its parameter order or None)`` of the model file's
    ``optimizer``: None for fp32 training, where ``module`` is the fp32 weights.

    Raises ConfigError (one line naming ``path``) for an optimizer layout not read here."""
    osd = saved["optimizer"]
    if isinstance(osd, dict) and "optimizer_state_dict" in osd and "fp32_groups" in osd:  # FP16_UnfusedOptimizer
        return osd["optimizer_state_dict"], [t for group in osd["fp32_groups"] for t in group]
    if isinstance(osd, dict) and "fp32_groups_flat" in osd:
        raise ConfigError(f"{path} holds DeepSpeed's FP16_Optimizer (its FusedAdam at ZeRO-0: "
                          f"'fp32_groups_flat'), a layout not verified here; {FIX}")
    if not isinstance(osd, dict) or not {"state", "param_groups"} <= set(osd):  # e.g. its BF16_Optimizer's
        raise ConfigError(f"{path}'s 'optimizer' is not a torch optimizer's state_dict (keys "
                          f"{sorted(osd)[:4] if isinstance(osd, dict) else type(osd).__name__}), a DeepSpeed layout "
                          f"not read here; {FIX}")
    return osd, None


def plain_optimizer(saved: dict, names: list[list[str]], path: str) -> tuple[dict, dict, dict]:
    """``(values, states, scalars)`` without ZeRO: per trained parameter name its flat fp32 value and optimizer
    state, and the scalars (``step``), from the model file's ``optimizer`` (its params numbered across groups in
    order, DeepSpeed's grouping: ``names``)."""
    osd, masters = torch_state_dict(saved, path)
    order = [n for group in names for n in group]
    numbered = [i for group in osd["param_groups"] for i in group["params"]]
    if len(numbered) != len(order) or (masters is not None and len(masters) != len(order)):
        raise ConfigError(f"{path}'s optimizer has {len(numbered)} parameters, this engine trains "
                          f"{len(order)}; give initialize the saving run's model and model_parameters")
    if masters is None:  # fp32: the weights are the masters; a name the file lacks (another model) is left out,
        masters = [saved["module"].get(n) for n in order]  # for the module load to report by its keys
    values = {n: m.detach().float().reshape(-1).clone() for n, m in zip(order, masters, strict=True) if m is not None}
    states: dict[str, dict[str, torch.Tensor]] = {}
    found: dict = {}
    for index, name in zip(numbered, order, strict=True):
        if name not in values:
            continue
        entry = osd["state"].get(index, {})
        states[name] = {k: v.reshape(-1).clone() for k, v in entry.items() if k in ELEMENT_STATE}
        found = found or scalars(entry)
    return values, states, found


def param_groups(saved: dict) -> list[dict]:
    """The torch optimizer's param groups of the model file's ``optimizer`` (after :func:`plain_optimizer`)."""
    osd = saved["optimizer"]
    return (osd["optimizer_state_dict"] if "optimizer_state_dict" in osd else osd)["param_groups"]


def unfused_grad_scaler(saved: dict, engine: Any) -> dict | None:
    """``FP16_UnfusedOptimizer``'s loss scale as this engine's ``grad_scaler`` state, None when it holds none.

    Its ``_update_scale`` grows after ``stable_interval = cur_iter - last_overflow_iter - 1`` clean steps, as
    DeepSpeed's ``DynamicLossScaler``: ``growth_tracker`` is that count. It keeps no hysteresis (every overflow
    halves the scale), so ``hysteresis_tracker`` is 1: the next overflow backs off, as it does in DeepSpeed."""
    osd = saved["optimizer"]
    if "cur_scale" not in osd or engine.optimizer.grad_scaler is None:
        return None
    if not osd.get("dynamic_loss_scale"):
        return {"scale": float(osd["cur_scale"])}
    return {"scale": float(osd["cur_scale"]),
            "growth_tracker": int(osd["cur_iter"]) - int(osd["last_overflow_iter"]) - 1, "hysteresis_tracker": 1}


def consolidated_masters(saved: dict, path: str) -> dict[str, torch.Tensor]:
    """For ``zero_to_fp32``: per parameter name (tied names too) its fp32 value without ZeRO: ``module``'s
    (fp32 training) or the ``FP16_UnfusedOptimizer``'s master copy (fp16 / bf16). Those copies are not named:
    they follow the optimizer's parameters, here taken as ``module``'s parameters in order (one param group
    over ``model.parameters()``, DeepSpeed's ``model_parameters`` default), each checked to round to ``module``'s
    bits. DeepSpeed's own zero_to_fp32.py reads no ZeRO-0 checkpoint.

    Raises ConfigError (one line naming ``path``) where a copy does not round to its parameter (another order)."""
    module, buffers = saved["module"], set(saved.get("buffer_names") or [])
    _, masters = torch_state_dict(saved, path)
    if masters is None:
        return {k: v.float() for k, v in module.items() if torch.is_floating_point(v) and k not in buffers}
    owners: dict[tuple[int, int], str] = {}  # a tied name shares its owner's storage (torch.save keeps that)
    for name, tensor in module.items():
        if name not in buffers:
            owners.setdefault((tensor.untyped_storage().data_ptr(), tensor.storage_offset()), name)
    names = list(owners.values())
    if len(names) != len(masters) or any(m.shape != module[n].shape or not torch.equal(m.to(module[n].dtype), module[n])
                                         for n, m in zip(names, masters, strict=False)):
        raise ConfigError(f"{path}'s fp32 master copies ({len(masters)}) are not its module's "
                          f"{len(names)} parameters in order (more than one param group?), not read here; load it "
                          f"into DeepSpeed or this engine and write the weights from there")
    values = {n: m.detach().float().clone() for n, m in zip(names, masters, strict=True)}
    for name, tensor in module.items():
        owner = owners.get((tensor.untyped_storage().data_ptr(), tensor.storage_offset()))
        if name not in buffers and owner != name and owner is not None:
            values[name] = values[owner].clone()
    return values
