"""Read and write Hugging Face model directories (``config.json`` plus safetensors or torch weights)."""
from __future__ import annotations

import json
import os
from typing import Any

import torch

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


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


def save_hf_dir(path: str, hf_config: Any, state: dict[str, torch.Tensor]) -> None:
    """Write ``config.json`` and ``model.safetensors`` that ``from_pretrained`` loads."""
    from safetensors.torch import save_file  # noqa: PLC0415
    os.makedirs(path, exist_ok=True)
    hf_config.save_pretrained(path)
    save_file({k: v.detach().contiguous() for k, v in state.items()}, os.path.join(path, "model.safetensors"),
              metadata={"format": "pt"})
