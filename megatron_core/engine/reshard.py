"""Load an engine checkpoint at another AutoTP size: DeepSpeed's universal checkpoint, done on load.

DeepSpeed changes the TP size of a checkpoint with an offline step (``ds_to_universal.py``: every
parameter and its optimizer state merged to full size, then read back sliced). Here the files already
name each parameter and how TP split it (``param_meta``: ``tp_dim``, ``stride``, ``hf_transpose``), and the
optimizer fragments are addressed by parameter name, so ``load_checkpoint`` does the same in memory:

1. each saved TP rank's tensor (model weight, fp32 main value, ``exp_avg``, ``exp_avg_sq``, ...) is
   viewed at its local shape, the shards are joined with
   :func:`megatron_core.tensor_parallel.utils.merge_shards` (de-interleaving GPT-2's fused QKV by its
   stride 3) and put in the Hugging Face layout (GPT-2's ``Conv1D`` weights are [in, out] at AutoTP 1,
   [out, in] under AutoTP) -- what :mod:`megatron_core.engine.consolidate` writes;
2. this rank's piece is cut from that full tensor with
   :func:`megatron_core.tensor_parallel.utils.shard_of_master`, exactly as AutoTP sharded the HF weights
   when the engine was built, using this engine's own ``param_meta``.

Adam's moments are element-wise, so moving them with their elements is exact; the scalar ``step``, the
loss scaler, the lr scheduler and the client state do not depend on TP. Every rank reads every TP rank's
files of the checkpoint and holds the full fp32 values and optimizer state of the model in host memory
while loading (what ``ds_to_universal`` holds too).
"""

from __future__ import annotations

import torch

from megatron_core.errors import ConfigError
from megatron_core.tensor_parallel.utils import merge_shards, shard_of_master


def key_owners(meta: dict[str, dict]) -> dict[str, str]:
    """State-dict key -> the parameter name it belongs to (tied weights: every alias -> the owner)."""
    return {key: name for name, info in meta.items() for key in [name, *info["aliases"]]}


def trained(info: dict) -> bool:
    """Whether the optimizer holds the parameter of ``param_meta`` entry ``info`` (fp32 main, state): a
    frozen one (``requires_grad`` False) is in the model files only. Checkpoints saved before the flag: True."""
    return bool(info.get("requires_grad", True))


def frozen_keys(meta: dict[str, dict]) -> set[str]:
    """The state-dict keys (aliases included) of the frozen parameters of ``param_meta`` ``meta``."""
    return {key for name, info in meta.items() if not trained(info) for key in [name, *info["aliases"]]}


def to_full(shards: list[torch.Tensor], info: dict) -> torch.Tensor:
    """The full tensor in Hugging Face's layout from every saved TP rank's shard (each at its local shape).

    ``info``: the parameter's ``param_meta`` entry of the saving run. A parameter TP does not split is
    identical on every rank: rank 0's is taken.
    """
    full = merge_shards(shards, info["tp_dim"], info["stride"]) if info["tp_dim"] >= 0 else shards[0]
    return full.t() if info["hf_transpose"] else full


def to_local(full: torch.Tensor, info: dict, tp_rank: int, tp_size: int, what: str) -> torch.Tensor:
    """This rank's shard of ``full`` (HF layout), laid out as this engine's parameter (``info``: its
    ``param_meta`` entry). Raises ConfigError naming ``what`` when the shapes say another model."""
    local = full.t() if info["hf_transpose"] else full
    expected = list(info["local_shape"])
    if info["tp_dim"] >= 0:
        expected[info["tp_dim"]] *= tp_size
    if list(local.shape) != expected:
        raise ConfigError(
            f"{what} is {list(local.shape)} in the checkpoint (merged over its AutoTP ranks), "
            f"{expected} in this model; load it into the model it was saved from"
        )
    if info["tp_dim"] >= 0:
        local = shard_of_master(local, info["tp_dim"], info["stride"], tp_rank, tp_size)
    return local.contiguous()


def reshard_module(saved: list[dict], target_meta: dict[str, dict], tp_rank: int, tp_size: int) -> dict:
    """This rank's module state dict cut from the model files of every saved TP rank (``saved``, in TP order).

    Keys that are no parameter of both models (buffers, or keys of another model) are passed through from
    TP rank 0's file, for ``load_state_dict(strict=True)`` to accept or report.
    """
    saved_meta = saved[0]["param_meta"]
    saved_owner, target_owner = key_owners(saved_meta), key_owners(target_meta)
    out = {}
    for key, tensor in saved[0]["module"].items():
        # A tied key one side does not list as an alias (checkpoints saved under ZeRO-3 before aliases were
        # read from the module tree) takes the layout of the parameter the other side ties it to.
        owner = saved_owner.get(key, target_owner.get(key))
        target = target_owner.get(key, owner)
        if owner not in saved_meta or target not in target_meta:
            out[key] = tensor
            continue
        full = to_full([files["module"][key] for files in saved], saved_meta[owner])
        out[key] = to_local(full, target_meta[target], tp_rank, tp_size, key)
    return out


def _moved(flats: list[torch.Tensor], saved_meta: list[dict[str, dict]], source: str, info: dict, tp_rank: int,
           tp_size: int, name: str) -> torch.Tensor:
    """One flat per-parameter tensor of every saved TP rank -> this rank's flat piece (:func:`to_full`,
    then :func:`to_local`)."""
    shards = [flat.view(meta[source]["local_shape"]) for flat, meta in zip(flats, saved_meta, strict=True)]
    return to_local(to_full(shards, saved_meta[0][source]), info, tp_rank, tp_size, name).reshape(-1)


def reshard_fragments(
    per_rank: list[tuple[dict[str, torch.Tensor], dict[str, dict]]],
    saved_meta: list[dict[str, dict]],
    target_meta: dict[str, dict],
    tp_rank: int,
    tp_size: int,
) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """``(values, states)`` of this rank's parameters, flat, as :func:`checkpoint.full_fragments` returns them
    for a checkpoint of this AutoTP size.

    ``per_rank``: ``(values, states)`` of each saved TP rank from ``full_fragments``; ``saved_meta``: each
    saved TP rank's ``param_meta``. Raises ConfigError for a parameter the checkpoint does not hold. A
    parameter trained here but frozen when saved is refused before this (``checkpoint._load_optimizer``).
    """
    owner = key_owners(saved_meta[0])
    values: dict[str, torch.Tensor] = {}
    states: dict[str, dict[str, torch.Tensor]] = {}
    for name, info in target_meta.items():
        if not trained(info):
            continue  # frozen: no optimizer state, its value came with the module (reshard_module)
        source = next((owner[key] for key in [name, *info["aliases"]] if key in owner), None)
        if source is None:
            raise ConfigError(
                f"the checkpoint's optimizer state has no parameter {name!r}; load it into "
                f"the model it was saved from"
            )
        where = (saved_meta, source, info, tp_rank, tp_size, name)
        values[name] = _moved([rank_values[source] for rank_values, _ in per_rank], *where)
        states[name] = {
            key: _moved([rank_states[source][key] for _, rank_states in per_rank], *where)
            for key in per_rank[0][1].get(source, {})
        }
    return values, states
