"""Save and load training checkpoints with ``torch.distributed.checkpoint`` (``--ckpt-format torch_dist``).

Layout: ``{dir}/iter_NNNNNNN/`` holds DCP's ``.metadata`` and ``__*.distcp`` files (every tensor with
its global shape and each rank's slice: see :mod:`.sharded`) and ``common.pt`` (iteration, consumed
samples, scheduler, the optimizer's shared state, every rank's RNG state, the saving layout and the
caller's ``extra``: model args, tokenizer identity) and ``manifest.json`` (every file and its size,
as the legacy format: a load names a deleted or truncated file and the earlier iterations to load
instead). ``latest_checkpointed_iteration.txt`` names the newest complete one. Writes go to
``iter_NNNNNNN.tmp`` and are renamed once every rank has written, then the tracker is replaced
atomically: a save killed at any point leaves the previous checkpoint loadable.
:func:`load_dist_checkpoint` reads it under any TP x PP x VPP x DP x ZeRO layout.
"""
from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from megatron_core.checkpoint import megatron_lm_dist
from megatron_core.collectives import lowest_failure
from megatron_core.dist_checkpointing import optimizer_state as opt_state
from megatron_core.dist_checkpointing.sharded import (
    ShardedSlice,
    SliceSpec,
    chunk_params,
    clip_to,
    logical_names,
    piece_slices,
    refresh_gathered,
    shard_pieces,
)
from megatron_core.errors import ConfigError
from megatron_core.parallel_state import ParallelState
from megatron_core.training import checkpoint_io as io
from megatron_core.training.rng_state import get_rng_state, set_rng_state

COMMON_FILE = "common.pt"
METADATA_FILE = ".metadata"  # DCP's index of every tensor's chunks and the file holding each
FORMAT = "torch_dist"
PAUSE_BEFORE_PUBLISH_ENV = "MCORE_DIST_CKPT_PAUSE_BEFORE_PUBLISH"  # tests: seconds to wait, to kill a save


def layout_of(parallel_state: ParallelState, optimizer: Any = None,
              model_chunks: list[torch.nn.Module] | None = None) -> dict[str, Any]:
    """The parallel layout recorded in (and compared against) a checkpoint. The ZeRO stage is the
    optimizer's, else the DDP wrapper's (``ddp_config.zero_stage``), else 0 (no data-parallel wrapper)."""
    stage = getattr(optimizer, "zero_stage", None)
    if stage is None:
        stages = [getattr(getattr(c, "ddp_config", None), "zero_stage", None) for c in model_chunks or []]
        stage = next((s for s in stages if s is not None), 0)
    return {"tp": parallel_state.tp_size, "pp": parallel_state.pp_size, "vpp": parallel_state.vpp_size,
            "dp": parallel_state.dp_size, "zero_stage": int(stage)}


def describe_layout(layout: dict[str, Any]) -> str:
    """``TP 2 x PP 1 x DP 2, ZeRO stage 1`` (``x VPP n`` with virtual stages) for a :func:`layout_of` record."""
    vpp = f" x VPP {layout['vpp']}" if layout.get("vpp") else ""
    stage = layout.get("zero_stage")
    return (f"TP {layout['tp']} x PP {layout['pp']}{vpp} x DP {layout['dp']}, ZeRO stage "
            f"{'unknown' if stage is None else stage}")  # None: saved before the stage was recorded


def _add_chunks(sd: dict[str, Any], prefix: str, name: str, flat: torch.Tensor, start: int,
                param: torch.nn.Parameter, parallel_state: ParallelState) -> None:
    """``sd[prefix/<logical name>]``: elements ``[start, start + flat.numel())`` of ``param`` as chunks of
    its global tensors."""
    for part, global_shape, chunks in piece_slices(name, flat, start, param, parallel_state.tp_rank,
                                                   parallel_state.tp_size):
        (offsets, local), *more = chunks
        sd[f"{prefix}/{part}"] = ShardedSlice(local, global_shape, offsets, more)


def _model_values(chunk: torch.nn.Module, copy: bool, zero3_only: bool
                  ) -> Callable[[torch.nn.Parameter], tuple[int, torch.Tensor] | None]:
    """``param -> (first element, flat values)`` this rank writes or reads: under ZeRO its piece of this
    rank's shard (None: no element here; ``zero3_only``: under ZeRO-3 only, a load under ZeRO-1/2 fills
    the whole parameters), else the whole parameter. ``copy``: a copy (async save)."""
    shards = shard_pieces(chunk, zero3_only)

    def values(param: torch.nn.Parameter) -> tuple[int, torch.Tensor] | None:
        found = (0, param.detach().view(-1)) if shards is None else shards.get(id(param))
        return None if found is None else (found[0], found[1].clone() if copy else found[1])
    return values


def _tensor_state(model_chunks: list[torch.nn.Module], optimizer: Any, parallel_state: ParallelState,
                  copy: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """DCP state dict of this rank's chunks, and the optimizer metadata for common.pt. Nothing is
    gathered: under ZeRO-1/2/3 the optimizer state of this rank's shard only, under ZeRO-3 the
    parameters' too. Call inside ``optimizer.resident()``."""
    sd: dict[str, Any] = {}
    pieces, keys, step = (opt_state.param_state_pieces(optimizer, parallel_state, copy) if optimizer is not None
                          else ([], [], -1.0))
    by_param = {id(piece.param): (piece, flat) for piece, flat in pieces}
    for chunk in model_chunks:
        # ZeRO-1/2 too: each rank writes its shard of the (replicated) parameters, so the writes are balanced and
        # each rank's DCP writer holds its own items only (it keeps every item it copies until its file is done).
        values = _model_values(chunk, copy, zero3_only=False)
        for name, param, saved_here in chunk_params(chunk):
            if not saved_here:
                continue
            found = values(param)
            if found is not None:
                _add_chunks(sd, "model", name, found[1], found[0], param, parallel_state)
            piece, flats = by_param.get(id(param), (None, {}))
            for key, tensor in flats.items():
                if key == opt_state.MAIN and param.dtype == torch.float32:
                    continue  # an fp32 model's main parameters are its weights: stored once, as model/
                assert piece is not None
                _add_chunks(sd, f"optimizer/{key}", name, tensor, piece.start, param, parallel_state)
    meta = {} if optimizer is None else {"state_keys": keys, "step": step,
                                         "common": opt_state.common_optimizer_state(optimizer)}
    return sd, meta


def _all_rng_states(parallel_state: ParallelState, layout: dict[str, Any]) -> list:
    states: list = [None] * dist.get_world_size()
    dist.all_gather_object(states, (layout, parallel_state.rank,
                                    get_rng_state(parallel_state.rng_tracker)))
    return states


@dataclass
class SaveRequest:
    """A save in progress: :meth:`wait` blocks until the checkpoint is published (a no-op once done)."""

    final_dir: str
    iteration: int = 0
    thread: threading.Thread | None = None
    error: list = field(default_factory=list)
    blocked_seconds: float = 0.0  # how long the caller (training) was stopped by this save

    def wait(self) -> str:
        """Block until the checkpoint is complete; re-raise a background error. Returns its directory."""
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error:
            raise self.error[0]
        return self.final_dir


def _agree(error: str | None, group: Any) -> None:
    """Raise ConfigError on every rank of ``group`` when any of them has an error (collective)."""
    failed = lowest_failure(error, group)
    if failed is not None:
        raise ConfigError(failed[1])


def _write_and_publish(sd: dict, common: dict, root: str, iteration: int, tmp_dir: str, final_dir: str,
                       group: Any, is_rank0: bool, refuse_publish: Callable[[], str | None] | None) -> None:
    failed = (f"saving iteration {iteration} to {root} failed ({{}}); the partial directory was removed: free "
              f"space or give --save another location")
    error = None
    try:
        dcp.save(sd, storage_writer=dcp.FileSystemWriter(tmp_dir), process_group=group)
        if is_rank0:
            io.save_file(common, os.path.join(tmp_dir, COMMON_FILE))
    except (CheckpointException, OSError, RuntimeError, KeyboardInterrupt) as exc:  # a full disk: on every rank
        # DCP gathers the ranks' errors (one process's come as they are)
        error = failed.format(io.write_failure(exc, root))
        if isinstance(io.root_cause(exc)[1], KeyboardInterrupt):
            # Ctrl-C: one line, and no further collective (the other ranks may be stopping anywhere, so one
            # more all-gather could wait for a peer that never comes).
            if is_rank0:
                shutil.rmtree(tmp_dir, ignore_errors=True)
            raise ConfigError(f"saving iteration {iteration} to {root} was interrupted (Ctrl-C); the partial "
                              f"directory was removed and the previous checkpoint is still the latest") from None
    pause = float(os.environ.get(PAUSE_BEFORE_PUBLISH_ENV, "0") or 0)
    if pause > 0 and error is None:
        time.sleep(pause)
    if is_rank0 and error is None:
        error = refuse_publish() if refuse_publish is not None else None
        try:
            if error is None:
                io.publish_iteration(root, tmp_dir, final_dir, iteration)
        except OSError as exc:
            error = failed.format(io.first_line(exc))
    if is_rank0 and error is not None:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    _agree(error, group)


def save_dist_checkpoint(save_dir: str, iteration: int, model_chunks: list[torch.nn.Module], optimizer: Any,
                         scheduler: Any, parallel_state: ParallelState, extra: dict[str, Any] | None = None,
                         async_save: bool = False,
                         refuse_publish: Callable[[], str | None] | None = None,
                         save_rng: bool = True) -> SaveRequest:
    """Write iteration ``iteration`` of a training run under ``save_dir``. Collective over all ranks.

    ``model_chunks``: this rank's (DDP-wrapped) GPTModel chunks; ``optimizer``: a MegatronOptimizer or
    None; ``scheduler``: anything with ``state_dict()`` or None; ``extra``: plain Python values stored
    as they are (``consumed_train_samples``, model args, tokenizer identity, ...). With ``async_save``
    the tensors are copied and written by a background thread on its own gloo group while training
    goes on; call ``wait()`` on the result before the next save (or at exit). ``refuse_publish``: asked
    on rank 0 once every file is written; a message it returns cancels the save (training: the launcher
    died); ``save_rng=False`` leaves the RNG states out (``--no-save-rng``; pass ``optimizer=None`` for
    ``--no-save-optim``). Returns the request. A failed write (full disk) or a refusal removes the partial directory and
    raises ConfigError on every rank (from ``wait()`` for an asynchronous save).
    """
    start = time.perf_counter()
    final_dir = io.iteration_dir(save_dir, iteration)
    tmp_dir = final_dir + ".tmp"
    is_rank0 = parallel_state.rank == 0
    if is_rank0:
        os.makedirs(save_dir, exist_ok=True)
        io.remove_leftovers(save_dir)  # temporaries of saves that were killed
        shutil.rmtree(tmp_dir, ignore_errors=True)
        os.makedirs(tmp_dir)
    dist.barrier()
    layout = layout_of(parallel_state, optimizer, model_chunks)
    common = {"format": FORMAT, "iteration": iteration, "layout": layout,
              "scheduler": scheduler.state_dict() if scheduler is not None else None,
              "rng": _all_rng_states(parallel_state, layout) if save_rng else [], "extra": dict(extra or {})}
    request = SaveRequest(final_dir, iteration)
    with opt_state.resident_state(optimizer):  # the chunks are views of the state: written before leaving
        sd, common["optimizer"] = _tensor_state(model_chunks, optimizer, parallel_state, copy=async_save)
        if not async_save:
            _write_and_publish(sd, common, save_dir, iteration, tmp_dir, final_dir, None, is_rank0, refuse_publish)
            request.blocked_seconds = time.perf_counter() - start
            return request
    group = parallel_state.background_group()  # collective on first use: every rank saves together

    def run() -> None:
        try:
            _write_and_publish(sd, common, save_dir, iteration, tmp_dir, final_dir, group, is_rank0, refuse_publish)
        except BaseException as exc:  # noqa: BLE001 - handed to wait()
            request.error.append(exc)

    request.thread = threading.Thread(target=run, name=f"async-save-{iteration}", daemon=True)
    request.thread.start()
    request.blocked_seconds = time.perf_counter() - start
    return request


def is_dist_dir(path: str) -> bool:
    """Whether the iteration directory ``path`` was written in this format (even with a file since deleted)."""
    if not os.path.isdir(path):
        return False
    names = os.listdir(path)
    if COMMON_FILE in names or METADATA_FILE in names or any(n.endswith(".distcp") for n in names):
        return True
    try:
        return COMMON_FILE in (io.read_manifest(path) or {})
    except ConfigError:  # a damaged manifest: the legacy loader names it
        return False


def checkpoint_dir(load_dir: str, iteration: int | None) -> tuple[str, int]:
    """The iteration directory to load and its iteration, its manifest verified (ConfigError naming a damaged file)."""
    if iteration is None:
        try:
            iteration = io.read_tracker(load_dir)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if iteration is None:
            raise ConfigError(f"--load {load_dir} has no {io.TRACKER_FILENAME}: nothing to resume from")
    path = io.existing_iteration_dir(load_dir, iteration)
    if path is None or not is_dist_dir(path):
        raise ConfigError(f"--load {load_dir}: iteration {iteration} is not a torch_dist checkpoint (no "
                          f"{COMMON_FILE}); a legacy one loads with pretrain_gpt.py --load")
    io.verify_manifest(load_dir, iteration, path)
    for name in (COMMON_FILE, METADATA_FILE):  # a checkpoint saved without a manifest, or the manifest deleted
        if not os.path.isfile(os.path.join(path, name)):
            raise ConfigError(io.damaged_message(load_dir, iteration, os.path.join(path, name), "is missing"))
    return path, iteration


def read_common(load_dir: str, iteration: int | None = None) -> dict[str, Any]:
    """The ``common.pt`` record of a torch_dist checkpoint (no tensors read).

    Raises ConfigError when absent, or naming the damaged file and an earlier iteration to load instead.
    """
    path, iteration = checkpoint_dir(load_dir, iteration)
    return read_checkpoint_common(load_dir, iteration, path)


def read_checkpoint_common(load_dir: str, iteration: int, path: str) -> dict[str, Any]:
    """``common.pt`` of the iteration directory ``path``; ConfigError naming it when damaged."""
    if megatron_lm_dist.is_megatron_core_dist(path):  # Megatron-LM's own torch_dist: read by the converter only
        raise ConfigError(megatron_lm_dist.conversion_hint(load_dir))
    file = os.path.join(path, COMMON_FILE)
    try:
        common = io.load_file(file)
    except ConfigError as exc:  # truncated, overwritten, or holding pickled objects: none of them a save writes
        cause = exc.cause if isinstance(exc, io.DamagedFileError) else "not a plain-tensor file"
        raise ConfigError(io.damaged_message(load_dir, iteration, file, f"is truncated or damaged ({cause})")) \
            from None
    if not isinstance(common, dict) or common.get("format") != FORMAT or "iteration" not in common:
        raise ConfigError(io.damaged_message(load_dir, iteration, file, "is not the record a torch_dist save writes"))
    return common


def read_metadata(load_dir: str, iteration: int, path: str, reader: Any) -> Any:
    """DCP's ``.metadata`` of ``path`` through ``reader``; ConfigError naming it when damaged."""
    try:
        return reader.read_metadata()
    except Exception as exc:  # noqa: BLE001 - DCP unpickles the file: anything may come out of damaged bytes
        raise ConfigError(io.damaged_message(load_dir, iteration, os.path.join(path, METADATA_FILE),
                                             f"is truncated or damaged ({type(exc).__name__})")) from None


def is_dist_checkpoint(load_dir: str) -> bool:
    """True when the tracker of ``load_dir`` names a torch_dist checkpoint (ValueError: a damaged tracker)."""
    iteration = io.read_tracker(load_dir)
    path = io.existing_iteration_dir(load_dir, iteration) if iteration is not None else None
    return path is not None and is_dist_dir(path)


def _targets(model_chunks: list[torch.nn.Module], optimizer: Any, parallel_state: ParallelState, saved: dict,
             keys: list[str]) -> tuple[dict[str, Any], list[tuple[opt_state.StatePiece, dict[str, torch.Tensor]]],
                                       set[int]]:
    """DCP targets for this rank's chunks (clipped to the saved shapes): the parameters (under ZeRO-3
    this rank's kept shard) and fresh tensors for this rank's optimizer pieces; those pieces, and the
    ids of the parameters whose main parameters the checkpoint holds."""
    sd: dict[str, Any] = {}
    main_saved: set[int] = set()

    def add(prefix: str, name: str, flat: torch.Tensor, start: int, param: torch.nn.Parameter) -> None:
        for part, ours, chunks in piece_slices(name, flat, start, param, parallel_state.tp_rank,
                                              parallel_state.tp_size):
            key = f"{prefix}/{part}"
            if key not in saved:
                continue  # optimizer/main/ of an fp32 model: filled from the loaded weights (load_dist_checkpoint)
            shape = tuple(saved[key].size)
            clipped = [c for offsets, local in chunks
                       if (c := clip_to(SliceSpec(part, ours, offsets, local), shape)) is not None]
            if clipped:
                sd[key] = ShardedSlice(clipped[0].local, shape, clipped[0].offsets,
                                       [(c.offsets, c.local) for c in clipped[1:]])

    # Every rank checks every name (under ZeRO a rank holds pieces of some parameters only): all refuse together.
    prefixes = ["model", *(f"optimizer/{k}" for k in (opt_state.MAIN, *keys) if optimizer is not None)]
    for chunk in model_chunks:
        for name, param, _ in chunk_params(chunk):
            for prefix in prefixes:
                for part in logical_names(name, param):
                    key = f"{prefix}/{part}"
                    if key in saved:
                        main_saved.update([id(param)] if prefix == f"optimizer/{opt_state.MAIN}" else [])
                    elif prefix != f"optimizer/{opt_state.MAIN}":  # an fp32 model's main is its weights
                        raise ConfigError(f"checkpoint has no {key}: it is of another model or was saved without "
                                          f"it (--no-load-optim skips the optimizer)")
    names: dict[int, str] = {}
    for chunk in model_chunks:
        values = _model_values(chunk, copy=False, zero3_only=True)
        for name, param, _ in chunk_params(chunk):
            names.setdefault(id(param), name)
            found = values(param)
            if found is not None:
                add("model", name, found[1], found[0], param)
    pieces = opt_state.state_targets(optimizer, keys) if optimizer is not None else []
    for piece, flats in pieces:
        for k, tensor in flats.items():
            add(f"optimizer/{k}", names[id(piece.param)], tensor, piece.start, piece.param)
    return sd, pieces, main_saved


def load_dist_checkpoint(load_dir: str, model_chunks: list[torch.nn.Module], optimizer: Any, scheduler: Any,
                         parallel_state: ParallelState, iteration: int | None = None, load_optim: bool = True,
                         load_rng: bool = True, printer: Callable[[str], None] = print) -> dict[str, Any]:
    """Fill the model chunks (and optimizer, scheduler, RNG) from a torch_dist checkpoint saved under any layout.

    Returns the checkpoint's common record (``iteration``, ``extra``, ``layout``, ...). RNG states are
    restored when the layout is the one saved; otherwise every rank is reseeded deterministically
    from the iteration and its coordinates, and ``printer`` says so. Collective over all ranks.
    Raises ConfigError for a missing or incomplete checkpoint, or one of another model.
    """
    path, iteration = checkpoint_dir(load_dir, iteration)
    common = read_checkpoint_common(load_dir, iteration, path)
    reader = dcp.FileSystemReader(path)
    saved = read_metadata(load_dir, iteration, path, reader).state_dict_metadata
    use_optim = optimizer is not None and load_optim and bool(common["optimizer"])
    keys = common["optimizer"].get("state_keys", []) if use_optim else []
    for chunk in model_chunks:  # ZeRO-3: the load rewrites the kept shards that gathers in flight read
        for buffer in getattr(chunk, "buffers_by_dtype", []):
            buffer.finish_param_gathers()
    sd, pieces, main_saved = _targets(model_chunks, optimizer if use_optim else None, parallel_state, saved, keys)
    try:
        dcp.load(sd, storage_reader=reader)
    except CheckpointException as exc:  # a damaged .distcp in a checkpoint saved without a manifest
        raise ConfigError(io.damaged_message(load_dir, iteration, path, f"holds an unreadable tensor file "
                                             f"({io.first_line(exc)})")) from None
    for chunk in model_chunks:
        refresh_gathered(chunk)
    if use_optim:
        with torch.no_grad():
            for piece, flats in pieces:
                if id(piece.param) not in main_saved:
                    flats[opt_state.MAIN].copy_(piece.model)
        opt_state.scatter_param_states(optimizer, pieces, common["optimizer"]["step"])
        opt_state.load_common_optimizer_state(optimizer, common["optimizer"]["common"])
    elif optimizer is not None:
        optimizer.reload_model_params()
    if scheduler is not None and common.get("scheduler") is not None:
        scheduler.load_state_dict(common["scheduler"])
    if load_rng:
        _restore_rng(common, layout_of(parallel_state, optimizer, model_chunks), parallel_state, printer)
    return common


def _restore_rng(common: dict, ours: dict[str, Any], parallel_state: ParallelState,
                 printer: Callable[[str], None]) -> None:
    if not common["rng"]:  # saved with --no-save-rng: the run keeps its own seeding, as the legacy format
        return
    for layout, rank, state in common["rng"]:
        if {k: layout[k] for k in ("tp", "pp", "vpp", "dp")} == {k: ours[k] for k in ("tp", "pp", "vpp", "dp")}:
            if rank == parallel_state.rank:
                set_rng_state(state, parallel_state.rng_tracker)
                return
    seed = 1234 + int(common["iteration"])
    parallel_state.manual_seed(seed + 7919 * parallel_state.dp_rank)
    if parallel_state.rank == 0:
        printer(f"  RNG states were saved under {describe_layout(common['layout'])}, this run is "
                f"{describe_layout(ours)}: they do not carry over, every rank is reseeded from {seed} (+ its "
                f"pipeline / tensor / data-parallel rank)")
