"""Per-rank memory of a layout, predicted without process groups.

Model states follow the framework's own buffers exactly (``megatron_core.optimizer.memory``
measures the same categories): each model chunk's parameters sit in one flat DDP buffer in reverse
registration order, cut into buckets of ``bucket_size`` elements padded to a multiple of DP; the
tied embedding copy gets its own bucket under the distributed optimizer. ZeRO (Rajbhandari et al.
2020) with K = 12 (Adam's fp32 main copy and two moments): stage 0 keeps (2+2+K)Ψ, stage 1
shards the fp32 parts, stage 2 also the gradients, stage 3 also the parameters, (2+2+K)Ψ/Nd plus a window of
gathered parameters (:func:`zero3_gather_window_bytes`). ``offload`` moves the fp32
main parameters and optimizer state to host memory (DeepSpeed's ``offload_optimizer``).

Activations: Korthikanti et al. 2022's per-layer ``sbh(34 + 5as/h)`` bytes (fp16, TP 1) rewritten
as the tensors this implementation actually saves for backward (see :func:`layer_activation_bytes`),
times the microbatches each pipeline rank holds in flight under 1F1B (``pp - rank``) or interleaving
(``2(pp - rank - 1) + (v - 1)pp + 1`` chunk forwards).
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from megatron_core.autotune.layout import Layout, ModelSpec
from megatron_core.autotune.params import ParamInfo, rank_chunks

if TYPE_CHECKING:
    from megatron_core.distributed.distributed_data_parallel_config import DistributedDataParallelConfig

IMPLEMENTED_ZERO_STAGES = (0, 1, 2, 3)


@dataclasses.dataclass(frozen=True)
class BucketSettings:
    """The run's bucket sizes, in elements, as the framework uses them (defaults
    ``DistributedDataParallelConfig``'s): ``bucket_size`` (``--ddp-bucket-size``, DeepSpeed's
    ``reduce_bucket_size``; None: one bucket per model chunk), ``stage3_prefetch_bucket_size`` and
    ``stage3_param_persistence_threshold`` (DeepSpeed's keys; ZeRO-3's gather window only)."""

    bucket_size: int | None = 40_000_000
    stage3_prefetch_bucket_size: int = 50_000_000
    stage3_param_persistence_threshold: int = 0

    @classmethod
    def from_ddp_config(cls, ddp: DistributedDataParallelConfig) -> BucketSettings:
        """The settings a ``DistributedDataParallelConfig`` trains with."""
        return cls(ddp.bucket_size, ddp.stage3_prefetch_bucket_size, ddp.stage3_param_persistence_threshold)


DEFAULT_BUCKETS = BucketSettings()  # frozen: a constant, safe as a default argument


@dataclasses.dataclass
class ModelStates:
    """Bytes of one rank after an optimizer step (``memory_footprint``'s categories), plus the
    most gradient bytes alive during backward (ZeRO-2/3: the shard and the buckets in use), the fp32
    gradient copies alive during the step only, and host bytes."""

    params: int
    grads: int
    main_params: int
    optimizer_state: int
    grads_in_backward: int
    host: int = 0
    # 16-bit gradients: the step's fp32 copies of them (``main.grad = grad.float()``, one per main
    # parameter or shard piece), made at the start of ``step()`` and dropped at its end, so not in
    # ``memory_footprint`` after it but in the step's peak. 0 for fp32 gradients (their own copy).
    step_grad_copies: int = 0
    # ZeRO-3: full parameters of buckets gathered at the moment of measurement (``memory_footprint``'s
    # field); none after an optimizer step, so 0 here. The live window during a step is
    # ``zero3_gather_window_bytes``.
    gathered_params: int = 0

    @property
    def total(self) -> int:
        """Bytes after the step: the sum of ``memory_footprint``'s four categories."""
        return self.params + self.grads + self.main_params + self.optimizer_state


def _pad(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _buckets(params: list[ParamInfo], dp: int, sharded: bool, bucket_size: int | None) -> list[list[tuple[int, int]]]:
    """Buckets as lists of (start, end) parameter ranges relative to the bucket, plus a final
    ``(padded_size, -1)`` marker; the buffer takes parameters in reverse order (DDP's ``params[::-1]``)."""
    buckets: list[list[tuple[int, int]]] = []
    current: list[tuple[int, int]] = []
    offset = 0
    for p in reversed(params):
        own = sharded and p.shared_embedding
        if own and current:
            buckets.append(current + [(_pad(offset, dp), -1)])
            current, offset = [], 0
        current.append((offset, offset + p.numel))
        offset += p.numel
        if own or (bucket_size is not None and offset >= bucket_size):
            buckets.append(current + [(_pad(offset, dp), -1)])
            current, offset = [], 0
    if current:
        buckets.append(current + [(_pad(offset, dp), -1)])
    return buckets


def _shard_pieces(buckets: list[list[tuple[int, int]]], dp: int, dp_rank: int) -> tuple[int, list[int]]:
    """(shard elements with padding, element counts of the parameter pieces in this rank's shard)."""
    shard_numel, pieces = 0, []
    for bucket in buckets:
        size = bucket[-1][0] // dp
        lo, hi = dp_rank * size, (dp_rank + 1) * size
        shard_numel += size
        pieces += [min(e, hi) - max(s, lo) for s, e in bucket[:-1] if min(e, hi) > max(s, lo)]
    return shard_numel, pieces


def comm_buffer_bytes(spec: ModelSpec, layout: Layout, pp_rank: int = 0, on_cpu: bool = True,
                      bucket_size: int | None = 40_000_000) -> int:
    """Temporary bytes of the DP collectives of ZeRO >= 1 while they run (after backward: no activations).

    gloo (CPU) reduce-scatters a flat bucket through a full-size copy plus the output chunk,
    ``(1 + 1/Nd)`` x the bucket, and all-gathers through a full-size staging tensor; measured with
    torch 2.13 on 4 ranks (1.24x and 1.04x). NCCL works in fixed internal buffers: 0 here.
    """
    if not on_cpu or layout.dp == 1 or layout.zero_stage == 0:
        return 0
    largest = max(b[-1][0] for chunk in rank_chunks(spec, layout, pp_rank)
                  for b in _buckets(chunk, layout.dp, True, bucket_size))
    return max(largest * spec.grad_bytes * (layout.dp + 1) // layout.dp, largest * spec.bytes_per_param)


def _buckets_in_backward(buckets: list[list[tuple[int, int]]], overlap_grad_reduce: bool) -> int:
    """Elements of full bucket gradients ZeRO-2/3 hold at once during backward: the bucket being
    filled, and with ``overlap_grad_reduce`` the one before it, whose reduce-scatter is in flight
    until the next launch (``param_and_grad_buffer``). Assumes gradients arrive in bucket order, which
    the buffer's reverse-registration layout is made for."""
    sizes = [b[-1][0] for b in buckets]
    if overlap_grad_reduce:
        return max(a + b for a, b in zip(sizes, sizes[1:], strict=False)) if len(sizes) > 1 else sizes[0]
    return max(sizes)


def model_state_bytes(spec: ModelSpec, layout: Layout, pp_rank: int = 0, dp_rank: int = 0,
                      optimizer: str = "adam", bucket_size: int | None = 40_000_000,
                      sgd_momentum: float = 0.9, overlap_grad_reduce: bool = False) -> ModelStates:
    """Bytes of parameters, gradients, fp32 main parameters and optimizer state on one rank.

    Equals ``megatron_core.optimizer.memory_footprint`` after a step for stages 0-2, ``grads_in_backward``
    the most gradient bytes measured during backward (stages 0-3), and ``step_grad_copies`` the fp32
    gradient copies measured inside the step (checked by tests/test_autotune_memory.py); stage 3's
    states after the step follow the ZeRO paper's (2+2+K)Ψ/Nd.
    """
    pb, gb, stage, dp = spec.bytes_per_param, spec.grad_bytes, layout.zero_stage, layout.dp
    params = grads = mains = state = grads_bw = copies = in_flight = 0
    adam = optimizer == "adam"
    per_elem_state = 8 if adam else (4 if sgd_momentum > 0 else 0)
    for chunk in rank_chunks(spec, layout, pp_rank):
        buckets = _buckets(chunk, dp, stage >= 1, bucket_size)
        numel = sum(b[-1][0] for b in buckets)
        psi = sum(p.numel for p in chunk)
        if stage == 0:
            params += numel * pb
            grads += numel * gb
            copies += psi * 4 if gb != 4 else 0  # main.grad = grad.float(), during the step
            grads_bw += numel * gb
            mains += psi * 4 if pb != 4 else 0  # fp32 parameters are their own main copy
            state += psi * per_elem_state + (4 * len(chunk) if adam else 0)
            continue
        shard, pieces = _shard_pieces(buckets, dp, dp_rank)
        copies += sum(pieces) * 4 if gb != 4 else 0  # each shard piece's main.grad, during the step
        params += (shard if stage == 3 else numel) * pb
        grads += (numel if stage == 1 else shard) * gb
        # ZeRO-1 reduces into the full buffer itself. ZeRO-2 and -3 keep the reduced shard and free
        # each bucket's full gradient once reduced, from the gradient hooks: besides the shards, one
        # chunk's buckets in use (chunks run backward one at a time; each ends with all freed).
        grads_bw += (numel if stage == 1 else shard) * gb
        if stage >= 2:
            in_flight = max(in_flight, _buckets_in_backward(buckets, overlap_grad_reduce) * gb)
        mains += shard * 4 if pb != 4 or layout.offload else 0  # fp32 shards on the device are their own main copy
        state += sum(pieces) * per_elem_state + (4 * len(pieces) if adam else 0)
    host = 0
    if layout.offload:
        host, mains, state = mains + state, 0, 0
    return ModelStates(params, grads, mains, state, grads_bw + in_flight, host, step_grad_copies=copies)


def _gather_units(chunk: list[ParamInfo], dp: int, bucket_size: int | None) -> tuple[list[int], list[set[int]]]:
    """ZeRO-3 buckets of one chunk in forward order (``param_gather``'s ``forward_order``: the buffer's buckets
    reversed), as (padded sizes in elements, the positions each parameter-owning module uses, in the order the
    modules run). A module is a parameter name less its last component; on a chunk holding both the word
    embedding and a tied output layer, the output layer runs last with the embedding's bucket (passed to it)."""
    buckets = _buckets(chunk, dp, True, bucket_size)
    last = len(buckets) - 1
    owner = [last - i for i, b in enumerate(buckets) for _ in b[:-1]][::-1]  # per parameter, registration order
    modules: dict[str, set[int]] = {}
    for p, position in zip(chunk, owner, strict=True):
        modules.setdefault(p.name.rsplit(".", 1)[0], set()).add(position)
    units = list(modules.values())
    names = [p.name for p in chunk]
    if "embedding.word_embeddings.weight" in names and "decoder.final_layernorm.weight" in names \
            and "output_layer.weight" not in names:  # tied on this chunk: the output layer takes the embedding
        units.append(set(modules["embedding.word_embeddings"]))
    return [b[-1][0] for b in reversed(buckets)], units


def _prefetched(sizes: list[int], units: set[int], step: int, budget: int) -> set[int]:
    """The buckets ``param_gather._prefetch_list`` gathers ahead of a module using ``units``: the next ones in
    forward order (``step`` 1) or backward order (-1), taken while the elements taken so far are under
    ``budget``, so the last one may overshoot it (DeepSpeed's ``stage3_prefetch_bucket_size``)."""
    out: set[int] = set()
    i, total = (max(units) + 1 if step > 0 else min(units) - 1), 0
    while 0 <= i < len(sizes) and total < budget:
        out.add(i)
        total += sizes[i]
        i += step
    return out


def _chunk_gather_window(sizes: list[int], units: list[set[int]], budget: int,
                         resident: set[int]) -> tuple[int, set[int]]:
    """(most elements gathered at once in one forward and backward of a chunk, the buckets left gathered
    after its forward), following ``param_gather``'s rules (see :func:`zero3_gather_window_bytes`)."""
    def elements(held: set[int]) -> int:
        return sum(sizes[k] for k in held | resident)

    peak, held, used = 0, set[int](), set[int]()
    for u in units:  # forward: gather the module's buckets, then keep only them and the prefetch
        used |= u
        peak = max(peak, elements(held | u))
        held = u | (_prefetched(sizes, u, 1, budget) - used)
        peak = max(peak, elements(held))
    after_forward = set(held)
    first_user = {k: min(j for j, u in enumerate(units) if k in u) for k in range(len(sizes))}
    for j in reversed(range(len(units))):  # backward: a bucket is freed once all of its parameters have gradients
        held |= units[j] | _prefetched(sizes, units[j], -1, budget)
        peak = max(peak, elements(held))
        held = {k for k in held if first_user[k] < j}
    return peak, after_forward


def zero3_gather_window_bytes(spec: ModelSpec, layout: Layout, pp_rank: int | None = None,
                              buckets: BucketSettings = DEFAULT_BUCKETS) -> int:
    """ZeRO-3 working memory of pipeline rank ``pp_rank`` (the last when None): the most bytes of full
    (gathered) bucket parameters held at once during forward and backward.

    The rules are this framework's ``distributed.param_gather`` (DeepSpeed's ZeRO-3 semantics at bucket
    granularity): parameters are gathered by DDP bucket (``--ddp-bucket-size`` elements, padded to DP), a
    module's buckets just before it runs, and with them the buckets that follow (forward order; preceding ones in
    backward) until ``stage3_prefetch_bucket_size`` elements are reached (the last one counted whole, so it may
    overshoot; 0 prefetches nothing). In forward, once the module's buckets are in, every other bucket but the
    prefetched ones is freed; in backward a bucket is freed once every one of its parameters has its gradient.
    Buckets of at most ``stage3_param_persistence_threshold`` elements are never freed (counted always). A tied
    output layer on the embedding's stage gathers the word embedding's bucket at the start of backward, and it
    stays gathered to the end: the embedding's gradient is complete only after the embedding's own backward.
    Hence with the defaults (buckets of at least 40M elements, 5e7 prefetched) the bucket in use and the next
    two (one if the next has 5e7 or more) are gathered: a small model, or a 124M-parameter GPT-2 small (three
    buckets), is gathered whole. With interleaving (``vpp``) the other chunks of the rank add what they leave
    gathered after their forward, and their persistent buckets: an upper bound (each chunk has its own
    ``param_gather`` manager; whether they coincide depends on the schedule), reached in the test below.

    Equal, to the byte, to the gathered buckets' storage at its peak measured in tests/test_autotune_memory.py:
    two training steps at DP 2, TP 1 and 2, tied and untied, six bucket/prefetch/threshold settings; and each
    stage of PP 2 x DP 2, with and without interleaving (4 microbatches), at three settings.
    """
    pp_rank = layout.pp - 1 if pp_rank is None else pp_rank
    windows, at_rest = [], []
    for chunk in rank_chunks(spec, layout, pp_rank):
        sizes, units = _gather_units(chunk, layout.dp, buckets.bucket_size)
        resident = {k for k, n in enumerate(sizes) if n <= buckets.stage3_param_persistence_threshold}
        peak, after_forward = _chunk_gather_window(sizes, units, buckets.stage3_prefetch_bucket_size, resident)
        windows.append(peak)
        at_rest.append(sum(sizes[k] for k in after_forward | resident))
    window = max(w + sum(at_rest) - rest for w, rest in zip(windows, at_rest, strict=True))
    return window * spec.bytes_per_param
