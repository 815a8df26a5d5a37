"""Read and write model-only checkpoints in Megatron-LM's legacy layout (docs/design.md).

``{dir}/latest_checkpointed_iteration.txt`` and ``{dir}/iter_NNNNNNN/mp_rank_TT[_PPP]/model_optim_rng.pt``,
each file holding ``model`` (or ``model0``, ``model1``, ... per virtual stage), ``config``,
``model_info``, ``iteration`` and ``checkpoint_version``: what ``pretrain_gpt.py --load`` or
``--finetune`` reads to rebuild and fill the model. A re-sharded training checkpoint also carries its
consumed samples, learning-rate schedule and (replicated) optimizer state, cut for each rank, and
records what it holds (``save_flags``: never RNG states).
"""
from __future__ import annotations

import os
import shutil
from dataclasses import replace
from typing import Any

import torch

from megatron_core.checkpoint.megatron_lm import FROM_MEGATRON_LM
from megatron_core.checkpoint.optimizer_reshard import (
    FullOptimizerState,
    ShardedOptimizerState,
    merge_states,
    rank_optimizer_state,
    rank_state_by_name,
)
from megatron_core.checkpoint.sharding import chunk_keys, merge_chunks, merge_tp_shards, tp_shards
from megatron_core.tensor_parallel.utils import pad_vocab_size
from megatron_core.training import checkpoint_io as io
from megatron_core.training.save_flags import SAVE_FLAGS, reshard_flags
from megatron_core.transformer.config import TransformerConfig

CHECKPOINT_VERSION = 3.0


def make_model_info(config: TransformerConfig, vocab_size: int, max_position_embeddings: int, tp: int, pp: int,
                    vpp: int | None, make_vocab_size_divisible_by: int, **extra: Any) -> dict[str, Any]:
    """The ``model_info`` entry, with the keys ``megatron_core.training`` compares on load."""
    return {"vocab_size": vocab_size,
            "padded_vocab_size": pad_vocab_size(vocab_size, make_vocab_size_divisible_by, tp),
            "make_vocab_size_divisible_by": make_vocab_size_divisible_by,
            "seq_length": max_position_embeddings, "max_position_embeddings": max_position_embeddings,
            "position_embedding_type": config.position_embedding_type,
            "share_embeddings_and_output_weights": config.share_embeddings_and_output_weights,
            "tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
            "virtual_pipeline_model_parallel_size": vpp, **extra}


# What a training checkpoint holds beside the model that no layout change touches: carried by a
# re-shard so that a run resumed from it continues the data order and the learning-rate schedule, and
# the --tokenizer-* flags the run recorded (TOKENIZER_FLAGS, Megatron-LM's args.tokenizer_*).
TOKENIZER_FLAGS = "tokenizer"
TRAIN_STATE_KEYS = ("consumed_train_samples", "opt_param_scheduler", TOKENIZER_FLAGS)
OPTIMIZER = "optimizer"  # train_state's FullOptimizerState: re-sharded with the weights (optimizer_reshard)
# train_state's {vocabulary table name: its rows past the true vocabulary} of a re-sharded checkpoint: the
# new layout's padding starts from them (sharding.pad_vocab_rows), so that a run resumed under a layout
# with the same padded size sees the same softmax (padding rows keep their own values and join it).
VOCAB_PADDING = "vocab_padding"


def reshard_record(train_state: dict[str, Any], optimizer_written: bool) -> dict[str, Any] | None:
    """The ``save_flags`` record a re-shard writes: None for a model-only checkpoint (a Hugging Face
    conversion, which loads with or without ``--finetune``), else :func:`reshard_flags`."""
    training = optimizer_written or any(k in train_state for k in ("consumed_train_samples", "opt_param_scheduler"))
    return reshard_flags(optimizer_written) if training else None


def resume_flags_note(train_state: dict[str, Any], save_dir: str) -> str | None:
    """What a re-shard of ``train_state`` (a loaded checkpoint's, :data:`OPTIMIZER` included when read) into
    ``save_dir`` leaves out and the flags its resume needs (without them it stops in one line; ``save_flags``);
    None for a model-only checkpoint."""
    record = reshard_record(train_state, OPTIMIZER in train_state)
    if record is None:
        return None
    parts, flags = ("RNG states", "--no-load-rng") if record["optimizer"] else \
        ("RNG or optimizer states (nor the learning-rate schedule, which goes with the optimizer)",
         "--no-load-optim --no-load-rng")
    return f"{save_dir} holds no {parts}: resume from it with {flags} (or --finetune)"


def save_core_checkpoint(save_dir: str, config: TransformerConfig, model_info: dict[str, Any],
                         full: dict[str, torch.Tensor], iteration: int = 1,
                         train_state: dict[str, Any] | None = None) -> str:
    """Shard ``full`` (TP = 1, PP = 1, true vocabulary) over the TP/PP sizes in ``model_info`` and write
    every rank's file; returns the iteration directory. The tracker is written last. ``train_state``
    (:data:`TRAIN_STATE_KEYS` of a re-sharded training checkpoint) goes into every file; its
    :data:`OPTIMIZER` (a ``FullOptimizerState``) is cut for each rank as the weights are, and its
    :data:`VOCAB_PADDING` rows start the padding of the vocabulary tables.

    A training checkpoint's re-shard (``train_state`` holds its consumed samples, schedule or optimizer)
    records what it holds under ``save_flags`` (:func:`reshard_flags`), so that a resume which would load a
    part it lacks stops in one line; without an optimizer state it also leaves the schedule out, as
    ``--no-save-optim`` and Megatron-LM's save do (a resume must skip both with ``--no-load-optim``)."""
    train_state = dict(train_state or {})
    optimizer: FullOptimizerState | None = train_state.pop(OPTIMIZER, None)
    padding: dict[str, torch.Tensor] | None = train_state.pop(VOCAB_PADDING, None)
    record = reshard_record(train_state, optimizer is not None)
    if record is not None:
        if optimizer is None:
            train_state.pop("opt_param_scheduler", None)
        train_state[SAVE_FLAGS] = record
    tp, pp = model_info["tensor_model_parallel_size"], model_info["pipeline_model_parallel_size"]
    vpp = model_info.get("virtual_pipeline_model_parallel_size")
    config.validate_parallel(tp, pp, vpp)
    tied = config.share_embeddings_and_output_weights
    final_dir = io.iteration_dir(save_dir, iteration)
    tmp_dir = final_dir + ".tmp"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    for pp_rank in range(pp):
        stages = [None] if vpp is None else list(range(vpp))
        chunks = [chunk_keys(full, config, pp, vpp, pp_rank, vp, tied) for vp in stages]
        per_tp = [tp_shards(chunk, config, tp, model_info["vocab_size"], model_info["make_vocab_size_divisible_by"],
                            padding) for chunk in chunks]
        for tp_rank in range(tp):
            state: dict[str, Any] = {"checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration,
                                     "config": config.to_dict(), "model_info": dict(model_info),
                                     **(train_state or {})}
            keys = ["model"] if vpp is None else [f"model{v}" for v in stages]
            for key, shards in zip(keys, per_tp, strict=True):
                state[key] = shards[tp_rank]
            if optimizer is not None:
                state[OPTIMIZER] = rank_optimizer_state(optimizer, [state[k] for k in keys], config, model_info,
                                                        pp_rank, tp_rank)
            io.save_file(state, os.path.join(tmp_dir, io.mp_rank_name(tp_rank, pp_rank, pp), io.MODEL_FILENAME))
    io.publish_dir(tmp_dir, final_dir)
    io.write_text_atomic(os.path.join(save_dir, io.TRACKER_FILENAME), str(iteration))
    return final_dir


def _iteration_dir(load_dir: str, iteration: int | None) -> str:
    if not os.path.isdir(load_dir):
        what = "is a file, not a checkpoint directory" if os.path.exists(load_dir) else "does not exist"
        raise FileNotFoundError(f"--load-dir {load_dir} {what}")
    asked = iteration is not None
    if iteration is None:
        iteration = io.read_tracker(load_dir)
        if iteration is None:
            name = os.path.basename(os.path.normpath(load_dir))
            if name.startswith("iter_") and name[len("iter_"):].isdigit():
                raise FileNotFoundError(f"--load-dir {load_dir} is one iteration's directory: pass --load-dir "
                                        f"{os.path.dirname(os.path.normpath(load_dir))} --load-iteration "
                                        f"{int(name[len('iter_'):])}")
            raise FileNotFoundError(f"--load-dir {load_dir} has no {io.TRACKER_FILENAME}: not a Megatron checkpoint "
                                    f"directory (for a Hugging Face directory use --loader hf)")
    path = io.existing_iteration_dir(load_dir, iteration)
    if path is None:
        if asked:
            saved = ", ".join(map(str, io.complete_iterations(load_dir))) or "none"
            raise FileNotFoundError(f"--load-iteration {iteration}: {io.iteration_dir(load_dir, iteration)} does not "
                                    f"exist (iterations saved in --load-dir {load_dir}: {saved})")
        raise FileNotFoundError(f"--load-dir {load_dir}: {io.TRACKER_FILENAME} names iteration {iteration} but "
                                f"{io.iteration_dir(load_dir, iteration)} does not exist")
    return path


def load_core_checkpoint(load_dir: str, iteration: int | None = None, with_optimizer: bool = False
                         ) -> tuple[TransformerConfig, dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """``(config, model_info, full state dict, train state)`` merged from every TP/PP rank's file; the train
    state is the first file's :data:`TRAIN_STATE_KEYS` (none in a converted Hugging Face model) and, with
    ``with_optimizer``, the merged optimizer state under :data:`OPTIMIZER` when the files hold one; the
    vocabulary tables' padding rows are under :data:`VOCAB_PADDING`.

    Raises ShardedOptimizerState (``with_optimizer``) for a distributed optimizer's shards, ValueError
    for an optimizer state that does not fit its model."""
    path = _iteration_dir(load_dir, iteration)
    first = os.path.join(path, io.mp_rank_name(0, 0, 1), io.MODEL_FILENAME)
    if not os.path.isfile(first):
        first = os.path.join(path, io.mp_rank_name(0, 0, 2), io.MODEL_FILENAME)
    if not os.path.isfile(first):
        raise FileNotFoundError(f"{path} has neither mp_rank_00/ nor mp_rank_00_000/{io.MODEL_FILENAME}")
    head = io.load_file(first)
    if "config" not in head or "model_info" not in head:
        raise ValueError(f"{first} has no 'config' / 'model_info' entries; it was not written by this framework")
    info = head["model_info"]
    config = TransformerConfig.from_dict(head["config"])
    tp, pp = info["tensor_model_parallel_size"], info["pipeline_model_parallel_size"]
    vpp = info.get("virtual_pipeline_model_parallel_size")
    vocab = info.get("vocab_size") or info["padded_vocab_size"]
    with_optimizer = with_optimizer and OPTIMIZER in head
    if with_optimizer and ("distrib_optim_shards" in head or "zero_stage" in head[OPTIMIZER]):
        raise ShardedOptimizerState(
            f"{load_dir} holds a distributed optimizer (distrib_optim_dpNNN.pt shards, cut along the gradient buckets "
            f"of the layout it was saved under), which a re-shard cannot carry: add --no-load-optim to re-shard "
            f"without it (the optimizer starts fresh), or convert it to torch_dist: pretrain_gpt.py with the run's "
            f"flags under the layout it was saved under and --load {load_dir} --ckpt-convert-format torch_dist "
            f"--ckpt-convert-save DIR (Megatron-LM's flags) writes DIR/torch_dist, which resumes under any layout "
            f"with its optimizer")
    stages = [None] if vpp is None else list(range(vpp))
    keys = ["model"] if vpp is None else [f"model{vp}" for vp in stages]
    chunks: dict[int, dict[str, torch.Tensor]] = {}
    opt_tensors: dict[int, list] = {}
    opt_scalars: dict[int, dict] = {}
    padding: dict[str, torch.Tensor] = {}
    for pp_rank in range(pp):
        names = [os.path.join(path, io.mp_rank_name(t, pp_rank, pp), io.MODEL_FILENAME) for t in range(tp)]
        files = [io.load_file(name) for name in names]
        for key in keys:
            missing = [t for t, f in enumerate(files) if key not in f]
            if missing:
                raise KeyError(f"{path}: TP ranks {missing} of pipeline rank {pp_rank} have no {key!r} entry")
        by_name = [rank_state_by_name(f[OPTIMIZER], [f[k] for k in keys], name)
                   for f, name in zip(files, names, strict=True)] if with_optimizer else []
        for slot, (vp, key) in enumerate(zip(stages, keys, strict=True)):
            index = (vp or 0) * pp + pp_rank
            chunks[index] = merge_tp_shards([f[key] for f in files], config, vocab, padding)
            if by_name:
                opt_tensors[index] = [tensors[slot] for tensors, _ in by_name]
                opt_scalars[index] = by_name[0][1][slot]
    tied = config.share_embeddings_and_output_weights
    train_state: dict[str, Any] = {key: head[key] for key in TRAIN_STATE_KEYS if key in head}
    train_state[VOCAB_PADDING] = padding
    if with_optimizer:
        train_state[OPTIMIZER] = merge_states(opt_tensors, opt_scalars, config, vocab, pp, vpp, head[OPTIMIZER])
    full = merge_chunks(chunks, config, pp, vpp, tied)
    if head.get(FROM_MEGATRON_LM):  # its uneven pipeline split cut its files; the merged model is whole
        config = replace(config, num_layers_in_first_pipeline_stage=None, num_layers_in_last_pipeline_stage=None)
    return config, info, full, train_state
