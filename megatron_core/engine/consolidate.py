"""One fp32 state dict from an engine checkpoint of any ZeRO stage, DP size and AutoTP size.

DeepSpeed users run ``zero_to_fp32.py`` for this; here it is one call (or ``tools/zero_to_fp32.py``):
each parameter is rebuilt from the fp32 main values in the optimizer fragment files (every DP rank's
piece; see :mod:`megatron_core.engine.checkpoint`), the TP shards are concatenated along the
dimension AutoTP split (de-interleaving fused QKV by its stride) and put back in the Hugging Face
layout, tied weights get every state-dict key they had, and buffers come from the model file. The
result is exact: the fp32 master values, no re-rounding.

Output: a ``.safetensors`` file; a ``.bin`` / ``.pt`` / ``.pth`` file written with ``torch.save`` (what
DeepSpeed's ``zero_to_fp32.py CHECKPOINT_DIR pytorch_model.bin`` writes); or, when the model came from
``transformers``, a Hugging Face directory (``config.json`` + ``model.safetensors``, tied keys left to
``from_pretrained`` to re-tie).
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from megatron_core.engine.checkpoint import atomic_save, full_fragments, model_file, optim_files, read_latest, trained
from megatron_core.engine.reshard import to_full
from megatron_core.errors import ConfigError


def _tag_folder(checkpoint_dir: str, tag: str | None) -> str:
    if tag is None:
        if os.path.exists(model_file(checkpoint_dir, 0)):
            return checkpoint_dir  # the tag folder itself
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
    if not os.path.exists(model_file(folder, 0)):
        raise ConfigError(f"{folder!r} is not an engine checkpoint (no mp_rank_00_model_states.pt)")
    return folder


def consolidate_state_dict(checkpoint_dir: str, tag: str | None = None) -> tuple[dict[str, torch.Tensor], dict | None]:
    """``(state_dict, hf_config)``: every key of the model's full state dict, parameters in fp32.

    ``checkpoint_dir``: a save directory (its ``latest`` tag is read, or ``tag``) or a tag folder.
    Raises ConfigError when files are missing.
    """
    folder = _tag_folder(checkpoint_dir, tag)
    first = torch.load(model_file(folder, 0), weights_only=True, map_location="cpu")
    tp_size = first["tp_size"]
    per_rank = []
    for tp_rank in range(tp_size):
        saved = (
            first if tp_rank == 0 else torch.load(model_file(folder, tp_rank), weights_only=True, map_location="cpu")
        )
        files = optim_files(folder, tp_rank)
        if not files:
            raise ConfigError(f"{folder!r}: no optimizer fragment files for TP rank {tp_rank}")
        values, _, _ = full_fragments(files, saved["param_meta"])
        per_rank.append((saved, values))
    meta = first["param_meta"]
    out: dict[str, torch.Tensor] = {}
    for key, tensor in first["module"].items():
        out[key] = tensor.clone()  # buffers (and the training-dtype weights, replaced below)
    for name, info in meta.items():
        # A frozen parameter has no fp32 main value: its shards are the model files' (training dtype).
        shards = [values[name].view(saved["param_meta"][name]["local_shape"]) if trained(info)
                  else saved["module"][name].float() for saved, values in per_rank]
        full = to_full(shards, info).contiguous()
        for key in [name, *info["aliases"]]:
            out[key] = full.clone() if key != name else full
    hf_config = json.loads(first["hf_config"]) if first.get("hf_config") else None
    return out, hf_config


TORCH_SAVE_SUFFIXES = (".bin", ".pt", ".pth")


def _torch_save(state: dict[str, torch.Tensor], output: str) -> None:
    """One ``torch.save`` file, written to a temporary name and renamed (a killed run leaves no half file)."""
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    atomic_save(state, output)


def save_consolidated(checkpoint_dir: str, output: str, tag: str | None = None, hf_dir: bool | None = None) -> str:
    """Write the consolidated fp32 weights to ``output`` (a ``.safetensors`` file, a ``torch.save`` file ending
    in ``.bin``/``.pt``/``.pth``, or an HF directory); returns it.

    ``hf_dir`` None: a directory when the checkpoint holds a Hugging Face config and ``output`` does
    not end in ``.safetensors``.
    """
    from safetensors.torch import save_file  # only the tool needs it

    from megatron_core.checkpoint.hf_io import normal_permissions

    state, hf_config = consolidate_state_dict(checkpoint_dir, tag)
    if output.endswith(TORCH_SAVE_SUFFIXES):
        _torch_save(state, output)
        return output
    if hf_dir is None:
        hf_dir = hf_config is not None and not output.endswith(".safetensors")
    if not hf_dir:
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        save_file(state, output)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(output, 0o666 & ~umask)  # safetensors writes 0o600; a plain open() would not
        return output
    if hf_config is None:
        raise ConfigError(f"{checkpoint_dir!r} was not trained from a transformers model; write a .safetensors file")
    folder = _tag_folder(checkpoint_dir, tag)
    meta = torch.load(model_file(folder, 0), weights_only=True, map_location="cpu")["param_meta"]
    tied = {alias for info in meta.values() for alias in info["aliases"]}
    os.makedirs(output, exist_ok=True)
    save_file(
        {k: v for k, v in state.items() if k not in tied},
        os.path.join(output, "model.safetensors"),
        metadata={"format": "pt"},
    )
    hf_config = {**hf_config, "torch_dtype": "float32"}
    hf_config.pop("dtype", None)
    with open(os.path.join(output, "config.json"), "w", encoding="utf-8") as f:
        json.dump(hf_config, f, indent=2)
    normal_permissions(output)
    return output


def main(argv: list[str] | None = None) -> int:
    """``tools/zero_to_fp32.py CHECKPOINT_DIR OUTPUT [--tag TAG]``."""
    parser = argparse.ArgumentParser(
        description="Consolidate an engine checkpoint (any ZeRO stage, DP and AutoTP "
        "size) into fp32 safetensors or a Hugging Face directory."
    )
    parser.add_argument("checkpoint_dir", help="the save directory (reads its 'latest' tag) or a tag folder")
    parser.add_argument("output", help="a .safetensors file, a .bin/.pt/.pth file (torch.save, as DeepSpeed's "
                        "zero_to_fp32.py CHECKPOINT_DIR pytorch_model.bin), or a directory for a Hugging Face model")
    parser.add_argument("-t", "--tag", default=None, help="checkpoint tag (default: the 'latest' file)")
    parser.add_argument("--safetensors", action="store_true", help="one file even for a transformers model")
    args = parser.parse_args(argv)
    try:
        path = save_consolidated(args.checkpoint_dir, args.output, args.tag, hf_dir=False if args.safetensors else None)
    except ConfigError as exc:
        print(f"error: {exc}")
        return 2
    print(f"wrote {path}")
    return 0
