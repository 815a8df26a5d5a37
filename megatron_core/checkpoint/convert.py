"""Convert GPT checkpoints between Hugging Face directories and Megatron checkpoints.

``--loader core`` reads a training checkpoint in either format (``torch_dist``, the default of
``pretrain_gpt.py``, or the legacy per-rank files) saved under any layout, also one written by Megatron-LM
itself (``checkpoint.megatron_lm``, ``checkpoint.megatron_lm_dist``); ``--saver core`` writes the
legacy layout (model only), which ``pretrain_gpt.py --load`` reads under the layout it was cut for.

Takes Megatron-LM's converter flags::

    python tools/checkpoint/convert.py --model-type GPT --loader hf --saver core \
        --load-dir HF_DIR --save-dir CKPT --target-tensor-parallel-size 2 [--target-pipeline-parallel-size 2]
    python tools/checkpoint/convert.py --model-type GPT --loader core --saver hf --load-dir CKPT --save-dir HF_DIR

``--loader core --saver core`` re-shards a checkpoint to another TP/PP size; a legacy training
checkpoint keeps its iteration, consumed samples, learning-rate schedule and optimizer state (the
replicated optimizer's Adam moments, step and fp32 main parameters, re-sharded with the weights;
``optimizer_reshard``). No RNG states are carried, nor the optimizer state of a ``torch_dist`` checkpoint
or under ``--no-load-optim`` (then the schedule is left out with it, as ``--no-save-optim`` does): the
re-shard records this (``save_flags``), so a resume must pass ``--no-load-rng`` (and ``--no-load-optim``)
or ``--finetune``, as Megatron-LM's converted checkpoints need. Hugging Face models:
GPT2LMHeadModel and LlamaForCausalLM (``transformers`` and ``safetensors`` must be installed).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from megatron_core.checkpoint import hf_gpt2, hf_llama, megatron_lm_dist
from megatron_core.checkpoint.core_format import (
    TOKENIZER_FLAGS,
    VOCAB_PADDING,
    load_core_checkpoint,
    make_model_info,
    resume_flags_note,
    save_core_checkpoint,
)
from megatron_core.checkpoint.hf_errors import UnsupportedModel
from megatron_core.checkpoint.hf_io import (
    check_hf_state,
    load_hf_config,
    load_hf_state,
    normal_permissions,
    save_hf_dir,
)
from megatron_core.checkpoint.hf_tokenizer import has_tokenizer, load_dir_tokenizer, save_tokenizer, special_ids
from megatron_core.dist_checkpointing import read_common
from megatron_core.dist_checkpointing.full_model import is_torch_dist, load_full_model
from megatron_core.dist_checkpointing.serialization import checkpoint_dir
from megatron_core.errors import ArgumentParser
from megatron_core.tensor_parallel.utils import pad_vocab_size
from megatron_core.tokenizer.base import MegatronTokenizer
from megatron_core.tokenizer.build import build_tokenizer
from megatron_core.training import checkpoint_io as io
from megatron_core.transformer.config import TransformerConfig

_HF_MODULES = {"gpt2": hf_gpt2, "llama": hf_llama}
# llama_mistral: Megatron-LM's loader of Hugging Face Llama-family directories (docs/llama_mistral.md).
_LOADERS = {"hf": "hf", "huggingface": "hf", "llama_mistral": "hf", "core": "core", "mcore": "core",
            "megatron": "core", "legacy": "core"}
_POSITIVE_FLAGS = ("target_tensor_parallel_size", "target_pipeline_parallel_size", "make_vocab_size_divisible_by",
                   "iteration")


@dataclass
class FullModel:
    """A whole model in memory: config, true vocabulary, positions, full state dict, HF family, tokenizer."""

    config: TransformerConfig
    vocab_size: int
    max_position_embeddings: int
    state: dict[str, torch.Tensor]
    hf_family: str | None = None
    tokenizer: MegatronTokenizer | None = None
    iteration: int | None = None  # of a Megatron checkpoint: kept when it is resharded
    train_state: dict[str, Any] = field(default_factory=dict)  # core_format.TRAIN_STATE_KEYS, kept likewise
    # Without a tokenizer: why, and whether the source recorded one (then its absence is a loss to report;
    # a legacy training checkpoint of an older run, or a NullTokenizer run, records none and loses nothing).
    no_tokenizer_reason: str = ""
    tokenizer_expected: bool = True
    # The padding multiple a Megatron checkpoint was saved with (None from HF): a re-shard keeps it unless
    # --make-vocab-size-divisible-by says otherwise, as Megatron-LM's loaders hand it to the saver.
    make_vocab_size_divisible_by: int | None = None


def _family_of(hf_config: Any, path: str) -> str:
    family = getattr(hf_config, "model_type", None)
    if family not in _HF_MODULES:
        archs = getattr(hf_config, "architectures", None)
        raise UnsupportedModel(f"--load-dir {path}: model_type {family!r} (architectures {archs}) is not supported; "
                               f"supported: GPT2LMHeadModel (gpt2), LlamaForCausalLM (llama)")
    return family


def load_hf(path: str, layernorm_zero_centered_gamma: bool = False) -> FullModel:
    """Read a GPT-2 or Llama ``save_pretrained`` directory; with ``layernorm_zero_centered_gamma``
    (``--apply-layernorm-1p``) as a model whose norm weights are stored zero-centred (HF's weight - 1)."""
    hf_config = load_hf_config(path)
    family = _family_of(hf_config, path)
    module = _HF_MODULES[family]
    config, vocab, positions = module.config_from_hf(hf_config)
    if layernorm_zero_centered_gamma:
        config = replace(config, layernorm_zero_centered_gamma=True)
    state = load_hf_state(path)
    check_hf_state(path, hf_config, state)
    try:
        full = module.state_to_core(state, config)
    except KeyError as exc:
        raise ValueError(f"--load-dir {path}: weight {exc} is missing for a {module.ARCHITECTURE}; config.json "
                         f"describes more than the file holds: use the config the weights were saved with") from None
    tokenizer = load_dir_tokenizer(path) if has_tokenizer(path) else None
    return FullModel(config, vocab, positions, full, family, tokenizer,
                     no_tokenizer_reason=f"{path} holds no tokenizer files")


def save_hf(model: FullModel, path: str, family: str | None = None) -> None:
    """Write ``model`` as a Hugging Face directory (family from the checkpoint, else guessed from its shape)."""
    family = family or model.hf_family or ("llama" if model.config.position_embedding_type == "rope" else "gpt2")
    if family not in _HF_MODULES:
        raise UnsupportedModel(f"--hf-model-type {family!r} is not supported; use gpt2 or llama")
    module = _HF_MODULES[family]
    # The tokenizer's own special ids; without a tokenizer none (transformers' defaults, e.g. GPT-2's
    # 50256, would name ids that may not exist in this vocabulary).
    ids = special_ids(model.tokenizer) if model.tokenizer is not None else dict.fromkeys(
        ("bos_token_id", "eos_token_id", "pad_token_id"))
    hf_config = module.config_to_hf(model.config, model.vocab_size, model.max_position_embeddings, ids)
    save_hf_dir(path, hf_config, _state_to_hf_whole(module, model))
    from transformers import GenerationConfig  # noqa: PLC0415
    GenerationConfig(**{k: v for k, v in ids.items() if v is not None}).save_pretrained(path)
    if model.tokenizer is not None:
        save_tokenizer(model.tokenizer, path)
    normal_permissions(path)


class _ReadKeys(dict):
    """A state dict that records the keys read from it (what a ``state_to_hf`` mapping consumed)."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        super().__init__(state)
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> torch.Tensor:
        self.read.add(key)
        return super().__getitem__(key)


def _state_to_hf_whole(module: Any, model: FullModel) -> dict[str, torch.Tensor]:
    """``module.state_to_hf`` of the model, refusing weights the Hugging Face class has no place for (a
    ``--spec`` layer's q/k norms in a run without ``--qk-layernorm``): leaving them out changes the model."""
    state = _ReadKeys(model.state)
    hf_state = module.state_to_hf(state, model.config)
    left = sorted(set(model.state) - state.read)
    if left:
        shown = ", ".join(left[:4]) + (f" and {len(left) - 4} more" if len(left) > 4 else "")
        raise UnsupportedModel(f"{module.ARCHITECTURE} has no place for the weights {shown} (a custom --spec layer's); "
                               f"the export would drop them: keep the Megatron checkpoint")
    return hf_state


def load_core(path: str, iteration: int | None = None, with_optimizer: bool = False) -> FullModel:
    """Read and merge every rank of a Megatron checkpoint (torch_dist or legacy, any layout); with
    ``with_optimizer`` also a legacy checkpoint's optimizer state (ShardedOptimizerState for ZeRO shards)."""
    if is_torch_dist(path, iteration):
        return _load_torch_dist(path, iteration)
    config, info, state, train_state = load_core_checkpoint(path, iteration, with_optimizer)
    family = info.get("hf_model_type")
    tokenizer = None
    # A training run's legacy checkpoint records its --tokenizer-* flags; one this converter wrote, its directory.
    saved = (info.get("tokenizer") or {}).get("dir")
    flags = train_state.get(TOKENIZER_FLAGS) or {}
    if saved and os.path.isdir(os.path.join(path, saved)):
        tokenizer = load_dir_tokenizer(os.path.join(path, saved), info["tokenizer"].get("type"))
    elif not saved:
        tokenizer = tokenizer_from_flags(flags)
    recorded = flags.get("tokenizer_type") not in (None, "NullTokenizer")
    reason = f"its tokenizer directory {os.path.join(path, saved)} is gone" if saved else \
        f"its recorded tokenizer files are gone ({_recorded_files(flags)})" if recorded else \
        f"the legacy checkpoint {path} records no tokenizer"
    return FullModel(config, info.get("vocab_size") or info["padded_vocab_size"],
                     int(info.get("max_position_embeddings") or info["seq_length"]), state, family, tokenizer,
                     iteration if iteration is not None else io.read_tracker(path), train_state,
                     no_tokenizer_reason=reason, tokenizer_expected=bool(saved) or recorded,
                     make_vocab_size_divisible_by=info.get("make_vocab_size_divisible_by"))


def _load_torch_dist(path: str, iteration: int | None) -> FullModel:
    full = load_full_model(path, iteration)
    info = full.model_info
    # megatron-core's own torch_dist records Megatron-LM's args (read by load_full_model), not this framework's
    own = not megatron_lm_dist.is_megatron_core_dist(checkpoint_dir(path, full.iteration)[0])
    common = read_common(path, full.iteration) if own else {}
    train_state = {"consumed_train_samples": common.get("extra", {}).get("consumed_train_samples"),
                   "opt_param_scheduler": common.get("scheduler"), VOCAB_PADDING: full.vocab_padding}
    kind = full.tokenizer.get("tokenizer_type")
    expected = bool(kind) and kind != "NullTokenizer"
    reason = (f"the tokenizer files its training run recorded ({kind}) are gone" if expected else
              f"the run that saved {path} used {kind or 'no tokenizer'}: ids without text")
    return FullModel(full.config, int(info.get("vocab_size") or info["padded_vocab_size"]),
                     int(info.get("max_position_embeddings") or info["seq_length"]), full.state, None,
                     tokenizer_from_flags(full.tokenizer), full.iteration,
                     {k: v for k, v in train_state.items() if v is not None}, reason, expected,
                     info.get("make_vocab_size_divisible_by"))


def _recorded_files(flags: dict[str, Any]) -> str:
    return ", ".join(str(flags[k]) for k in ("tokenizer_model", "vocab_file", "merge_file") if flags.get(k))


def tokenizer_from_flags(flags: dict[str, Any]) -> MegatronTokenizer | None:
    """The tokenizer a training run recorded (its ``--tokenizer-*`` flags), when its files are still there.

    None for a NullTokenizer (no text behind the ids) or when a recorded file is gone (another machine):
    then ``--tokenizer-type`` and its file flags give it.
    """
    kind = flags.get("tokenizer_type")
    files = [str(flags[k]) for k in ("tokenizer_model", "vocab_file", "merge_file") if flags.get(k)]
    if not kind or kind == "NullTokenizer" or not files or not all(os.path.exists(f) for f in files):
        return None
    return build_tokenizer(kind, tokenizer_model=flags.get("tokenizer_model"), vocab_file=flags.get("vocab_file"),
                           merge_file=flags.get("merge_file"))


def _save_core_tokenizer(tokenizer: MegatronTokenizer, save_dir: str) -> dict:
    """Write the tokenizer to ``{save_dir}/tokenizer`` (temp dir + rename); its model_info entry."""
    final, tmp = os.path.join(save_dir, "tokenizer"), os.path.join(save_dir, "tokenizer.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_tokenizer(tokenizer, tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return {"dir": "tokenizer", "type": type(tokenizer).__name__, **special_ids(tokenizer)}


def save_core(model: FullModel, path: str, tp: int, pp: int = 1, vpp: int | None = None,
              make_vocab_size_divisible_by: int = 128, iteration: int = 1) -> str:
    """Shard ``model`` for TP x PP (x virtual stages) and write it; returns the iteration directory.

    ``vpp`` 1 is no virtual pipeline (one chunk per rank: what a run whose
    ``--num-layers-per-virtual-pipeline-stage`` gives one stage per rank builds); ``vpp`` >= 2 needs
    ``pp`` >= 2, as training's ``--num-layers-per-virtual-pipeline-stage`` does (ValueError otherwise)."""
    if vpp is not None and vpp < 1:
        raise ValueError(f"--target-virtual-pipeline-parallel-size {vpp}: give 2 or more virtual stages per "
                         f"pipeline rank, or drop the flag")
    if vpp is not None and vpp > 1 and pp < 2:
        raise ValueError(f"--target-virtual-pipeline-parallel-size {vpp} needs --target-pipeline-parallel-size 2 or "
                         f"more (got {pp}): virtual stages interleave the pipeline ranks; drop the flag or raise "
                         f"the pipeline size")
    vpp = None if vpp == 1 else vpp
    try:
        config = _training_settings_for_layout(model.config, tp, pp, vpp)
        config.validate_parallel(tp, pp, vpp)
    except ValueError as exc:
        raise ValueError(f"--target-tensor-parallel-size {tp} / --target-pipeline-parallel-size {pp} do not fit "
                         f"this model: {exc}") from None
    extra = {}
    if model.tokenizer is not None:
        os.makedirs(path, exist_ok=True)
        extra["tokenizer"] = _save_core_tokenizer(model.tokenizer, path)
    info = make_model_info(config, model.vocab_size, model.max_position_embeddings, tp, pp, vpp,
                           make_vocab_size_divisible_by, hf_model_type=model.hf_family, **extra)
    return save_core_checkpoint(path, config, info, model.state, iteration, model.train_state)


def _training_settings_for_layout(config: TransformerConfig, tp: int, pp: int, vpp: int | None) -> TransformerConfig:
    """``config`` with the training settings that depend on the layout fitted to the target one.

    They change no weight, so they must not stop a re-shard (a TP 2 run with ``--sequence-parallel``
    converted to TP 1 was refused): sequence parallelism is dropped at TP 1, as Megatron-LM's
    ``validate_args`` does. (Block recompute of more layers than a chunk of the new split holds needs
    no change: it recomputes all of them, as Megatron-LM's.) Raises ConfigError (a ValueError) for a
    split that does not fit ``config.num_layers``."""
    if (config.num_layers_in_first_pipeline_stage, config.num_layers_in_last_pipeline_stage) == (None, None) \
            and config.num_layers % (pp * (vpp or 1)):  # the split's own error names training's flags
        raise ValueError(f"its {config.num_layers} layers do not split evenly over {pp * (vpp or 1)} pipeline "
                         f"chunks; give sizes whose chunk count (pipeline x virtual) divides {config.num_layers}")
    config.layer_counts(pp, vpp)  # the split's own error
    changes: dict[str, Any] = {}
    if tp == 1 and config.sequence_parallel:
        changes["sequence_parallel"] = False
    return replace(config, **changes) if changes else config


def build_parser() -> argparse.ArgumentParser:
    """Megatron-LM's ``tools/checkpoint/convert.py`` flags (the subset that applies here)."""
    p = ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--model-type", required=True, choices=["GPT"], help="only GPT models are supported")
    p.add_argument("--loader", required=True, help="hf (Hugging Face directory) or core (Megatron checkpoint)")
    p.add_argument("--saver", required=True, help="core (Megatron checkpoint) or hf (Hugging Face directory)")
    p.add_argument("--load-dir", required=True, help="directory to read")
    p.add_argument("--save-dir", required=True, help="directory to write")
    p.add_argument("--target-tensor-parallel-size", type=int, default=1, help="TP size of a core checkpoint")
    p.add_argument("--target-pipeline-parallel-size", type=int, default=1, help="PP size of a core checkpoint")
    p.add_argument("--target-virtual-pipeline-parallel-size", type=int, default=None,
                   help="virtual pipeline stages per rank of a core checkpoint (model0, model1, ...; needs a "
                        "pipeline size of 2 or more; 1 is the plain layout)")
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=None,
                   help="pad the vocabulary to a multiple of this times the TP size (as --make-vocab-size-"
                        "divisible-by; default: the value a Megatron checkpoint was saved with, 128 from HF)")
    p.add_argument("--iteration", type=int, default=None, help="iteration number of a written core checkpoint "
                                                                "(default: the source checkpoint's, 1 from HF)")
    p.add_argument("--load-iteration", type=int, default=None, help="iteration of a core checkpoint to read "
                                                                     "(default: the tracker's)")
    p.add_argument("--no-load-optim", action="store_true",
                   help="re-shard a legacy training checkpoint without its optimizer state and schedule (as "
                        "pretrain_gpt.py's flag): needed for a distributed optimizer's shards, which a re-shard "
                        "cannot carry")
    p.add_argument("--tokenizer-type", default=None, help="tokenizer to write with the model (default: the one "
                   "the source carries); SentencePieceTokenizer, GPT2BPETokenizer or HuggingFaceTokenizer")
    p.add_argument("--tokenizer-model", default=None, help="SentencePiece .model, or tokenizer.json / directory")
    p.add_argument("--vocab-file", default=None, help="GPT-2 vocab.json (GPT2BPETokenizer)")
    p.add_argument("--merge-file", default=None, help="GPT-2 merges.txt (GPT2BPETokenizer)")
    p.add_argument("--hf-model-type", choices=sorted(_HF_MODULES), default=None,
                   help="family of a written HF directory (default: the one the checkpoint came from, else "
                        "llama for RoPE models and gpt2 otherwise)")
    p.add_argument("--apply-layernorm-1p", action="store_true",
                   help="with --loader hf: write a checkpoint for pretrain_gpt.py --apply-layernorm-1p (norm weights "
                        "stored zero-centred, HF's weight - 1); a checkpoint that records it exports as weight + 1")
    g = p.add_argument_group("Megatron-LM compatibility", "flags of Megatron-LM's convert.py that change nothing here")
    g.add_argument("--megatron-path", default=None, help="accepted: the converter is this package")
    g.add_argument("--max-queue-size", type=int, default=None,
                   help="accepted: the loader hands the saver the whole model, not a queue of layers")
    g.add_argument("--no-checking", action="store_true",
                   help="accepted: the saver always checks what it receives")
    for side in ("loader", "saver"):
        g.add_argument(f"--{side}-transformer-impl", default=None, choices=["local", "transformer_engine"],
                       help="accepted: checkpoints here have one layout for both layer implementations")
    g.add_argument("--true-vocab-size", type=int, default=None,
                   help="checked: the vocabulary size without padding, which checkpoints here record (the padding "
                        "is always trimmed on load); a different value is an error")
    # Megatron-LM's llama_mistral loader flags (docs/llama_mistral.md's command).
    g.add_argument("--checkpoint-type", default=None, choices=["hf", "meta"],
                   help="hf: a Hugging Face directory (read as --loader hf); meta's original consolidated.*.pth "
                        "files are not read")
    g.add_argument("--model-size", default=None,
                   help="the shape comes from the directory's config.json; llama2-* makes a bare SentencePiece "
                        "--tokenizer-model a Llama2Tokenizer (bos first), as Megatron-LM's loader")
    g.add_argument("--bf16", action="store_true", help="write the weights in bf16 (default: the source's dtype)")
    g.add_argument("--fp16", action="store_true", help="write the weights in fp16 (default: the source's dtype)")
    return p


def _check_args(args: argparse.Namespace) -> None:
    """One-line ValueErrors for flag values no conversion can use (before anything is read or written)."""
    for name in _POSITIVE_FLAGS:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} {value}: give an integer of 1 or more")
    if args.checkpoint_type == "meta":
        raise ValueError("--checkpoint-type meta: Meta's original consolidated.*.pth files are not read; convert "
                         "them to a Hugging Face directory (transformers' convert_llama_weights_to_hf.py) and pass "
                         "--checkpoint-type hf")
    if args.bf16 and args.fp16:
        raise ValueError("--bf16 and --fp16 both given: pick the one dtype to write the weights in")
    if args.apply_layernorm_1p and _kind(args.loader, "--loader") != "hf":
        raise ValueError("--apply-layernorm-1p applies to --loader hf; a Megatron checkpoint records whether its norm "
                         "weights are zero-centred: drop the flag")


def _tokenizer_type(args: argparse.Namespace) -> str | None:
    """``--tokenizer-type``, or the type a bare ``--tokenizer-model`` implies, as Megatron-LM's llama_mistral
    loader takes it: a SentencePiece ``.model`` file is ``Llama2Tokenizer`` (bos first, as Hugging Face's
    Llama tokenizer) with a ``--model-size llama2-*``, else ``SentencePieceTokenizer``; a Hugging Face
    tokenizer file or directory is ``HuggingFaceTokenizer``."""
    if args.tokenizer_type is not None or args.tokenizer_model is None:
        return args.tokenizer_type
    if not args.tokenizer_model.endswith(".model"):
        return "HuggingFaceTokenizer"
    return "Llama2Tokenizer" if "llama2" in (args.model_size or "") else "SentencePieceTokenizer"


def _cast_weights(model: FullModel, args: argparse.Namespace) -> None:
    """``--bf16`` / ``--fp16``: the floating-point weights in that dtype (Megatron's loader ``params_dtype``)."""
    dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None
    if dtype is not None:
        model.state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in model.state.items()}


def _check_tokenizer_fits(model: FullModel, args: argparse.Namespace, given: bool) -> None:
    """ValueError when the tokenizer to be written has more tokens than the model's vocabulary: its ids from the
    vocabulary size on have no embedding row (generation refuses them, training needs a --vocab-size it lacks)."""
    if model.tokenizer is None or model.tokenizer.vocab_size <= model.vocab_size:
        return
    source = f"--tokenizer-model {args.tokenizer_model or args.vocab_file}" if given else \
        f"the one --load-dir {args.load_dir} holds"
    raise ValueError(f"the tokenizer ({source}) has {model.tokenizer.vocab_size} tokens but the model in --load-dir "
                     f"{args.load_dir} has a vocabulary of {model.vocab_size}: ids from {model.vocab_size} on would "
                     f"have no embedding row; give the tokenizer the model was trained with")


def _kind(name: str, flag: str) -> str:
    if name not in _LOADERS:
        raise ValueError(f"{flag} {name!r} is not supported; use one of {', '.join(sorted(_LOADERS))}")
    return _LOADERS[name]


def _file_above(path: str) -> str | None:
    """The nearest existing ancestor of ``path`` when it is a file (``os.makedirs`` fails after the load), else None."""
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    return None if os.path.isdir(parent) else parent


def _save(model: FullModel, args: argparse.Namespace, saver: str) -> str:
    """Write ``model`` as ``saver`` asks; returns where. ValueError naming --save-dir when it cannot be written."""
    try:
        if saver == "hf":
            save_hf(model, args.save_dir, args.hf_model_type)
            return args.save_dir
        return save_core(model, args.save_dir, args.target_tensor_parallel_size, args.target_pipeline_parallel_size,
                         args.target_virtual_pipeline_parallel_size,
                         args.make_vocab_size_divisible_by or model.make_vocab_size_divisible_by or 128,
                         args.iteration or model.iteration or 1)
    except OSError as exc:
        raise ValueError(f"--save-dir {args.save_dir} cannot be written ({exc.strerror or exc}"
                         f"{f': {exc.filename}' if exc.filename else ''}); give a directory this user can create "
                         f"and write to") from None


def _vocab_rows(model: FullModel, tp: int, make_vocab_size_divisible_by: int) -> tuple[int, int]:
    """(rows of the vocabulary tables read: the true vocabulary plus the source's padding rows, rows written
    for TP ``tp``): more written than read are copies of the last row (:func:`sharding.pad_vocab_rows`)."""
    padding = model.train_state.get(VOCAB_PADDING) or {}
    read = model.vocab_size + max((rows.shape[0] for rows in padding.values()), default=0)
    return read, pad_vocab_size(model.vocab_size, make_vocab_size_divisible_by, tp)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one conversion; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        loader, saver = _kind(args.loader, "--loader"), _kind(args.saver, "--saver")
        _check_args(args)
        if os.path.exists(args.save_dir) and not os.path.isdir(args.save_dir):
            raise ValueError(f"--save-dir {args.save_dir} is a file; give a directory (it is created if missing)")
        blocking = _file_above(args.save_dir)
        if blocking is not None:
            raise ValueError(f"--save-dir {args.save_dir} is under the file {blocking}, so it cannot be created; give "
                             f"a directory elsewhere")
        if os.path.realpath(args.save_dir) == os.path.realpath(args.load_dir):
            raise ValueError(f"--save-dir {args.save_dir} is --load-dir: the converted checkpoint would replace "
                             f"the one it is read from; give another directory")
        model = load_hf(args.load_dir, args.apply_layernorm_1p) if loader == "hf" else \
            load_core(args.load_dir, args.load_iteration, with_optimizer=saver == "core" and not args.no_load_optim)
        if args.true_vocab_size is not None and args.true_vocab_size != model.vocab_size:
            raise ValueError(f"--true-vocab-size {args.true_vocab_size} differs from the vocabulary size "
                             f"{model.vocab_size} that {args.load_dir} records (without padding); drop the flag "
                             f"or correct it")
        _cast_weights(model, args)
        tokenizer_type = _tokenizer_type(args)
        if tokenizer_type is not None:
            model.tokenizer = build_tokenizer(tokenizer_type, tokenizer_model=args.tokenizer_model,
                                              vocab_file=args.vocab_file, merge_file=args.merge_file)
        _check_tokenizer_fits(model, args, given=tokenizer_type is not None)
        where = _save(model, args, saver)
    except (FileNotFoundError, UnsupportedModel, ValueError, KeyError) as exc:
        print(f"convert.py: error: {exc}", file=sys.stderr)
        return 2
    print(f"converted {args.loader}:{args.load_dir} -> {args.saver}:{where}")
    if saver == "hf" and model.config.fp32_residual_connection and any(
            v.dtype in (torch.bfloat16, torch.float16) for v in model.state.values()):
        print(f"convert.py: note: {args.load_dir} was trained with --fp32-residual-connection; the Hugging Face "
              f"model keeps its residual stream in the weights' 16-bit dtype, so its logits differ slightly from "
              f"the run's (from_pretrained(..., dtype=torch.float32) runs the whole model, that stream included, "
              f"in fp32)", file=sys.stderr)
    if saver == "core":
        if (note := resume_flags_note(model.train_state, args.save_dir)) is not None:
            print(f"convert.py: note: {note}", file=sys.stderr)
        divisible = args.make_vocab_size_divisible_by or model.make_vocab_size_divisible_by or 128
        read, written = _vocab_rows(model, args.target_tensor_parallel_size, divisible)
        if written > read:  # their logits join the softmax: the first losses move (docs/training.md)
            print(f"convert.py: note: the vocabulary tables grow from {read} to {written} rows (--make-vocab-size-"
                  f"divisible-by {divisible} x TP {args.target_tensor_parallel_size}) by copies of the last row, as "
                  f"Megatron-LM's converter pads; those rows join the softmax, so losses start slightly apart from "
                  f"{args.load_dir}'s", file=sys.stderr)
    # Said where something is lost: a tokenizer the source recorded, or any tokenizer in a Hugging Face
    # directory (AutoTokenizer fails on it later). A re-shard of a checkpoint that records none loses nothing.
    if model.tokenizer is None and (model.tokenizer_expected or saver == "hf"):
        print(f"convert.py: note: no tokenizer written to {args.save_dir} ({model.no_tokenizer_reason}); add one "
              f"with --tokenizer-type TYPE --tokenizer-model FILE (or --vocab-file/--merge-file)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
