"""Write checkpoints in DeepSpeed 0.19.8's on-disk layout without DeepSpeed (no tests here).

The layout is the one real DeepSpeed 0.19.8 runs wrote (``bench/ds_checkpoint_peer.py``: ZeRO 0-3, DP 1 and 2,
fp32, bf16 and fp16, torch AdamW through ``"torch_adam": true``; docs/engine.md records the comparison), and
``bench/ds_checkpoint_layout.py`` finds the same file names, pickled globals, keys, types, shapes and dtypes
in what this module writes as in those folders:
``mp_rank_00_model_states.pt`` (ZeRO-3: ``zero_pp_rank_{r}_mp_rank_00_model_states.pt`` per rank, with empty
parameters in ``module``) and ``zero_pp_rank_{r}_mp_rank_00_optim_states.pt`` (ZeRO-1/2: each rank's slice
of the param group's flat fp32 vector, padded to a multiple of ``2 * dp``, the padding cut from
``single_partition_of_fp32_groups`` and kept in Adam's state; ZeRO-3: ``ceil(numel / dp)`` elements of every
parameter per rank); named ``bf16_zero_pp_rank_...`` in bf16. Without ZeRO in fp16 or bf16 the model file's
``optimizer`` is DeepSpeed's ``FP16_UnfusedOptimizer``'s (fp32 master copies in ``fp32_groups``, the loss scale);
bf16 at ZeRO-1 with ``grad_accum_dtype`` fp32 writes ``BF16_Optimizer``'s files (``state["bf16_optimizer"]``).
DeepSpeed pickles three of its classes there (``ZeroStageEnum``, ``LossScaler``,
``fragment_address``); :func:`deepspeed_classes` makes same-named classes under a stand-in ``deepspeed``
package only while the files are written, so the pickles name the same globals as DeepSpeed's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
import math
import os
import sys
import types
from collections import OrderedDict

import torch
from engine_common import make_model

from megatron_core.engine.checkpoint import full_fragments
from megatron_core.engine.checkpoint_files import load_states, model_file, optim_files

DS_VERSION = "0.19.8"
ADAMW_GROUP = {"amsgrad": False, "maximize": False, "foreach": None, "capturable": False, "differentiable": False,
               "fused": None, "decoupled_weight_decay": True}  # torch AdamW's flags, in DeepSpeed's saved groups


@contextlib.contextmanager
def deepspeed_classes():
    """``deepspeed.runtime.zero.config.ZeroStageEnum``, ``deepspeed.runtime.fp16.loss_scaler.LossScaler`` and
    ``deepspeed.utils.tensor_fragment.fragment_address`` as importable names while inside the block."""

    class ZeroStageEnum(int, enum.Enum):
        disabled = 0
        optimizer_states = 1
        gradients = 2
        weights = 3

    class LossScaler:
        pass

    class DynamicLossScaler:  # fp16 with "loss_scale": 0 (DeepSpeed's default)
        pass

    @dataclasses.dataclass
    class fragment_address:  # noqa: N801 - DeepSpeed's name
        numel: int
        start: int

    where = [("deepspeed.runtime.zero.config", ZeroStageEnum), ("deepspeed.runtime.fp16.loss_scaler", LossScaler),
             ("deepspeed.runtime.fp16.loss_scaler", DynamicLossScaler),
             ("deepspeed.utils.tensor_fragment", fragment_address)]
    added = []
    for module_name, cls in where:
        parts = module_name.split(".")
        for i in range(1, len(parts) + 1):
            name = ".".join(parts[:i])
            if name not in sys.modules:
                sys.modules[name] = types.ModuleType(name)
                added.append(name)
        cls.__module__, cls.__qualname__ = module_name, cls.__name__
        setattr(sys.modules[module_name], cls.__name__, cls)
    try:
        yield ZeroStageEnum, LossScaler, fragment_address, DynamicLossScaler
    finally:
        for name in added:
            del sys.modules[name]


def _frozen_fragments(state: dict, stage: int, dp: int, rank: int) -> OrderedDict:
    """A rank's ``frozen_param_fragments``: each frozen parameter whole (ZeRO-2) or its ``ds_tensor``, the rank's
    ``ceil(numel / dp)`` elements, the last rank's zero-padded (ZeRO-3)."""
    out = OrderedDict()
    for name, value in state.get("frozen", {}).items():
        if stage == 3:
            part = math.ceil(value.numel() / dp)
            value = torch.nn.functional.pad(value.reshape(-1), (0, part * dp - value.numel()))[rank * part:][:part]
        out[name] = value.clone()
    return out


def _model_states(state: dict, stage: int, dp: int, module: dict, client: dict, rank: int = 0) -> dict:
    """The model file; frozen parameters (``state["frozen"]``) are listed with their values only where DeepSpeed
    partitions gradients (ZeRO-2/3: its ``save_frozen_param``); ZeRO-0/1 keep them in ``module`` alone."""
    zero = stage > 0
    frozen = state.get("frozen", {})
    return {
        "module": module, "buffer_names": [],
        "optimizer": state["torch_optimizer"] if not zero else None,
        "param_shapes": [OrderedDict((n, torch.Size(s)) for n, s in state["shapes"].items())] if zero else None,
        "frozen_param_shapes": OrderedDict((n, v.shape) for n, v in frozen.items()) if stage >= 2 else None,
        "shared_params": {} if zero else None,
        "frozen_param_fragments": _frozen_fragments(state, stage, dp, rank) if stage >= 2 else None,
        "lr_scheduler": state["lr_scheduler"], "data_sampler": None, "random_ltd": None,
        "skipped_steps": state.get("skipped_steps", 0), "global_steps": state["global_steps"],
        "global_samples": state["global_samples"],
        "dp_world_size": dp, "mp_world_size": 1, "checkpoint_parallel_dimensions": {"pp_degree": 1, "tp_degree": 1},
        "ds_config": state["ds_config"], "ds_version": DS_VERSION, **client,
    }


def _scaler(state: dict, classes: tuple) -> object:
    """DeepSpeed's ``LossScaler`` (fp32, bf16: scale 1, static) or, when ``state`` has ``scaler`` (the attributes
    DeepSpeed 0.19.8's ``DynamicLossScaler`` pickles: ``cur_scale``, ``cur_iter``, ``last_overflow_iter``, ...),
    its ``DynamicLossScaler``."""
    scaler = classes[3]() if state.get("scaler") else classes[1]()
    scaler.__dict__.update(state.get("scaler") or {"cur_scale": 1.0, "dynamic": False})
    return scaler


def _flat(state: dict, key: str) -> torch.Tensor:
    return torch.cat([state[key][n].reshape(-1) for n in state["shapes"]])


def _zero12_files(state: dict, stage: int, dp: int, classes: tuple) -> list[dict]:
    zero_stage, _, fragment_address, _ = classes
    total = sum(math.prod(s) for s in state["shapes"].values())
    padded = 2 * dp * math.ceil(total / (2 * dp))
    part = padded // dp
    flats = {k: torch.nn.functional.pad(_flat(state, k), (0, padded - total))
             for k in ("fp32", "exp_avg", "exp_avg_sq")}
    files = []
    for r in range(dp):
        lo, hi = r * part, (r + 1) * part
        mappings, offset = OrderedDict(), 0
        for name, shape in state["shapes"].items():
            numel = math.prod(shape)
            start, end = max(lo, offset), min(hi, offset + numel)
            if start < end:
                mappings[name] = fragment_address(numel=end - start, start=start - lo)
            offset += numel
        pad = max(0, hi - total)
        files.append({"optimizer_state_dict": {
            "loss_scaler": _scaler(state, classes), "dynamic_loss_scale": bool(state.get("scaler")), "overflow": False,
            "clip_grad": state["clip"],
            "base_optimizer_state": {
                "state": {0: {"step": state["step"].clone(), "exp_avg": flats["exp_avg"][lo:hi].clone(),
                              "exp_avg_sq": flats["exp_avg_sq"][lo:hi].clone()}},
                "param_groups": [{**state["group"], **ADAMW_GROUP, "params": [0]}]},
            "single_partition_of_fp32_groups": [flats["fp32"][lo:hi - pad].clone()],
            "zero_stage": zero_stage(stage), "group_paddings": [pad],
            "param_alignment_paddings": [[0] * len(state["shapes"])], "partition_count": [dp],
            "ds_version": DS_VERSION, "param_slice_mappings": [mappings]},
            "ds_config": state["ds_config"], "ds_version": DS_VERSION})
    return files


def _zero3_files(state: dict, dp: int, classes: tuple) -> list[dict]:
    zero_stage = classes[0]
    files = []
    for r in range(dp):
        flats = {}
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            chunks = []
            for name, shape in state["shapes"].items():
                numel = math.prod(shape)
                part = math.ceil(numel / dp)
                full = torch.nn.functional.pad(state[key][name].reshape(-1), (0, part * dp - numel))
                chunks.append(full[r * part:(r + 1) * part])
            flats[key] = torch.cat(chunks)
        files.append({"optimizer_state_dict": {
            "zero_stage": zero_stage(3), "loss_scaler": _scaler(state, classes),
            "dynamic_loss_scale": bool(state.get("scaler")), "overflow": False,
            "partition_count": dp,
            "optimizer_state_dict": {
                "state": {0: {"step": state["step"].clone(), "exp_avg": flats["exp_avg"],
                              "exp_avg_sq": flats["exp_avg_sq"]}},
                "param_groups": [{**state["group"], **ADAMW_GROUP, "params": [0]}]},
            "fp32_flat_groups": [flats["fp32"]]},
            "ds_config": state["ds_config"], "ds_version": DS_VERSION})
    return files


def _zero0_optimizer(state: dict) -> dict:
    """The model file's ``optimizer`` without ZeRO: the torch optimizer's ``state_dict`` (fp32) or, training in
    fp16 / bf16, DeepSpeed's ``FP16_UnfusedOptimizer.state_dict()`` around it (the fp32 master copies in
    ``fp32_groups``; the loss scale: ``scaler``'s ``cur_scale``, ``cur_iter``, ``last_overflow_iter``, ...)."""
    torch_state = {
        "state": {i: {"step": state["step"].clone(), "exp_avg": state["exp_avg"][n].clone(),
                      "exp_avg_sq": state["exp_avg_sq"][n].clone()} for i, n in enumerate(state["shapes"])},
        "param_groups": [{**state["group"], **ADAMW_GROUP, "params": list(range(len(state["shapes"])))}]}
    if state.get("dtype", torch.float32) == torch.float32:
        return torch_state
    scaler = state.get("scaler") or {"dynamic": False, "cur_scale": 1.0, "cur_iter": state["global_steps"]}
    loss_scale = {"dynamic_loss_scale": scaler["dynamic"], "cur_scale": scaler["cur_scale"],
                  "cur_iter": scaler["cur_iter"]}
    if scaler["dynamic"]:
        loss_scale.update({k: scaler[k] for k in ("last_overflow_iter", "scale_factor", "scale_window")})
    return {**loss_scale, "optimizer_state_dict": torch_state,
            "fp32_groups": [[state["fp32"][n].clone() for n in state["shapes"]]]}


def _bf16_optimizer_files(state: dict, dp: int, classes: tuple) -> list[dict]:
    """DeepSpeed's ``BF16_Optimizer.state_dict()`` per rank (bf16 at ZeRO-1 with ``grad_accum_dtype`` fp32): ZeRO-1's
    files less ``zero_stage``, the loss scaler and ``param_alignment_paddings``, each rank's fp32 partition kept
    whole (the last one's padding too, which ``group_paddings`` counts)."""
    files = _zero12_files(state, 1, dp, classes)
    for data in files:
        osd = data["optimizer_state_dict"]
        partition = torch.nn.functional.pad(osd["single_partition_of_fp32_groups"][0], (0, osd["group_paddings"][0]))
        data["optimizer_state_dict"] = {
            "clip_grad": osd["clip_grad"], "base_optimizer_state": osd["base_optimizer_state"],
            "single_partition_of_fp32_groups": [partition], "group_paddings": osd["group_paddings"],
            "partition_count": osd["partition_count"], "ds_version": DS_VERSION,
            "param_slice_mappings": osd["param_slice_mappings"]}
    return files


def write_deepspeed_checkpoint(directory: str, tag: str, state: dict, stage: int, dp: int, client: dict) -> None:
    """``directory/tag`` and ``directory/latest`` as DeepSpeed 0.19.8 writes them at ZeRO ``stage`` over ``dp``
    ranks. ``state``: ``shapes`` (name -> shape, the param group's order), per name ``fp32``, ``exp_avg``,
    ``exp_avg_sq``; ``step`` (Adam's, a 0-dim tensor), ``group`` (lr, betas, eps, weight_decay), ``clip``,
    ``lr_scheduler``, ``global_steps``, ``global_samples``, ``ds_config``, optionally ``skipped_steps``, ``dtype``,
    ``scaler`` (fp16: ``DynamicLossScaler``'s attributes), ``bf16_optimizer`` and ``frozen`` (name -> the frozen
    parameter's value in the training dtype); ``client`` is ``client_state``."""
    folder = os.path.join(directory, tag)
    os.makedirs(folder, exist_ok=True)
    # the training dtype's weights (DeepSpeed's module_state_dict), fp32 unless ``state`` says ``dtype``
    module = OrderedDict((n, state["fp32"][n].to(state.get("dtype", torch.float32))) for n in state["shapes"])
    module.update(state.get("frozen", {}))
    if stage == 0:
        state = {**state, "torch_optimizer": _zero0_optimizer(state)}
    prefix = "bf16_" if state.get("dtype") == torch.bfloat16 else ""  # DeepSpeed's _get_zero_ckpt_prefix
    with deepspeed_classes() as classes:
        if stage == 3:
            empty = OrderedDict((n, torch.empty(0, dtype=t.dtype)) for n, t in module.items())
            for r, optim in enumerate(_zero3_files(state, dp, classes)):
                torch.save(_model_states(state, 3, dp, empty, client, r),
                           os.path.join(folder, f"zero_pp_rank_{r}_mp_rank_00_model_states.pt"))
                torch.save(optim, os.path.join(folder, f"{prefix}zero_pp_rank_{r}_mp_rank_00_optim_states.pt"))
        else:
            torch.save(_model_states(state, stage, dp, module, client),
                       os.path.join(folder, "mp_rank_00_model_states.pt"))
            bf16_optimizer = state.get("bf16_optimizer", False)
            write = _bf16_optimizer_files if bf16_optimizer else functools.partial(_zero12_files, stage=stage)
            for r, optim in enumerate(write(state, dp=dp, classes=classes) if stage else []):
                torch.save(optim, os.path.join(folder, f"{prefix}zero_pp_rank_{r}_mp_rank_00_optim_states.pt"))
    with open(os.path.join(directory, "latest"), "w") as f:
        f.write(tag)


def other_weights() -> torch.nn.Module:
    """The test MLP with other weights than ``make_model("mlp")``'s: a load must replace every one."""
    model = make_model("mlp")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    return model


def state_for_deepspeed(folder: str, config: dict) -> dict:
    """This engine's checkpoint in ``folder`` restated as what DeepSpeed holds (per parameter, full tensors), the
    ``state`` :func:`write_deepspeed_checkpoint` takes."""
    saved = load_states(model_file(folder, 0))
    values, states, scalars = full_fragments(optim_files(folder, 0, saved), saved["param_meta"])
    shapes = {n: tuple(info["local_shape"]) for n, info in saved["param_meta"].items() if info["requires_grad"]}
    frozen = {n: saved["module"][n].clone() for n, info in saved["param_meta"].items() if not info["requires_grad"]}
    group = {k: saved["param_groups"][0][k] for k in ("lr", "betas", "eps", "weight_decay")}
    return {"shapes": shapes, "fp32": {n: values[n].view(shapes[n]) for n in shapes},
            "exp_avg": {n: states[n]["exp_avg"].view(shapes[n]) for n in shapes},
            "exp_avg_sq": {n: states[n]["exp_avg_sq"].view(shapes[n]) for n in shapes},
            "step": scalars["step"].float(), "group": group, "clip": 0.5, "lr_scheduler": saved["lr_scheduler"],
            "global_steps": saved["global_steps"], "global_samples": saved["global_samples"], "ds_config": config,
            "frozen": frozen}
