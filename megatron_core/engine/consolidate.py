"""One fp32 state dict from an engine checkpoint of any ZeRO stage, DP size and AutoTP size.

DeepSpeed users run ``zero_to_fp32.py`` for this; here it is one call (or ``tools/zero_to_fp32.py``):
each parameter is rebuilt from the fp32 main values in the optimizer fragment files (every DP rank's
piece; see :mod:`megatron_core.engine.checkpoint`), the TP shards are concatenated along the
dimension AutoTP split (de-interleaving fused QKV by its stride) and put back in the Hugging Face
layout, tied weights get every state-dict key they had, and buffers come from the model file. The
result is exact: the fp32 master values, no re-rounding.

Output: a ``.safetensors`` file; a ``.bin`` / ``.pt`` / ``.pth`` file written with ``torch.save`` (what
DeepSpeed's older ``zero_to_fp32.py CHECKPOINT_DIR pytorch_model.bin`` writes); when the model came from
``transformers``, a Hugging Face directory (``config.json`` + ``model.safetensors``, tied keys left to
``from_pretrained`` to re-tie); otherwise a directory as DeepSpeed's current ``zero_to_fp32.py
CHECKPOINT_DIR OUTPUT_DIR`` writes it: ``pytorch_model.bin`` (``model.safetensors`` with
``--safe_serialization``), cut into ``pytorch_model-00001-of-0000N.bin`` ... with
``pytorch_model.bin.index.json`` (``{"metadata": {"total_size": bytes}, "weight_map": {key: file}}``, Hugging
Face's sharded layout, cut by huggingface_hub as transformers and DeepSpeed cut it) when larger than
``--max_shard_size``.
"""

from __future__ import annotations

import json
import os
import re

import torch

from megatron_core.checkpoint.hf_io import normal_permissions, torch_save_file, write_weights_dir, write_weights_file
from megatron_core.engine import deepspeed_checkpoint
from megatron_core.engine.checkpoint import full_fragments
from megatron_core.engine.checkpoint_files import foreign_states, load_states, model_file, optim_files, read_latest
from megatron_core.engine.reshard import frozen_keys, to_full, trained
from megatron_core.errors import ArgumentParser, ConfigError, named_for


def _tag_folder(checkpoint_dir: str, tag: str | None) -> str:
    if tag is None:
        if os.path.exists(model_file(checkpoint_dir, 0)) or \
                os.path.exists(deepspeed_checkpoint.zero3_model_file(checkpoint_dir)):
            return checkpoint_dir  # the tag folder itself
        lost = deepspeed_checkpoint.zero3_rank0_lost(checkpoint_dir)  # the tag folder of DeepSpeed's ZeRO-3, less one
        if lost is not None:
            raise ConfigError(lost)
        tag = read_latest(checkpoint_dir)
        if tag is None and os.path.exists(os.path.join(checkpoint_dir, "latest_checkpointed_iteration.txt")):
            # Megatron's tracker file: a pretrain_gpt.py checkpoint, which has its own converter.
            raise ConfigError(
                f"{checkpoint_dir!r} is a pretrain_gpt.py checkpoint, not an engine one; export it with "
                f"tools/checkpoint/convert.py --model-type GPT --loader core --saver hf --load-dir "
                f"{checkpoint_dir} --save-dir DIR"
            )
        if tag is None:
            raise ConfigError(
                f"{checkpoint_dir!r} has no 'latest' file and no mp_rank_00_model_states.pt; pass the "
                f"tag folder or --tag"
            )
    folder = os.path.join(checkpoint_dir, tag)
    if not os.path.exists(model_file(folder, 0)) and not os.path.exists(deepspeed_checkpoint.zero3_model_file(folder)):
        lost = deepspeed_checkpoint.zero3_rank0_lost(folder)
        raise ConfigError(lost if lost is not None else
                          f"{folder!r} is not an engine checkpoint (no mp_rank_00_model_states.pt)")
    return folder


def consolidate_state_dict(checkpoint_dir: str, tag: str | None = None) -> tuple[dict[str, torch.Tensor], dict | None]:
    """``(state_dict, hf_config)``: every key of the model's full state dict, parameters in fp32.

    ``checkpoint_dir``: a save directory (its ``latest`` tag is read, or ``tag``) or a tag folder.
    Raises ConfigError when files are missing.
    """
    state, hf_config, _ = _read(checkpoint_dir, tag)
    return state, hf_config


def _read(checkpoint_dir: str, tag: str | None) -> tuple[dict[str, torch.Tensor], dict | None, dict[str, dict]]:
    """:func:`_consolidate` of the tag folder; its errors named ``zero_to_fp32:``, the command's name, whichever
    reader (this engine's files or DeepSpeed's) raised them."""
    with named_for("zero_to_fp32"):
        return _consolidate(_tag_folder(checkpoint_dir, tag))


def _consolidate(folder: str) -> tuple[dict[str, torch.Tensor], dict | None, dict[str, dict]]:
    """:func:`consolidate_state_dict` of a tag folder, and the saved ``param_meta`` (read with it, once)."""
    path = model_file(folder, 0)
    if not os.path.exists(path):  # DeepSpeed's ZeRO-3 writes one model-states file per DP rank
        path = deepspeed_checkpoint.zero3_model_file(folder)
    first = deepspeed_checkpoint.read_model_states(path)
    if deepspeed_checkpoint.is_deepspeed_states(first):
        state, meta = deepspeed_checkpoint.consolidate(folder, first, path)
        return state, None, meta
    foreign = foreign_states(first, path)
    if foreign is not None:
        raise ConfigError(foreign)
    tp_size = first["tp_size"]
    per_rank = []
    for tp_rank in range(tp_size):
        saved = (
            first if tp_rank == 0 else load_states(model_file(folder, tp_rank))
        )
        values, _, _ = full_fragments(optim_files(folder, tp_rank, saved), saved["param_meta"])
        per_rank.append((saved, values))
    meta = first["param_meta"]
    out: dict[str, torch.Tensor] = {}
    for key, tensor in first["module"].items():
        out[key] = tensor.clone()  # buffers (and the training-dtype weights, replaced below)
    for name, info in meta.items():
        if not trained(info) and name not in first["module"]:
            continue  # frozen and saved with exclude_frozen_parameters: in no file (DeepSpeed's output lacks it too)
        # A frozen parameter has no fp32 main value: its shards are the model files' (training dtype).
        shards = [values[name].view(saved["param_meta"][name]["local_shape"]) if trained(info)
                  else saved["module"][name].float() for saved, values in per_rank]
        full = to_full(shards, info).contiguous()
        for key in [name, *info["aliases"]]:
            out[key] = full.clone() if key != name else full
    hf_config = json.loads(first["hf_config"]) if first.get("hf_config") else None
    return out, hf_config, meta


TORCH_SAVE_SUFFIXES = (".bin", ".pt", ".pth")
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # huggingface_hub's units


def parse_size(text: str) -> int:
    """Bytes of ``"5GB"`` / ``"500MB"`` / ``"1KiB"`` / ``"1000"`` (DeepSpeed's and Hugging Face's
    ``max_shard_size``); ConfigError naming the flag otherwise."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() if match else None
    if match is None or unit not in _SIZE_UNITS or float(match.group(1)) <= 0:
        raise ConfigError(f"--max_shard_size {text!r}: give a size such as 5GB, 500MB or a number of bytes")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def save_consolidated(checkpoint_dir: str, output: str, tag: str | None = None, hf_dir: bool | None = None, *,
                      safe_serialization: bool = False, max_shard_bytes: int | None = None,
                      exclude_frozen_parameters: bool = False) -> str:
    """Write the consolidated fp32 weights to ``output`` (a ``.safetensors`` file, a ``torch.save`` file ending
    in ``.bin``/``.pt``/``.pth``, an HF directory, or DeepSpeed's output directory); returns it.

    ``hf_dir`` None: an HF directory when the checkpoint holds a Hugging Face config and ``output`` does
    not end in ``.safetensors``; False: a ``.safetensors`` file. Otherwise (a plain model, no file suffix)
    :func:`write_weights_dir` with ``safe_serialization`` and ``max_shard_bytes``, as DeepSpeed's
    ``zero_to_fp32.py``. ``exclude_frozen_parameters`` leaves ``requires_grad=False`` parameters out.
    """
    state, hf_config, meta = _read(checkpoint_dir, tag)
    if exclude_frozen_parameters:
        frozen = frozen_keys(meta)
        state = {k: v for k, v in state.items() if k not in frozen}
    if output.endswith(TORCH_SAVE_SUFFIXES):
        torch_save_file(state, output)
        return output
    if output.endswith(".safetensors") or hf_dir is False:
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        write_weights_file(state, output, safe=True)
        return output
    if hf_config is None:
        if hf_dir:
            raise ConfigError(f"{checkpoint_dir!r} was not trained from a transformers model; write a .safetensors "
                              f"file")
        write_weights_dir(state, output, safe_serialization, max_shard_bytes)
        return output
    tied = {alias for info in meta.values() for alias in info["aliases"]}
    untied = {k: v for k, v in state.items() if k not in tied}
    write_weights_dir(untied, output, True, max_shard_bytes, sum(untied[k].numel() for k in meta if k in untied))
    hf_config = {**hf_config, "torch_dtype": "float32"}
    hf_config.pop("dtype", None)
    with open(os.path.join(output, "config.json"), "w", encoding="utf-8") as f:
        json.dump(hf_config, f, indent=2)
    normal_permissions(output)
    return output


def _is_write_failure(exc: BaseException, output: str) -> bool:
    """An OSError on a path in ``output``'s folder (or in ``output``), or safetensors' SafetensorError (it
    wraps its writer's I/O error in its own class; reading the checkpoint never goes through safetensors)."""
    if type(exc).__name__ == "SafetensorError":
        return True
    if not isinstance(exc, OSError) or exc.filename is None:
        return False
    return os.path.abspath(str(exc.filename)).startswith(os.path.dirname(os.path.abspath(output)))


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        return f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc.strerror or exc)
    return str(exc)


def main(argv: list[str] | None = None) -> int:
    """``tools/zero_to_fp32.py CHECKPOINT_DIR OUTPUT [--tag TAG]`` and DeepSpeed's current flags."""
    parser = ArgumentParser(
        description="Consolidate an engine checkpoint (any ZeRO stage, DP and AutoTP "
        "size) into fp32 safetensors, a torch.save file, a Hugging Face directory or DeepSpeed's output directory."
    )
    parser.add_argument("checkpoint_dir", help="the save directory (reads its 'latest' tag) or a tag folder")
    parser.add_argument("output", help="a .safetensors file, a .bin/.pt/.pth file (torch.save, as DeepSpeed's older "
                        "zero_to_fp32.py CHECKPOINT_DIR pytorch_model.bin), or a directory: a Hugging Face model for "
                        "a transformers model, else pytorch_model.bin (model.safetensors) in it, as DeepSpeed's "
                        "zero_to_fp32.py CHECKPOINT_DIR OUTPUT_DIR")
    parser.add_argument("-t", "--tag", default=None, help="checkpoint tag (default: the 'latest' file)")
    parser.add_argument("--safetensors", action="store_true", help="one file even for a transformers model")
    parser.add_argument("--safe_serialization", action="store_true",
                        help="DeepSpeed's: model.safetensors in the output directory instead of pytorch_model.bin")
    parser.add_argument("--max_shard_size", default="5GB",
                        help="DeepSpeed's: cut a directory's weights into shards of at most this size (default 5GB)")
    parser.add_argument("--exclude_frozen_parameters", action="store_true",
                        help="DeepSpeed's: leave out parameters with requires_grad=False")
    parser.add_argument("-d", "--debug", action="store_true", help="DeepSpeed's: accepted; nothing more is printed")
    args = parser.parse_args(argv)
    try:
        path = save_consolidated(args.checkpoint_dir, args.output, args.tag, hf_dir=False if args.safetensors else None,
                                 safe_serialization=args.safe_serialization,
                                 max_shard_bytes=parse_size(args.max_shard_size),
                                 exclude_frozen_parameters=args.exclude_frozen_parameters)
    except ConfigError as exc:
        print(f"error: {exc}")
        return 2
    except Exception as exc:  # noqa: BLE001 - only a failed write, named; anything else is raised again
        if not _is_write_failure(exc, args.output):
            raise
        print(f"error: writing {args.output!r} failed ({_reason(exc)}); give an output path in a writable directory")
        return 2
    print(f"wrote {path}")
    return 0
