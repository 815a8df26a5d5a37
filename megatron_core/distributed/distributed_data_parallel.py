"""Data-parallel wrapper: gradients in contiguous bucketed buffers, reduced while backward runs.

Each parameter's gradient is accumulated by a post-accumulate-grad hook into ``param.main_grad``
(a view into its buffer) and ``param.grad`` is dropped. Outside :meth:`no_sync` the hook also
marks the parameter ready; with ``overlap_grad_reduce`` a bucket's all-reduce (reduce-scatter
under the distributed optimizer) starts asynchronously as soon as all its gradients are in, so it
runs behind the rest of backward. :meth:`finish_grad_sync` (called by ``finalize_model_grads``)
launches whatever is left and waits.

Under ZeRO-2/3 each bucket's full gradient is freed once reduced, also between microbatches (see
``param_and_grad_buffer``): after backward only the reduced shard is held.

Under ZeRO-3 and with ``overlap_param_gather`` a :class:`ParamGatherManager` gathers bucket
parameters on demand (see ``param_gather``). The wrapped module's ``state_dict`` (also when called
on the unwrapped module) returns full (TP-local) parameters at every ZeRO stage, copied one bucket
at a time under ZeRO-3; its ``load_state_dict`` copies each rank's shard straight from the incoming
full tensors, nothing gathered (see ``zero3_state_dict``).
"""
from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from typing_extensions import override

from megatron_core.distributed import comm_log as comm
from megatron_core.distributed.comm_log import CommLog
from megatron_core.distributed.distributed_data_parallel_config import DistributedDataParallelConfig
from megatron_core.distributed.param_and_grad_buffer import MAIN_GRAD_ATTR, ParamAndGradBuffer
from megatron_core.distributed.param_gather import ParamGatherManager
from megatron_core.distributed.zero3_state_dict import register_state_dict_hooks
from megatron_core.errors import ConfigError
from megatron_core.parallel_state import ParallelState, get_parallel_state


def _parameter_signature(module: torch.nn.Module) -> list[str]:
    return [f"{name} {list(p.shape)} {str(p.dtype).removeprefix('torch.')}"
            f"{'' if p.requires_grad else ' frozen'}" for name, p in module.named_parameters()]


def check_same_parameters(module: torch.nn.Module, parallel_state: ParallelState) -> None:
    """Raise :class:`ConfigError` on every DP rank when the ranks' ``module`` parameters differ (names,
    shapes, dtypes, ``requires_grad``), naming the first parameter that differs and a rank that differs
    from the most common model (its DP rank and global rank).

    The gradient buckets and the ZeRO shards are laid out from each rank's own parameters, so a
    rank-dependent model would pair unrelated elements in every broadcast and reduction without any
    error (or abort gloo on a size mismatch). Collective over the DP group: one all-gather of a
    32-byte digest; the signatures themselves are gathered only to name the first difference.
    """
    if parallel_state.dp_size == 1:
        return
    group = parallel_state.dp_group
    mine = _parameter_signature(module)
    digest = hashlib.sha256("\n".join(mine).encode()).hexdigest()
    digests: list = [None] * parallel_state.dp_size
    dist.all_gather_object(digests, digest, group=group)
    if len(set(digests)) == 1:
        return
    signatures: list = [None] * parallel_state.dp_size
    dist.all_gather_object(signatures, mine, group=group)
    # The model most DP ranks hold is the reference (ties: the lowest rank's), so the rank named is the
    # odd one out: with 4 ranks of which rank 0 alone differs, rank 0 is named, not rank 1.
    common = max(digests, key=lambda d: (digests.count(d), -digests.index(d)))
    ref = digests.index(common)
    odd = next(r for r, d in enumerate(digests) if d != common)
    first, other = signatures[ref], signatures[odd]
    at = next((i for i, (a, b) in enumerate(zip(first, other, strict=False)) if a != b), min(len(first), len(other)))

    def describe(sig: list[str]) -> str:
        return f"'{sig[at]}'" if at < len(sig) else "no more parameters"
    raise ConfigError(f"the model differs across data-parallel ranks: at parameter {at}, DP rank {odd} (global rank "
                      f"{parallel_state.dp_ranks[odd]}) has {describe(other)} where DP rank {ref} has "
                      f"{describe(first)} (as {digests.count(common)} of {len(digests)} DP ranks do); build the "
                      "same model on every rank (no rank-dependent modules, shapes, dtypes or requires_grad)")


class DistributedDataParallel(torch.nn.Module):
    """Wraps one model chunk for data parallelism (see the module docstring and the config's ZeRO stages)."""

    def __init__(self, config: DistributedDataParallelConfig, module: torch.nn.Module,
                 parallel_state: ParallelState | None = None, comm_log: CommLog | None = None) -> None:
        super().__init__()
        self.ddp_config = config
        self.module = module
        self.parallel_state = get_parallel_state(parallel_state)
        self.comm_log = comm_log
        self._sync_enabled = True
        check_same_parameters(module, self.parallel_state)
        self.buffers_by_dtype: list[ParamAndGradBuffer] = []
        self._buffer_of: dict[int, ParamAndGradBuffer] = {}
        self._build_buffers()
        self._broadcast_params()
        self.param_gather: ParamGatherManager | None = None
        if self.buffers_by_dtype and (config.zero_stage == 3 or config.overlap_param_gather):
            self.param_gather = ParamGatherManager(module, self.buffers_by_dtype)
        if self.param_gather is not None:
            # Checkpoints read and write full parameters: copied bucket by bucket (ZeRO-3), or with no gather
            # left in flight.
            register_state_dict_hooks(self.param_gather, module, config.zero_stage == 3)
        self._hooks = [p.register_post_accumulate_grad_hook(self._grad_hook(self._buffer_of[id(p)]))
                       for buffer in self.buffers_by_dtype for p in buffer.params]

    # ---- construction -------------------------------------------------------------------------
    def _grad_dtype(self, param: torch.nn.Parameter) -> torch.dtype:
        return torch.float32 if self.ddp_config.grad_reduce_in_fp32 else param.dtype

    def _build_buffers(self) -> None:
        groups: dict[tuple[torch.dtype, torch.dtype], list[torch.nn.Parameter]] = {}
        for p in self.module.parameters():
            if p.requires_grad:
                groups.setdefault((p.dtype, self._grad_dtype(p)), []).append(p)
        for (_, grad_dtype), params in groups.items():
            # Reverse order: backward produces the last layers' gradients first, so the first
            # buckets fill (and can be reduced) first.
            buffer = ParamAndGradBuffer(params[::-1], grad_dtype, self.ddp_config, self.parallel_state, self.comm_log)
            self.buffers_by_dtype.append(buffer)
            for p in params:
                self._buffer_of[id(p)] = buffer

    def _broadcast_params(self) -> None:
        """Every DP rank starts from DP rank 0's parameters."""
        if self.parallel_state.dp_size == 1:
            return
        src = self.parallel_state.dp_ranks[0]
        with torch.no_grad():
            for buffer in self.buffers_by_dtype:
                if buffer.param_data is not None:  # ZeRO-3's buffers broadcast each bucket as they build it
                    comm.broadcast(buffer.param_data, src, self.parallel_state.dp_group, log=self.comm_log,
                                   tag="param.broadcast")
            for p in self.module.parameters():
                if not p.requires_grad:
                    comm.broadcast(p.data, src, self.parallel_state.dp_group, log=self.comm_log, tag="param.broadcast")

    def _grad_hook(self, buffer: ParamAndGradBuffer):
        def hook(param: torch.nn.Parameter) -> None:
            if param.grad is None:
                return
            buffer.ensure_grad_allocated(param)
            main_grad: torch.Tensor = getattr(param, MAIN_GRAD_ATTR)  # set by the buffer
            main_grad.add_(param.grad)
            param.grad = None  # the gradient lives in the buffer only
            buffer.register_grad_ready(param, final=self._sync_enabled)
            if self.param_gather is not None:
                self.param_gather.grad_ready(param)
        return hook

    # ---- ZeRO-3: full parameters for checkpoints ----------------------------------------------
    def gather_all_params(self) -> None:
        """Make every parameter hold its full value (ZeRO-3: all-gather every bucket; wait for
        gathers in flight under ``overlap_param_gather``). Collective over DP."""
        if self.param_gather is not None:
            self.param_gather.gather_all()

    def release_params(self) -> None:
        """ZeRO-3: free every non-persistent bucket again (after :meth:`gather_all_params`)."""
        if self.param_gather is not None and self.ddp_config.zero_stage == 3:
            self.param_gather.release_all()

    @contextlib.contextmanager
    def gathered_params(self, writeback: bool = False) -> Iterator[None]:
        """Full parameters inside the block (collective over DP on entry). With ``writeback`` the values
        written into them inside the block (a checkpoint load) become this rank's ZeRO-3 shards on exit."""
        self.gather_all_params()
        try:
            yield
        finally:
            if writeback and self.ddp_config.zero_stage == 3:
                for buffer in self.buffers_by_dtype:
                    buffer.keep_shards()
            self.release_params()

    # ---- the module interface -----------------------------------------------------------------
    @override
    def forward(self, *args, **kwargs):
        if self.ddp_config.zero_stage != 3:
            return self.module(*args, **kwargs)
        for buffer in self.buffers_by_dtype:  # freed parameters: see ParamAndGradBuffer.released
            buffer.set_in_forward(True)
        try:
            return self.module(*args, **kwargs)
        finally:
            for buffer in self.buffers_by_dtype:
                buffer.set_in_forward(False)

    def set_input_tensor(self, tensor: torch.Tensor | None) -> None:
        """Hand the previous pipeline stage's activations to the wrapped chunk (see ``GPTModel``)."""
        set_input_tensor = getattr(self.module, "set_input_tensor", None)
        if not callable(set_input_tensor):
            raise AttributeError(f"{type(self.module).__name__} has no set_input_tensor(); a pipeline stage "
                                 f"wrapped in DistributedDataParallel must define one")
        set_input_tensor(tensor)

    @override
    def state_dict(self, *args, **kwargs):
        """The wrapped module's state dict (same keys as without the wrapper)."""
        return self.module.state_dict(*args, **kwargs)

    @override
    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.module.load_state_dict(state_dict, strict=strict, assign=assign)

    # ---- gradient sync ------------------------------------------------------------------------
    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients without reducing them (every microbatch but the last).

        Under ZeRO-2/3 each backward is reduced all the same, into the kept gradient shard, so the
        full gradients of a microbatch are freed before the next one (DeepSpeed's engine refuses
        ``no_sync`` at stages 2/3 for this reason; here it only marks the step's last backward)."""
        self._sync_enabled = False
        try:
            yield
        finally:
            self._sync_enabled = True

    def finish_grad_sync(self) -> None:
        """Launch the remaining buckets' collectives and wait for all of them (after the last backward)."""
        for buffer in self.buffers_by_dtype:
            buffer.finish_grad_sync()

    def zero_grad_buffer(self) -> None:
        """Zero ``main_grad`` and reset the bucket state; call before each step's first backward."""
        for p in self.module.parameters():
            p.grad = None
        for buffer in self.buffers_by_dtype:
            buffer.reset()
        if self.param_gather is not None:
            self.param_gather.reset()

    def broadcast_params(self) -> None:
        """Copy DP rank 0's parameters to the other DP ranks (done once at construction)."""
        self._broadcast_params()


def no_sync_func(model_chunks: list[torch.nn.Module]):
    """A ``no_sync_func`` for the schedules covering every DDP-wrapped chunk (virtual stages)."""
    @contextlib.contextmanager
    def no_sync() -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for chunk in model_chunks:
                if isinstance(chunk, DistributedDataParallel):
                    stack.enter_context(chunk.no_sync())
            yield
    return no_sync
