"""Each parameter of a model chunk as slices of named global tensors, for ``torch.distributed.checkpoint``.

A parameter's global name is its name in the TP = 1, PP = 1 model: global layer numbers
(``TransformerBlock.layer_offset``), and the last stage's copy of a tied word embedding is the word
embedding itself (saved once, by the first stage). A TP-split parameter with ``partition_stride`` s
(gated MLP fc1: s = 2) is s logical tensors ``name#part{i}``, each split contiguously over TP. The
global shape is this layout's (vocabulary tables include its TP padding); on load, a slice is
clipped to the saved global shape, so a table saved with another padding fills its true rows and
keeps the rest.

:class:`ShardedSlice` is a tensor subclass carrying the global shape and this rank's offsets. It
implements the three hooks DCP's planners call on DTensor (``__create_write_items__``,
``__create_chunk_list__``, ``__get_tensor_shard__``), which is all DCP needs to write a slice with its
global coordinates and to read any overlapping region back. Slices with the same name and offsets
on several ranks (DP replicas) are written once: DCP de-duplicates write items by index.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")
WORD_EMBEDDINGS = "embedding.word_embeddings.weight"


class ShardedSlice(torch.Tensor):
    """Local tensors presented as chunks (at their ``offsets``) of a global tensor of shape ``global_shape``.

    One chunk for a TP slice; several for a ZeRO shard, whose flat element range of a parameter is
    a few rectangular boxes (:func:`flat_boxes`). Only DCP's checkpoint hooks are meant to be used:
    the wrapper has no storage of its own; each chunk is read or written in place (DCP copies a
    non-contiguous chunk before writing it, and ``copy_``-s into it on load).
    """

    _chunks: dict[torch.Size, torch.Tensor]

    @staticmethod
    def __new__(cls, local: torch.Tensor, global_shape: tuple[int, ...], offsets: tuple[int, ...],
                more: list[tuple[tuple[int, ...], torch.Tensor]] | None = None) -> ShardedSlice:
        """Wrap ``local`` (not copied) as the chunk at ``offsets`` of a ``global_shape`` tensor, and each
        ``(offsets, tensor)`` of ``more`` (same dtype) as further chunks."""
        out = torch.Tensor._make_wrapper_subclass(cls, global_shape, dtype=local.dtype, device=local.device)
        out._chunks = {torch.Size(o): t for o, t in [(tuple(offsets), local), *(more or [])]}
        return out

    # torch types Tensor.__torch_dispatch__ as its disabled implementation, not as the classmethod protocol
    # every subclass defines; torch's DTensor carries the same ignore.
    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:  # type: ignore[override]
        """Refuse every tensor operation: a ShardedSlice is a checkpoint handle, not a tensor to compute with."""
        raise TypeError(f"ShardedSlice is a checkpoint handle, not a tensor to compute with ({func})")

    def __create_write_items__(self, fqn: str, obj: Any) -> list[WriteItem]:
        return [WriteItem(index=MetadataIndex(fqn, offsets), type=WriteItemType.SHARD,
                          tensor_data=TensorWriteData(chunk=ChunkStorageMetadata(offsets=offsets, sizes=local.shape),
                                                      properties=TensorProperties.create_from_tensor(local),
                                                      size=self.shape))
                for offsets, local in self._chunks.items()]

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [ChunkStorageMetadata(offsets=offsets, sizes=local.shape) for offsets, local in self._chunks.items()]

    def __get_tensor_shard__(self, index: MetadataIndex) -> torch.Tensor:
        # DCP names the chunk by its offsets (on save) and by its position in the chunk list too (on load)
        if index.offset is None:
            return next(iter(self._chunks.values()))
        return self._chunks[torch.Size(index.offset)]


@dataclass
class SliceSpec:
    """One logical global tensor a parameter holds a slice of: ``local`` = global[offsets : offsets + local.shape]."""

    name: str
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    local: torch.Tensor


def global_name(local_name: str, layer_offset: int, param: torch.nn.Parameter) -> str:
    """The TP = 1, PP = 1 name of a chunk's parameter."""
    match = _LAYER.match(local_name)
    if match:
        return f"decoder.layers.{int(match.group(1)) + layer_offset}.{match.group(2)}"
    if local_name == "output_layer.weight" and getattr(param, "shared_embedding", False):
        return WORD_EMBEDDINGS
    return local_name


def _slice_boxes(name: str, shape: tuple[int, ...], param: torch.nn.Parameter, tp_rank: int, tp_size: int
                 ) -> list[tuple[str, tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """``(name, global shape, global offsets, local offsets, local sizes)`` of each logical tensor a
    TP-local tensor of ``shape`` (shaped like ``param``) is a slice of: see :func:`param_slices`."""
    # Also at TP = 1: a strided parameter is always its ``stride`` logical parts, so names match across sizes.
    if not getattr(param, "tensor_model_parallel", False):
        return [(name, shape, (0,) * len(shape), (0,) * len(shape), shape)]
    dim: int = getattr(param, "partition_dim", 0)  # set with tensor_model_parallel by the parallel layers
    stride: int = getattr(param, "partition_stride", 1)
    each = -(-shape[dim] // stride)  # as Tensor.chunk: ceil-sized parts, the last one shorter
    out = []
    for i, begin in enumerate(range(0, shape[dim], each)):
        sizes = list(shape)
        sizes[dim] = min(each, shape[dim] - begin)
        local_offsets, offsets, global_shape = [0] * len(shape), [0] * len(shape), list(sizes)
        local_offsets[dim], offsets[dim] = begin, tp_rank * sizes[dim]
        global_shape[dim] *= tp_size
        out.append((name if stride == 1 else f"{name}#part{i}", tuple(global_shape), tuple(offsets),
                    tuple(local_offsets), tuple(sizes)))
    return out


def param_slices(name: str, local: torch.Tensor, param: torch.nn.Parameter, tp_rank: int,
                 tp_size: int) -> list[SliceSpec]:
    """The logical global tensors ``local`` (shaped like ``param``) is a slice of, per its TP attributes."""
    return [SliceSpec(n, g, o, local[tuple(slice(a, a + z) for a, z in zip(lo, sz, strict=True))])
            for n, g, o, lo, sz in _slice_boxes(name, tuple(local.shape), param, tp_rank, tp_size)]


def logical_names(name: str, param: torch.nn.Parameter) -> list[str]:
    """The names of the logical global tensors ``param`` is a slice of (``name#part{i}`` when strided)."""
    return [n for n, *_ in _slice_boxes(name, tuple(param.shape), param, 0, 1)]


def flat_boxes(shape: tuple[int, ...], lo: int, hi: int) -> list[tuple[tuple[int, ...], tuple[int, ...], int]]:
    """Elements ``[lo, hi)`` of a row-major tensor of ``shape`` as boxes ``(offsets, sizes, first)``,
    each one contiguous flat range that starts at element ``first``: for ``[r, c]`` a partial first
    row, a block of whole rows and a partial last row; N-D recursively (at most 2 x ndim - 1 boxes)."""
    if lo >= hi:
        return []
    if len(shape) <= 1:  # 0-d: the one element, at offsets ()
        return [((lo,) * len(shape), (hi - lo,) * len(shape), lo)]
    rest = tuple(shape[1:])
    inner = math.prod(rest)
    (r0, a), (r1, b) = divmod(lo, inner), divmod(hi, inner)

    def in_row(row: int, x: int, y: int) -> list[tuple[tuple[int, ...], tuple[int, ...], int]]:
        return [((row, *o), (1, *s), row * inner + f) for o, s, f in flat_boxes(rest, x, y)]

    if r0 == r1:
        return in_row(r0, a, b)
    out = in_row(r0, a, inner) if a else []
    r0 += 1 if a else 0
    if r1 > r0:
        out.append(((r0, *(0,) * len(rest)), (r1 - r0, *rest), r0 * inner))
    return out + (in_row(r1, 0, b) if b else [])


def piece_slices(name: str, flat: torch.Tensor, start: int, param: torch.nn.Parameter, tp_rank: int,
                 tp_size: int) -> list[tuple[str, tuple[int, ...], list[tuple[tuple[int, ...], torch.Tensor]]]]:
    """Elements ``[start, start + flat.numel())`` of the TP-local ``param`` flattened (a ZeRO shard's
    piece; the whole parameter from 0), held in the 1-D ``flat``, as chunks of the logical global
    tensors of :func:`param_slices`: ``[(name, global shape, [(global offsets, view of flat)])]``.

    Each box of :func:`flat_boxes` is a contiguous view of ``flat``; its intersection with a logical
    tensor (gated fc1's ``#part{i}`` halves) a narrowed view of it. The whole parameter gives exactly
    :func:`param_slices`'s slices, so both write the same chunks of the same global tensors.
    """
    shape = tuple(param.shape)
    parts = _slice_boxes(name, shape, param, tp_rank, tp_size)
    chunks: dict[str, list[tuple[tuple[int, ...], torch.Tensor]]] = {n: [] for n, *_ in parts}
    for offsets, sizes, first in flat_boxes(shape, start, start + flat.numel()):
        box = flat[first - start:first - start + math.prod(sizes)].view(sizes)
        ends = [o + z for o, z in zip(offsets, sizes, strict=True)]
        for part, _, part_offsets, local_offsets, local_sizes in parts:
            lo = [max(o, a) for o, a in zip(offsets, local_offsets, strict=True)]
            hi = [min(e, a + z) for e, a, z in zip(ends, local_offsets, local_sizes, strict=True)]
            if any(h <= low for low, h in zip(lo, hi, strict=True)):
                continue
            view = box[tuple(slice(low - o, h - o) for low, h, o in zip(lo, hi, offsets, strict=True))]
            chunks[part].append((tuple(g + low - a for g, low, a in zip(part_offsets, lo, local_offsets,
                                                                          strict=True)), view))
    return [(n, g, chunks[n]) for n, g, *_ in parts if chunks[n]]


def chunk_params(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter, bool]]:
    """``(global name, parameter, saved here)`` for a (DDP-wrapped) GPTModel chunk. The last stage's copy
    of a tied embedding is loaded but not saved (the first stage saves the one tensor)."""
    inner: Any = getattr(model, "module", model)
    offset = inner.decoder.layer_offset
    out = []
    for local_name, param in inner.named_parameters():
        name = global_name(local_name, offset, param)
        copy = name == WORD_EMBEDDINGS and local_name == "output_layer.weight"
        out.append((name, param, not copy))
    return out


def clip_to(spec: SliceSpec, saved_shape: tuple[int, ...]) -> SliceSpec | None:
    """``spec`` restricted to a saved global shape (another vocabulary padding); None when nothing overlaps.

    Raises ValueError when a dimension other than a padded vocabulary's differs (another model).
    """
    if tuple(saved_shape) == spec.global_shape:
        return spec
    if len(saved_shape) != len(spec.global_shape):
        raise ValueError(f"{spec.name}: saved with shape {tuple(saved_shape)}, this model has {spec.global_shape}")
    local = spec.local
    for dim, (saved, ours) in enumerate(zip(saved_shape, spec.global_shape, strict=True)):
        if saved == ours:
            continue
        if not spec.name.startswith(WORD_EMBEDDINGS) and not spec.name.startswith("output_layer.weight"):
            raise ValueError(f"{spec.name}: saved with shape {tuple(saved_shape)}, this model has "
                             f"{spec.global_shape}; the checkpoint is of another model (--use-checkpoint-args)")
        keep = max(0, min(local.shape[dim], saved - spec.offsets[dim]))
        if keep == 0:
            return None
        local = local.narrow(dim, 0, keep)
    return SliceSpec(spec.name, tuple(saved_shape), spec.offsets, local)


def shard_pieces(chunk: torch.nn.Module, zero3_only: bool = False) -> dict[int, tuple[int, torch.Tensor]] | None:
    """``id(parameter) -> (first element, flat view of this rank's shard of it)`` for each parameter with
    elements in this rank's ZeRO shard (the others have none here), for a DDP-wrapped chunk under
    ZeRO-1/2/3 (``zero3_only``: ZeRO-3, whose buffers keep only the shard; ZeRO-1/2 shards are views of
    the full parameters). None for other stages and unwrapped models."""
    config = getattr(chunk, "ddp_config", None)
    stage = getattr(config, "zero_stage", 0)
    buffers = list(getattr(chunk, "buffers_by_dtype", []))
    if not buffers or stage < (3 if zero3_only else 1):
        return None
    out = {}
    for buffer in buffers:
        for piece in buffer.local_pieces():
            offset = piece.shard_start - piece.bucket.local_offset
            out[id(piece.param)] = (piece.param_start, buffer.shard_param(piece.bucket)[offset:offset + piece.numel])
    return out


def refresh_gathered(chunk: torch.nn.Module) -> None:
    """ZeRO-3, after loading into the kept shards: the buckets gathered now (the persistent ones) are
    all-gathered again from them, so the full parameters in use hold the loaded values. Collective over DP."""
    for buffer in getattr(chunk, "buffers_by_dtype", []):
        if getattr(buffer, "param_shard", None) is None:
            continue
        for bucket in buffer.buckets:
            if bucket.gathered:
                buffer.launch_param_gather(bucket)
                buffer.wait_param_gather(bucket)
