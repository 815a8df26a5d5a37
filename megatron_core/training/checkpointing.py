"""Save and load training checkpoints in Megatron-LM's legacy layout (docs/design.md).

Each (TP, PP) rank's first DP rank writes ``mp_rank_.../model_optim_rng.pt`` with the model
chunks, the optimizer (unless sharded), the scheduler, the RNG states of every DP rank, the
iteration and the consumed samples. Under the distributed optimizer every rank writes its shard
to ``distrib_optim_dpNNN.pt`` beside it. Writes go to a temporary directory that is renamed when
all ranks are done; the tracker file is replaced last (see ``checkpoint_io``).
"""
from __future__ import annotations

import dataclasses
import functools
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import torch
import torch.distributed as dist

from megatron_core.checkpoint.core_format import TOKENIZER_FLAGS
from megatron_core.checkpoint.megatron_lm import FROM_MEGATRON_LM, megatron_lm_hint
from megatron_core.parallel_state import ParallelState
from megatron_core.training import checkpoint_io as io
from megatron_core.training.agreement import agreed
from megatron_core.training.config import CheckpointConfig, ModelInfo
from megatron_core.training.errors import ConfigError
from megatron_core.training.health import TrainingDivergedError, check_finite_state
from megatron_core.training.initialize import launcher_alive
from megatron_core.training.rng_state import get_rng_state, set_rng_state
from megatron_core.training.save_flags import SAVE_FLAGS, check_saved_parts, save_flags
from megatron_core.transformer.config import TransformerConfig

# Test hook: sleep this many seconds inside a save, after the files are written and before the
# directory is published, so a test can kill the process mid-save.
SLEEP_IN_SAVE_ENV = "MCORE_TEST_SLEEP_IN_SAVE"

# Config fields that change parameter shapes, names or what the weights compute: a checkpoint must
# agree on each, and a mismatch names the flag that sets it.
CONFIG_FLAGS = {
    "num_layers": "--num-layers", "hidden_size": "--hidden-size", "ffn_hidden_size": "--ffn-hidden-size",
    "num_attention_heads": "--num-attention-heads", "num_query_groups": "--num-query-groups",
    "kv_channels": "--kv-channels", "add_bias_linear": "--disable-bias-linear", "add_qkv_bias": "--add-qkv-bias",
    "qk_layernorm": "--qk-layernorm",
    "normalization": "--normalization", "layernorm_epsilon": "--norm-epsilon",
    "layernorm_zero_centered_gamma": "--apply-layernorm-1p",
    "activation": "--swiglu / --openai-gelu", "position_embedding_type": "--position-embedding-type",
    "rotary_base": "--rotary-base", "rotary_percent": "--rotary-percent", "rope_scaling": "--use-rope-scaling",
    "rope_scaling_factor": "--rope-scaling-factor",
    "share_embeddings_and_output_weights": "--untie-embeddings-and-output-weights",
}
INFO_FLAGS = {
    "padded_vocab_size": "--vocab-size / --tokenizer-* / --make-vocab-size-divisible-by",
    "max_position_embeddings": "--max-position-embeddings",
    "tensor_model_parallel_size": "--tensor-model-parallel-size",
    "pipeline_model_parallel_size": "--pipeline-model-parallel-size",
    "virtual_pipeline_model_parallel_size": "--num-layers-per-virtual-pipeline-stage",
}
_LAYOUT_FIELDS = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "virtual_pipeline_model_parallel_size")


@dataclass
class LoadResult:
    """What a load restored."""

    iteration: int = 0
    consumed_train_samples: int = 0
    loaded: bool = False
    optimizer_loaded: bool = False
    rng_loaded: bool = False


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP / mixed-precision wrappers."""
    inner = getattr(module, "module", None)
    while isinstance(inner, torch.nn.Module):
        module, inner = inner, getattr(inner, "module", None)
    return module


def _model_keys(model: Sequence[Any]) -> list[str]:
    return ["model"] if len(model) == 1 else [f"model{i}" for i in range(len(model))]


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _gather_rng_states(parallel_state: ParallelState) -> list[dict[str, Any]]:
    """Every DP rank's RNG states, in DP-rank order (each DP rank may have drawn differently)."""
    mine = get_rng_state(parallel_state.rng_tracker)
    if parallel_state.dp_size == 1:
        return [mine]
    states: list = [None] * parallel_state.dp_size
    dist.all_gather_object(states, mine, group=parallel_state.dp_group)
    return states


def save_checkpoint(config: CheckpointConfig, iteration: int, consumed_train_samples: int,
                    model: list[torch.nn.Module], optimizer: Any, scheduler: Any, parallel_state: ParallelState,
                    transformer: TransformerConfig, model_info: ModelInfo,
                    printer: Callable[[str], None] = print, tokenizer: dict[str, Any] | None = None) -> str:
    """Write iteration ``iteration`` under ``config.save``; returns the checkpoint directory. Collective.

    ``tokenizer``: the run's ``--tokenizer-*`` flags (``dist_checkpoint.tokenizer_identity``), recorded for
    ``--use-checkpoint-args``, text generation and the converter, as Megatron-LM's legacy files carry its args.

    A sharded (ZeRO) optimizer also writes this DP rank's shard beside the model file. Weights
    holding inf/nan are never saved (``TrainingDivergedError``); a write that fails on any rank (a
    full disk) removes the partial directory and raises ConfigError naming it on every rank.
    Temporaries left by killed saves are removed first.
    """
    root = config.save
    if root is None:
        raise ValueError("save_checkpoint needs CheckpointConfig.save (--save DIR)")
    final_dir = io.iteration_dir(root, iteration)
    tmp_dir = final_dir + ".tmp"
    start = time.perf_counter()
    # On every DP rank, outside ``agreed`` (which must not communicate): under ZeRO-3 state_dict()
    # all-gathers the parameter shards, a DP collective.
    model_states = [unwrap(chunk).state_dict() for chunk in model]
    agreed(check_finite_model, model_states, iteration)
    if parallel_state.rank == 0:
        os.makedirs(root, exist_ok=True)
        io.remove_leftovers(root)
        os.makedirs(tmp_dir)
    _barrier()
    rng = None if config.no_save_rng else _gather_rng_states(parallel_state)
    try:
        agreed(_write_files, config, tmp_dir, iteration, consumed_train_samples, model_states, optimizer,
               scheduler, parallel_state, transformer, model_info, rng, tokenizer)
    except ConfigError:
        if parallel_state.rank == 0:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    _sleep_for_test(iteration)
    _barrier()
    if parallel_state.rank == 0:
        agreed_publish = _publish(root, tmp_dir, final_dir, iteration)
    else:
        agreed_publish = None
    agreed(_raise_if, agreed_publish)
    printer(f"  successfully saved checkpoint at iteration {iteration:7d} to {root} "
            f"[ t {time.perf_counter() - start:.2f}s ]")
    return final_dir


def check_finite_model(model_states: list[Mapping[str, torch.Tensor]], iteration: int) -> None:
    """Refuse to save weights holding inf/nan (``TrainingDivergedError`` naming the first one).

    ``model_states``: one name -> tensor mapping per chunk, full values (state dicts; under ZeRO-3 a
    parameter's own storage is freed between steps unless it is gathered)."""
    for state in model_states:
        for name, param in state.items():
            if torch.is_tensor(param) and param.is_floating_point() and not torch.isfinite(param).all():
                raise TrainingDivergedError(f"not saving iteration {iteration}: weight {name} holds inf or nan; "
                                            f"resume from the last good checkpoint")


def _write_files(config: CheckpointConfig, tmp_dir: str, iteration: int, consumed_train_samples: int,
                 model_states: list[dict[str, Any]], optimizer: Any, scheduler: Any,
                 parallel_state: ParallelState, transformer: TransformerConfig, model_info: ModelInfo,
                 rng: list | None, tokenizer: dict[str, Any] | None = None) -> None:
    """This rank's files of the checkpoint (no communication); an OSError becomes one ConfigError line."""
    rank_dir = os.path.join(tmp_dir, io.mp_rank_name(parallel_state.tp_rank, parallel_state.pp_rank,
                                                     parallel_state.pp_size))
    save_optim = optimizer is not None and not config.no_save_optim
    try:
        if parallel_state.dp_rank == 0:
            state: dict[str, Any] = {"checkpoint_version": 3.0, "iteration": iteration,
                                     "consumed_train_samples": consumed_train_samples,
                                     "config": transformer.to_dict(), "model_info": model_info.to_dict(),
                                     SAVE_FLAGS: save_flags(config, save_optim)}
            for key, model_state in zip(_model_keys(model_states), model_states, strict=True):
                state[key] = model_state
            if save_optim:
                state["optimizer"] = optimizer.state_dict()  # under ZeRO: what all DP ranks share
                if _sharded(optimizer):  # so a load can tell a deleted shard from another DP size
                    state["distrib_optim_shards"] = parallel_state.dp_size
            # The schedule goes with the optimizer, as Megatron-LM's generate_state_dict saves it (and every
            # load skips it with --no-load-optim, the flag a resume of such a checkpoint must give).
            if scheduler is not None and not config.no_save_optim:
                state["opt_param_scheduler"] = scheduler.state_dict()
            if rng is not None:
                state["rng_state"] = rng
            if tokenizer is not None:
                state[TOKENIZER_FLAGS] = tokenizer
            io.save_file(state, os.path.join(rank_dir, io.MODEL_FILENAME))
        if save_optim and _sharded(optimizer):
            io.save_file(optimizer.sharded_state_dict(),
                         os.path.join(rank_dir, io.distrib_optim_filename(parallel_state.dp_rank)))
    except (OSError, RuntimeError) as exc:  # torch.save reports a failed write as RuntimeError
        reason = io.write_failure(exc, config.save or tmp_dir)
        raise ConfigError(f"saving iteration {iteration} to {tmp_dir} failed ({reason}); "
                          f"the partial directory was removed: free space or give --save another location") from None


def _publish(root: str, tmp_dir: str, final_dir: str, iteration: int) -> str | None:
    """Rank 0: manifest, fsync, rename, tracker. Returns an error message instead of raising."""
    if not launcher_alive():  # never publish a checkpoint after the job's launcher was killed
        shutil.rmtree(tmp_dir, ignore_errors=True)
        return f"not saving iteration {iteration}: the launcher of this job died"
    try:
        io.publish_iteration(root, tmp_dir, final_dir, iteration)
    except OSError as exc:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        return (f"saving iteration {iteration} to {root} failed ({io.first_line(exc)}); the partial directory was "
                f"removed: free space or give --save another location")
    return None


def _raise_if(message: str | None) -> None:
    if message is not None:
        raise ConfigError(message)


def _sharded(optimizer: Any) -> bool:
    """Whether the optimizer's state is sharded over DP (ZeRO stage >= 1)."""
    return bool(getattr(optimizer, "sharded_over_dp", False))


def _sleep_for_test(iteration: int) -> None:
    spec = os.environ.get(SLEEP_IN_SAVE_ENV)
    if not spec:
        return
    at, _, seconds = spec.partition(":")
    if int(at) == iteration:
        print(f"[test hook] {SLEEP_IN_SAVE_ENV}: sleeping {seconds}s inside the save of iteration {iteration}",
              flush=True)
        time.sleep(float(seconds))


def check_compatible(saved_config: dict[str, Any], saved_info: dict[str, Any], model_config: dict[str, Any],
                     model_info: dict[str, Any], where: str) -> None:
    """Refuse a checkpoint of another model shape or parallel layout, naming every mismatching field."""
    diffs, layout = [], False
    for saved, ours, flags in ((saved_config, model_config, CONFIG_FLAGS), (saved_info, model_info, INFO_FLAGS)):
        for name, flag in flags.items():
            if name == "rope_scaling_factor" and not (saved.get("rope_scaling") or ours.get("rope_scaling")):
                continue  # the factor does nothing without --use-rope-scaling (a checkpoint may hold any)
            if name in saved and saved[name] != ours.get(name):
                diffs.append(f"{name}: checkpoint {saved[name]!r} vs run {ours.get(name)!r} ({flag})")
                layout = layout or name in _LAYOUT_FIELDS
    if diffs:
        # Re-sharding only helps a layout mismatch; a model-shape mismatch needs the checkpoint's flags.
        fix = ("re-shard it with tools/checkpoint/convert.py --target-tensor-parallel-size ... "
               "--target-pipeline-parallel-size ..." if layout else "pass --use-checkpoint-args to take them from it")
        raise ConfigError(f"checkpoint {where} does not fit this model: {'; '.join(diffs)}. Set those flags to match "
                          f"the checkpoint, or {fix}")


def check_load_root(root: str) -> bool:
    """Whether ``root`` may mean a fresh start (missing, or empty apart from temporaries of killed saves).

    Raises ConfigError naming ``root`` when it exists but is not a checkpoint directory (a file, an
    iteration directory, a directory of other things).
    """
    expected = f"a checkpoint directory holding {io.TRACKER_FILENAME} and iter_NNNNNNN/"
    if not os.path.exists(root):
        return True
    if not os.path.isdir(root):
        hint = " (the tracker file: give its directory)" if os.path.basename(root) == io.TRACKER_FILENAME else ""
        raise ConfigError(f"--load {root} is a file{hint}; expected {expected}")
    if os.path.isfile(os.path.join(root, io.TRACKER_FILENAME)):
        return False
    name = os.path.basename(os.path.normpath(root))
    foreign = io.foreign_checkpoint_hint(root)
    if foreign.startswith("; it is a tag folder"):
        raise ConfigError(f"--load {root} is not a training checkpoint; expected {expected}{foreign}")
    if name.startswith("iter_") or name == io.RELEASE_DIRNAME or any(e.startswith("mp_rank_")
                                                                     for e in os.listdir(root)):
        parent = os.path.dirname(os.path.normpath(root))
        step = (name[len("iter_"):].lstrip("0") or "0") if name.startswith("iter_") else "N"
        raise ConfigError(f"--load {root} is one iteration's directory; expected {expected}: pass --load {parent} "
                          f"(add --ckpt-step {step} for this iteration)")
    entries = [e for e in os.listdir(root) if not (e.endswith(".tmp") or ".tmp." in e or e.startswith(".write_test"))]
    if not entries:
        return True
    iterations = io.complete_iterations(root)
    if iterations:
        raise ConfigError(f"--load {root} has iteration directories ({', '.join(map(str, iterations[-3:]))}) but no "
                          f"{io.TRACKER_FILENAME}; choose one with --ckpt-step N")
    raise ConfigError(f"--load {root} holds {', '.join(sorted(entries)[:3])}{', ...' if len(entries) > 3 else ''} "
                      f"but no checkpoint; expected {expected}{io.foreign_checkpoint_hint(root)}")


def _resolve_dir(config: CheckpointConfig, parallel_state: ParallelState) -> tuple[int, str] | None:
    root = config.load
    if root is None:
        return None
    fresh = check_load_root(root)
    try:
        iteration = config.ckpt_step if config.ckpt_step is not None else io.read_tracker(root)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if iteration is None or fresh and config.ckpt_step is None:
        if config.exit_on_missing_checkpoint:
            raise ConfigError(f"--load {root}: no {io.TRACKER_FILENAME} there; check the path, or drop "
                              f"--exit-on-missing-checkpoint to start from scratch")
        return None
    directory = io.existing_iteration_dir(root, iteration)
    if directory is None:
        saved = ", ".join(map(str, io.complete_iterations(root))) or "none"
        raise ConfigError(f"--load {root}: iteration {iteration} has no directory {io.iteration_dir(root, iteration)} "
                          f"(iterations saved there: {saved}; pick one with --ckpt-step N)")
    rank_name = io.mp_rank_name(parallel_state.tp_rank, parallel_state.pp_rank, parallel_state.pp_size)
    rank_dir = os.path.join(directory, rank_name)
    manifest = io.read_manifest(directory)
    if not os.path.isfile(os.path.join(rank_dir, io.MODEL_FILENAME)):
        if manifest is not None and f"{rank_name}/{io.MODEL_FILENAME}" in manifest:
            _damaged(root, iteration, os.path.join(rank_dir, io.MODEL_FILENAME), "was deleted")
        found = sorted(d for d in os.listdir(directory) if d.startswith("mp_rank_"))
        raise ConfigError(
            f"--load {directory} has no {rank_name}/{io.MODEL_FILENAME} "
            f"(it holds {', '.join(found) or 'nothing'}): it was saved with another --tensor-model-parallel-size / "
            f"--pipeline-model-parallel-size; use those, or convert it with tools/checkpoint/convert.py")
    if manifest is not None:
        io.verify_manifest(root, iteration, directory, prefix=rank_name + "/")
    return iteration, rank_dir


def _damaged(root: str, iteration: int, path: str, what: str) -> NoReturn:
    raise ConfigError(io.damaged_message(root, iteration, path, what))


def load_checkpoint(config: CheckpointConfig, model: list[torch.nn.Module], optimizer: Any, scheduler: Any,
                    parallel_state: ParallelState, transformer: TransformerConfig, model_info: ModelInfo,
                    printer: Callable[[str], None] = print) -> LoadResult:
    """Restore what ``config`` asks for from ``config.load``; a fresh start when it holds nothing."""
    if config.load is None:
        return LoadResult()
    resolved = _resolve_dir(config, parallel_state)
    load_root = config.load
    if resolved is None:
        printer(f"> no checkpoint found in --load {config.load}: starting from scratch")
        return LoadResult()
    iteration, rank_dir = resolved
    release = os.path.basename(os.path.dirname(rank_dir)) == io.RELEASE_DIRNAME
    if release:
        # Megatron-LM's load_checkpoint: "if args.finetune or release: iteration = 0", and a release's optimizer
        # and RNG states are not read: weights to start from, whatever iteration the file records.
        config = dataclasses.replace(config, finetune=True)
    state = _load_or_name_damage(load_root, iteration, os.path.join(rank_dir, io.MODEL_FILENAME))
    check_compatible(state.get("config", {}), state.get("model_info", {}), transformer.to_dict(),
                     model_info.to_dict(), rank_dir)
    check_saved_parts(state.get(SAVE_FLAGS), config, os.path.dirname(rank_dir), optimizer is not None, True)
    for key in _model_keys(model):
        check_finite_state(state.get(key, {}), os.path.join(rank_dir, io.MODEL_FILENAME))
    _load_model(state, model, rank_dir)
    result = LoadResult(loaded=True)
    if config.finetune:
        why = "a release checkpoint (weights only, as Megatron-LM)" if release else "for finetuning"
        printer(f"> loaded model weights from {rank_dir} {why}: starting at iteration 0")
        _reload_main_params(optimizer)
        return result
    if state.get(FROM_MEGATRON_LM) and not (config.no_load_optim and config.no_load_rng):
        raise ConfigError(megatron_lm_hint(os.path.join(rank_dir, io.MODEL_FILENAME)))
    result.iteration = int(state.get("iteration", iteration))
    result.consumed_train_samples = int(state.get("consumed_train_samples", 0))
    if not config.no_load_optim:
        result.optimizer_loaded = _load_optimizer(state, optimizer, rank_dir, parallel_state, printer,
                                                  functools.partial(_load_or_name_damage, load_root, iteration))
        if scheduler is not None and "opt_param_scheduler" in state:
            scheduler.load_state_dict(state["opt_param_scheduler"])
    if not result.optimizer_loaded:
        _reload_main_params(optimizer)
    if not config.no_load_rng and "rng_state" in state:
        states = state["rng_state"]
        # One state per DP rank when saved with this DP size, else every rank takes the first.
        rank_state = states[parallel_state.dp_rank] if len(states) == parallel_state.dp_size else states[0]
        set_rng_state(rank_state, parallel_state.rng_tracker)
        result.rng_loaded = True
    printer(f"> loaded checkpoint from {config.load} at iteration {result.iteration} "
            f"(optimizer: {'yes' if result.optimizer_loaded else 'no'}, rng: {'yes' if result.rng_loaded else 'no'})")
    return result


def _load_model(state: dict[str, Any], model: list[torch.nn.Module], where: str) -> None:
    keys = _model_keys(model)
    missing = [k for k in keys if k not in state]
    if missing:
        present = sorted(k for k in state if k.startswith("model"))
        raise ConfigError(f"{where}: needs {keys} but holds {present}: it was saved with another number of virtual "
                          f"pipeline stages (--num-layers-per-virtual-pipeline-stage)")
    for key, chunk in zip(keys, model, strict=True):
        try:
            unwrap(chunk).load_state_dict(state[key], strict=True)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()
            raise ConfigError(f"{where}: the {key} weights do not fit this model ({' '.join(first[:3])[:400]}); "
                              f"check the model flags against the checkpoint") from None


def _load_or_name_damage(root: str, iteration: int, path: str) -> Any:
    """``io.load_file``; a truncated or damaged file names the previous complete iteration."""
    try:
        return io.load_file(path)
    except io.DamagedFileError as exc:
        _damaged(root, iteration, path, f"is truncated or damaged ({exc.cause})")


def _load_optimizer(state: dict[str, Any], optimizer: Any, rank_dir: str, parallel_state: ParallelState,
                    printer: Callable[[str], None], load: Callable[[str], Any]) -> bool:
    if optimizer is None:
        return False
    distributed_optimizer = _sharded(optimizer)
    if "optimizer" not in state:
        printer(f"> {rank_dir} holds no optimizer state (a model-only checkpoint): starting the optimizer fresh")
        return False
    shards = sorted(f for f in os.listdir(rank_dir) if f.startswith("distrib_optim_dp"))
    if distributed_optimizer != bool(shards):
        saved, now = ("sharded", "does not use") if shards else ("non-sharded", "uses")
        raise ConfigError(f"{rank_dir} holds a {saved} optimizer state but this run {now} --use-distributed-optimizer; "
                          f"match the flag to the checkpoint or pass --no-load-optim")
    last_shard = int(shards[-1][len("distrib_optim_dp"):-len(".pt")]) if shards else -1
    written = int(state.get("distrib_optim_shards", last_shard + 1))
    missing = sorted({io.distrib_optim_filename(r) for r in range(written)} - set(shards))
    if distributed_optimizer and missing:
        raise ConfigError(f"{os.path.join(rank_dir, missing[0])} is missing (the save wrote {written} shards): the "
                          f"checkpoint is damaged; load an earlier one with --ckpt-step N or pass --no-load-optim")
    if distributed_optimizer and len(shards) != parallel_state.dp_size:
        # Flat pieces of the saved layout's gradient buckets: tools/checkpoint/convert.py refuses them too.
        procs = len(shards) * parallel_state.tp_size * parallel_state.pp_size
        raise ConfigError(
            f"{rank_dir} holds {len(shards)} distributed-optimizer shards (saved at data-parallel size {len(shards)}) "
            f"but this run's data-parallel size is {parallel_state.dp_size}; the legacy format's shards load only at "
            f"the size they were saved at (tools/checkpoint/convert.py cannot re-shard them): run these flags once "
            f"with {procs} processes and --ckpt-convert-format torch_dist --ckpt-convert-save DIR (as Megatron-LM), "
            f"then --load DIR/torch_dist at any data-parallel size with the optimizer; or resume with {procs} "
            f"processes; or pass --no-load-optim to continue from the weights, iteration and consumed samples with "
            f"a fresh optimizer and learning-rate schedule")
    shard = (load(os.path.join(rank_dir, io.distrib_optim_filename(parallel_state.dp_rank)))
             if distributed_optimizer else None)
    _check_decoupled_group(state["optimizer"], optimizer, rank_dir)
    try:
        optimizer.load_state_dict(state["optimizer"])
        if shard is not None:
            optimizer.load_sharded_state_dict(shard)
    except (ValueError, KeyError) as exc:
        raise ConfigError(f"{rank_dir}: the optimizer state does not fit ({exc}); pass --no-load-optim to start the "
                          f"optimizer fresh") from None
    return True


def _saved_param_groups(state: Any) -> list[dict[str, Any]]:
    """Every ``param_groups`` entry of a saved optimizer state, however the optimizer nests it."""
    if isinstance(state, dict):
        groups = state.get("param_groups")
        found = list(groups) if isinstance(groups, list) else []
        return found + [g for key, value in state.items() if key != "param_groups" for g in _saved_param_groups(value)]
    if isinstance(state, (list, tuple)):
        return [g for value in state for g in _saved_param_groups(value)]
    return []


def _check_decoupled_group(saved: Any, optimizer: Any, rank_dir: str) -> None:
    """ConfigError when the legacy optimizer state and this run disagree on ``--decoupled-lr``'s group: the
    state is stored per param group, so the load failed as 'a different number of parameter groups' and
    named only --no-load-optim (a torch_dist checkpoint is stored per parameter and loads either way)."""
    saved_lr = [g.get("max_lr") for g in _saved_param_groups(saved) if g.get("is_decoupled_lr")]
    ours = any(g.get("is_decoupled_lr") for g in getattr(optimizer, "param_groups", []))
    if bool(saved_lr) == ours:
        return
    if saved_lr:
        fix = f"add --decoupled-lr {saved_lr[0]:g} (and its --decoupled-min-lr)"
        what = "with --decoupled-lr (a param group of its own for the embedding and output layer) and this run has none"
    else:
        fix = "drop --decoupled-lr"
        what = "without --decoupled-lr and this run has its param group (the embedding and output layer)"
    raise ConfigError(f"{rank_dir}: the optimizer state was saved {what}; {fix}, or pass --no-load-optim to start "
                      f"the optimizer fresh (a --ckpt-format torch_dist checkpoint resumes either way)")


def _reload_main_params(optimizer: Any) -> None:
    """fp32 main copies of the weights follow the freshly loaded model weights."""
    reload = getattr(optimizer, "reload_model_params", None)
    if reload is not None:
        reload()
