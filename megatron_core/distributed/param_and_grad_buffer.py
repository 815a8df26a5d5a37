"""Contiguous parameter and gradient storage for one dtype, cut into buckets reduced one by one.

Layout (shared by the parameter and the gradient buffer, so a later ZeRO-3 can shard parameters
with the same ranges): parameters are placed in the order given, which the DDP wrapper makes the
reverse of ``module.parameters()`` so that buckets fill up in the order backward produces
gradients. A bucket closes once it holds ``bucket_size`` elements and is padded to a multiple of
the DP size; DP rank r owns elements ``[r * n / dp, (r + 1) * n / dp)`` of every bucket of n
elements (its *shard*). Under ZeRO-3 each bucket's full parameters get a storage of their own,
freed and re-gathered bucket by bucket (``param_gather``), and the rank keeps its shard of every
bucket in ``param_shard`` (on the host with ``offload_param``). Under the distributed optimizer a
``shared_embedding`` parameter gets a bucket of its own, so the first and the last pipeline stage
shard it identically and the embedding-group all-reduce after the DP reduce-scatter adds matching
shards.

Gradients under ZeRO-2/3 (``partition_grads``, DeepSpeed's partitioned gradients): each bucket's
full gradient gets a storage of its own (``Bucket.grad_data``; the parameters' ``main_grad`` are
views into it), allocated zeroed by the bucket's first gradient of a backward and freed (resized
to 0) once its reduce-scatter has completed and its shard has been kept in ``grad_shard``. Every
backward reduces, under ``no_sync`` too (DeepSpeed ZeRO-2 reduces every micro-step): a backward run
under ``no_sync`` is flushed by a callback at its end, the last one by ``finish_grad_sync``. This
rank adds its running shard into its own part of the bucket before the reduce-scatter, so the
collective's output is the sum over microbatches. Buckets are launched from the gradient hooks
(in bucket order) whether or not ``overlap_grad_reduce`` is set: with it, launching bucket i waits
for the buckets before it, so at most one reduce-scatter is left in flight behind backward; without
it each reduce-scatter is waited on at once.
"""
from __future__ import annotations

import weakref
from collections.abc import Callable

import torch

from megatron_core import device as device_mod
from megatron_core.distributed import comm_log as comm
from megatron_core.distributed.bucket import Bucket, ShardPiece
from megatron_core.distributed.comm_log import BucketTiming, CommLog
from megatron_core.distributed.distributed_data_parallel_config import DistributedDataParallelConfig
from megatron_core.parallel_state import ParallelState

# The attribute each parameter's gradient view in the buffer is stored under (Megatron-LM's name;
# the optimizer reads it with ``getattr(param, "main_grad", None)``).
MAIN_GRAD_ATTR = "main_grad"
GRAD_BUFFER_ATTR = "grad_buffer"  # on each parameter: the ParamAndGradBuffer holding its gradient


def _pad(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class ParamAndGradBuffer:
    """Parameters of one (param dtype, grad dtype) pair laid out in one flat buffer, with their grads."""

    def __init__(self, params: list[torch.nn.Parameter], grad_dtype: torch.dtype,
                 config: DistributedDataParallelConfig, parallel_state: ParallelState,
                 comm_log: CommLog | None = None) -> None:
        if not params:
            raise ValueError("ParamAndGradBuffer needs at least one parameter")
        self.config, self.parallel_state, self.comm_log = config, parallel_state, comm_log
        self.dp_size, self.dp_rank = parallel_state.dp_size, parallel_state.dp_rank
        self.dp_group = parallel_state.dp_group
        self.param_dtype, self.grad_dtype = params[0].dtype, grad_dtype
        self.params = params
        self.param_ranges: dict[int, tuple[int, int, Bucket]] = {}
        self.buckets: list[Bucket] = []
        self.numel = self._layout(params)
        self.shard_numel = sum(b.shard_size for b in self.buckets)
        device = self.device = params[0].device
        self.zero3 = config.zero_stage == 3
        # Called as listener(bucket) after write_shard rewrote a bucket's kept shard: the distributed
        # optimizer's fp32 main copy follows (weak methods: the optimizer may go before the buffer).
        self.shard_listeners: list[weakref.WeakMethod] = []
        self.param_data: torch.Tensor | None = None
        self.param_shard: torch.Tensor | None = None
        if self.zero3:
            shard_device = device_mod.host_device() if config.offload_param else device
            self.param_shard = device_mod.maybe_pin(torch.zeros(self.shard_numel, dtype=self.param_dtype,
                                                                device=shard_device))
        else:
            self.param_data = torch.zeros(self.numel, dtype=self.param_dtype, device=device)
        # What ZeRO-3's freed parameters point at outside forward (Bucket.point_params_at; not counted as
        # memory). Inside forward they stay views of their 0-byte storage: an op reading one that no hook
        # gathered fails with torch's "storage of size 0" (the engine names the fix) instead of reading NaN.
        self.released = torch.full((1,), float("nan"), dtype=self.param_dtype, device=device)
        self.in_forward = False
        # ZeRO-2/3: per-bucket gradient storage, released after each reduction (module docstring); the
        # reduced shard of every bucket, summed over the microbatches of a step, lives in ``grad_shard``.
        self.partition_grads = config.zero_stage >= 2
        self.grad_data: torch.Tensor | None = None
        self.grad_shard: torch.Tensor | None = None
        if self.partition_grads:
            self.grad_shard = torch.zeros(self.shard_numel, dtype=grad_dtype, device=device)
        else:
            self.grad_data = torch.zeros(self.numel, dtype=grad_dtype, device=device)
        for bucket in self.buckets:
            self._build_bucket(bucket)
        self._synced = False
        self._round_open = False  # a backward under no_sync is running; a callback reduces at its end
        self.has_grads = False  # a backward put gradients here since the last reset (safe_get_full_grad)
        # Called as each bucket's collective is launched with (bucket, its Work or None when already
        # done, the tensor that holds the reduced shard once it is): optimizer offload's
        # --overlap-cpu-optimizer-d2h-h2d queues the shard's copy to the host behind the collective.
        self.on_bucket_launched: Callable[[Bucket, object, torch.Tensor], None] | None = None
        # Sum over DP, then the optimizer sees the average unless the loss is averaged per token later.
        self.gradient_scaling_factor = 1.0 if config.calculate_per_token_loss else 1.0 / self.dp_size

    # ---- layout -------------------------------------------------------------------------------
    def _build_bucket(self, bucket: Bucket) -> None:
        """Move ``bucket``'s parameters into the buffer and give them their ``main_grad`` views; ZeRO-3 then
        broadcasts the bucket from DP rank 0, keeps this rank's shard and frees it. One bucket at a time: at
        most one bucket beyond the model and the shards exists (allocating every bucket first held two more
        copies of the model at once)."""
        n = bucket.end - bucket.start
        if self.zero3:
            bucket.param_data = torch.zeros(n, dtype=self.param_dtype, device=self.device)
            bucket.persistent = n <= self.config.stage3_param_persistence_threshold
        else:
            assert self.param_data is not None
            bucket.param_data = self.param_data[bucket.start:bucket.end]
        if self.partition_grads:  # zeroed when the bucket's first gradient arrives (_allocate_grad)
            bucket.grad_data = torch.empty(n, dtype=self.grad_dtype, device=self.device)
        else:
            assert self.grad_data is not None
            bucket.grad_data = self.grad_data[bucket.start:bucket.end]
        for p in bucket.params:
            start, end, _ = self.param_ranges[id(p)]
            view = bucket.param_data[start - bucket.start:end - bucket.start]
            view.copy_(p.detach().reshape(-1))
            p.data = view.view(p.shape)
            bucket.param_views.append((p, p.data))
            main_grad = bucket.grad_data[start - bucket.start:end - bucket.start].view(p.shape)
            bucket.main_grads.append((p, main_grad))
            setattr(p, MAIN_GRAD_ATTR, main_grad)
            setattr(p, GRAD_BUFFER_ATTR, self)
        if self.partition_grads:
            self._release_grad(bucket)
        if self.zero3:
            if self.dp_size > 1:
                comm.broadcast(bucket.param_data, self.parallel_state.dp_ranks[0], self.dp_group,
                               log=self.comm_log, tag="param.broadcast")
            self._keep_shard(bucket)
            self.release_params(bucket)

    def _layout(self, params: list[torch.nn.Parameter]) -> int:
        bucket_size = self.config.bucket_size
        offset = bucket_start = local_offset = 0
        current: list[torch.nn.Parameter] = []
        current_ranges: list[tuple[int, int]] = []  # buffer ranges of ``current``, known before their bucket

        def close() -> None:
            nonlocal offset, bucket_start, local_offset, current, current_ranges
            end = bucket_start + _pad(offset - bucket_start, self.dp_size)
            bucket = Bucket(len(self.buckets), bucket_start, end, current, self.dp_size, self.dp_rank, local_offset)
            for p, (start, stop) in zip(current, current_ranges, strict=True):
                self.param_ranges[id(p)] = (start, stop, bucket)
            self.buckets.append(bucket)
            local_offset += bucket.shard_size
            offset = bucket_start = end
            current, current_ranges = [], []

        for p in params:
            own_bucket = self.config.use_distributed_optimizer and getattr(p, "shared_embedding", False)
            if own_bucket and current:
                close()
            current_ranges.append((offset, offset + p.numel()))
            offset += p.numel()
            current.append(p)
            if own_bucket or (bucket_size is not None and offset - bucket_start >= bucket_size):
                close()
        if current:
            close()
        return offset

    def local_pieces(self) -> list[ShardPiece]:
        """The pieces of parameters inside this rank's shard, in shard order."""
        pieces = [piece for bucket in self.buckets for p in bucket.params
                  if (piece := self.local_piece(p)) is not None]
        return sorted(pieces, key=lambda piece: piece.shard_start)

    def local_piece(self, param: torch.nn.Parameter) -> ShardPiece | None:
        """The part of ``param`` inside this rank's shard, or None when it has none here."""
        start, end, bucket = self.param_ranges[id(param)]
        lo, hi = bucket.shard_start, bucket.shard_start + bucket.shard_size
        s, e = max(start, lo), min(end, hi)
        if s >= e:
            return None
        return ShardPiece(param, s - start, e - start, bucket.local_offset + s - lo, bucket)

    # ---- gradient storage ---------------------------------------------------------------------
    def ensure_grad_allocated(self, param: torch.nn.Parameter) -> None:
        """ZeRO-2/3: re-create ``param``'s bucket gradient storage (zeroed) if it was released; the
        ``main_grad`` views stay valid (same storage). A no-op below stage 2 (one buffer, never freed)."""
        bucket = self.param_ranges[id(param)][2]
        if not bucket.grad_allocated:
            self._allocate_grad(bucket)

    @staticmethod
    def _allocate_grad(bucket: Bucket) -> None:
        bucket.grad_data.untyped_storage().resize_(bucket.grad_data.numel() * bucket.grad_data.element_size())
        bucket.grad_data.zero_()
        bucket.grad_allocated = True
        for param, main_grad in bucket.main_grads:
            setattr(param, MAIN_GRAD_ATTR, main_grad)

    @staticmethod
    def _release_grad(bucket: Bucket) -> None:
        bucket.grad_data.untyped_storage().resize_(0)
        bucket.grad_allocated = False
        # A view of a storage resized to 0 reads out of bounds (torch does not check): while released,
        # ``param.main_grad`` is None, and the reduced gradient is in ``grad_shard`` (``reduced_grads``).
        for param, _ in bucket.main_grads:
            setattr(param, MAIN_GRAD_ATTR, None)

    def _kept_shard(self, bucket: Bucket) -> torch.Tensor:
        assert self.grad_shard is not None
        return self.grad_shard[bucket.local_offset:bucket.local_offset + bucket.shard_size]

    def shard_grad(self, bucket: Bucket) -> torch.Tensor:
        """This rank's reduced gradient shard of ``bucket``: in ``grad_shard`` under ZeRO-2/3, else a
        view of the full buffer."""
        if self.grad_shard is not None:
            return self._kept_shard(bucket)
        assert self.grad_data is not None
        return self.grad_data[bucket.shard_start:bucket.shard_start + bucket.shard_size]

    def reset(self) -> None:
        """Zero the gradients and forget which buckets were reduced (start of a step)."""
        if self.grad_data is not None:
            self.grad_data.zero_()
        if self.grad_shard is not None:
            self.grad_shard.zero_()
            for bucket in self.buckets:
                if bucket.grad_allocated:
                    self._release_grad(bucket)  # a backward without its step: re-allocated zeroed
        for bucket in self.buckets:
            bucket.reset()
        self._synced = False
        self._round_open = False  # a backward that raised never ran its callback
        self.has_grads = False

    # ---- gradient sync ------------------------------------------------------------------------
    def register_grad_ready(self, param: torch.nn.Parameter, final: bool = True) -> None:
        """Called from the backward hook; launches finished buckets when overlapping.

        ``final`` is False inside ``no_sync`` (a microbatch before the last): ignored below ZeRO-2
        (the gradients only accumulate); under ZeRO-2/3 that backward is reduced as well, the rest of
        its buckets launched and every one waited on by a callback at the end of the backward pass.
        """
        self.has_grads = True
        if not final and not self.partition_grads:
            return
        bucket = self.param_ranges[id(param)][2]
        if not final:
            self._open_round()
            if id(param) not in bucket.pending and not bucket.launched:
                return  # a second gradient of the same backward (reentrant recompute): accumulated
        if self._synced or bucket.launched or id(param) not in bucket.pending:
            raise RuntimeError(
                "a parameter's gradient became ready twice before the optimizer step: gradient accumulation over "
                "microbatches must run all but the last backward under DistributedDataParallel.no_sync() (pass "
                "no_sync_func= to the schedule), and optimizer.zero_grad() / zero_grad_buffer() must run between steps")
        bucket.pending.discard(id(param))
        # ZeRO-2/3 reduce during backward with or without overlap (DeepSpeed's overlap_comm=False
        # reduces from its hooks too, synchronously): that is what frees each bucket's full gradient.
        if self.config.overlap_grad_reduce or self.partition_grads:
            self._launch_ready_buckets(final)

    def _open_round(self) -> None:
        if not self._round_open:
            # torch's own DDP finishes its reduction the same way (a callback at the end of backward).
            torch.autograd.Variable._execution_engine.queue_callback(self._close_round)
            self._round_open = True

    def _close_round(self) -> None:
        self._round_open = False
        self._flush(final=False)
        for bucket in self.buckets:
            bucket.reset()

    def _launch_ready_buckets(self, final: bool = True) -> None:
        # Strictly in bucket order, so every rank issues its collectives in the same order even if a
        # bucket completes earlier on one rank than on another.
        for bucket in self.buckets:
            if bucket.launched:
                continue
            if bucket.pending:
                return
            self._launch(bucket, final)

    def _launch(self, bucket: Bucket, final: bool = True) -> None:
        bucket.launched_at = comm.now()
        if self.partition_grads:
            self._launch_partitioned(bucket, final)
            return
        if self.dp_size == 1:
            if self.on_bucket_launched is not None:
                self.on_bucket_launched(bucket, None, self.shard_grad(bucket))
            return
        grad = bucket.grad_data
        if self.gradient_scaling_factor != 1.0:
            grad.mul_(self.gradient_scaling_factor)  # gloo has no AVG / PREMUL_SUM: divide before summing
        tag = f"grad.bucket{bucket.index}"
        if self.config.reduce_scatter_grads:
            bucket.reduce_scatter_output = torch.empty(bucket.shard_size, dtype=grad.dtype, device=grad.device)
            # The bucket's other shards are not read after the sync: gloo may sum in place there.
            bucket.handle = comm.reduce_scatter(bucket.reduce_scatter_output, grad, self.dp_group, async_op=True,
                                                log=self.comm_log, tag=tag, full_is_scratch=True)
        else:
            bucket.handle = comm.all_reduce(grad, self.dp_group, async_op=True, log=self.comm_log, tag=tag)
        if self.on_bucket_launched is not None:
            shard = bucket.reduce_scatter_output
            self.on_bucket_launched(bucket, bucket.handle, self.shard_grad(bucket) if shard is None else shard)

    def _launch_partitioned(self, bucket: Bucket, final: bool) -> None:
        """ZeRO-2/3: reduce-scatter ``bucket`` with the running shard folded in, then complete the
        buckets launched before it (releasing their storage). ``final``: the step's last backward,
        whose launches the ``on_bucket_launched`` listener hears."""
        if not bucket.grad_allocated:
            self._allocate_grad(bucket)  # no gradient this backward: zeros, so every rank reduces it
        grad, kept = bucket.grad_data, self._kept_shard(bucket)
        if self.gradient_scaling_factor != 1.0:
            grad.mul_(self.gradient_scaling_factor)  # gloo has no AVG / PREMUL_SUM: divide before summing
        own = grad[bucket.shard_start - bucket.start:bucket.shard_start - bucket.start + bucket.shard_size]
        # Only this rank adds its kept shard (the earlier microbatches' reduced sum, zero at the first),
        # so the reduce-scatter returns the running total: the listener may copy the output directly.
        own.add_(kept)
        if self.dp_size == 1:
            kept.copy_(own)
            self._release_grad(bucket)
            if final and self.on_bucket_launched is not None:
                self.on_bucket_launched(bucket, None, kept)
            return
        bucket.reduce_scatter_output = torch.empty(bucket.shard_size, dtype=grad.dtype, device=grad.device)
        bucket.handle = comm.reduce_scatter(bucket.reduce_scatter_output, grad, self.dp_group, async_op=True,
                                            log=self.comm_log, tag=f"grad.bucket{bucket.index}", full_is_scratch=True)
        if final and self.on_bucket_launched is not None:
            self.on_bucket_launched(bucket, bucket.handle, bucket.reduce_scatter_output)
        # With overlap the collective runs behind the rest of backward until the next launch; without,
        # it is waited on now (backward pauses, as DeepSpeed's with overlap_comm=False).
        for earlier in self.buckets[:bucket.index + (0 if self.config.overlap_grad_reduce else 1)]:
            self._complete(earlier)

    def _complete(self, bucket: Bucket) -> None:
        """Wait for ``bucket``'s collective, if in flight; keep the reduced shard (ZeRO-2/3: in
        ``grad_shard``, then free the bucket's full storage)."""
        if bucket.handle is None:
            return
        wait_started = comm.now()
        bucket.handle.wait()
        if self.comm_log is not None:
            self.comm_log.bucket_timings.append(BucketTiming(bucket.launched_at, wait_started, comm.now()))
        if bucket.reduce_scatter_output is not None:
            # Written back into the full buffer below ZeRO-2 so finalize_model_grads' TP / embedding
            # all-reduces (which act on param.main_grad) also reach the shard the optimizer reads.
            self.shard_grad(bucket).copy_(bucket.reduce_scatter_output)
        if self.partition_grads:
            self._release_grad(bucket)
        bucket.handle, bucket.reduce_scatter_output = None, None

    def _flush(self, final: bool) -> None:
        for bucket in self.buckets:
            if not bucket.launched:
                self._launch(bucket, final)
        for bucket in self.buckets:
            self._complete(bucket)

    def finish_grad_sync(self) -> None:
        """Launch the buckets not launched yet (all of them without overlap) and wait for every one."""
        if self._synced:
            return
        self._flush(final=True)
        self._synced = True

    @property
    def synced(self) -> bool:
        """Whether this step's gradients are reduced: :meth:`finish_grad_sync` ran (the last micro batch's
        backward) since the last :meth:`reset`."""
        return self._synced

    # ---- parameter sync (distributed optimizer) ----------------------------------------------
    def shard_param(self, bucket: Bucket) -> torch.Tensor:
        """This rank's shard of ``bucket``'s parameters (a view into the parameter buffer, or into
        ``param_shard`` under ZeRO-3)."""
        if self.param_shard is not None:
            return self.param_shard[bucket.local_offset:bucket.local_offset + bucket.shard_size]
        offset = bucket.shard_start - bucket.start
        return bucket.param_data[offset:offset + bucket.shard_size]

    def keep_shards(self) -> None:
        """ZeRO-3: copy this rank's shard of every (gathered) bucket into ``param_shard``."""
        for bucket in self.buckets:
            self._keep_shard(bucket)

    def _keep_shard(self, bucket: Bucket) -> None:
        offset = bucket.shard_start - bucket.start
        self.shard_param(bucket).copy_(bucket.param_data[offset:offset + bucket.shard_size])

    def write_shard(self, bucket: Bucket) -> None:
        """ZeRO-3: the (gathered, modified) full parameters of ``bucket`` become this rank's kept shard,
        and every shard listener (the distributed optimizer's fp32 main copy) follows."""
        self._keep_shard(bucket)
        for ref in self.shard_listeners:
            listener = ref()
            if listener is not None:
                listener(bucket)

    def launch_param_gather(self, bucket: Bucket) -> None:
        """Start the all-gather of ``bucket``'s parameters from every rank's shard (asynchronous).

        ZeRO-3 re-allocates the freed storage first (the parameters' views stay valid: same storage).
        """
        if bucket.gather_handle is not None:
            return
        if self.zero3:
            storage = bucket.param_data.untyped_storage()
            nbytes = bucket.param_data.numel() * bucket.param_data.element_size()
            if storage.nbytes() != nbytes:
                storage.resize_(nbytes)
                bucket.point_params_at_buffer()
        # A device copy of the local shard as input: the output contains it (no aliasing allowed),
        # and an offloaded shard is on the host (the host-to-device copy of parameter offload).
        shard = self.shard_param(bucket).to(self.device, copy=True)
        if self.dp_size == 1:
            bucket.param_data.copy_(shard)
            bucket.gathered = True
            return
        bucket.gather_handle = comm.all_gather(bucket.param_data, shard, self.dp_group, async_op=True,
                                               log=self.comm_log, tag=f"param.bucket{bucket.index}")
        bucket.gathered = True

    def wait_param_gather(self, bucket: Bucket) -> None:
        """Wait for ``bucket``'s all-gather in flight, if any."""
        if bucket.gather_handle is not None:
            bucket.gather_handle.wait()
            bucket.gather_handle = None

    def release_params(self, bucket: Bucket) -> None:
        """ZeRO-3: free ``bucket``'s full parameters (its shard stays in ``param_shard``)."""
        if not self.zero3 or bucket.persistent or not bucket.gathered:
            return
        self.wait_param_gather(bucket)
        bucket.param_data.untyped_storage().resize_(0)
        if not self.in_forward:
            bucket.point_params_at(self.released.fill_(float("nan")))
        bucket.gathered = False

    def set_in_forward(self, in_forward: bool) -> None:
        """ZeRO-3: entering (True) or leaving a forward; freed parameters become views of their freed storage
        or point at the NaN placeholder (see ``released``)."""
        self.in_forward = in_forward
        freed = [bucket for bucket in self.buckets if not bucket.gathered]
        if freed and not in_forward:
            self.released.fill_(float("nan"))  # once per forward, not per bucket (a write may have reached it)
        for bucket in freed:
            if in_forward:
                bucket.point_params_at_buffer()
            else:
                bucket.point_params_at(self.released)

    def finish_param_gathers(self) -> None:
        """Wait for every all-gather in flight (before a step writes the shards, or a checkpoint reads)."""
        for bucket in self.buckets:
            self.wait_param_gather(bucket)

    def all_gather_params(self, async_op: bool = False) -> None:
        """After each rank updated its shard, give every rank every bucket's full parameters.

        ``async_op`` (``--overlap-param-gather``) leaves the gathers in flight: each bucket is waited
        on before its first use in the next forward. Under ZeRO-3 the non-persistent buckets are
        freed instead (gathered on demand in the next forward) and the persistent ones re-gathered.
        """
        self.finish_param_gathers()
        if self.dp_size == 1 and not self.zero3:
            return
        for bucket in self.buckets:
            if self.zero3 and not bucket.persistent:
                self.release_params(bucket)
            else:
                self.launch_param_gather(bucket)
        if not async_op:
            self.finish_param_gathers()
