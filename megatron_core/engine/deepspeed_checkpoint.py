"""Read a checkpoint DeepSpeed's ``engine.save_checkpoint`` wrote, restated as one of this engine's.

Layout verified against DeepSpeed 0.19.8 (``runtime/engine.py`` ``_save_checkpoint``,
``runtime/zero/stage_1_and_2.py`` / ``stage3.py`` ``state_dict``; ``bench/ds_checkpoint_peer.py`` resumes
real DeepSpeed checkpoints in both engines). ``save_dir/latest`` names the tag; ``save_dir/<tag>/`` holds:

- ``mp_rank_00_model_states.pt`` (ZeRO-0/1/2; at ZeRO-3 each DP rank writes
  ``zero_pp_rank_{dp}_mp_rank_00_model_states.pt``): ``module`` (the training-dtype state dict; at ZeRO-3 its
  parameters are empty placeholders), ``param_shapes`` (per param group an ordered ``{name: shape}`` of
  the trained parameters, the order of the flat groups), ``shared_params`` (tied name -> the name holding
  it), ``frozen_param_shapes`` and ``frozen_param_fragments`` (ZeRO-2/3 only: each frozen parameter whole, or
  at ZeRO-3 this DP rank's ``ceil(numel / dp)`` elements of it; ZeRO-0/1 keep frozen ones in ``module`` alone),
  ``optimizer`` (ZeRO-0: the torch optimizer's ``state_dict`` or, in fp16 / bf16, its ``FP16_UnfusedOptimizer``'s:
  :mod:`megatron_core.engine.deepspeed_zero0`), ``lr_scheduler``, ``global_steps``, ``global_samples``,
  ``skipped_steps``, ``dp_world_size``, ``mp_world_size``, ``ds_config``, ``ds_version``, and
  ``client_state``'s keys merged in.
- ``zero_pp_rank_{dp}_mp_rank_00_optim_states.pt`` (ZeRO-1/2/3; ``bf16_zero_pp_rank_...`` when training in
  bf16, the same entries): ``optimizer_state_dict`` with
  ``zero_stage`` (a pickled ``ZeroStageEnum``), ``partition_count``, ``loss_scaler`` (a pickled
  ``LossScaler`` / ``DynamicLossScaler``) and: ZeRO-1/2 ``single_partition_of_fp32_groups`` (per param
  group this rank's slice of the group's flat fp32 vector, its end padding removed: the ranks' slices
  joined are the group's parameters back to back, with ``param_alignment_paddings`` after each) and
  ``base_optimizer_state`` (the torch optimizer's ``state_dict`` over those slices, padding kept);
  ZeRO-3 ``fp32_flat_groups`` (per sub-group this rank's flat partition: every parameter in ``param_shapes``
  order contributes ``ceil(numel / dp)`` elements, its rank-th chunk, zero-padded) and
  ``optimizer_state_dict`` (the torch optimizer's ``state_dict`` over those partitions). bf16 at ZeRO-1 with
  ``data_types.grad_accum_dtype`` fp32 trains through DeepSpeed's ``BF16_Optimizer``, whose files hold ZeRO-1's
  entries less ``zero_stage``, the loss scaler and ``param_alignment_paddings``, each rank's fp32 partition whole
  (the last one's end padding, ``group_paddings``, kept).

DeepSpeed pickles its classes; the files are read with ``torch.load(weights_only=True)`` and a stand-in for
each ``deepspeed.*`` class (:func:`megatron_core.checkpoint.megatron_lm.load_with_stand_ins`), so no code
from the file runs. Each parameter's full fp32 value and Adam moments are rebuilt by name, so the
checkpoint loads at any DP size and ZeRO stage, as this engine's own. What was not verified (tensor or
pipeline parallel files, DeepSpeed's fused FP16_Optimizer at ZeRO-0, MoE) is one error line.
"""

from __future__ import annotations

import glob
import math
import os
from typing import Any

import torch

from megatron_core.checkpoint.megatron_lm import load_with_stand_ins
from megatron_core.engine import deepspeed_zero0
from megatron_core.engine.checkpoint_files import load_states
from megatron_core.engine.deepspeed_zero0 import ELEMENT_STATE, FIX
from megatron_core.errors import ConfigError

_GROUP_SETTINGS = ("lr", "betas", "eps", "weight_decay", "momentum")  # torch Adam / AdamW / SGD's hyper-parameters


def load_deepspeed_file(path: str) -> Any:
    """``torch.load(path, weights_only=True)`` reading DeepSpeed's pickled classes as inert stand-ins."""
    return load_with_stand_ins(path, "deepspeed.", "DeepSpeed's checkpoint classes (read as plain data)")


def is_deepspeed_states(saved: Any) -> bool:
    """Whether a model-states dict is DeepSpeed's: ``ds_version``, none of this engine's ``format_version``."""
    return isinstance(saved, dict) and "ds_version" in saved and "format_version" not in saved


def read_model_states(path: str) -> Any:
    """A model-states file: DeepSpeed's (it may pickle ``deepspeed.*`` classes) through
    :func:`load_deepspeed_file`, any other through ``checkpoint_files.load_states``."""
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # a damaged file: load_states names it in one line
        found = []
    if any(name.startswith("deepspeed.") for name in found):
        return load_deepspeed_file(path)
    return load_states(path)


def zero3_model_file(folder: str, dp_rank: int = 0, dp_world_size: int = 1) -> str:
    """DeepSpeed's ZeRO-3 model-states file of DP rank ``dp_rank`` (ZeRO-3 writes one per DP rank; all hold the
    same entries), or DP rank 0's where the saving run had fewer ranks: ``dp_world_size``, its model file's
    ``dp_world_size``. ``dp_rank`` 0 gives rank 0's name, existing or not (callers probe it).

    Raises ConfigError naming the file when a rank below ``dp_world_size`` wrote none (a lost file, not a
    smaller saving run)."""
    path = os.path.join(folder, f"zero_pp_rank_{dp_rank}_mp_rank_00_model_states.pt")
    if dp_rank == 0 or os.path.exists(path):
        return path
    if dp_rank < dp_world_size:
        raise ConfigError(_lost(path, dp_world_size))
    return zero3_model_file(folder)


def _lost(path: str, dp_world_size: int) -> str:
    return (f"{path} is missing (DeepSpeed's dp_world_size is {dp_world_size}: each of its DP ranks wrote a "
            f"model-states file); copy every rank's file")


def zero3_rank0_lost(folder: str) -> str | None:
    """Why ``folder`` cannot be read where DeepSpeed's ZeRO-3 files of other DP ranks are there but not rank 0's
    model-states file (read first): the line :func:`zero3_model_file` gives for another rank's lost file, without
    its caller's prefix; None when rank 0's is there or no rank's is. The saving run's ``dp_world_size`` comes
    from another rank's file (small: ZeRO-3's hold placeholders for the parameters)."""
    path = zero3_model_file(folder)
    others = glob.glob(os.path.join(glob.escape(folder), "zero_pp_rank_*_mp_rank_00_model_states.pt"))
    if os.path.exists(path) or not others:
        return None
    return _lost(path, int(read_model_states(sorted(others)[0]).get("dp_world_size", 1)))


def zero3_frozen(folder: str, saved: dict) -> dict[str, torch.Tensor]:
    """ZeRO-3's frozen parameters (``frozen_param_shapes``), whole, in the training dtype: each DP rank's model file
    holds its ``ceil(numel / dp)`` elements in ``frozen_param_fragments`` (the parameter's ``ds_tensor``, the last
    one zero-padded), joined and cut as DeepSpeed's ``_zero3_merge_frozen_params``; ``module`` holds placeholders.

    Raises ConfigError naming a DP rank's missing model file."""
    shapes = saved.get("frozen_param_shapes") or {}
    if not shapes:
        return {}
    fragments = []
    dp_world_size = int(saved.get("dp_world_size", 1))
    for rank in range(dp_world_size):
        held = saved if rank == 0 and "frozen_param_fragments" in saved else \
            load_deepspeed_file(zero3_model_file(folder, rank, dp_world_size))
        fragments.append(held["frozen_param_fragments"])
    return {name: torch.cat([f[name].reshape(-1) for f in fragments])[:math.prod(shape)].view(tuple(shape)).clone()
            for name, shape in shapes.items()}


def _stage_of(value: Any) -> int:
    """``zero_stage`` as saved: a ``ZeroStageEnum`` stand-in (constructed from its int) or an int."""
    return int(value.values[0]) if hasattr(value, "values") else int(value)


def _names(saved: dict, group_names: list[list[str]]) -> list[list[str]]:
    """The trained parameters' names per param group, in the order of DeepSpeed's flat groups."""
    shapes = saved.get("param_shapes")
    if shapes is not None:
        return [list(group.keys()) for group in shapes]
    return group_names  # ZeRO-0: the torch optimizer's groups, this engine's (DeepSpeed's) grouping


def _flat_zero12(files: list[dict], group: int, key: str | None) -> torch.Tensor:
    """Group ``group``'s whole flat vector: the ranks' fp32 slices joined (``key`` None) or one moment's."""
    pieces = []
    for osd in files:
        fp32 = osd["single_partition_of_fp32_groups"][group]
        if key is None:
            pieces.append(fp32)
        else:  # the optimizer's state of the slice keeps the end padding the fp32 slice was saved without
            pieces.append(osd["base_optimizer_state"]["state"][group][key].reshape(-1)[: fp32.numel()])
    return torch.cat([p.float() if key is None else p for p in pieces])


def _split_zero12(files: list[dict], names: list[list[str]], shapes: dict[str, torch.Size],
                  key: str | None) -> dict[str, torch.Tensor]:
    """Per parameter name its flat elements of the ZeRO-1/2 flat groups (DeepSpeed's zero_to_fp32 walk)."""
    paddings = files[0].get("param_alignment_paddings")
    out = {}
    for g, group in enumerate(names):
        flat = _flat_zero12(files, g, key)
        offset = 0
        for i, name in enumerate(group):
            numel = math.prod(shapes[name])
            out[name] = flat[offset:offset + numel].clone()
            offset += numel + (int(paddings[g][i]) if paddings is not None else 0)
    return out


def _split_zero3(files: list[dict], names: list[list[str]], shapes: dict[str, torch.Size],
                 key: str | None) -> dict[str, torch.Tensor]:
    """Per parameter name its flat elements from the ranks' ZeRO-3 partitions (``ceil(numel/dp)`` each)."""
    world = len(files)
    per_rank = []
    for osd in files:
        if key is None:
            per_rank.append(torch.cat([t.reshape(-1).float() for t in osd["fp32_flat_groups"]]))
        else:
            state = osd["optimizer_state_dict"]["state"]
            per_rank.append(torch.cat([state[i][key].reshape(-1) for i in range(len(osd["fp32_flat_groups"]))]))
    out, offset = {}, 0
    for name in (n for group in names for n in group):
        numel = math.prod(shapes[name])
        part = math.ceil(numel / world)
        out[name] = torch.cat([flat[offset:offset + part] for flat in per_rank])[:numel].clone()
        offset += part
    return out


def deepspeed_optim_files(folder: str) -> list[str]:
    """DeepSpeed's optimizer files in DP order: ``zero_pp_rank_{dp}_mp_rank_00_optim_states.pt``, named
    ``bf16_zero_pp_rank_...`` when it trained in bf16 (its ``_get_zero_ckpt_name``)."""
    def in_dp_order(prefix: str) -> list[str]:
        paths = glob.glob(os.path.join(folder, f"{prefix}zero_pp_rank_*_mp_rank_00_optim_states.pt"))
        return sorted(paths, key=lambda p: int(os.path.basename(p)[len(prefix):].split("_")[3]))

    return in_dp_order("bf16_") or in_dp_order("")


def _zero_optimizer(folder: str, saved: dict, names: list[list[str]]) -> tuple[int, dict, dict, dict, dict]:
    """``(stage, values, states, scalars, osd of DP rank 0)`` from the ``zero_pp_rank_*_optim_states.pt`` files."""
    paths = deepspeed_optim_files(folder)
    files = []
    for path in paths:
        data = load_deepspeed_file(path)
        if not isinstance(data, dict) or "optimizer_state_dict" not in data:
            raise ConfigError(f"{path} is no DeepSpeed optimizer file (no 'optimizer_state_dict') "
                              f"beside DeepSpeed's model states; save the checkpoint again or load another tag")
        files.append(data["optimizer_state_dict"])
    first = files[0]
    if "zero_stage" in first:
        stage = _stage_of(first["zero_stage"])
    elif "single_partition_of_fp32_groups" in first:  # BF16_Optimizer: ZeRO-1's partitions, no stage saved
        stage = 1
    else:
        raise ConfigError(f"{paths[0]} holds no 'zero_stage' (a DeepSpeed layout not verified "
                          f"here); {FIX}")
    count = first["partition_count"]
    count = max(count) if isinstance(count, list) else int(count)
    if count != len(paths):
        pattern = ("bf16_" if os.path.basename(paths[0]).startswith("bf16_") else "") + "zero_pp_rank_*_optim_states.pt"
        raise ConfigError(f"{folder} has {len(paths)} {pattern} files, "
                          f"DeepSpeed's partition_count is {count}; is a rank's file missing?")
    shapes = {n: torch.Size(s) for group in saved["param_shapes"] for n, s in group.items()}
    split = _split_zero3 if stage == 3 else _split_zero12
    values = split(files, names, shapes, None)
    base = first["optimizer_state_dict"] if stage == 3 else first["base_optimizer_state"]
    state0 = base["state"][0] if base["state"] else {}
    keys = [k for k in state0 if k in ELEMENT_STATE]
    per_key = {key: split(files, names, shapes, key) for key in keys}
    states = {name: {key: per_key[key][name] for key in keys} for name in values}
    return stage, values, states, deepspeed_zero0.scalars(state0), first


def _fp16(saved: dict) -> bool:
    fp16 = saved.get("ds_config", {}).get("fp16", {})
    return isinstance(fp16, dict) and bool(fp16.get("enabled"))


def _grad_scaler(osd: dict | None) -> dict | None:
    """DeepSpeed's ``LossScaler`` / ``DynamicLossScaler`` (pickled in the optimizer files) as this engine's
    ``grad_scaler`` state. Its ``update_scale`` grows after ``stable_interval = cur_iter - last_overflow_iter - 1``
    clean steps and backs off once ``cur_hysteresis`` is 1: ``growth_tracker`` (clean steps since the last
    overflow, :class:`megatron_core.optimizer.grad_scaler.DynamicGradScaler` with ``deepspeed_window``) is
    ``cur_iter - last_overflow_iter - 1`` and ``hysteresis_tracker`` is ``cur_hysteresis``."""
    scaler = getattr(osd.get("loss_scaler"), "state", None) if osd is not None else None
    if not isinstance(scaler, dict) or "cur_scale" not in scaler:
        return None
    if not scaler.get("dynamic"):
        return {"scale": float(scaler["cur_scale"])}
    return {"scale": float(scaler["cur_scale"]),
            "growth_tracker": int(scaler["cur_iter"]) - int(scaler["last_overflow_iter"]) - 1,
            "hysteresis_tracker": int(scaler["cur_hysteresis"])}


def _unsupported(saved: dict, path: str, engine: Any) -> str | None:
    """Why DeepSpeed's checkpoint ``saved`` (at ``path``) is not read into ``engine``, or None."""
    if int(saved.get("mp_world_size", 1)) != 1 or engine.parallel_state.tp_size != 1:
        return (f"{path} (DeepSpeed {saved['ds_version']}, mp_world_size "
                f"{saved.get('mp_world_size')}) with tensor parallelism is not read here; {FIX}")
    return None


def restate(folder: str, saved: dict, path: str, engine: Any) -> dict:
    """DeepSpeed's model-states dict ``saved`` (read from ``path``) and the optimizer files beside it, as this
    engine's model-states dict (:mod:`megatron_core.engine.checkpoint`) plus ``fragments``: per parameter name
    the flat fp32 value and optimizer state, and the scalars (``step``).

    Raises ConfigError (one line naming the file and the fix) for a layout not verified here."""
    error = _unsupported(saved, path, engine)
    if error is not None:
        raise ConfigError(error)
    names = _names(saved, engine.param_group_names)
    osd = None
    if saved.get("optimizer") is not None:
        stage, (values, states, scalars) = 0, deepspeed_zero0.plain_optimizer(saved, names, path)
        groups = deepspeed_zero0.param_groups(saved)
    elif deepspeed_optim_files(folder):
        stage, values, states, scalars, osd = _zero_optimizer(folder, saved, names)
        groups = (osd["optimizer_state_dict"] if stage == 3 else osd["base_optimizer_state"])["param_groups"]
    else:
        raise ConfigError(f"{folder} has DeepSpeed's {os.path.basename(path)} but no optimizer "
                          f"state (no 'optimizer', no zero_pp_rank_*_optim_states.pt); {FIX}")
    module = dict(saved["module"])
    if stage == 3:  # its frozen parameters are split over the DP ranks' model files
        module.update(zero3_frozen(folder, saved))
    shared = saved.get("shared_params") or {}
    for name, value in values.items():  # ZeRO-3 saves empty placeholders: the fp32 main values are the weights
        if module.get(name) is None or module[name].numel() != value.numel():
            shape = dict(p for g in saved["param_shapes"] for p in g.items())[name]
            module[name] = value.view(shape)
    for alias, owner in shared.items():
        if owner in module:
            module[alias] = module[owner]
    aliases: dict[str, list[str]] = {}
    for alias, owner in shared.items():
        aliases.setdefault(owner, []).append(alias)
    # This engine's parameters the files hold, trained or frozen when saved, and those frozen here that they do
    # not hold (left out by exclude_frozen_parameters=True). A parameter trained here and held nowhere is left
    # out: another model, which the strict load names by its keys (it blamed exclude_frozen_parameters).
    meta = {name: {"local_shape": list(engine_param.shape), "tp_dim": -1, "stride": 1, "hf_transpose": False,
                   "aliases": aliases.get(name, []), "requires_grad": name in values}
            for name, engine_param in engine.module.named_parameters()
            if name in values or name in module or not engine_param.requires_grad}
    return {
        "module": module, "param_meta": meta, "fragments": (values, states, scalars),
        "global_steps": saved["global_steps"], "global_samples": saved.get("global_samples", 0),
        "skipped_steps": saved["skipped_steps"], "lr_scheduler": saved.get("lr_scheduler"),
        "grad_scaler": (None if not _fp16(saved) else _grad_scaler(osd) if stage
                        else deepspeed_zero0.unfused_grad_scaler(saved, engine)),
        # DeepSpeed's torch optimizer's groups also hold torch's flags (foreach, fused, ...), which are this
        # engine's choice (its fused AdamW differed in the last bit): the hyper-parameters only
        "param_groups": [{k: v for k, v in g.items() if k in _GROUP_SETTINGS} for g in groups],
        "client_state": client_state(saved), "ds_states": saved, "dp_size": saved.get("dp_world_size", 1), "tp_size": 1,
        "zero_stage": stage, "ds_version": saved["ds_version"],
    }


def client_state(saved: dict, load_optimizer: bool = True, load_scheduler: bool = True,
                 module_only: bool = False) -> dict:
    """What DeepSpeed 0.19.8's ``load_checkpoint`` returns as ``client_state`` for its model-states dict ``saved``:
    ``saved`` less what it restores (``module``; unless ``module_only`` the counters, ``dp_world_size``,
    ``mp_world_size``, ``data_sampler``, ``random_ltd``; ``lr_scheduler`` when loaded, ``optimizer`` when
    loaded, put back at ZeRO-0, where it is the optimizer's state): the client's keys and DeepSpeed's metadata."""
    restored = {"module"} if module_only else {"module", "skipped_steps", "global_steps", "dp_world_size",
                                               "mp_world_size", "data_sampler", "random_ltd"}
    if load_scheduler or module_only:  # load_module_only=True drops them too (with the flags' defaults)
        restored.add("lr_scheduler")
    if load_optimizer or module_only:
        restored.add("optimizer")
    out = {k: v for k, v in saved.items() if k not in restored}
    if load_optimizer and not module_only and saved.get("optimizer") is not None:
        out["optimizer"] = saved["optimizer"]
    return out


def consolidate(folder: str, saved: dict, path: str) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """``(state_dict, param_meta)`` of a DeepSpeed checkpoint for ``zero_to_fp32.py``: the buffers, each trained
    parameter's fp32 main value (tied names too), frozen ones from ``module`` in fp32, as DeepSpeed's own
    ``zero_to_fp32.py``; ``param_meta`` as this engine's (shape, aliases, ``requires_grad``).

    Raises ConfigError for a layout not verified here (the same as :func:`restate`)."""
    if int(saved.get("mp_world_size", 1)) != 1:
        raise ConfigError(f"{path} (DeepSpeed {saved['ds_version']}) holds tensor-parallel shards, "
                          f"not read here; run the zero_to_fp32.py DeepSpeed saved beside it")
    if saved.get("optimizer") is not None:  # ZeRO-0: the fp32 module, or the fp16 / bf16 optimizer's masters
        values = deepspeed_zero0.consolidated_masters(saved, path)
        trained_names = set(values)
    else:
        names = [list(group.keys()) for group in saved["param_shapes"] or []]
        _, values, _, _, _ = _zero_optimizer(folder, saved, names)
        trained_names = set(values)
        shapes = {n: torch.Size(s) for group in saved["param_shapes"] for n, s in group.items()}
        values = {n: v.view(shapes[n]) for n, v in values.items()}
        if os.path.basename(path).startswith("zero_pp_rank_"):  # ZeRO-3: frozen ones from every rank's file
            values.update({n: v.float() for n, v in zero3_frozen(folder, saved).items()})
    # the buffers in fp32 when floating, as DeepSpeed's zero_to_fp32.py (``parse_model_states``) has them
    state = {k: v.float() if torch.is_floating_point(v) else v.clone() for k, v in saved["module"].items()
             if k in (saved.get("buffer_names") or [])}
    for name, tensor in saved["module"].items():
        if name not in values and name not in state and tensor.numel() > 0:
            state[name] = tensor.float() if torch.is_floating_point(tensor) else tensor.clone()
    state.update(values)
    shared = saved.get("shared_params") or {}
    for alias, owner in shared.items():
        state[alias] = state[owner].clone()
    meta = {name: {"local_shape": list(state[name].shape), "tp_dim": -1, "stride": 1, "hf_transpose": False,
                   "aliases": [a for a, o in shared.items() if o == name], "requires_grad": name in trained_names}
            for name in state if name not in shared and name not in (saved.get("buffer_names") or [])}
    return state, meta
