"""Process groups for tensor, pipeline (with virtual stages), context and data parallelism.

Ranks are laid out by an order string such as ``"tp-cp-ep-dp-pp"``: the first named dimension
varies fastest, so with that order the ranks of a tensor-parallel group are adjacent (they share
the most bandwidth) and pipeline stages are furthest apart.

One :class:`ParallelState` object holds a rank's groups. Code takes it as an explicit argument;
the single module-level "current" handle exists only so that entry points and layers built without
an explicit object can find it, and it is reset by :func:`destroy_model_parallel`.
"""
from __future__ import annotations

import itertools
from datetime import timedelta

import torch.distributed as dist

from megatron_core.rng_tracker import RNGStatesTracker, model_parallel_manual_seed

_DIMENSIONS = ("tp", "cp", "ep", "dp", "pp")


def rank_groups(sizes: dict[str, int], order: str, dims: str) -> list[list[int]]:
    """All groups of global ranks that vary only along ``dims`` (e.g. ``"tp"`` or ``"tp-pp"``).

    Pure function of the layout, so every rank computes the same list in the same order, which
    ``torch.distributed.new_group`` requires.
    """
    order_list = order.split("-")
    wanted = dims.split("-")
    strides, stride = {}, 1
    for d in order_list:
        strides[d] = stride
        stride *= sizes[d]
    others = [d for d in order_list if d not in wanted]
    groups = []
    # Slowest-varying "other" dimension outermost, so groups come out sorted by their first rank.
    for other_coords in itertools.product(*[range(sizes[d]) for d in reversed(others)]):
        base = sum(c * strides[d] for c, d in zip(other_coords, reversed(others), strict=True))
        members = [
            base + sum(c * strides[d] for c, d in zip(coords, reversed(wanted), strict=True))
            for coords in itertools.product(*[range(sizes[d]) for d in reversed(wanted)])
        ]
        groups.append(sorted(members))
    return sorted(groups)


class ParallelState:
    """One rank's process groups and coordinates for TP, PP (with virtual stages), CP and DP."""

    def __init__(
        self,
        tensor_model_parallel_size: int = 1,
        pipeline_model_parallel_size: int = 1,
        virtual_pipeline_model_parallel_size: int | None = None,
        context_parallel_size: int = 1,
        expert_model_parallel_size: int = 1,
        order: str = "tp-cp-ep-dp-pp",
        timeout: timedelta | None = None,
    ) -> None:
        if not dist.is_initialized():
            raise RuntimeError(
                "torch.distributed is not initialized: call torch.distributed.init_process_group "
                "(or megatron_core.initialize.initialize_distributed) before building process groups")
        world = dist.get_world_size()
        self.rank = dist.get_rank()
        self.world_size = world
        tp, pp, cp, ep = (tensor_model_parallel_size, pipeline_model_parallel_size,
                          context_parallel_size, expert_model_parallel_size)
        for name, value in (("tensor_model_parallel_size", tp), ("pipeline_model_parallel_size", pp),
                            ("context_parallel_size", cp), ("expert_model_parallel_size", ep)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if cp != 1 or ep != 1:
            raise NotImplementedError(
                "context and expert parallelism are laid out but not implemented yet; "
                "use context_parallel_size=1 and expert_model_parallel_size=1")
        if world % (tp * pp * cp * ep) != 0:
            raise ValueError(
                f"world size {world} is not divisible by tensor_model_parallel_size ({tp}) x "
                f"pipeline_model_parallel_size ({pp}) x context_parallel_size ({cp}) x "
                f"expert_model_parallel_size ({ep}) = {tp * pp * cp * ep}; change the sizes or the "
                f"number of processes")
        if virtual_pipeline_model_parallel_size is not None:
            if virtual_pipeline_model_parallel_size < 1:
                raise ValueError("virtual_pipeline_model_parallel_size must be >= 1")
            if pp < 2 and virtual_pipeline_model_parallel_size > 1:
                raise ValueError("virtual pipeline stages need pipeline_model_parallel_size >= 2")
        order_dims = order.split("-")
        if sorted(order_dims) != sorted(_DIMENSIONS):
            raise ValueError(f"order {order!r} must name each of {'-'.join(_DIMENSIONS)} exactly once")
        dp = world // (tp * pp * cp * ep)
        self.order = order
        self.sizes = {"tp": tp, "cp": cp, "ep": ep, "dp": dp, "pp": pp}
        self.virtual_pipeline_model_parallel_size = virtual_pipeline_model_parallel_size
        self._timeout = timeout
        self._owned_groups: list = []
        self._background_group: dist.ProcessGroup | None = None
        self.rng_tracker = RNGStatesTracker()

        self.tp_group, self.tp_ranks = self._build("tp")
        self.pp_group, self.pp_ranks = self._build("pp")
        self.dp_group, self.dp_ranks = self._build("dp")
        self.cp_group, self.cp_ranks = self._build("cp")
        self.mp_group, self.mp_ranks = self._build("tp-pp")
        self.embedding_group, self.embedding_ranks = self._build_from_pipelines(
            lambda ranks: [ranks[0], ranks[-1]] if len(ranks) > 1 else [ranks[0]])
        self.position_embedding_group, self.position_embedding_ranks = self._build_from_pipelines(
            lambda ranks: [ranks[0]])

    # ---- construction -------------------------------------------------------------------------
    def _new_group(self, ranks: list[int], member: bool):
        group = dist.new_group(ranks, timeout=self._timeout)  # None: torch's default timeout
        if member:
            self._owned_groups.append(group)
        return group

    def _build(self, dims: str):
        mine: tuple[dist.ProcessGroup, list[int]] | None = None
        for ranks in rank_groups(self.sizes, self.order, dims):
            group = self._new_group(ranks, self.rank in ranks)  # every rank joins every call
            if self.rank in ranks:
                mine = (group, ranks)
        if mine is None:  # the groups along any dims partition all ranks, so this is a layout bug
            raise RuntimeError(f"rank {self.rank} is in no {dims!r} group of layout {self.sizes} ({self.order})")
        return mine

    def _build_from_pipelines(self, pick):
        mine: tuple[dist.ProcessGroup | None, list[int]] = (None, [])
        for ranks in rank_groups(self.sizes, self.order, "pp"):
            members = sorted(set(pick(ranks)))
            group = self._new_group(members, self.rank in members)
            if self.rank in members:
                mine = (group, members)
        return mine

    # ---- sizes and ranks ----------------------------------------------------------------------
    @property
    def tp_size(self) -> int:
        """Tensor-parallel group size."""
        return self.sizes["tp"]

    @property
    def pp_size(self) -> int:
        """Pipeline-parallel size (number of stages)."""
        return self.sizes["pp"]

    @property
    def dp_size(self) -> int:
        """Data-parallel group size."""
        return self.sizes["dp"]

    @property
    def cp_size(self) -> int:
        """Context-parallel group size."""
        return self.sizes["cp"]

    @property
    def vpp_size(self) -> int | None:
        """Virtual pipeline stages (model chunks) per rank, or None without interleaving."""
        return self.virtual_pipeline_model_parallel_size

    @property
    def tp_rank(self) -> int:
        """This rank's index in its tensor-parallel group."""
        return self.tp_ranks.index(self.rank)

    @property
    def pp_rank(self) -> int:
        """This rank's pipeline stage (0 is the first)."""
        return self.pp_ranks.index(self.rank)

    @property
    def dp_rank(self) -> int:
        """This rank's index in its data-parallel group."""
        return self.dp_ranks.index(self.rank)

    @property
    def mp_size(self) -> int:
        """Model-parallel size: ``tp_size * pp_size``."""
        return self.tp_size * self.pp_size

    def is_pipeline_first_stage(self, vp_stage: int | None = None) -> bool:
        """First pipeline stage; with virtual stages, also the first model chunk (``vp_stage`` 0)."""
        if vp_stage is not None and vp_stage != 0:
            return False
        return self.pp_rank == 0

    def is_pipeline_last_stage(self, vp_stage: int | None = None) -> bool:
        """Last pipeline stage; with virtual stages, also the last model chunk."""
        if vp_stage is not None and self.vpp_size is not None and vp_stage != self.vpp_size - 1:
            return False
        return self.pp_rank == self.pp_size - 1

    def is_in_embedding_group(self) -> bool:
        """Whether this rank holds a tied word-embedding copy (first or last pipeline stage)."""
        return self.rank in self.embedding_ranks

    @property
    def next_pipeline_rank(self) -> int:
        """Global rank of the next pipeline stage (wraps around from the last)."""
        return self.pp_ranks[(self.pp_rank + 1) % self.pp_size]

    @property
    def prev_pipeline_rank(self) -> int:
        """Global rank of the previous pipeline stage (wraps around from the first)."""
        return self.pp_ranks[(self.pp_rank - 1) % self.pp_size]

    def manual_seed(self, seed: int) -> None:
        """Seed like Megatron-LM: ``seed + 100 * pp_rank`` for the default stream, per-TP-rank
        seeds for the tracker's model-parallel stream."""
        model_parallel_manual_seed(seed + 100 * self.pp_rank, self.rng_tracker, self.tp_rank)

    def describe(self) -> str:
        """One line with this rank's global, TP, PP and DP coordinates, for logs."""
        return (f"rank {self.rank}/{self.world_size}: tp {self.tp_rank}/{self.tp_size} "
                f"pp {self.pp_rank}/{self.pp_size} dp {self.dp_rank}/{self.dp_size}")

    @property
    def world_group(self) -> dist.ProcessGroup:
        """The default group (every rank of the job), for job-wide collectives such as the timers' gather."""
        group = dist.group.WORLD
        if group is None:
            raise RuntimeError("torch.distributed's default group is gone (destroyed after this ParallelState)")
        return group

    def background_group(self) -> dist.ProcessGroup:
        """A gloo group of all ranks for collectives that run in a background thread (asynchronous
        checkpoint saves), so they never interleave with the training loop's collectives on the
        default group. Created on first use: every rank must call this at the same point."""
        if self._background_group is None:
            self._background_group = dist.new_group(backend="gloo", timeout=self._timeout)
            self._owned_groups.append(self._background_group)
        return self._background_group

    def destroy(self) -> None:
        """Destroy every group this object created."""
        for group in self._owned_groups:
            try:
                dist.destroy_process_group(group)
            except (ValueError, RuntimeError):
                pass  # already gone with the default group
        self._owned_groups.clear()
        self._background_group = None


# The one resettable "current" handle (see module docstring).
_CURRENT: ParallelState | None = None


def initialize_model_parallel(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    virtual_pipeline_model_parallel_size: int | None = None,
    **kwargs,
) -> ParallelState:
    """Build a :class:`ParallelState` and make it the current one."""
    global _CURRENT
    if _CURRENT is not None:
        raise RuntimeError("model parallel groups are already initialized; call "
                           "destroy_model_parallel() first")
    _CURRENT = ParallelState(tensor_model_parallel_size, pipeline_model_parallel_size,
                             virtual_pipeline_model_parallel_size, **kwargs)
    return _CURRENT


def set_parallel_state(state: ParallelState | None) -> None:
    """Make ``state`` current (``None`` clears it)."""
    global _CURRENT
    _CURRENT = state


def get_parallel_state(state: ParallelState | None = None) -> ParallelState:
    """``state`` if given, else the current one; a clear error when none exists."""
    if state is not None:
        return state
    if _CURRENT is None:
        raise RuntimeError(
            "model parallel groups are not initialized: call "
            "megatron_core.parallel_state.initialize_model_parallel(...) (after "
            "torch.distributed.init_process_group) before building or running parallel layers")
    return _CURRENT


def model_parallel_is_initialized() -> bool:
    """Whether a current :class:`ParallelState` is set (``initialize_model_parallel`` was called)."""
    return _CURRENT is not None


def destroy_model_parallel() -> None:
    """Destroy the current groups and clear the handle."""
    global _CURRENT
    if _CURRENT is not None:
        _CURRENT.destroy()
    _CURRENT = None
