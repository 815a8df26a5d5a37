"""Read and write Hugging Face model directories (``config.json`` plus safetensors or torch weights)."""
from __future__ import annotations

import copy
import json
import os
import re
import sys
from typing import Any

import torch

from megatron_core.errors import ConfigError
from megatron_core.training.checkpoint_io import atomic_save

HF_MAX_SHARD_BYTES = 50 * 10**9  # transformers' save_pretrained default, "50GB"

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


def norm_weight_to_core(weight: torch.Tensor, zero_centered_gamma: bool) -> torch.Tensor:
    """A Hugging Face norm weight (applied as is) in our storage: ``weight - 1`` when the target model keeps
    zero-centred gammas (``layernorm_zero_centered_gamma``, applied as 1 + weight); computed in fp32."""
    return (weight.float() - 1).to(weight.dtype) if zero_centered_gamma else weight


def norm_weight_to_hf(weight: torch.Tensor, zero_centered_gamma: bool) -> torch.Tensor:
    """Inverse of :func:`norm_weight_to_core`: the weight a Hugging Face norm applies, ``1 + weight``."""
    return (weight.float() + 1).to(weight.dtype) if zero_centered_gamma else weight


def _load_weight_file(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file  # noqa: PLC0415
        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def load_hf_config(path: str) -> Any:
    """The ``transformers`` config of a ``save_pretrained`` directory."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--load-dir {path} is not a directory")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"--load-dir {path} has no config.json: not a Hugging Face model directory "
                                f"(for a Megatron checkpoint use --loader core)")
    from transformers import AutoConfig  # noqa: PLC0415
    return AutoConfig.from_pretrained(path)


def load_hf_state(path: str) -> dict[str, torch.Tensor]:
    """The weights of a ``save_pretrained`` directory (safetensors or torch, sharded or not)."""
    for name in _WEIGHT_FILES:
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            continue
        if not name.endswith(".index.json"):
            return _load_weight_file(file)
        with open(file) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            shard_path = os.path.join(path, shard)
            if not os.path.isfile(shard_path):
                raise FileNotFoundError(f"{file} lists {shard}, which is missing from --load-dir {path}")
            state.update(_load_weight_file(shard_path))
        return state
    raise FileNotFoundError(f"--load-dir {path} has none of {', '.join(_WEIGHT_FILES)}")


# Buffers older transformers versions saved beside the weights (GPT-2's causal mask, Llama's RoPE frequencies).
_SAVED_BUFFERS = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")


def check_hf_state(path: str, hf_config: Any, state: dict[str, torch.Tensor]) -> None:
    """Raise ValueError when ``config.json`` does not describe the weights of ``path``.

    The reference is the ``transformers`` model built from ``hf_config`` on the meta device (no memory):
    every stored tensor must have its shape there, and none may be left without a place (e.g. a config
    with fewer layers than the file holds). A bare base model's keys (no ``transformer.`` / ``model.``
    prefix) are matched as ``from_pretrained`` matches them. Missing weights are the converters' check.
    """
    from transformers import AutoModelForCausalLM  # noqa: PLC0415
    with torch.device("meta"):
        reference = AutoModelForCausalLM.from_config(hf_config)
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    prefix = f"{reference.base_model_prefix}."
    fix = "config.json does not describe these weights; use the config they were saved with"
    for key, tensor in sorted(state.items()):
        name = key if key in expected else prefix + key
        if name not in expected:
            if key.endswith(_SAVED_BUFFERS):
                continue
            raise ValueError(f"--load-dir {path}: weight {key!r} has no place in a {type(reference).__name__} "
                             f"with this config.json ({hf_config.num_hidden_layers} layers); {fix}")
        if tuple(tensor.shape) != expected[name]:
            raise ValueError(f"--load-dir {path}: weight {key!r} has shape {tuple(tensor.shape)} but config.json "
                             f"gives {expected[name]}; {fix}")


def normal_permissions(path: str) -> None:
    """Give every file directly in ``path`` the mode a plain ``open(..., "w")`` would (0o666 minus the umask).

    safetensors and ``tempfile``-based writers create 0o600 files, which other users (a serving account,
    a shared cache) cannot read.
    """
    umask = os.umask(0)
    os.umask(umask)
    for name in os.listdir(path):
        file = os.path.join(path, name)
        if os.path.isfile(file):
            os.chmod(file, 0o666 & ~umask)


def torch_save_file(state: dict[str, torch.Tensor], output: str) -> None:
    """One ``torch.save`` file (its folder created), written to a temporary name and renamed (a killed run
    leaves no half file)."""
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    atomic_save(state, output)


def write_weights_file(state: dict[str, torch.Tensor], path: str, safe: bool) -> None:
    """One weights file: safetensors (with ``{"format": "pt"}`` metadata, as transformers writes) when ``safe``,
    else an atomic ``torch.save``; OSError / safetensors' error from the write."""
    from safetensors.torch import save_file  # noqa: PLC0415

    if safe:
        save_file(state, path, metadata={"format": "pt"})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(path, 0o666 & ~umask)  # safetensors writes 0o600; a plain open() would not
    else:
        torch_save_file(state, path)


def write_weights_dir(state: dict[str, torch.Tensor], output: str, safe: bool, max_shard_bytes: int | None,
                      total_parameters: int | None = None) -> None:
    """``output/pytorch_model.bin`` (``model.safetensors`` when ``safe``), or shards of at most
    ``max_shard_bytes`` (a tensor larger than that alone in its shard) with their index, as transformers'
    ``save_pretrained`` and DeepSpeed's ``zero_to_fp32.py`` write them: huggingface_hub's
    ``split_torch_state_dict_into_shards`` cuts the state in key order (tensors sharing storage in one
    shard) and names the files ``model-00001-of-0000N.safetensors`` ...; the index
    ``model.safetensors.index.json`` (``pytorch_model.bin.index.json``) holds ``{"metadata": {"total_size":
    bytes}, "weight_map": {key: file}}``, plus transformers' ``total_parameters`` when given (a model
    directory). Shard files of an earlier write that this one does not name are removed, as transformers does,
    and so is the one file (index) of an earlier write of the same format that transformers would read instead
    of this write's shards (file); transformers' save_pretrained leaves it. ConfigError when huggingface_hub is
    missing (it comes with transformers), or for .bin output where an earlier model.safetensors (or its index)
    would be read instead."""
    try:
        from huggingface_hub import split_torch_state_dict_into_shards
    except ImportError:
        raise ConfigError("writing an output directory needs huggingface_hub (pip install huggingface_hub, or "
                          "transformers); or give an output file ending in .safetensors or .bin") from None
    os.makedirs(output, exist_ok=True)
    weights_name = "model.safetensors" if safe else "pytorch_model.bin"
    # transformers' from_pretrained reads model.safetensors, then its index, before any pytorch_model*.bin
    shadowing = [n for n in ("model.safetensors", "model.safetensors.index.json") if not safe
                 and os.path.isfile(os.path.join(output, n))]
    if shadowing:
        raise ConfigError(f"{os.path.join(output, shadowing[0])} is an earlier write's, which transformers would load "
                          f"instead of the pytorch_model*.bin files asked for; remove it, write to another directory, "
                          f"or pass --safe_serialization")
    pattern = weights_name.replace(".bin", "{suffix}.bin").replace(".safetensors", "{suffix}.safetensors")
    limit = sys.maxsize if max_shard_bytes is None else max_shard_bytes  # None: one file (DeepSpeed's without a limit)
    split = split_torch_state_dict_into_shards(state, filename_pattern=pattern, max_shard_size=limit)
    stale = re.compile(re.escape(pattern).replace(re.escape("{suffix}"), r"-\d{5}-of-\d{5}"))
    for name in os.listdir(output):
        if stale.fullmatch(name) and name not in split.filename_to_tensors:
            os.remove(os.path.join(output, name))
    for file, keys in split.filename_to_tensors.items():
        write_weights_file({k: state[k] for k in keys}, os.path.join(output, file), safe)
    index = os.path.join(output, weights_name + ".index.json")
    if not split.is_sharded and os.path.exists(index):
        os.remove(index)  # an earlier sharded write's: transformers would read it instead of the one file
    single = os.path.join(output, weights_name)
    if split.is_sharded and os.path.isfile(single):
        os.remove(single)  # an earlier one-file write's: transformers would read it instead of the shards
    if split.is_sharded:
        metadata = {**({"total_parameters": total_parameters} if total_parameters is not None else {}),
                    **split.metadata}
        with open(index, "w", encoding="utf-8") as f:
            f.write(json.dumps({"metadata": metadata, "weight_map": split.tensor_to_filename}, indent=2,
                               sort_keys=True) + "\n")


def save_hf_dir(path: str, hf_config: Any, state: dict[str, torch.Tensor],
                max_shard_bytes: int = HF_MAX_SHARD_BYTES) -> None:
    """Write ``config.json`` (with the weights' dtype) and the weights as ``save_pretrained`` does:
    ``model.safetensors``, or shards of at most ``max_shard_bytes`` with their index (transformers' default
    limit, 50 GB), so that ``from_pretrained`` loads the directory; see :func:`write_weights_dir`."""
    os.makedirs(path, exist_ok=True)
    dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
    if len(dtypes) == 1:  # save_pretrained records the weights' dtype, which from_pretrained(dtype="auto") reads
        # "dtype" from transformers 5 on (set in the config's __init__), "torch_dtype" before
        hf_config = copy.copy(hf_config)  # the caller's config stays as given
        setattr(hf_config, "dtype" if "dtype" in vars(hf_config) else "torch_dtype", dtypes.pop())
    hf_config.save_pretrained(path)
    state = {k: v.detach().contiguous() for k, v in state.items()}
    write_weights_dir(state, path, True, max_shard_bytes, sum(v.numel() for v in state.values()))
    normal_permissions(path)
