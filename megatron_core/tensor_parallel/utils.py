"""Helpers shared by the tensor-parallel layers: divisibility checks, vocab padding, sharded init."""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

InitMethod = Callable[[torch.Tensor], None]

# Attributes the parallel layers tag parameters with (Megatron-LM's names), read back with getattr by
# grad clipping, finalize_model_grads, the DDP buffers and checkpointing. torch's stubs declare no such
# attributes on a Tensor, so they are set through setattr with these names.
TENSOR_MODEL_PARALLEL = "tensor_model_parallel"
PARTITION_DIM = "partition_dim"
PARTITION_STRIDE = "partition_stride"
SEQUENCE_PARALLEL = "sequence_parallel"


def divide(numerator: int, denominator: int, what: str = "size") -> int:
    """``numerator // denominator``, with an error naming ``what`` when it does not divide."""
    if numerator % denominator != 0:
        raise ValueError(f"{what} {numerator} is not divisible by the tensor-parallel size {denominator}")
    return numerator // denominator


def pad_vocab_size(vocab_size: int, make_vocab_size_divisible_by: int, tensor_model_parallel_size: int) -> int:
    """Pad the vocabulary to a multiple of ``make_vocab_size_divisible_by * TP`` as Megatron-LM does
    (its ``_vocab_size_with_padding``), so every TP shard of the embedding has the same number of rows.
    The one place the padding is computed: the data loader, the model and the checkpoint tools call it."""
    multiple = make_vocab_size_divisible_by * tensor_model_parallel_size
    return -(-int(vocab_size) // multiple) * multiple


def init_method_normal(std: float) -> InitMethod:
    """In-place N(0, std) initialisation."""
    def init_(tensor: torch.Tensor) -> None:
        torch.nn.init.normal_(tensor, mean=0.0, std=std)
    return init_


def scaled_init_method_normal(std: float, num_layers: int) -> InitMethod:
    """N(0, std / sqrt(2 * num_layers)), used for the output projections of residual branches."""
    return init_method_normal(std / math.sqrt(2.0 * num_layers))


def shard_of_master(master: torch.Tensor, dim: int, stride: int, rank: int, world: int) -> torch.Tensor:
    """This rank's shard of a full tensor split along ``dim``.

    With ``stride`` s the dimension is cut into ``world * s`` chunks and the rank keeps chunks
    ``rank, rank + world, ...``: a fused weight made of s stacked parts (e.g. SwiGLU's gate and up
    projections) is then split part by part.
    """
    if world == 1:
        return master.clone()
    size = master.shape[dim]
    if size % (world * stride) != 0:
        raise ValueError(f"dimension {size} is not divisible by tensor-parallel size {world} x stride {stride}")
    chunks = torch.chunk(master, world * stride, dim=dim)
    return torch.cat(chunks[rank::world], dim=dim).contiguous()


def merge_shards(shards: list[torch.Tensor], dim: int, stride: int) -> torch.Tensor:
    """The full tensor from every rank's :func:`shard_of_master` shard, in rank order (its inverse).

    Each shard holds ``stride`` chunks (one of each fused part, e.g. Q, K and V); part ``i`` of the
    full tensor is part ``i`` of every rank's shard, concatenated along ``dim``.
    """
    if len(shards) == 1:
        return shards[0].clone()
    pieces = [shard.chunk(stride, dim=dim) for shard in shards]
    return torch.cat([pieces[rank][i] for i in range(stride) for rank in range(len(shards))], dim=dim)


def sharded_parameter(full_shape: tuple[int, ...], dim: int, init_method: InitMethod, *, stride: int,
                      rank: int, world: int, dtype: torch.dtype, device: torch.device) -> torch.nn.Parameter:
    """A parameter holding this rank's shard of a master weight initialised at full size.

    The full weight is drawn on the CPU from the current RNG, so the same seed gives the same
    full weight at every TP size and every rank keeps exactly its slice of it.
    """
    master = torch.empty(full_shape, dtype=torch.float32)
    init_method(master)
    shard = shard_of_master(master, dim, stride, rank, world)
    param = torch.nn.Parameter(shard.to(device=device, dtype=dtype))
    set_tensor_model_parallel_attributes(param, is_parallel=True, dim=dim, stride=stride)
    return param


def set_tensor_model_parallel_attributes(param: torch.Tensor, is_parallel: bool, dim: int, stride: int) -> None:
    """Mark a parameter as split across TP ranks (read by grad-norm, checkpoint and conversion code)."""
    setattr(param, TENSOR_MODEL_PARALLEL, is_parallel)
    setattr(param, PARTITION_DIM, dim)
    setattr(param, PARTITION_STRIDE, stride)


def set_sequence_parallel_attribute(param: torch.Tensor, sequence_parallel: bool) -> None:
    """Mark a parameter replicated over TP whose gradient is partial on each rank (a norm's weight
    under sequence parallelism): ``finalize_model_grads`` all-reduces such gradients over TP."""
    setattr(param, SEQUENCE_PARALLEL, sequence_parallel)
