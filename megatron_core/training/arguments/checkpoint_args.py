"""``--use-checkpoint-args``: take the model and tokenizer flags from the checkpoint in ``--load``.

A torch_dist checkpoint stores the ``TransformerConfig``, the ``model_info`` and the tokenizer
flags of the run that wrote it; this maps them back onto the flag names (Megatron-LM's
``load_args_from_checkpoint``), so ``pretrain_gpt.py --load DIR --use-checkpoint-args`` needs no
model flags. A legacy checkpoint's model files hold the same ``config``, ``model_info`` and, from
``pretrain_gpt.py``, tokenizer flags (Megatron-LM's legacy files carry its args); a checkpoint that
``tools/checkpoint/convert.py`` wrote stores its tokenizer beside the iterations instead
(``model_info["tokenizer"]["dir"]``), which wins; one from an older run records none (give the flags).
A flag the user gave that disagrees with the checkpoint is an error naming both, except ``--seq-length``,
which the given value sets (as Megatron-LM), and a tokenizer file the checkpoint records but this machine
does not have (Megatron-LM's args name the training cluster's paths), which the given one replaces.
Both formats give ``--make-vocab-size-divisible-by`` (the padded vocabulary); a legacy checkpoint, which
loads only under the layout that saved it, also its TP / PP / virtual-stage sizes (Megatron-LM forces them).
"""
from __future__ import annotations

import argparse
import filecmp
import json
import os
from typing import Any

from megatron_core.errors import ConfigError
from megatron_core.training.arguments.given import on_command_line
from megatron_core.training.initialize import rank_from_env

# flag dest -> how to read it from the checkpoint's (model_config, model_info, tokenizer) records
_FROM_CONFIG = {
    "num_layers": "num_layers", "hidden_size": "hidden_size", "ffn_hidden_size": "ffn_hidden_size",
    "num_attention_heads": "num_attention_heads", "num_query_groups": "num_query_groups",
    "kv_channels": "kv_channels", "normalization": "normalization", "norm_epsilon": "layernorm_epsilon",
    "apply_layernorm_1p": "layernorm_zero_centered_gamma",
    "add_bias_linear": "add_bias_linear", "add_qkv_bias": "add_qkv_bias", "qk_layernorm": "qk_layernorm",
    "position_embedding_type": "position_embedding_type", "rotary_base": "rotary_base",
    "rotary_percent": "rotary_percent", "use_rope_scaling": "rope_scaling",
    "rope_scaling_factor": "rope_scaling_factor",
    "rotary_seq_len_interpolation_factor": "seq_len_interpolation_factor",
    "hidden_dropout": "hidden_dropout", "attention_dropout": "attention_dropout",
}
_FROM_INFO = {"seq_length": "seq_length", "max_position_embeddings": "max_position_embeddings"}
# Flags a run may set apart from the checkpoint: the given value wins (Megatron-LM's non-forced
# ``_set_arg``). --seq-length is the samples' length, not a shape of the weights; a position interpolation
# factor is how a run extends a checkpoint's context. Dropout is no shape either: Megatron-LM forces the
# checkpoint's, here it fills the flags not given (so a resume keeps the saved run's) and a given one wins.
_RUN_CHOICES = ("seq_length", "rotary_seq_len_interpolation_factor", "hidden_dropout", "attention_dropout")
_ACTIVATION_FLAGS = {"swiglu": "swiglu", "gelu_tanh": "openai_gelu", "squared_relu": "squared_relu"}


def apply_checkpoint_args(args: argparse.Namespace, parser_defaults: dict[str, Any]) -> None:
    """Fill the model and tokenizer flags of ``args`` from the checkpoint in ``args.load``.

    ``parser_defaults``: each flag's default, to tell a flag the user gave from one left alone.
    A ``--load`` that is missing or empty (no checkpoint yet) leaves ``args`` as given, with one printed line, as
    Megatron-LM; with ``--exit-on-missing-checkpoint`` or ``--ckpt-step`` it is an error. Raises ConfigError when
    ``--load`` holds no checkpoint then, or something else than a checkpoint, or a given flag disagrees.
    """
    if args.load is None:
        raise ConfigError("--use-checkpoint-args needs --load DIR (the checkpoint to read the model flags from)")
    if args.ckpt_step is None and not args.exit_on_missing_checkpoint and _no_checkpoint_yet(args.load):
        # Megatron-LM's load_args_from_checkpoint: "Checkpoint not found to provide arguments, using provided
        # arguments." A script passing --save DIR --load DIR --use-checkpoint-args starts from scratch the first time.
        if rank_from_env() == 0:
            print(f"> --use-checkpoint-args: no checkpoint in --load {args.load} to take the model flags from: "
                  f"using the flags given", flush=True)
        return
    config, info, tokenizer, legacy = _records(args.load, args.ckpt_step)
    if not config or not info:
        raise ConfigError(f"--load {args.load}: the checkpoint records no model flags (it was not written by "
                          f"pretrain_gpt.py); give the model flags instead of --use-checkpoint-args")
    values: dict[str, Any] = {dest: config[key] for dest, key in _FROM_CONFIG.items() if key in config}
    values.update({dest: info[key] for dest, key in _FROM_INFO.items() if key in info})
    if not config.get("rope_scaling"):  # the factor does nothing then; a run before it was checked saved any
        values.pop("rope_scaling_factor", None)
    values["group_query_attention"] = config.get("num_query_groups") not in (None, config.get("num_attention_heads"))
    values["untie_embeddings_and_output_weights"] = not config.get("share_embeddings_and_output_weights", True)
    for activation, dest in _ACTIVATION_FLAGS.items():
        values[dest] = config.get("activation") == activation
    # The padded vocabulary (Megatron-LM's _set_arg('padded_vocab_size')): its multiple, as a flag.
    if info.get("make_vocab_size_divisible_by") is not None:
        values["make_vocab_size_divisible_by"] = info["make_vocab_size_divisible_by"]
    if legacy:
        values.update(_legacy_layout(config, info))
        args.layout_from_checkpoint = True  # for validate's message about a world these sizes do not fit
    values.update({k: v for k, v in (tokenizer or {}).items() if v is not None})
    _set(args, values, parser_defaults)


def _no_checkpoint_yet(load: str) -> bool:
    """Whether ``load`` is missing or empty (what a training run starts from scratch on). A directory holding
    something else is not: the loader names what it holds (ConfigError)."""
    from megatron_core.training.checkpointing import check_load_root

    return check_load_root(load)


def _legacy_layout(config: dict[str, Any], info: dict[str, Any]) -> dict[str, Any]:
    """The TP / PP / virtual-stage flags of a legacy checkpoint, which loads under that layout only (Megatron-LM's
    load_args_from_checkpoint forces them; a torch_dist one resumes under any layout, so there they stay the run's)."""
    pp = info.get("pipeline_model_parallel_size") or 1
    vpp = info.get("virtual_pipeline_model_parallel_size")
    layout = {"tensor_model_parallel_size": info.get("tensor_model_parallel_size") or 1,
              "pipeline_model_parallel_size": pp}
    if vpp is not None and vpp > 1 and config.get("num_layers"):
        layout["num_layers_per_virtual_pipeline_stage"] = config["num_layers"] // (pp * vpp)
    return layout


def _records(load: str, step: int | None) -> tuple[Any, Any, Any, bool]:
    """``(model config, model_info, tokenizer flags, whether legacy)`` of the checkpoint (torch_dist or
    legacy) in ``load``."""
    from megatron_core.checkpoint.core_format import TOKENIZER_FLAGS
    from megatron_core.checkpoint.hf_tokenizer import dir_tokenizer_flags
    from megatron_core.dist_checkpointing import read_common
    from megatron_core.dist_checkpointing.full_model import is_torch_dist
    from megatron_core.training import checkpoint_io as io

    if is_torch_dist(load, step):
        extra = read_common(load, step).get("extra", {})
        return extra.get("model_config"), extra.get("model_info"), extra.get("tokenizer"), False
    try:
        iteration = io.read_tracker(load) if step is None else step
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    directory = io.existing_iteration_dir(load, iteration) if iteration is not None else None
    if directory is None:
        raise ConfigError(f"--load {load} holds no checkpoint to read the model flags from (--use-checkpoint-args); "
                          f"check the path and --ckpt-step")
    for rank_dir in (io.mp_rank_name(0, 0, 1), io.mp_rank_name(0, 0, 2)):  # without / with pipeline stages
        path = os.path.join(directory, rank_dir, io.MODEL_FILENAME)
        if os.path.isfile(path):
            state = io.load_file(path)
            info = state.get("model_info") or {}
            # tools/checkpoint/convert.py stores the tokenizer it carried beside the iterations.
            saved = (info.get("tokenizer") or {}).get("dir")
            tokenizer = dir_tokenizer_flags(os.path.join(load, saved), info["tokenizer"].get("type")) if saved else None
            # pretrain_gpt.py records its --tokenizer-* flags (core_format.TOKENIZER_FLAGS; none before 2026-11-30)
            tokenizer = tokenizer or state.get(TOKENIZER_FLAGS)
            return state.get("config"), state.get("model_info"), tokenizer or None, True
    raise ConfigError(f"--load {directory} has no {io.mp_rank_name(0, 0, 1)}/{io.MODEL_FILENAME} to read the model "
                      f"flags from (--use-checkpoint-args)")


# Tokenizer files: the checkpoint records absolute paths, a user may name the same file relatively.
_PATH_FLAGS = ("tokenizer_model", "vocab_file", "merge_file")


def _same(dest: str, given: Any, value: Any) -> bool:
    if dest in _PATH_FLAGS and isinstance(given, str) and isinstance(value, str):
        return os.path.realpath(given) == os.path.realpath(value) or _same_tokenizer_dir(given, value)
    return bool(given == value)


def _same_tokenizer_dir(given: str, saved: str) -> bool:
    """True when the directory ``given`` holds the tokenizer that convert.py copied into ``saved``: the same
    tokenizer.json bytes and the same special tokens in tokenizer_config.json (the copy is written through
    transformers, so its other config keys, e.g. tokenizer_class, differ from the original's). A Hugging Face
    directory given as --tokenizer-model was refused as disagreeing with its own copy."""
    def tokens(directory: str) -> dict[str, Any] | None:
        try:
            with open(os.path.join(directory, "tokenizer_config.json"), encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, ValueError):
            return None
        # the tokens HuggingFaceTokenizer reads (the copy leaves out unk_token, which it does not read)
        return {key: config.get(key) for key in ("bos_token", "eos_token", "pad_token")}

    given_json, saved_json = os.path.join(given, "tokenizer.json"), os.path.join(saved, "tokenizer.json")
    if not (os.path.isfile(given_json) and os.path.isfile(saved_json)):
        return False
    return filecmp.cmp(given_json, saved_json, shallow=False) and tokens(given) == tokens(saved)


def _set(args: argparse.Namespace, values: dict[str, Any], parser_defaults: dict[str, Any]) -> None:
    for dest, value in values.items():
        given = getattr(args, dest, None)
        explicit = given is not None and on_command_line(args, dest, parser_defaults)
        if dest in _RUN_CHOICES and explicit:
            continue
        if dest in _PATH_FLAGS and given is not None and isinstance(value, str) and not os.path.exists(value):
            continue  # the recorded file is not on this machine (Megatron-LM's args name the cluster's): given wins
        if explicit and not _same(dest, given, value):
            flag = "--" + dest.replace("_", "-")
            raise ConfigError(f"{flag} {given} disagrees with the checkpoint's {value} under --use-checkpoint-args; "
                              f"drop {flag} or --use-checkpoint-args")
        setattr(args, dest, value)
