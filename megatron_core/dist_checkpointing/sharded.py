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

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")
WORD_EMBEDDINGS = "embedding.word_embeddings.weight"


class ShardedSlice(torch.Tensor):
    """A local tensor presented as its slice (``offsets``) of a global tensor of shape ``global_shape``.

    Only DCP's checkpoint hooks are meant to be used: the wrapper has no storage of its own.
    """

    _local: torch.Tensor
    _offsets: tuple[int, ...]

    @staticmethod
    def __new__(cls, local: torch.Tensor, global_shape: tuple[int, ...], offsets: tuple[int, ...]) -> ShardedSlice:
        """Wrap ``local`` (not copied) as the slice at ``offsets`` of a ``global_shape`` tensor."""
        out = torch.Tensor._make_wrapper_subclass(cls, global_shape, dtype=local.dtype, device=local.device)
        out._local, out._offsets = local, tuple(offsets)
        return out

    # torch types Tensor.__torch_dispatch__ as its disabled implementation, not as the classmethod protocol
    # every subclass defines; torch's DTensor carries the same ignore.
    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:  # type: ignore[override]
        """Refuse every tensor operation: a ShardedSlice is a checkpoint handle, not a tensor to compute with."""
        raise TypeError(f"ShardedSlice is a checkpoint handle, not a tensor to compute with ({func})")

    def __create_write_items__(self, fqn: str, obj: Any) -> list[WriteItem]:
        chunk = ChunkStorageMetadata(offsets=torch.Size(self._offsets), sizes=self._local.shape)
        return [WriteItem(index=MetadataIndex(fqn, torch.Size(self._offsets)), type=WriteItemType.SHARD,
                          tensor_data=TensorWriteData(chunk=chunk,
                                                      properties=TensorProperties.create_from_tensor(self._local),
                                                      size=self.shape))]

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [ChunkStorageMetadata(offsets=torch.Size(self._offsets), sizes=self._local.shape)]

    def __get_tensor_shard__(self, index: MetadataIndex) -> torch.Tensor:
        return self._local


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


def param_slices(name: str, local: torch.Tensor, param: torch.nn.Parameter, tp_rank: int,
                 tp_size: int) -> list[SliceSpec]:
    """The logical global tensors ``local`` (shaped like ``param``) is a slice of, per its TP attributes."""
    # Also at TP = 1: a strided parameter is always its ``stride`` logical parts, so names match across sizes.
    if not getattr(param, "tensor_model_parallel", False):
        return [SliceSpec(name, tuple(local.shape), (0,) * local.dim(), local)]
    dim: int = getattr(param, "partition_dim", 0)  # set with tensor_model_parallel by the parallel layers
    stride: int = getattr(param, "partition_stride", 1)
    parts = local.chunk(stride, dim=dim) if stride > 1 else (local,)
    out = []
    for i, part in enumerate(parts):
        shape = list(part.shape)
        offsets = [0] * part.dim()
        offsets[dim] = tp_rank * shape[dim]
        shape[dim] *= tp_size
        out.append(SliceSpec(name if stride == 1 else f"{name}#part{i}", tuple(shape), tuple(offsets), part))
    return out


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
