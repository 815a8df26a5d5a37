"""Enumerate layouts, prune the invalid ones with their reason, predict memory, rank by tokens/s.

The space is TP x PP x VPP x DP x ZeRO stage x micro batch x recompute x sequence parallelism x
offload. A layout is *valid* when the model divides over it, *fits* when its predicted peak memory per
rank is within the device memory, and *launchable* when ``pretrain_gpt.py`` has flags for every
setting in it (:data:`ZERO_STAGE_FLAGS`): only launchable layouts are written out or tried.
"""
from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable

from megatron_core.autotune.activations import stage_activation_bytes
from megatron_core.autotune.layout import Layout, ModelSpec
from megatron_core.autotune.memory import (
    DEFAULT_BUCKETS,
    IMPLEMENTED_ZERO_STAGES,
    BucketSettings,
    comm_buffer_bytes,
    model_state_bytes,
    zero3_gather_window_bytes,
)

# pretrain_gpt.py's flags for each ZeRO stage it can launch (a stage missing here would be listed, never
# written out or tried).
ZERO_STAGE_FLAGS: dict[int, list[str]] = {0: [], 1: ["--use-distributed-optimizer"], 2: ["--zero-stage", "2"],
                                          3: ["--zero-stage", "3"]}
OFFLOAD_LAUNCHABLE = True  # --optimizer-cpu-offload
GIB = 1024 ** 3


@dataclasses.dataclass
class Candidate:
    """A layout with its verdict: ``reason`` is None for a valid layout that fits."""

    layout: Layout
    memory_bytes: int = 0
    reason: str | None = None
    launchable: bool = True
    step_time_s: float | None = None
    tokens_per_s: float | None = None
    mfu: float | None = None
    measured_tokens_per_s: float | None = None
    measured_memory_bytes: int | None = None


def format_bytes(n: float) -> str:
    """``1.50 GiB`` / ``12.3 MiB``: GiB from 1 GiB up."""
    return f"{n / GIB:.2f} GiB" if abs(n) >= GIB else f"{n / 1024 ** 2:.1f} MiB"


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def enumerate_layouts(spec: ModelSpec, world_size: int, micro_batch_sizes: list[int] | None = None,
                      zero_stages: tuple[int, ...] = (0, 1, 2, 3), with_offload: bool = True) -> list[Layout]:
    """Every combination over ``world_size`` ranks (valid or not; :func:`check_layout` says which)."""
    out = []
    for tp, pp in itertools.product(_divisors(world_size), _divisors(world_size)):
        if world_size % (tp * pp):
            continue
        dp = world_size // (tp * pp)
        vpps: list[int | None] = [None] + ([v for v in (2, 3, 4)] if pp > 1 else [])
        mbs = micro_batch_sizes or [m for m in _divisors(spec.global_batch_size) if m <= 8]
        for vpp, zero, mb, rc, sp, off in itertools.product(
                vpps, zero_stages, mbs, (None, "selective", "full"), (False, True) if tp > 1 else (False,),
                (False, True) if with_offload else (False,)):
            if (dp == 1 and zero != 0) or (off and zero == 0):
                continue  # sharding over one rank is stage 0; offload pairs with a ZeRO stage
            out.append(Layout(tp, pp, dp, vpp, zero, mb, rc, sp, off))
    return out


def check_layout(spec: ModelSpec, layout: Layout) -> str | None:
    """Why the framework cannot build ``layout`` (None when it can), in the flags' words."""
    c, tp = spec.config, layout.tp
    for name, value in (("--num-attention-heads", c.num_attention_heads), ("--num-query-groups", spec.num_query_groups),
                        ("--ffn-hidden-size", spec.ffn_hidden_size)):
        if value % tp:
            return f"{name} {value} not divisible by TP {tp}"
    chunks = layout.pp * (layout.vpp or 1)
    if c.num_layers % chunks:
        return f"--num-layers {c.num_layers} not divisible by PP {layout.pp} x VPP {layout.vpp or 1}"
    per_step = layout.micro_batch_size * layout.dp
    for batch in [spec.global_batch_size, *spec.batch_sizes()[:-1]]:  # pretrain_gpt.py checks every ramped batch
        ramped = batch != spec.global_batch_size
        if batch % per_step:
            what = f"global batch size {batch} (reached during --rampup-batch-size)" if ramped else \
                f"--global-batch-size {batch}"
            return f"{what} not divisible by micro batch {layout.micro_batch_size} x DP {layout.dp}"
        if layout.vpp and batch // per_step % layout.pp:
            where = f" (global batch size {batch}, reached during --rampup-batch-size)" if ramped else ""
            return f"interleaving needs microbatches ({batch // per_step}) divisible by PP {layout.pp}{where}"
    if layout.sequence_parallel and spec.seq_length % tp:
        return f"--seq-length {spec.seq_length} not divisible by TP {tp} (sequence parallelism)"
    return None


def launch_blocker(layout: Layout) -> str | None:
    """Why ``pretrain_gpt.py`` cannot launch ``layout`` today (None when it can)."""
    if layout.zero_stage not in IMPLEMENTED_ZERO_STAGES:
        return f"ZeRO-{layout.zero_stage} is not in the framework yet"
    if layout.zero_stage not in ZERO_STAGE_FLAGS:
        return f"pretrain_gpt.py has no flag for ZeRO-{layout.zero_stage}"
    if layout.offload and not OFFLOAD_LAUNCHABLE:
        return "optimizer offload is not in the framework yet"
    return None


@dataclasses.dataclass(frozen=True)
class RankMemory:
    """Predicted bytes of one pipeline rank, in Megatron-LM's ``report_theoretical_memory`` terms.

    ``weight_and_optimizer``: parameters, fp32 main parameters, optimizer state and the gradients held at
    their peak (plus ZeRO-3's gather window); ``activation``: what the stage keeps for backward
    (:func:`.activations.stage_activation_bytes`); ``comm_buffers``: the DP collectives' temporaries after
    backward (:func:`.memory.comm_buffer_bytes`), which never coexist with the activations.
    """

    weight_and_optimizer: int
    activation: int
    comm_buffers: int

    @property
    def total(self) -> int:
        """The peak: model states plus the larger of the activations and the collectives' buffers."""
        return self.weight_and_optimizer + max(self.activation, self.comm_buffers)


def rank_memory(spec: ModelSpec, layout: Layout, pp_rank: int, on_cpu: bool = True,
                buckets: BucketSettings = DEFAULT_BUCKETS, optimizer: str = "adam", sgd_momentum: float = 0.9,
                overlap_grad_reduce: bool = False) -> RankMemory:
    """The parts of pipeline rank ``pp_rank``'s peak (:class:`RankMemory`): model states (with the gradients
    held during backward: ZeRO-2/3's shard plus the buckets in use), the ZeRO-3 gather window, activations
    during backward, and the DP collectives' buffers after it, for the run's ``buckets``."""
    states = model_state_bytes(spec, layout, pp_rank, 0, optimizer, buckets.bucket_size, sgd_momentum,
                               overlap_grad_reduce)
    weights = states.params + states.main_params + states.optimizer_state + max(
        states.grads + states.step_grad_copies, states.grads_in_backward)
    if layout.zero_stage == 3:
        weights += zero3_gather_window_bytes(spec, layout, pp_rank, buckets)
    return RankMemory(weights, stage_activation_bytes(spec, layout, pp_rank, on_cpu),
                      comm_buffer_bytes(spec, layout, pp_rank, on_cpu, buckets.bucket_size))


def predict_rank_memory(spec: ModelSpec, layout: Layout, pp_rank: int, on_cpu: bool = True,
                        buckets: BucketSettings = DEFAULT_BUCKETS, optimizer: str = "adam") -> int:
    """Peak device bytes of pipeline rank ``pp_rank`` (:func:`rank_memory`'s total)."""
    return rank_memory(spec, layout, pp_rank, on_cpu, buckets, optimizer).total


def predict_memory(spec: ModelSpec, layout: Layout, on_cpu: bool = True, buckets: BucketSettings = DEFAULT_BUCKETS,
                   optimizer: str = "adam") -> int:
    """Peak device bytes of the most loaded rank (:func:`predict_rank_memory` over pipeline ranks)."""
    return max(predict_rank_memory(spec, layout, r, on_cpu, buckets, optimizer) for r in range(layout.pp))


def search(spec: ModelSpec, layouts: list[Layout], memory_per_device: float,
           predict_time: Callable[[Layout], tuple[float, float]] | None = None,
           progress: Callable | None = None, buckets: BucketSettings = DEFAULT_BUCKETS) -> list[Candidate]:
    """Verdicts for ``layouts``: pruned ones carry a reason; the rest are ranked by predicted tokens/s
    (``predict_time(layout) -> (step seconds, MFU)``), launchable ones first. ``memory_per_device`` in bytes;
    ``buckets`` are the run's (:func:`rank_memory`)."""
    out = []
    iterator = progress(layouts) if progress is not None else layouts
    for layout in iterator:
        cand = Candidate(layout, reason=check_layout(spec, layout))
        if cand.reason is None:
            cand.memory_bytes = predict_memory(spec, layout, buckets=buckets)
            if cand.memory_bytes > memory_per_device:
                cand.reason = (f"out of memory by {format_bytes(cand.memory_bytes - memory_per_device)} "
                               f"({format_bytes(cand.memory_bytes)} predicted)")
        blocker = launch_blocker(layout)
        cand.launchable = blocker is None
        if cand.reason is None and predict_time is not None:
            cand.step_time_s, cand.mfu = predict_time(layout)
            cand.tokens_per_s = spec.global_batch_size * spec.seq_length / cand.step_time_s
        out.append(cand)
    return sorted(out, key=lambda c: (c.reason is not None, not c.launchable, -(c.tokens_per_s or 0.0)))
