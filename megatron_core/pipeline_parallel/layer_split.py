"""Which transformer layers a (virtual) pipeline stage owns.

Layers are numbered globally from 0. With ``v`` virtual stages per rank and ``p`` ranks, the model is
cut into ``p * v`` chunks; chunk ``k`` lives on rank ``k % p`` as that rank's virtual stage ``k // p``
(Megatron-LM's interleaving), so rank 0 holds chunks 0, p, 2p, ...
"""
from __future__ import annotations

from collections.abc import Sequence


def chunk_layer_counts(num_layers: int, pp_size: int, vpp_size: int | None = None,
                       first_stage_layers: int | None = None, last_stage_layers: int | None = None,
                       layers_per_chunk: Sequence[int] | None = None) -> list[int]:
    """Layer counts of the ``pp_size * vpp_size`` chunks in model order.

    ``layers_per_chunk`` sets every count explicitly. Otherwise ``first_stage_layers`` /
    ``last_stage_layers`` (lighter ends, since embedding and loss cost compute) fix the first and
    last chunk and the rest is split evenly; without them every chunk gets the same count.
    """
    chunks = pp_size * (vpp_size or 1)
    if layers_per_chunk is not None:
        counts = list(layers_per_chunk)
        if len(counts) != chunks:
            raise ValueError(f"layers_per_chunk has {len(counts)} entries but pipeline size {pp_size} x "
                             f"virtual stages {vpp_size or 1} = {chunks} chunks")
        if sum(counts) != num_layers or min(counts) < 0:
            raise ValueError(f"layers_per_chunk {counts} must be non-negative and sum to --num-layers {num_layers}")
        return counts
    if first_stage_layers is None and last_stage_layers is None:
        if num_layers % chunks != 0:
            raise ValueError(
                f"--num-layers {num_layers} does not split evenly over --pipeline-model-parallel-size {pp_size}"
                + (f" x {vpp_size} virtual stages" if vpp_size else "")
                + f" = {chunks} chunks; use a multiple of {chunks}, or set the first/last stage layer counts")
        return [num_layers // chunks] * chunks
    if chunks < 2:
        raise ValueError("first/last stage layer counts need at least two pipeline chunks")
    first = first_stage_layers if first_stage_layers is not None else None
    last = last_stage_layers if last_stage_layers is not None else None
    middle_chunks = chunks - (first is not None) - (last is not None)
    rest = num_layers - (first or 0) - (last or 0)
    if rest < 0 or (middle_chunks == 0 and rest != 0) or (middle_chunks > 0 and rest % middle_chunks != 0):
        raise ValueError(
            f"--num-layers {num_layers} minus first stage {first} and last stage {last} layers leaves {rest}, "
            f"which does not split evenly over the remaining {middle_chunks} chunks")
    each = rest // middle_chunks if middle_chunks else 0
    counts = [each] * chunks
    if first is not None:
        counts[0] = first
    if last is not None:
        counts[-1] = last
    return counts


def chunk_index(pp_size: int, pp_rank: int, vp_stage: int | None) -> int:
    """Position in model order of the chunk that rank ``pp_rank`` holds as virtual stage ``vp_stage``."""
    return (vp_stage or 0) * pp_size + pp_rank


def layer_range(counts: Sequence[int], pp_size: int, pp_rank: int, vp_stage: int | None = None) -> tuple[int, int]:
    """``(offset, count)``: the first global layer number and the number of layers of one chunk."""
    k = chunk_index(pp_size, pp_rank, vp_stage)
    return sum(counts[:k]), counts[k]
