"""The ``torch_dist`` checkpoint format in the training loop (``--ckpt-format torch_dist``).

``megatron_core.dist_checkpointing`` stores every tensor with its global shape and this rank's
slice on ``torch.distributed.checkpoint``, so a run resumes at any other TP x PP x VPP x DP x ZeRO
layout with its optimizer state, iteration, consumed samples and schedule. This module adds what
the trainer keeps beside the tensors (consumed samples, the model and tokenizer identity that
``--use-checkpoint-args`` reads back) and the non-finite and launcher checks the legacy format has
(under ZeRO-3 each rank checks its shard: nothing is gathered). Saves are collective.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch

from megatron_core.collectives import lowest_failure
from megatron_core.dist_checkpointing import SaveRequest, load_dist_checkpoint, save_dist_checkpoint
from megatron_core.dist_checkpointing.full_model import is_torch_dist
from megatron_core.dist_checkpointing.serialization import checkpoint_dir, describe_layout, layout_of
from megatron_core.dist_checkpointing.sharded import shard_pieces
from megatron_core.errors import ConfigError
from megatron_core.parallel_state import ParallelState
from megatron_core.training import checkpoint_io as io
from megatron_core.training.checkpointing import LoadResult, check_compatible, check_finite_model, unwrap
from megatron_core.training.config import CheckpointConfig, DataConfig, ModelInfo
from megatron_core.training.health import TrainingDivergedError, check_finite_state
from megatron_core.training.initialize import launcher_alive
from megatron_core.training.save_flags import SAVE_FLAGS, check_saved_parts, save_flags
from megatron_core.transformer.config import TransformerConfig


def holds_dist_checkpoint(config: CheckpointConfig) -> bool:
    """Whether ``config.load`` (at ``--ckpt-step`` or its tracker's iteration) is a torch_dist checkpoint.

    False for a damaged tracker: the legacy loader names the file and the fix."""
    return config.load is not None and is_torch_dist(config.load, config.ckpt_step)


def _local_values(model: list[torch.nn.Module]) -> list[Mapping[str, torch.Tensor]]:
    """Each chunk's parameters as this rank holds them: full, or under ZeRO-3 its pieces of the kept
    shard (the parameters' own storage is freed between steps; nothing is gathered for a check)."""
    out: list[Mapping[str, torch.Tensor]] = []
    for chunk in model:
        shards = shard_pieces(chunk, zero3_only=True)
        named = unwrap(chunk).named_parameters()
        out.append({name: p for name, p in named} if shards is None else
                   {name: shards[id(p)][1] for name, p in named if id(p) in shards})
    return out


def _agreed(check: Callable[[], None]) -> None:
    """Run ``check`` on every rank; when it raises TrainingDivergedError on any (under ZeRO-3 each rank sees
    its shard only), raise the lowest such rank's on all of them. Collective."""
    try:
        check()
        error = None
    except TrainingDivergedError as exc:
        error = str(exc)
    failed = lowest_failure(error)
    if failed is not None:
        raise TrainingDivergedError(failed[1])


def save_checkpoint(config: CheckpointConfig, iteration: int, consumed_train_samples: int,
                    model: list[torch.nn.Module], optimizer: Any, scheduler: Any, parallel_state: ParallelState,
                    transformer: TransformerConfig, model_info: ModelInfo, data: DataConfig,
                    printer: Callable[[str], None] = print) -> SaveRequest:
    """Write iteration ``iteration`` under ``config.save`` in torch_dist format; ``config.async_save``
    writes in the background (call ``wait()`` on the result before the next save and at exit).

    Raises TrainingDivergedError for weights holding inf/nan (never saved) and ConfigError when the
    launcher of the job has died (never publish a checkpoint the user is about to resume from).
    """
    if config.save is None:
        raise ValueError("save_checkpoint needs CheckpointConfig.save (--save DIR)")
    died = f"not saving iteration {iteration}: the launcher of this job died"
    if not launcher_alive():
        raise ConfigError(died)
    extra = {"consumed_train_samples": consumed_train_samples, "model_config": transformer.to_dict(),
             "model_info": model_info.to_dict(), "tokenizer": tokenizer_identity(data),
             SAVE_FLAGS: save_flags(config, optimizer is not None and not config.no_save_optim)}
    # This rank's values, not state_dict(): under ZeRO-3 that would gather the whole model.
    _agreed(lambda: check_finite_model(_local_values(model), iteration))
    # --no-save-optim / --no-save-rng leave them out, as the legacy format and Megatron-LM do (the schedule
    # goes with the optimizer).
    request = save_dist_checkpoint(config.save, iteration, model, None if config.no_save_optim else optimizer,
                                   None if config.no_save_optim else scheduler, parallel_state, extra=extra,
                                   async_save=config.async_save,
                                   refuse_publish=lambda: None if launcher_alive() else died,
                                   save_rng=not config.no_save_rng)
    how = "started an asynchronous save of" if config.async_save else "successfully saved"
    printer(f"  {how} checkpoint at iteration {iteration:7d} to {config.save} (torch_dist) "
            f"[ training blocked {request.blocked_seconds:.2f}s ]")
    return request


def load_checkpoint(config: CheckpointConfig, model: list[torch.nn.Module], optimizer: Any, scheduler: Any,
                    parallel_state: ParallelState, transformer: TransformerConfig, model_info: ModelInfo,
                    printer: Callable[[str], None] = print) -> LoadResult:
    """Restore a torch_dist checkpoint saved under any layout (``--load``, ``--ckpt-step``, ``--finetune``,
    ``--no-load-optim``, ``--no-load-rng``). Collective. Raises ConfigError for another model."""
    assert config.load is not None
    from megatron_core.dist_checkpointing import read_common

    directory = checkpoint_dir(config.load, config.ckpt_step)[0]
    release = os.path.basename(directory) == io.RELEASE_DIRNAME
    # A release: weights only, at iteration 0, as Megatron-LM's load_checkpoint (and the legacy format's load).
    finetune = config.finetune or release
    common = read_common(config.load, config.ckpt_step)
    extra = common.get("extra", {})
    _check_same_model(extra, transformer, model_info, config.load, printer)
    # Missing RNG states are skipped (load_rng=False), as Megatron-LM's torch_dist load does.
    check_saved_parts(extra.get(SAVE_FLAGS), dataclasses.replace(config, finetune=finetune), directory,
                      optimizer is not None, False)
    load_optim = optimizer is not None and not (config.no_load_optim or finetune)
    # The schedule goes with the optimizer, as Megatron-LM's load_checkpoint (and the legacy format's) has it.
    load_scheduler = not (config.no_load_optim or finetune)
    common = load_dist_checkpoint(config.load, model, optimizer if load_optim else None,
                                  scheduler if load_scheduler else None, parallel_state,
                                  iteration=config.ckpt_step, load_optim=load_optim,
                                  load_rng=not (config.no_load_rng or finetune), printer=printer)
    where = config.load

    def check_loaded() -> None:
        for values in _local_values(model):
            check_finite_state(dict(values), where)
    _agreed(check_loaded)
    # A checkpoint saved with --no-save-optim / --no-save-rng has none to load: the optimizer starts fresh.
    load_optim = load_optim and bool(common["optimizer"])
    if not load_optim and optimizer is not None:
        optimizer.reload_model_params()
    result = LoadResult(loaded=True, optimizer_loaded=load_optim,
                        rng_loaded=not (config.no_load_rng or finetune) and bool(common["rng"]))
    if finetune:
        why = "a release checkpoint (weights only, as Megatron-LM)" if release else "for finetuning"
        printer(f"> loaded model weights from {config.load} (torch_dist) {why}: starting at iteration 0")
        return result
    ours_now = layout_of(parallel_state, optimizer, model)
    result.iteration = int(common["iteration"])
    result.consumed_train_samples = int(extra.get("consumed_train_samples", 0))
    printer(f"> loaded torch_dist checkpoint from {config.load} at iteration {result.iteration} (saved under "
            f"{describe_layout(common['layout'])}, resumed under {describe_layout(ours_now)}; optimizer: "
            f"{'yes' if load_optim else 'no'})")
    return result


def _check_same_model(extra: dict[str, Any], transformer: TransformerConfig, model_info: ModelInfo, where: str,
                      printer: Callable[[str], None]) -> None:
    """The layout may differ (that is the point), and with it the vocabulary padding; the model may not."""
    layout_free = dict.fromkeys(("tensor_model_parallel_size", "pipeline_model_parallel_size",
                                 "virtual_pipeline_model_parallel_size", "padded_vocab_size"))
    saved = dict(extra.get("model_info", {}))
    ours = model_info.to_dict()
    if saved.get("vocab_size") not in (None, ours["vocab_size"]):
        raise ConfigError(f"checkpoint {where} was trained on {saved['vocab_size']} tokens, this run's tokenizer has "
                          f"{ours['vocab_size']}: give the checkpoint's --tokenizer-* / --vocab-size flags "
                          f"(or --use-checkpoint-args)")
    check_compatible(extra.get("model_config", {}), {**saved, **layout_free}, transformer.to_dict(),
                     {**ours, **layout_free}, where)
    if saved.get("padded_vocab_size") not in (None, ours["padded_vocab_size"]):
        printer(f"  the vocabulary is padded to {ours['padded_vocab_size']} rows here, {saved['padded_vocab_size']} "
                f"in the checkpoint (--make-vocab-size-divisible-by x TP size): rows past the checkpoint's keep this "
                f"run's initialisation and their logits join the softmax, so losses differ slightly from the saving "
                f"layout's; to resume exactly, pass a --make-vocab-size-divisible-by that pads to "
                f"{saved['padded_vocab_size']} rows at this TP size")


def save_format(config: CheckpointConfig, loaded_format: str | None,
                printer: Callable[[str], None] = print) -> str:
    """The format this run's saves use: ``--ckpt-format`` when given; else the format of the checkpoint
    it resumed (a legacy series stays legacy, so tools reading that directory keep working); else
    ``torch_dist`` (new runs, and ``--finetune``, which starts a new series at iteration 0).

    ``loaded_format``: "torch" or "torch_dist" when a checkpoint was loaded, None for a fresh start.
    Whatever the format of each iteration, ``--load`` resumes the one the tracker names.
    """
    if config.ckpt_format is not None:
        return config.ckpt_format
    if loaded_format == "torch" and not config.finetune:
        if config.save is not None:
            printer("> resumed a legacy (--ckpt-format torch) checkpoint: saving in that format; pass "
                    "--ckpt-format torch_dist to switch (it resumes under any parallel layout)")
        return "torch"
    return "torch_dist"


def tokenizer_identity(data: DataConfig) -> dict[str, Any]:
    """The tokenizer flags that rebuild this run's tokenizer (``--use-checkpoint-args``).

    File paths that exist are recorded absolute, so a run or tool started from another working
    directory finds them (the demo passes ``demo_output/tokenizer.model``); anything else (a Hugging
    Face hub name) is kept as given.
    """
    def _absolute(path: str | None) -> str | None:
        return os.path.abspath(path) if path is not None and os.path.exists(path) else path

    return {"tokenizer_type": data.tokenizer_type, "tokenizer_model": _absolute(data.tokenizer_model),
            "vocab_file": _absolute(data.vocab_file), "merge_file": _absolute(data.merge_file),
            "vocab_size": data.vocab_size, "make_vocab_size_divisible_by": data.make_vocab_size_divisible_by}
