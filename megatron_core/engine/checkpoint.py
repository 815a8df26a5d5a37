"""Engine checkpoints: DeepSpeed's folder layout, with optimizer state that any DP size can load.

``save_dir/latest`` holds the tag, ``save_dir/zero_to_fp32.py`` is DeepSpeed's consolidation script
(:mod:`megatron_core.engine.zero_to_fp32`, copied by rank 0); ``save_dir/<tag>/`` holds (DeepSpeed's file names):

- ``mp_rank_{tp:02d}_model_states.pt`` (DP rank 0 of each TP rank): ``module`` (the model's state dict in
  its training dtype), the counters, ``lr_scheduler``, ``client_state``, the loss scaler, the layout
  (``dp_size``, ``tp_size``, ``zero_stage``) and ``param_meta`` (per parameter name: full shape, TP split
  dim / stride / transpose for consolidation, and the state-dict keys tied to it);
- ``zero_pp_rank_{dp}_mp_rank_{tp:02d}_optim_states.pt``: this rank's *fragments*: for each parameter
  piece it owns, ``(name, start, end)`` in the flattened parameter, its fp32 main values and optimizer
  state (``exp_avg``, ``exp_avg_sq`` / ``momentum_buffer``) and the scalar ``step``. Under ZeRO-1/2 every
  DP rank writes its shard; without ZeRO DP rank 0 writes whole parameters.

Because fragments are addressed by parameter name and element range, not by bucket layout, a run
with another DP size (or ZeRO stage, or bucket size) rebuilds each parameter and takes its own
pieces; a run with another AutoTP size also joins the TP shards and cuts its own
(:mod:`megatron_core.engine.reshard`). Files are written to a temporary name and renamed; ``latest``
is written by rank 0 after every rank has finished, so it only ever names a complete checkpoint.
Everything is read back with ``torch.load(weights_only=True)``: ``client_state`` must hold tensors, plain
Python values and ``argparse.Namespace``; anything else is refused when saving, since it could not be
loaded (file names and I/O: :mod:`megatron_core.engine.checkpoint_files`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from typing import Any

import torch
import torch.distributed as dist

from megatron_core.collectives import lowest_failure
from megatron_core.dist_checkpointing.optimizer_state import set_state, steps_on_device
from megatron_core.engine import deepspeed_checkpoint
from megatron_core.engine.checkpoint_files import (
    LATEST,
    RECOVERY_SCRIPT,
    client_state_error,
    copy_recovery_script,
    foreign_states,
    load_states,
    model_file,
    optim_file,
    optim_files,
    read_latest,
)
from megatron_core.engine.reshard import frozen_keys, reshard_fragments, reshard_module, trained
from megatron_core.errors import ConfigError
from megatron_core.training.checkpoint_io import atomic_save
from megatron_core.zero import refuse_inside_gathered_block

FORMAT_VERSION = 1


def _resident(engine: Any) -> Any:
    """The optimizer's main weights and state in memory inside the block: NVMe offload frees their storage
    between steps (reading it was a SIGSEGV) and writes them back on exit."""
    resident = getattr(engine.optimizer, "resident", None)
    return resident() if resident is not None else contextlib.nullcontext()


def _cpu(value: Any) -> Any:
    return value.detach().cpu().clone() if torch.is_tensor(value) else value


# ---- what the optimizer holds, by parameter name ----------------------------------------------
def _pieces(engine: Any) -> list[tuple[str, int, int, torch.nn.Parameter]]:
    """``(name, start, end, main)`` for every fp32 main parameter (piece) this rank's optimizer updates."""
    names = {id(p): n for n, p in engine.module.named_parameters()}
    optimizer = engine.optimizer
    if hasattr(optimizer, "sharded"):
        return [
            (names[id(piece.param)], piece.param_start, piece.param_end, main)
            for sb in optimizer.sharded
            for piece, main in zip(sb.pieces, sb.mains, strict=True)
        ]
    return [(names[id(model)], 0, model.numel(), main) for main, model in optimizer.pairs]


def param_meta(module: torch.nn.Module) -> dict[str, dict]:
    """Per parameter name: its full shape, how TP splits it and the state-dict keys that alias it (tied weights)."""
    by_id = {id(p): n for n, p in module.named_parameters()}
    aliases: dict[str, list[str]] = {}
    # From the module tree, not from state_dict(): under ZeRO-3 state_dict() returns gathered copies,
    # which share no identity with the parameters (the tied lm_head.weight was no alias there).
    for key, param in module.named_parameters(remove_duplicate=False):
        if by_id[id(param)] != key:
            aliases.setdefault(by_id[id(param)], []).append(key)
    meta = {}
    for name, p in module.named_parameters():
        tp_dim = getattr(p, "partition_dim", -1) if getattr(p, "tensor_model_parallel", False) else -1
        meta[name] = {
            "local_shape": list(p.shape),
            "tp_dim": tp_dim,
            "stride": getattr(p, "partition_stride", 1),
            "hf_transpose": bool(getattr(p, "autotp_transpose", False)),
            "aliases": aliases.get(name, []),
            # A frozen parameter has no optimizer state: its value is the model file's (training dtype).
            "requires_grad": p.requires_grad,
        }
    return meta


def _fragments(engine: Any) -> dict:
    inner = engine.optimizer.inner
    frags, scalars = [], {}
    for name, start, end, main in _pieces(engine):
        state = {}
        for key, value in inner.state.get(main, {}).items():
            if torch.is_tensor(value) and value.dim() > 0:
                state[key] = _cpu(value.reshape(-1))
            elif value is not None:
                scalars[key] = _cpu(torch.as_tensor(value))
        frags.append(
            {"name": name, "start": start, "end": end, "fp32": _cpu(main.detach().reshape(-1)), "state": state}
        )
    return {"fragments": frags, "scalars": scalars}


# ---- save -------------------------------------------------------------------------------------
def _model_states(engine: Any, module_state: dict, meta: dict, client_state: dict) -> dict:
    """What ``mp_rank_XX_model_states.pt`` holds."""
    ps, scaler, scheduler = engine.parallel_state, engine.optimizer.grad_scaler, engine.lr_scheduler
    return {
        "format_version": FORMAT_VERSION,
        "module": {k: _cpu(v) for k, v in module_state.items()},
        "param_meta": meta,
        "global_steps": engine.global_steps,
        "global_samples": engine.global_samples,
        "micro_steps": engine.micro_steps,
        "skipped_steps": engine.skipped_steps,
        "lr_scheduler": scheduler.state_dict() if scheduler is not None and hasattr(scheduler, "state_dict") else None,
        "grad_scaler": scaler.state_dict() if scaler is not None else None,
        "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in engine.optimizer.param_groups],
        "client_state": client_state,
        "dp_size": ps.dp_size,
        "tp_size": ps.tp_size,
        "zero_stage": engine.ddp.ddp_config.zero_stage,
        "hf_config": json.dumps(engine.hf_config) if engine.hf_config is not None else None,
    }


def _agree_on_error(error: str | None) -> None:
    """Raise ConfigError on every rank when a write (or a read) failed on any (collective): no rank waits for
    a peer that stopped, and ``latest`` is not moved. The lowest failed rank's message is raised."""
    failed = lowest_failure(error)
    if failed is not None:
        raise ConfigError(failed[1])


def save(engine: Any, save_dir: str, tag: str | None, client_state: dict, save_latest: bool,
         exclude_frozen: bool = False) -> bool:
    """``Engine.save_checkpoint`` (see the module docstring for the layout); True, as DeepSpeed's. Rank 0 also
    writes ``save_dir/zero_to_fp32.py`` (:func:`copy_recovery_script`).

    A failed write (a path under a file, no permission, a full disk) on any rank is a ConfigError on every
    rank naming it; ``latest`` then still names the previous checkpoint. So is a save inside a ZeRO-3
    ``GatheredParameters(..., modifier_rank=R)`` block (every rank is inside it: a collective).
    """
    ps = engine.parallel_state
    gather = getattr(engine.ddp, "param_gather", None)
    if gather is not None and gather.modifying:
        # Rank R's changes are in its gathered parameters only until the block exits: the model file
        # would hold them and the optimizer's fp32 main copy (what load_checkpoint restores) would not.
        raise ConfigError("save_checkpoint inside a megatron_core.zero.GatheredParameters(..., modifier_rank=...) "
                          "block: the changes reach every rank and the optimizer on exit; save after the block")
    tag = tag if tag is not None else f"global_step{engine.global_steps}"
    if not isinstance(tag, str) or not tag or os.sep in tag:
        raise ConfigError(f"save_checkpoint: tag must be a non-empty folder name, got {tag!r}")
    # A NUL is no file name (os raised ValueError); white space at either end is stripped from 'latest' by the load
    # (DeepSpeed's too), which then looked for another folder than the one saved.
    if "\0" in tag or tag != tag.strip():
        raise ConfigError(f"save_checkpoint: tag {tag!r} has a NUL character or white space at either end, which a "
                          f"load through {LATEST!r} cannot name; pick another tag, e.g. "
                          f"'global_step{engine.global_steps}'")
    # "." and ".." wrote the checkpoint's files into save_dir itself or its parent; the others are save_dir's files.
    if tag in (os.curdir, os.pardir, LATEST, RECOVERY_SCRIPT):
        raise ConfigError(f"save_checkpoint: tag {tag!r} is not a folder of its own under {save_dir!r} (\".\", "
                          f"\"..\", {LATEST!r} and {RECOVERY_SCRIPT!r} are taken); pick another tag, e.g. "
                          f"'global_step{engine.global_steps}'")
    folder = os.path.join(save_dir, tag)
    sharded = hasattr(engine.optimizer, "sharded")
    # Every DP rank: under ZeRO-3 state_dict() all-gathers the parameter shards (a DP collective, which
    # hung when only DP rank 0 called it); below stage 3 it returns references, so this costs nothing.
    module_state, meta = engine.module.state_dict(), param_meta(engine.module)
    if exclude_frozen:  # DeepSpeed's exclude_frozen_parameters: param_meta still records them as frozen
        frozen = frozen_keys(meta)
        module_state = {k: v for k, v in module_state.items() if k not in frozen}
    # Before any file: a client_state that cannot be loaded back would make the checkpoint unloadable.
    error = client_state_error(client_state) if ps.dp_rank == 0 else None
    try:
        if error is None:
            os.makedirs(folder, exist_ok=True)
        if error is None and ps.dp_rank == 0:
            atomic_save(_model_states(engine, module_state, meta, client_state), model_file(folder, ps.tp_rank))
        if error is None and ps.rank == 0:
            copy_recovery_script(save_dir)
        if error is None and (sharded or ps.dp_rank == 0):
            with _resident(engine):
                fragments = _fragments(engine)
            atomic_save(fragments, optim_file(folder, ps.dp_rank, ps.tp_rank))
    except (OSError, RuntimeError) as exc:  # torch.save reports a failed write as RuntimeError
        error = (f"save_checkpoint: writing {folder!r} failed on rank {ps.rank} ({exc}); 'latest' still names "
                 f"the previous checkpoint: give a directory this job can write to, with free space")
    except ConfigError as exc:  # NVMe offload: a swap file that cannot be read back (named in the message)
        error = str(exc)
    _agree_on_error(error)  # also the barrier: every rank has written before 'latest' moves
    if save_latest and ps.rank == 0:
        tmp = os.path.join(save_dir, f".{LATEST}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(tag)
        os.replace(tmp, os.path.join(save_dir, LATEST))
    if dist.is_initialized():
        dist.barrier()
    return True


def save_16bit_model(engine: Any, save_dir: str, save_filename: str, exclude_frozen_parameters: bool = False) -> bool:
    """``Engine.save_16bit_model``: the module's full state dict, in its training dtype, as one ``torch.save``
    file written by rank 0 (DeepSpeed's ``pytorch_model.bin``), without the ``requires_grad=False`` parameters
    when ``exclude_frozen_parameters`` (DeepSpeed's argument). Collective (ZeRO-3 gathers the shards).

    Raises ConfigError under AutoTP (each rank holds a shard: consolidate with ``tools/zero_to_fp32.py``)
    and, on every rank, when the write fails.
    """
    state = consolidated_16bit_state_dict(engine, exclude_frozen_parameters, "save_16bit_model")
    path = os.path.join(save_dir, save_filename)
    error = None
    if state is not None:
        try:
            os.makedirs(save_dir, exist_ok=True)
            atomic_save(state, path)
        except (OSError, RuntimeError) as exc:  # torch.save reports a failed write as RuntimeError
            error = f"save_16bit_model: writing {path!r} failed ({exc}); give a directory this job can write to"
    _agree_on_error(error)
    return True


def consolidated_16bit_state_dict(engine: Any, exclude_frozen_parameters: bool = False,
                                  caller: str = "_zero3_consolidated_16bit_state_dict") -> dict | None:
    """The module's full state dict in its training dtype on the CPU, on rank 0 (None on the others). Collective
    (ZeRO-3 all-gathers on every rank). Raises ConfigError, naming ``caller``, under AutoTP (shards per rank)."""
    if engine.parallel_state.tp_size > 1:
        raise ConfigError(f"{caller}: under tensor_parallel.autotp_size > 1 each rank holds a shard; save a "
                          f"checkpoint and consolidate it with tools/zero_to_fp32.py")
    full = engine.module_state_dict(exclude_frozen_parameters=exclude_frozen_parameters)  # every rank: ZeRO-3 gathers
    return {k: _cpu(v) for k, v in full.items()} if engine.parallel_state.rank == 0 else None


# ---- load -------------------------------------------------------------------------------------
def full_fragments(paths: list[str], meta: dict[str, dict]) -> tuple[dict[str, torch.Tensor], dict[str, dict], dict]:
    """Each parameter's flat fp32 values and optimizer state rebuilt from every DP rank's fragments.

    Raises ConfigError when some element of a parameter is in no file (a missing rank's file).
    """
    values: dict[str, torch.Tensor] = {}
    states: dict[str, dict[str, torch.Tensor]] = {}
    covered: dict[str, int] = {}
    scalars: dict = {}
    for path in paths:
        data = load_states(path)
        scalars.update(data["scalars"])
        for frag in data["fragments"]:
            name, start, end = frag["name"], frag["start"], frag["end"]
            numel = int(torch.Size(meta[name]["local_shape"]).numel())
            if name not in values:
                values[name] = torch.zeros(numel, dtype=torch.float32)
                covered[name] = 0
            values[name][start:end] = frag["fp32"]
            covered[name] += end - start
            for key, tensor in frag["state"].items():
                states.setdefault(name, {}).setdefault(key, torch.zeros(numel, dtype=tensor.dtype))[start:end] = tensor
    for name, info in meta.items():
        if trained(info) and covered.get(name, 0) != int(torch.Size(info["local_shape"]).numel()):
            raise ConfigError(
                f"checkpoint {os.path.dirname(paths[0]) if paths else '?'}: parameter {name!r} is not fully "
                f"covered by the optimizer files found ({len(paths)}); is a rank's file missing?"
            )
    return values, states, scalars


def _untrained_when_saved(engine: Any, folder: str, saved_meta: dict[str, dict]) -> str | None:
    """The error for the first parameter this engine trains that has no optimizer state in the checkpoint
    (frozen when saved, or absent: a model loaded with ``load_module_strict=False``), else None. Decided from
    the module and the saved ``param_meta`` alone, so every rank reaches the same verdict whatever its shard."""
    for name, param in engine.module.named_parameters():
        if not param.requires_grad:
            continue
        if name not in saved_meta:
            return (f"{folder!r} has no optimizer state for {name!r}, a parameter the checkpoint "
                    f"does not hold; load it with load_optimizer_states=False (the optimizer starts afresh)")
        if not trained(saved_meta[name]):
            return (f"{folder!r} has no optimizer state for {name!r} (frozen, requires_grad=False, "
                    f"when saved); load its weights only with load_optimizer_states=False")
    return None


def _fragments_here(engine: Any, folder: str, saved: list[dict]) -> tuple[dict, dict, dict]:
    """``full_fragments`` for this rank's parameters: its own TP rank's files when the AutoTP size matches,
    else every saved TP rank's, resharded to this AutoTP size (:mod:`megatron_core.engine.reshard`)."""
    ps = engine.parallel_state
    if "fragments" in saved[0]:  # DeepSpeed's files, already rebuilt by name (engine.deepspeed_checkpoint)
        return saved[0]["fragments"]
    if len(saved) == 1 and saved[0]["tp_size"] == ps.tp_size:
        return full_fragments(optim_files(folder, ps.tp_rank, saved[0]), saved[0]["param_meta"])
    per_rank: list[tuple[dict, dict]] = []
    scalars: dict = {}
    for tp_rank, files in enumerate(saved):
        values, states, rank_scalars = full_fragments(optim_files(folder, tp_rank, files), files["param_meta"])
        per_rank.append((values, states))
        scalars = scalars or rank_scalars
    values, states = reshard_fragments(
        per_rank, [files["param_meta"] for files in saved], param_meta(engine.module), ps.tp_rank, ps.tp_size
    )
    return values, states, scalars


@torch.no_grad()
def _load_optimizer(engine: Any, folder: str, saved: list[dict]) -> None:
    # Agreed before the parameter all-gather below: a rank raising alone (its shard holds the parameter
    # without state, its TP rank's file is missing) left the others in that collective.
    error = _untrained_when_saved(engine, folder, saved[0]["param_meta"])
    values: dict[str, torch.Tensor] = {}
    states: dict[str, dict[str, torch.Tensor]] = {}
    scalars: dict = {}
    if error is None:
        try:
            values, states, scalars = _fragments_here(engine, folder, saved)
        except ConfigError as exc:
            error = str(exc)
    _agree_on_error(error)
    step_on_device = steps_on_device(engine.optimizer.inner)
    with _resident(engine):  # written in place: under NVMe offload the swap buffers must stay the step's
        for name, start, end, main in _pieces(engine):
            main.copy_(values[name][start:end].view_as(main))
            entry = {key: flat[start:end].view_as(main) for key, flat in states.get(name, {}).items()}
            entry.update(scalars)
            if entry:
                set_state(engine.optimizer, main, entry, step_on_device[id(main)])
        engine.optimizer._copy_main_to_model()


def _mismatch(message: str) -> str:
    """One line from ``load_state_dict``'s multi-line strict-mode error: counts and a first example of each."""
    parts = []
    for kind in ("Missing", "Unexpected"):
        found = re.search(rf"{kind} key\(s\) in state_dict: (.*)", message)
        if found:
            keys = re.findall(r'"([^"]+)"', found.group(1))
            parts.append(f"{len(keys)} {kind.lower()} key(s), e.g. {keys[0]!r}")
    sizes = re.findall(r"size mismatch for ([^:]+): copying a param with shape torch\.Size\((\[[^\]]*\])\) from "
                       r"checkpoint, the shape in current model is torch\.Size\((\[[^\]]*\])\)", message)
    if sizes:
        name, saved, current = sizes[0]
        parts.append(f"{len(sizes)} of another shape, e.g. {name}: {saved} saved, {current} here")
    return "; ".join(parts) or message.splitlines()[0]


def _loaded_path(folder: str, saved: dict, ps: Any) -> str:
    """The model file DeepSpeed's load_checkpoint names: at its ZeRO-3 this DP rank's (ConfigError when lost)."""
    if saved.get("zero_stage") == 3 and "ds_states" in saved:  # DeepSpeed's ZeRO-3 files: one per DP rank
        return deepspeed_checkpoint.zero3_model_file(folder, ps.dp_rank, saved["dp_size"])
    return model_file(folder, ps.tp_rank * saved["tp_size"] // ps.tp_size)  # DeepSpeed's SDLoader index


def _model_files(engine: Any, folder: str, tag: str, load_dir: str) -> tuple[list[dict], dict]:
    """``(saved, module_state)``: this TP rank's model file alone when the AutoTP size matches (``[file]``),
    else every saved TP rank's (in TP order) and the module state resharded to this AutoTP size."""
    ps = engine.parallel_state
    first = model_file(folder, 0)
    if not os.path.exists(first) and os.path.exists(deepspeed_checkpoint.zero3_model_file(folder)):
        first = deepspeed_checkpoint.zero3_model_file(folder)  # DeepSpeed's ZeRO-3 writes one per DP rank
    if not os.path.exists(first):
        lost = deepspeed_checkpoint.zero3_rank0_lost(folder)
        raise ConfigError(lost if lost is not None else
                          f"{first} does not exist (tag {tag!r} in {load_dir!r})")
    saved = deepspeed_checkpoint.read_model_states(first)
    if deepspeed_checkpoint.is_deepspeed_states(saved):
        saved = deepspeed_checkpoint.restate(folder, saved, first, engine)
        return [saved], saved["module"]
    foreign = foreign_states(saved, first)
    if foreign is not None:
        raise ConfigError(foreign)
    if saved["tp_size"] == ps.tp_size:
        if ps.tp_rank != 0:
            saved = load_states(_existing(model_file(folder, ps.tp_rank)))
        return [saved], saved["module"]
    files = [saved] + [
        load_states(_existing(model_file(folder, r)))
        for r in range(1, saved["tp_size"])
    ]
    return files, reshard_module(files, param_meta(engine.module), ps.tp_rank, ps.tp_size)


def _latest_error(load_dir: str, tag: str) -> str | None:
    """Why the tag read from ``load_dir/latest`` cannot be loaded (empty, or not a folder there), or None."""
    if tag and os.path.isdir(os.path.join(load_dir, tag)):
        return None
    latest = os.path.join(load_dir, LATEST)
    tags = sorted(d for d in os.listdir(load_dir) if os.path.isdir(os.path.join(load_dir, d)))
    what = "is empty" if not tag else f"names the tag {tag!r}, which is not a folder of {load_dir}"
    return (f"{latest} {what}; write the tag to load into it or pass tag= "
            f"(tags in {load_dir}: {', '.join(tags) or 'none'})")


def _existing(path: str) -> str:
    if not os.path.exists(path):
        raise ConfigError(f"{path} does not exist; is a TP rank's model file missing?")
    return path


def load(
    engine: Any, load_dir: str, tag: str | None, load_optimizer: bool, load_scheduler: bool, strict: bool = True,
    load_counters: bool = True,
) -> tuple[str | None, dict | None]:
    """``Engine.load_checkpoint``: model, optimizer fragments (any DP, ZeRO or AutoTP size), scheduler, counters.

    Returns ``(path, client_state)``, DeepSpeed's: ``path`` is the model-states file this rank's load is named
    by, ``mp_rank_{i:02d}_model_states.pt`` with DeepSpeed's ``i = tp_rank * saved_tp_size // tp_size`` (this TP
    rank's file when the AutoTP size is the saving run's). ``(None, None)`` when ``tag`` is None and
    ``load_dir`` has no ``latest`` file."""
    ps = engine.parallel_state
    if load_optimizer:
        refuse_inside_gathered_block(engine.ddp, "load_checkpoint", "restoring the optimizer",
                                     "load after the block (or with load_optimizer_states=False)")
    error: str | None = None
    if tag is None:
        tag = read_latest(load_dir)
        if tag is None:
            if ps.rank == 0:  # DeepSpeed warns too: a mistyped directory would otherwise restart silently
                where = "has no 'latest' file" if os.path.isdir(load_dir) else "does not exist"
                print(
                    f"warning: load_checkpoint: {load_dir!r} {where}; nothing was loaded (training starts "
                    f"from scratch); pass tag= to load a given checkpoint folder",
                    file=sys.stderr,
                    flush=True,
                )
            return None, None
        error = _latest_error(load_dir, tag)
    folder = os.path.join(load_dir, tag)
    # Each TP rank reads its own model file: a failure is agreed on, or the ranks that read theirs would wait
    # in the next collective for one that stopped.
    saved_files: list[dict] = []
    module_state: dict[str, Any] = {}
    try:
        if error is None:
            saved_files, module_state = _model_files(engine, folder, tag, load_dir)
            path = _loaded_path(folder, saved_files[0], ps)
    except ConfigError as exc:
        error = str(exc)
    _agree_on_error(error)
    saved = saved_files[0]
    excluded = [n for n, info in saved["param_meta"].items() if not trained(info) and n not in module_state]
    try:
        if strict and excluded:
            error = (f"{path} was saved with exclude_frozen_parameters=True ({len(excluded)} frozen "
                     f"parameters left out, e.g. {excluded[0]!r}); load it with load_module_strict=False (the model "
                     f"keeps its own values of those)")
        else:
            engine.module.load_state_dict(module_state, strict=strict)
    except RuntimeError as exc:
        error = (f"{path} holds another model than this engine's ({_mismatch(str(exc))}); load "
                 f"it into the model it was saved from")
    _agree_on_error(error)
    groups = len(engine.optimizer.param_groups)
    if load_optimizer and len(saved["param_groups"]) != groups:  # the same files and engine on every rank
        raise ConfigError(f"{path} was saved with {len(saved['param_groups'])} optimizer param "
                          f"groups, this engine has {groups} (its model_parameters / optimizer groups differ; engine "
                          f"checkpoints before DeepSpeed's grouping had 2); load with load_optimizer_states=False "
                          f"or give the saving run's groups")
    if load_optimizer:
        _load_optimizer(engine, folder, saved_files)
        if engine.optimizer.grad_scaler is not None and saved["grad_scaler"] is not None:
            engine.optimizer.grad_scaler.load_state_dict(saved["grad_scaler"])
        for group, values in zip(engine.optimizer.param_groups, saved["param_groups"], strict=True):
            group.update(values)
    else:
        engine.optimizer.reload_model_params()
    if load_scheduler and engine.lr_scheduler is not None and saved["lr_scheduler"] is not None:
        engine.lr_scheduler.load_state_dict(saved["lr_scheduler"])
    # micro_steps stays this engine's own count, as DeepSpeed 0.19.8 (it restores the other three): restoring
    # the saving run's misplaced the accumulation boundary ((micro_steps + 1) % GA) when GA differs on resume.
    for name in ("global_steps", "global_samples", "skipped_steps") if load_counters else ():
        setattr(engine, name, saved[name])
    if "ds_states" in saved:  # DeepSpeed's client_state depends on what was loaded
        return path, deepspeed_checkpoint.client_state(saved["ds_states"], load_optimizer, load_scheduler,
                                                       not load_counters)
    return path, saved["client_state"]
