"""Optimizer offload: which buckets go to host memory, and the NVMe swapper (ZeRO-Infinity).

CPU offload (``OptimizerConfig.optimizer_cpu_offload``) is done by ``DistributedOptimizer`` itself:
the fp32 main shard of an offloaded bucket, its gradient copy and (created by the torch optimizer
beside it) the Adam state are host tensors. :func:`offloaded_buckets` picks the buckets.

NVMe offload keeps, for every offloaded bucket, the main shard and the two Adam moments in one file
under ``nvme_offload_path`` (DeepSpeed's ``offload_optimizer.nvme_path``); in between steps their
storage is freed. The step walks the buckets in order: bucket g is read in (reads run
``buffer_count - 1`` buckets ahead on I/O threads), updated by the torch optimizer (only params with
a gradient are updated, so g's pieces alone carry one), copied into the model shard, then written
back and freed on an I/O thread while the next bucket computes. File I/O uses ``os.preadv`` /
``os.pwritev`` straight into the tensors' memory from a thread pool (the calls release the GIL).
The async-I/O packages on PyPI were considered: caio / aiofile (Linux AIO, maintained) return each
read as a new ``bytes`` object and need an asyncio loop, which costs a copy and a transient
allocation the size of the window that this feature exists to bound; plain positional I/O into
the destination tensors has neither.

``--overlap-cpu-optimizer-d2h-h2d`` (:class:`OverlappedOffload`): each offloaded bucket's reduced
gradient shard is copied to the host as soon as the bucket's reduce-scatter has completed: the
copy is queued when the collective is launched (from the gradient hooks during backward with
``overlap_grad_reduce``, else in ``finish_grad_sync``) behind the collective, on the copy engine's
side stream or worker thread, so neither backward nor the waits on later buckets block on it.
The host step then runs bucket by bucket, each bucket's updated shard copied back while the next
one steps. The copies go through ``device.CopyEngine`` (a side stream on CUDA, a worker thread on
the CPU); results are bitwise those of the plain offload step (AdamW's update is elementwise per
tensor; a bucket's step only touches the parameters that carry a gradient).
"""
from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import os
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
import torch.distributed as dist

from megatron_core import device as device_mod
from megatron_core.collectives import lowest_failure
from megatron_core.distributed.finalize_model_grads import changed_after_dp_sync
from megatron_core.errors import ConfigError


def offloaded_buckets(config, buffers: list) -> list[list[bool]]:
    """Per buffer, per bucket: whether its optimizer shard lives on the host.

    Buckets are taken in layout order until ``optimizer_offload_fraction`` of this rank's shard
    elements is reached (a bucket is taken when that brings the share nearer the fraction).
    """
    if not config.optimizer_cpu_offload:
        return [[False] * len(b.buckets) for b in buffers]
    total = sum(b.shard_numel for b in buffers)
    target, taken, out = config.optimizer_offload_fraction * total, 0, []
    for buffer in buffers:
        flags = []
        for bucket in buffer.buckets:
            take = abs(taken + bucket.shard_size - target) < abs(taken - target) or (
                config.optimizer_offload_fraction == 1.0)
            taken += bucket.shard_size if take else 0
            flags.append(take)
        out.append(flags)
    return out


Unit = tuple[Any, Any, list[torch.nn.Parameter]]  # (sharded buffer, bucket, the bucket's main parameters)


def step_by_bucket(inner: torch.optim.Optimizer, units: list[Unit], after_rest: Callable[[], None],
                   before: Callable[[int], None], after: Callable[[int], None]) -> None:
    """One optimizer step split into: the parameters of no unit, then each unit in turn.

    ``after_rest()`` runs after the parameters outside the units stepped (copy the device buckets
    into the model), ``before(i)`` before unit i steps (NVMe: its read), ``after(i)`` after (the
    copy into the model shard). Only params with a gradient are updated by a torch optimizer step,
    so hiding the other units' gradients makes each call update exactly one unit, with the same
    elementwise arithmetic as one whole step (torch's fused and foreach AdamW alike).
    """
    in_units = {id(p) for _, _, params in units for p in params}
    grads = {}
    for group in inner.param_groups:
        for p in group["params"]:
            if id(p) in in_units and p.grad is not None:
                grads[id(p)] = p.grad
                p.grad = None
    inner.step()  # the parameters outside the units (buckets kept on the device)
    for group in inner.param_groups:
        for p in group["params"]:
            p.grad = None  # updated once: the units' steps below must not update them again
    after_rest()
    for i, (_, _, params) in enumerate(units):
        before(i)
        for p in params:
            p.grad = grads.get(id(p))
        inner.step()
        for p in params:
            p.grad = None
        after(i)


class OverlappedOffload:
    """``--overlap-cpu-optimizer-d2h-h2d``: gradient copies to the host during the gradient sync, a
    bucket-by-bucket host step with the copies of updated shards back to the model overlapped.

    Buckets holding a parameter whose gradient ``finalize_model_grads`` changes after the DP sync
    (sequence-parallel grads under TP, the tied embedding across stages, per-token loss) are copied
    at the step instead, as without the flag.
    """

    def __init__(self, sharded: list, parallel_state) -> None:
        self.engine = device_mod.CopyEngine()
        self.pending: dict[tuple[int, int], Any] = {}  # (sharded buffer index, bucket index) -> copy in flight
        for i, sb in enumerate(sharded):
            per_token = sb.buffer.config.calculate_per_token_loss
            early = {bucket.index for bucket, off in zip(sb.buffer.buckets, sb.offloaded, strict=True)
                     if off and not any(changed_after_dp_sync(p, parallel_state, per_token) for p in bucket.params)}
            if early:
                sb.buffer.on_bucket_launched = self._copier(i, sb, early)

    def _copier(self, i: int, sb, early: set[int]) -> Callable:
        def bucket_launched(bucket, work, shard: torch.Tensor) -> None:
            if bucket.index in early:  # runs once ``work`` (the bucket's reduce-scatter) has completed
                self.pending[(i, bucket.index)] = self.engine.copy(sb.host_grads[bucket.index], shard, after=work)
        return bucket_launched

    def wait_grads(self) -> set[tuple[int, int]]:
        """Wait for every gradient copy in flight; returns the (buffer, bucket) indices they covered."""
        done = set(self.pending)
        for handle in self.pending.values():
            handle.wait()
        self.pending.clear()
        return done

    def step(self, inner: torch.optim.Optimizer, units: list[Unit], after_rest: Callable[[], None],
             copy_to_model: Callable) -> None:
        """The host step bucket by bucket; each bucket's ``copy_to_model(sb, bucket)`` copy (a handle)
        runs while the next bucket steps. Every copy has finished on return."""
        copies = []
        step_by_bucket(inner, units, after_rest, lambda i: None,
                       lambda i: copies.append(copy_to_model(units[i][0], units[i][1])))
        for handle in copies:
            if handle is not None:
                handle.wait()


def _bytes_view(t: torch.Tensor) -> memoryview:
    # Through ctypes, not ``t.numpy()``: exporting to numpy marks the storage non-resizable for good,
    # and the swapper frees storages by resizing them to 0.
    assert t.device.type == "cpu" and t.is_contiguous()
    return memoryview((ctypes.c_char * (t.numel() * t.element_size())).from_address(t.data_ptr())).cast("B")


class _Group:
    """The tensors of one offloaded bucket that live in one file: main shard, exp_avg, exp_avg_sq."""

    def __init__(self, path: str, tensors: list[torch.Tensor]) -> None:
        self.path, self.tensors = path, tensors
        self.nbytes = [t.numel() * t.element_size() for t in tensors]
        self.fd = -1

    def open(self) -> None:
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        except OSError as exc:
            raise _io_error(self.path, "creating", exc) from None
        try:
            os.posix_fallocate(self.fd, 0, sum(self.nbytes))
        except OSError as exc:
            raise _io_error(self.path, "reserving space for", exc) from None

    def remove(self) -> None:
        """Close and delete the file (construction failed: leave nothing behind)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def write_and_free(self, copy_out: Any = None) -> None:
        """Write the tensors to the file and free them, once ``copy_out`` (a copy reading them) is done."""
        if copy_out is not None:
            copy_out.wait()
        offset = 0
        for t, n in zip(self.tensors, self.nbytes, strict=True):
            view = _bytes_view(t)
            done = 0
            while done < n:
                try:
                    done += os.pwritev(self.fd, [view[done:]], offset + done)
                except OSError as exc:
                    raise _io_error(self.path, "writing", exc) from None
            offset += n
        for t in self.tensors:
            t.untyped_storage().resize_(0)

    def read(self) -> None:
        for t, n in zip(self.tensors, self.nbytes, strict=True):
            t.untyped_storage().resize_(n)
        offset = 0
        for t, n in zip(self.tensors, self.nbytes, strict=True):
            view = _bytes_view(t)
            done = 0
            while done < n:
                try:
                    got = os.preadv(self.fd, [view[done:]], offset + done)
                except OSError as exc:
                    raise _io_error(self.path, "reading", exc) from None
                if got <= 0:
                    raise ConfigError(f"--nvme-offload-path: {self.path} is shorter than written (truncated?)")
                done += got
            offset += n


_HINTS = {
    errno.ENOSPC: "free space on its file system or pass another --nvme-offload-path",
    errno.EDQUOT: "free space (disk quota exceeded) or pass another --nvme-offload-path",
    errno.EFBIG: "raise the file-size limit (ulimit -f) or pass another --nvme-offload-path",
    errno.EROFS: "the file system is read-only: pass a writable --nvme-offload-path",
}


def _io_error(path: str, what: str, exc: OSError) -> ConfigError:
    hint = _HINTS.get(exc.errno or 0, "check the directory's permissions or pass another --nvme-offload-path")
    return ConfigError(f"--nvme-offload-path: {what} {path} failed: {exc.strerror}; {hint}")


def raise_agreed(error: ConfigError | None) -> None:
    """Raise ``error`` on every rank when any rank has one (a collective over all ranks).

    I/O errors are rank-local (one rank's file fills the disk); the other ranks would otherwise
    wait for it in their next collective and the run's one error line (printed by rank 0) would
    be missing. Every rank raises the message of the lowest failing rank.
    """
    if dist.is_initialized() and dist.get_world_size() > 1:
        failed = torch.tensor([0 if error is None else 1], device=device_mod.current_device())
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)
        if failed.item():
            first = lowest_failure(None if error is None else str(error))
            assert first is not None  # a rank failed: the MAX above says so
            raise ConfigError(first[1])
    if error is not None:
        raise error


def _directory_fix(directory: str) -> str:
    """What to do about a --nvme-offload-path that is not a directory."""
    if os.path.exists(directory):
        return "it is a file: pass a directory"
    existing = os.path.dirname(os.path.abspath(directory))
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"{existing} is a file: pass a directory elsewhere"
    return "create it (mkdir -p) or pass another"


def _remove_all(groups: list[_Group]) -> None:
    for group in groups:
        group.remove()


class NvmeSwapper:
    """Moves the offloaded buckets' optimizer shards between files and memory around the step."""

    def __init__(self, directory: str, groups: list[tuple[Any, Any, _Group]], buffer_count: int) -> None:
        self.directory, self.groups, self.buffer_count = directory, groups, buffer_count
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="nvme-offload")
        # The swap files hold nothing a checkpoint needs (saves read the state into the checkpoint):
        # delete them with the optimizer, or at exit, so a finished run leaves the directory as it was.
        weakref.finalize(self, _remove_all, [group for _, _, group in groups])

    @classmethod
    def for_optimizer(cls, config, sharded: list, inner: torch.optim.Optimizer, parallel_state) -> NvmeSwapper:
        """Create the Adam state as flat per-bucket tensors, write every offloaded bucket out, free it.

        Collective over all ranks: a missing, non-directory, unwritable or full directory on any
        rank is the same one-line ConfigError on every rank (nothing is left in the directory).
        """
        if config.optimizer != "adam":
            raise ConfigError("--nvme-offload-path swaps Adam's state; use --optimizer adam")
        groups: list[tuple[Any, Any, _Group]] = []
        error = None
        try:
            cls._create(config.nvme_offload_path, sharded, inner, parallel_state, groups)
        except ConfigError as exc:
            error = exc
        try:
            raise_agreed(error)
        except ConfigError:
            for _, _, group in groups:  # on the ranks that succeeded too
                group.remove()
            raise
        return cls(config.nvme_offload_path, groups, config.nvme_offload_buffer_count)

    @staticmethod
    def _create(directory: str, sharded: list, inner: torch.optim.Optimizer, parallel_state, groups: list) -> None:
        if not os.path.isdir(directory):
            raise ConfigError(f"--nvme-offload-path {directory} is not a directory; {_directory_fix(directory)}")
        if not os.access(directory, os.W_OK | os.X_OK):
            raise ConfigError(f"--nvme-offload-path {directory} is not writable; fix its permissions or pass another")
        for i, sb in enumerate(sharded):
            for bucket, off in zip(sb.buffer.buckets, sb.offloaded, strict=True):
                if not off:
                    continue
                main = sb.bucket_mains[bucket.index]
                exp_avg, exp_avg_sq = torch.zeros_like(main), torch.zeros_like(main)
                for piece, p in zip(sb.pieces, sb.mains, strict=True):
                    if piece.bucket is bucket:
                        start = (p.data_ptr() - main.data_ptr()) // main.element_size()
                        inner.state[p] = {"step": torch.tensor(0.0, dtype=torch.float32),
                                          "exp_avg": exp_avg[start:start + p.numel()].view_as(p),
                                          "exp_avg_sq": exp_avg_sq[start:start + p.numel()].view_as(p)}
                name = f"optim_rank{parallel_state.rank:05d}_buf{i}_bucket{bucket.index}.swp"
                group = _Group(os.path.join(directory, name), [main, exp_avg, exp_avg_sq])
                groups.append((sb, bucket, group))
        for _, _, group in groups:
            group.open()
            group.write_and_free()

    def step(self, inner: torch.optim.Optimizer, after_rest: Callable[[], None], after_bucket: Callable) -> None:
        """Update every offloaded bucket in turn (read ahead, step, copy to model, write back).

        ``after_bucket(sb, bucket)`` copies the updated bucket into the model shard; it may return a
        copy handle (``--overlap-cpu-optimizer-d2h-h2d``), waited on before the bucket is written
        back and freed.
        """
        units = [(sb, bucket, [p for piece, p in zip(sb.pieces, sb.mains, strict=True) if piece.bucket is bucket])
                 for sb, bucket, _ in self.groups]
        reads: dict[int, Future] = {}
        writes: collections.deque[Future] = collections.deque()
        ahead = max(self.buffer_count - 1, 0)
        for g in range(min(ahead, len(self.groups))):
            reads[g] = self.pool.submit(self.groups[g][2].read)

        def before(g: int) -> None:
            if g + ahead < len(self.groups) and ahead:
                reads[g + ahead] = self.pool.submit(self.groups[g + ahead][2].read)
            reads.pop(g).result() if g in reads else self.groups[g][2].read()

        def after(g: int) -> None:
            sb, bucket, swap = self.groups[g]
            writes.append(self.pool.submit(swap.write_and_free, after_bucket(sb, bucket)))
            while len(writes) > 1:
                writes.popleft().result()

        error = None
        try:
            try:
                step_by_bucket(inner, units, after_rest, before, after)
            finally:
                for f in [*reads.values(), *writes]:
                    f.result()
        except ConfigError as exc:  # a failing read or write (full disk): every rank stops with it
            error = exc
        raise_agreed(error)

    def swapped_in(self) -> _SwappedIn:
        """Context: every offloaded bucket in memory (checkpoints), written back and freed on exit."""
        return _SwappedIn(self)


class _SwappedIn:
    def __init__(self, swapper: NvmeSwapper) -> None:
        self.swapper = swapper

    # No communication here: checkpoint saves call this inside ``training.agreement.agreed``, which
    # makes a failing read or write (a ConfigError naming the file) every rank's error.
    def __enter__(self) -> None:
        for _, _, group in self.swapper.groups:
            group.read()

    def __exit__(self, *exc) -> None:
        for _, _, group in self.swapper.groups:
            group.write_and_free()
