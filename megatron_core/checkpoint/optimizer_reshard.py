"""Carry the optimizer state of a legacy training checkpoint through a TP/PP re-shard (convert.py).

A legacy file (``mp_rank_.../model_optim_rng.pt``) of the replicated optimizer (plain DP, ZeRO stage 0)
holds ``optimizer`` as :meth:`ReplicatedOptimizer.state_dict` writes it: the torch optimizer's state
dict, whose integer ids number the main parameters group by group (weight-decay group: parameters of
two or more dimensions, then the no-decay group, then with ``--decoupled-lr`` the word embedding and
output layer weights), each group in the order the rank's model chunks list
their parameters (which is the order of their state dict keys); and ``fp32_from_fp16_params``, the fp32
main copies of the non-fp32 parameters in that parameter order. Here the ids become parameter names,
so every per-element state tensor (Adam's ``exp_avg`` and ``exp_avg_sq``, SGD's ``momentum_buffer``,
the fp32 main copy) is a state dict shaped like the model's and goes through the same TP merge / split
and pipeline cut as the weights (``sharding``); scalars (``step``) follow their parameter. The files of
a new layout get the same format back, so ``pretrain_gpt.py --load`` restores the optimizer as if it
had been saved under that layout.

The distributed optimizer's shards (``distrib_optim_dpNNN.pt``) are flat pieces of the DDP buckets of
the layout they were saved under, which a re-shard changes; they are refused (``ShardedOptimizerState``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from megatron_core.checkpoint.sharding import chunk_keys, merge_chunks, merge_tp_shards, tp_shards
from megatron_core.optimizer.optimizer import group_index
from megatron_core.transformer.config import TransformerConfig

MAIN = "fp32_from_fp16_params"  # the per-name kind holding the fp32 main copies of bf16/fp16 parameters


class ShardedOptimizerState(ValueError):
    """The checkpoint holds distributed-optimizer shards, which a re-shard cannot carry."""


@dataclass
class FullOptimizerState:
    """The optimizer state of a whole model (TP = 1, PP = 1, true vocabulary), keyed by parameter name.

    ``tensors[kind][name]`` is shaped like weight ``name`` (kinds: the torch state's per-element keys and
    :data:`MAIN`); ``scalars[kind][name]`` holds per-parameter scalars (``step``).
    """

    tensors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    scalars: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    param_groups: list[dict[str, Any]] = field(default_factory=list)  # hyper-parameters, without "params"
    grad_scaler: Any = None
    # ``vocab_padding[kind][name]``: the rows of vocabulary table ``name`` past the true vocabulary, kept
    # for the new layout's padding as the weights' (sharding.pad_vocab_rows).
    vocab_padding: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


# The parameters of the --decoupled-lr group (GPTModel tags them is_embedding_or_output_parameter).
_DECOUPLED_NAMES = ("embedding.word_embeddings.weight", "output_layer.weight")


def _is_decoupled(groups: list[dict]) -> bool:
    """Whether the saved optimizer has the third, ``--decoupled-lr`` group (megatron.core's ``is_decoupled_lr``)."""
    return len(groups) == 3 and bool(groups[2].get("is_decoupled_lr"))


def _group_of(name: str, value: torch.Tensor, decoupled: bool) -> int:
    """The group index ``build_torch_optimizer`` gives a parameter (``param_group_index``); a saved state
    has no tags, so the embedding and output weights are known by name."""
    return group_index(value.dim(), name in _DECOUPLED_NAMES, decoupled)


def _param_order(model_states: list[dict[str, torch.Tensor]], decoupled: bool) -> list[tuple[int, str]]:
    """(chunk, name) of every parameter in the torch optimizer's id order: group by group (decay, no
    decay, then the --decoupled-lr group when ``decoupled``), each in the chunks' parameter order."""
    names = [(c, n) for c, state in enumerate(model_states) for n in state]
    return [(c, n) for group in range(3) for c, n in names if _group_of(n, model_states[c][n], decoupled) == group]


def _group_sizes(model_states: list[dict[str, torch.Tensor]], decoupled: bool) -> list[int]:
    sizes = [0, 0, 0]
    for state in model_states:
        for name, value in state.items():
            sizes[_group_of(name, value, decoupled)] += 1
    return sizes if decoupled else sizes[:2]


def _check_groups(saved_groups: list[dict], model_states: list[dict[str, torch.Tensor]], where: str) -> None:
    counts = [len(g["params"]) for g in saved_groups]
    expected = _group_sizes(model_states, _is_decoupled(saved_groups))
    if counts != expected:
        raise ValueError(f"{where}: the optimizer's parameter groups hold {counts} parameters, its model "
                         f"{expected} (weight decay, no weight decay[, --decoupled-lr]): the optimizer state does not "
                         f"belong to this model; convert with --no-load-optim to carry the weights only")


# One rank's state by name: per model chunk, {kind: {chunk-local parameter name: tensor}}.
ChunkStates = list[dict[str, dict[str, torch.Tensor]]]


def rank_state_by_name(saved: dict[str, Any], model_states: list[dict[str, torch.Tensor]], where: str
                       ) -> tuple[ChunkStates, ChunkStates]:
    """One rank's ``optimizer`` entry by parameter name: ``(tensors, scalars)``, each per chunk
    ``{kind: {name: value}}``; tensors are shaped like their weight. ValueError names ``where``."""
    inner = saved["optimizer"]
    _check_groups(inner["param_groups"], model_states, where)
    order = _param_order(model_states, _is_decoupled(inner["param_groups"]))
    tensors: ChunkStates = [{} for _ in model_states]
    scalars: ChunkStates = [{} for _ in model_states]
    for index, entry in inner["state"].items():
        chunk, name = order[int(index)]
        for kind, value in entry.items():
            if value is None:  # SGD without momentum keeps momentum_buffer None
                continue
            if torch.is_tensor(value) and value.dim() > 0 and value.shape == model_states[chunk][name].shape:
                tensors[chunk].setdefault(kind, {})[name] = value
            else:
                scalars[chunk].setdefault(kind, {})[name] = torch.as_tensor(value).clone()
    mains = [(c, n) for c, state in enumerate(model_states) for n, v in state.items() if v.dtype != torch.float32]
    copies = saved.get(MAIN) or []
    if len(copies) != len(mains):
        raise ValueError(f"{where}: {len(copies)} fp32 main parameters for {len(mains)} non-fp32 weights; the "
                         f"optimizer state does not belong to this model; convert with --no-load-optim")
    for (chunk, name), value in zip(mains, copies, strict=True):
        tensors[chunk].setdefault(MAIN, {})[name] = value
    return tensors, scalars


def merge_states(tensors: dict[int, list[dict[str, dict[str, torch.Tensor]]]],
                 scalars: dict[int, dict[str, dict[str, torch.Tensor]]], config: TransformerConfig, vocab_size: int,
                 pp: int, vpp: int | None, saved: dict[str, Any]) -> FullOptimizerState:
    """The whole model's state from every rank's :func:`rank_state_by_name`, keyed by model-order chunk
    index: ``tensors[index]`` one entry per TP rank (merged as the weights), ``scalars[index]`` TP rank
    0's (every TP rank steps alike). ``saved`` is one rank's ``optimizer`` entry (hyper-parameters, scaler)."""
    tied = config.share_embeddings_and_output_weights
    full = FullOptimizerState(
        param_groups=[{k: v for k, v in g.items() if k != "params"} for g in saved["optimizer"]["param_groups"]],
        grad_scaler=saved.get("grad_scaler"))
    for kind in sorted({kind for shards in tensors.values() for shard in shards for kind in shard}):
        padding = full.vocab_padding.setdefault(kind, {})
        chunks = {index: merge_tp_shards([shard.get(kind, {}) for shard in shards], config, vocab_size, padding)
                  for index, shards in tensors.items()}
        full.tensors[kind] = merge_chunks(chunks, config, pp, vpp, tied)
    for kind in sorted({kind for per_kind in scalars.values() for kind in per_kind}):
        full.scalars[kind] = merge_chunks({index: per_kind.get(kind, {}) for index, per_kind in scalars.items()},
                                          config, pp, vpp, tied)
    return full


def rank_optimizer_state(state: FullOptimizerState, model_states: list[dict[str, torch.Tensor]],
                         config: TransformerConfig, model_info: dict[str, Any], pp_rank: int, tp_rank: int
                         ) -> dict[str, Any]:
    """The ``optimizer`` entry of rank (tp_rank, pp_rank) of the new layout in ``ReplicatedOptimizer.state_dict``'s
    format; ``model_states`` are that rank's model chunks (already cut), which fix the parameter order."""
    tp, pp = model_info["tensor_model_parallel_size"], model_info["pipeline_model_parallel_size"]
    vpp = model_info.get("virtual_pipeline_model_parallel_size")
    tied = config.share_embeddings_and_output_weights
    stages = [None] if vpp is None else list(range(vpp))
    cut: ChunkStates = [{} for _ in stages]
    for slot, vp in enumerate(stages):
        for kind, full in state.tensors.items():
            cut[slot][kind] = tp_shards(chunk_keys(full, config, pp, vpp, pp_rank, vp, tied), config, tp,
                                        model_info["vocab_size"], model_info["make_vocab_size_divisible_by"],
                                        state.vocab_padding.get(kind))[tp_rank]
        for kind, values in state.scalars.items():
            cut[slot][kind] = chunk_keys(values, config, pp, vpp, pp_rank, vp, tied)
    entries: dict[int, dict[str, torch.Tensor]] = {}
    decoupled = _is_decoupled(state.param_groups)
    for index, (slot, name) in enumerate(_param_order(model_states, decoupled)):
        entry = {kind: by_name[name].clone() for kind, by_name in cut[slot].items() if kind != MAIN and name in by_name}
        if entry:
            entries[index] = entry
    starts = [0]
    for size in _group_sizes(model_states, decoupled):
        starts.append(starts[-1] + size)
    groups = [{**hp, "params": list(range(start, end))}
              for hp, start, end in zip(state.param_groups, starts[:-1], starts[1:], strict=True)]
    mains = [cut[slot][MAIN][name].clone() for slot, s in enumerate(model_states) for name, v in s.items()
             if v.dtype != torch.float32]
    return {"grad_scaler": state.grad_scaler, "optimizer": {"state": entries, "param_groups": groups}, MAIN: mains}
