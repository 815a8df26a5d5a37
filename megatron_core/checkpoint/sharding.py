"""Split a full GPTModel state dict over TP ranks and pipeline chunks, and put it back together.

The "full" state dict is the model at TP = 1, PP = 1 with the true (unpadded) vocabulary and global
layer numbers. Which tensors are split, along which dimension and with which stride, is the table
in :func:`partition_of`; ``tests/test_checkpoint_convert.py`` checks it against the attributes the
layers set on their parameters (``partition_dim``, ``partition_stride``).
"""
from __future__ import annotations

import re

import torch

from megatron_core.pipeline_parallel.layer_split import layer_range
from megatron_core.tensor_parallel.utils import merge_shards, pad_vocab_size, shard_of_master
from megatron_core.transformer.config import TransformerConfig

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")
VOCAB_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")


def partition_of(key: str, config: TransformerConfig) -> tuple[int, int] | None:
    """``(dim, stride)`` of a TP-split tensor, None for one replicated on every TP rank."""
    if key in VOCAB_KEYS:
        return 0, 1
    if key.endswith("self_attention.linear_qkv.weight") or key.endswith("self_attention.linear_qkv.bias"):
        return 0, 1  # per-query-group layout: a contiguous split hands out whole groups
    if key.endswith("self_attention.linear_proj.weight") or key.endswith("mlp.linear_fc2.weight"):
        return 1, 1
    if key.endswith("mlp.linear_fc1.weight") or key.endswith("mlp.linear_fc1.bias"):
        return 0, (2 if config.gated_linear_unit else 1)
    return None


def pad_vocab_rows(weight: torch.Tensor, padded: int, pad_rows: torch.Tensor | None = None) -> torch.Tensor:
    """The [vocab, h] table ``weight`` grown or cut to ``padded`` rows, Megatron-LM's converter rule
    (``tools/checkpoint/saver_mcore.py``): the source checkpoint's padding rows ``pad_rows`` (rows past the
    true vocabulary) come first, cut to fit, and any rows still missing repeat the last row. A source
    without padding rows gets copies of its last true row."""
    table = weight if pad_rows is None or pad_rows.shape[0] == 0 else torch.cat([weight, pad_rows], dim=0)
    if weight.shape[0] > padded:
        raise ValueError(f"vocabulary table has {weight.shape[0]} rows, more than the padded size {padded}")
    extra = padded - table.shape[0]
    if extra <= 0:
        return table[:padded]
    return torch.cat([table, table[-1:].expand(extra, -1)], dim=0)


def vocab_padding_of(key: str, padding: dict[str, torch.Tensor] | None, config: TransformerConfig
                     ) -> torch.Tensor | None:
    """The source padding rows of vocabulary table ``key``; a tied output layer shares the embedding's."""
    if not padding:
        return None
    if key not in padding and config.share_embeddings_and_output_weights:
        return padding.get(VOCAB_KEYS[0])
    return padding.get(key)


def tp_shards(full: dict[str, torch.Tensor], config: TransformerConfig, tp: int, vocab_size: int,
              make_vocab_size_divisible_by: int, padding: dict[str, torch.Tensor] | None = None
              ) -> list[dict[str, torch.Tensor]]:
    """The ``tp`` per-rank state dicts of ``full`` (vocabulary tables padded for this TP size, from the
    source's padding rows ``padding`` where given: :func:`pad_vocab_rows`)."""
    padded = pad_vocab_size(vocab_size, make_vocab_size_divisible_by, tp)
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(tp)]
    for key, value in full.items():
        if key in VOCAB_KEYS:
            value = pad_vocab_rows(value, padded, vocab_padding_of(key, padding, config))
        part = partition_of(key, config)
        for rank in range(tp):
            shards[rank][key] = value.clone() if part is None else shard_of_master(value, part[0], part[1], rank, tp)
    return shards


def merge_tp_shards(shards: list[dict[str, torch.Tensor]], config: TransformerConfig, vocab_size: int,
                    padding: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Inverse of :func:`tp_shards`: the full state dict with the vocabulary cut back to ``vocab_size``;
    the rows cut off (the padding, [padded - vocab_size, h]) go into ``padding`` by key when it is given,
    so that a re-shard keeps them (a run's padding rows have their own values and join the softmax)."""
    full = {}
    for key in shards[0]:
        part = partition_of(key, config)
        if part is None:
            full[key] = shards[0][key].clone()
            continue
        full[key] = merge_shards([s[key] for s in shards], *part)
        if key in VOCAB_KEYS:
            if padding is not None:
                padding[key] = full[key][vocab_size:].clone()
            full[key] = full[key][:vocab_size].clone()
    return full


def chunk_keys(full: dict[str, torch.Tensor], config: TransformerConfig, pp: int, vpp: int | None,
               pp_rank: int, vp_stage: int | None, tied: bool) -> dict[str, torch.Tensor]:
    """The part of ``full`` that pipeline chunk (pp_rank, vp_stage) holds, with local layer numbers."""
    counts = config.layer_counts(pp, vpp)
    offset, count = layer_range(counts, pp, pp_rank, vp_stage)
    chunks = pp * (vpp or 1)
    index = (vp_stage or 0) * pp + pp_rank
    first, last = index == 0, index == chunks - 1
    out = {}
    for key, value in full.items():
        match = _LAYER.match(key)
        if match:
            layer = int(match.group(1))
            if offset <= layer < offset + count:
                out[f"decoder.layers.{layer - offset}.{match.group(2)}"] = value
        elif key.startswith("embedding."):
            if first:
                out[key] = value
        elif key.startswith("decoder.final_layernorm.") or key == "output_layer.weight":
            if last:
                out[key] = value
        else:
            raise KeyError(f"unexpected state dict key {key!r}")
    if tied and last and not first:
        # The last stage's own copy of the tied word embedding (marked shared_embedding in the model).
        out["output_layer.weight"] = full["embedding.word_embeddings.weight"]
    return out


def merge_chunks(chunk_dicts: dict[int, dict[str, torch.Tensor]], config: TransformerConfig, pp: int,
                 vpp: int | None, tied: bool) -> dict[str, torch.Tensor]:
    """Inverse of :func:`chunk_keys` over all chunks, keyed by model-order chunk index."""
    counts = config.layer_counts(pp, vpp)
    full: dict[str, torch.Tensor] = {}
    last = len(counts) - 1
    for index, sd in sorted(chunk_dicts.items()):
        offset = sum(counts[:index])
        for key, value in sd.items():
            match = _LAYER.match(key)
            if match:
                full[f"decoder.layers.{int(match.group(1)) + offset}.{match.group(2)}"] = value
            elif key == "output_layer.weight" and tied:
                if index != last:
                    raise KeyError(f"output_layer.weight found on pipeline chunk {index}, not the last ({last})")
            else:
                full[key] = value
    return full


def rank_state_dict(full: dict[str, torch.Tensor], config: TransformerConfig, vocab_size: int,
                    make_vocab_size_divisible_by: int, tp: int, tp_rank: int, pp: int = 1, pp_rank: int = 0,
                    vpp: int | None = None, vp_stage: int | None = None) -> dict[str, torch.Tensor]:
    """The state dict of one GPTModel chunk (TP rank, pipeline rank, virtual stage) cut from ``full``."""
    chunk = chunk_keys(full, config, pp, vpp, pp_rank, vp_stage, config.share_embeddings_and_output_weights)
    return tp_shards(chunk, config, tp, vocab_size, make_vocab_size_divisible_by)[tp_rank]
