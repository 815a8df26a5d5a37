"""The one place that talks to an accelerator: picks the device, backend and RNG calls.

Everything else asks this module, so CPU-only machines never import or call ``torch.cuda``
outside of it, and a missing CUDA costs at most one log line.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import logging
import os
import shutil

import torch

logger = logging.getLogger(__name__)


def cuda_available() -> bool:
    """True when a CUDA device can be used (and was not disabled by MCORE_FORCE_CPU=1)."""
    if os.environ.get("MCORE_FORCE_CPU", "0") == "1":
        return False
    return torch.cuda.is_available()


def triton_available() -> bool:
    """True when Triton kernels can run: CUDA is usable and ``triton`` imports (the ``gpu`` extra)."""
    if not cuda_available():
        return False
    try:
        import triton  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


@functools.cache
def cpu_compiler_available() -> bool:
    """True when ``torch.compile``'s CPU backend (inductor) will find its C++ compiler: ``$CXX`` or
    ``g++`` on the PATH, inductor's default ``config.cpp.cxx`` on Linux. Checked by name, not through
    inductor, whose config import alone takes about 2 s (it imports dynamo)."""
    return shutil.which(os.environ.get("CXX", "g++")) is not None


def default_backend() -> str:
    """``nccl`` when CUDA is usable, else ``gloo``."""
    return "nccl" if cuda_available() else "gloo"


def current_device() -> torch.device:
    """The device this rank computes on: its local CUDA device, or the CPU."""
    if cuda_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def set_local_device(local_rank: int) -> torch.device:
    """Bind this process to its local accelerator; without one, compute on the CPU with the host
    allocator tuned for training (:func:`configure_host_allocator`)."""
    if cuda_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return current_device()
    configure_host_allocator()
    return torch.device("cpu")


@functools.cache
def host_libc() -> ctypes.CDLL | None:
    """This process's C library (for ``mallopt``, ``prctl``), or None where it cannot be found or loaded."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameter numbers (malloc.h)
HOST_TRIM_THRESHOLD = 256 << 20  # bytes of free heap top kept mapped instead of returned to the OS
@functools.cache
def configure_host_allocator() -> bool:
    """Keep large CPU tensors' memory mapped between training steps (glibc only; once per process).

    glibc serves every allocation of 32 MiB or more (and smaller ones until its dynamic threshold
    has grown) with a fresh ``mmap`` and unmaps it on free, so a tensor of that size allocated every
    step (the logits: [s, b, V] fp32 is 32 MiB at the bench shape) page-faults on every first
    touch: measured on this project's bench step (GPT-2 shape, 1 thread), the fp32 cross entropy
    over [2048, 4096] logits took 67-98 ms with the default and 32 ms without ``mmap``, and the
    whole step ~10% less time, for ~4-7% more peak resident memory. So: no ``mmap`` for malloc
    (``M_MMAP_MAX=0``) and keep up to :data:`HOST_TRIM_THRESHOLD` of free heap top before trimming.
    This is what preloading jemalloc/tcmalloc does for PyTorch on CPU (Intel's tuning guide), set
    from inside the process. ``MCORE_HOST_ALLOCATOR=default`` leaves malloc alone. Returns whether
    the setting was applied; runs once per process (cached).
    """
    if os.environ.get("MCORE_HOST_ALLOCATOR", "tuned") == "default":
        return False
    libc = host_libc()
    applied = bool(libc and hasattr(libc, "gnu_get_libc_version") and libc.mallopt(_M_MMAP_MAX, 0)
                   and libc.mallopt(_M_TRIM_THRESHOLD, HOST_TRIM_THRESHOLD))
    if not applied:
        logger.info("host allocator: not glibc, malloc left as it is (large tensors may page-fault every step)")
    return applied


def usable_cores() -> int:
    """The CPU cores this process may run on: its affinity mask (``taskset``, a Slurm or cgroup cpuset), which
    the ranks it launches inherit, rather than the machine's ``os.cpu_count()``."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def multiprocessor_count() -> int:
    """Streaming multiprocessors of this rank's GPU (CPU cores without one): how many programs a
    kernel launch needs to fill the device."""
    if cuda_available():
        return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    return os.cpu_count() or 1


def get_rng_state() -> torch.Tensor:
    """RNG state of the generator that dropout on ``current_device()`` draws from."""
    if cuda_available():
        return torch.cuda.get_rng_state()
    return torch.get_rng_state()


def set_rng_state(state: torch.Tensor) -> None:
    """Restore a state taken with :func:`get_rng_state`."""
    if cuda_available():
        torch.cuda.set_rng_state(state)
    else:
        torch.set_rng_state(state)


def manual_seed(seed: int) -> None:
    """Seed the device generator (the CPU one on CPU)."""
    if cuda_available():
        torch.cuda.manual_seed(seed)
    else:
        torch.manual_seed(seed)


def synchronize() -> None:
    """Wait for queued device work; used by timers and benchmarks."""
    if cuda_available():
        torch.cuda.synchronize()


def max_memory_allocated() -> int:
    """Peak bytes allocated on the device, 0 on CPU (use RSS there)."""
    if cuda_available():
        return torch.cuda.max_memory_allocated()
    return 0


def empty_cache() -> None:
    """Release the CUDA caching allocator's unused blocks (``--empty-unused-memory-level``); nothing on CPU,
    where freed tensors go back to the host allocator at once."""
    if cuda_available():
        torch.cuda.empty_cache()


def memory_report_mib() -> dict[str, float]:
    """Megatron-LM's ``report_memory`` fields in MiB: on CUDA the caching allocator's ``allocated``, ``max
    allocated``, ``reserved`` and ``max reserved``; on the CPU the process's ``rss`` and ``max rss`` (VmRSS,
    VmHWM)."""
    mib = float(1 << 20)
    if cuda_available():
        return {"allocated": torch.cuda.memory_allocated() / mib,
                "max allocated": torch.cuda.max_memory_allocated() / mib,
                "reserved": torch.cuda.memory_reserved() / mib,
                "max reserved": torch.cuda.max_memory_reserved() / mib}
    stats = memory_stats()
    return {"rss": stats["mem-rss-bytes"] / mib, "max rss": stats["mem-max-rss-bytes"] / mib}


def memory_stats() -> dict[str, float]:
    """TensorBoard's memory scalars (``--log-memory-to-tensorboard``): on CUDA Megatron-LM's four from
    ``torch.cuda.memory_stats`` (``mem-reserved-bytes``, ``mem-allocated-bytes``,
    ``mem-max-allocated-bytes``, ``mem-allocated-count``); on the CPU the process's resident memory now
    and at its peak (``mem-rss-bytes``, ``mem-max-rss-bytes``: VmRSS and VmHWM of /proc/self/status)."""
    if cuda_available():
        stats = torch.cuda.memory_stats()
        return {"mem-reserved-bytes": stats["reserved_bytes.all.current"],
                "mem-allocated-bytes": stats["allocated_bytes.all.current"],
                "mem-max-allocated-bytes": stats["allocated_bytes.all.peak"],
                "mem-allocated-count": stats["allocation.all.current"]}
    fields = {}
    with open("/proc/self/status", encoding="ascii") as f:  # Linux; VmHWM is the peak of VmRSS, both in kB
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = float(value.split()[0]) * 1024
    return {"mem-rss-bytes": fields["VmRSS"], "mem-max-rss-bytes": fields["VmHWM"]}


def cuda_profiler_start() -> contextlib.AbstractContextManager:
    """Open an Nsight Systems capture range (``cudaProfilerStart``) with an NVTX range per autograd op
    (``--profile``, as Megatron-LM); returns the NVTX context for :func:`cuda_profiler_stop`."""
    torch.cuda.cudart().cudaProfilerStart()
    nvtx = torch.autograd.profiler.emit_nvtx(record_shapes=True)
    nvtx.__enter__()
    return nvtx


def cuda_profiler_stop(nvtx: contextlib.AbstractContextManager) -> None:
    """Close the capture range and the NVTX context :func:`cuda_profiler_start` opened."""
    torch.cuda.cudart().cudaProfilerStop()
    nvtx.__exit__(None, None, None)


def host_device() -> torch.device:
    """Where offloaded tensors live: host memory (the CPU; the same memory as the compute device on CPU)."""
    return torch.device("cpu")


def maybe_pin(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in page-locked memory when CUDA is used (asynchronous copies need it), else itself."""
    if cuda_available() and tensor.device.type == "cpu":
        return tensor.pin_memory()
    return tensor


class _CudaCopy:
    """A copy queued on the side stream; :meth:`wait` blocks the host until it has run."""

    def __init__(self, event) -> None:
        self.event = event

    def wait(self) -> None:
        self.event.synchronize()


class _ThreadCopy:
    """A copy submitted to the worker thread; :meth:`wait` joins it (and re-raises its error)."""

    def __init__(self, future) -> None:
        self.future = future

    def wait(self) -> None:
        self.future.result()


def _copy_after(dst: torch.Tensor, src: torch.Tensor, after) -> None:
    if after is not None:
        after.wait()  # gloo Work: blocks this worker thread only
    dst.copy_(src)


class CopyEngine:
    """Asynchronous tensor copies that overlap compute and communication (optimizer offload's
    ``--overlap-cpu-optimizer-d2h-h2d``).

    On CUDA: ``dst.copy_(src, non_blocking=True)`` on a side stream that first waits for the work
    queued so far on the current stream (which produced ``src``); host memory must be pinned for
    the copy to be truly asynchronous (``maybe_pin``). On the CPU: the copy runs on one worker
    thread (ATen releases the GIL during ``copy_``), so it proceeds while the main thread computes
    or waits on collectives. ``after`` (a collective's Work) orders the copy behind that collective
    without blocking the caller: the side stream waits on it (CUDA), or the worker thread does
    (gloo). Either way :meth:`copy` returns a handle whose ``wait()`` returns once ``dst`` holds
    ``src``; the caller keeps ``src`` and ``dst`` alive and unchanged until then. Copies run in
    submission order.
    """

    def __init__(self) -> None:
        self._stream = torch.cuda.Stream() if cuda_available() else None
        self._pool = None
        if self._stream is None:
            from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415 - CPU only

            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="offload-copy")

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after=None) -> _CudaCopy | _ThreadCopy:
        """Start ``dst.copy_(src)`` (once the collective ``after`` has completed); returns a handle with ``wait()``."""
        if self._stream is not None:
            self._stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self._stream):
                if after is not None:
                    after.wait()  # NCCL: makes the current (side) stream wait; the host goes on
                dst.copy_(src, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self._stream)
            for t in (dst, src):
                if t.is_cuda:
                    t.record_stream(self._stream)  # the caching allocator must not reuse it early
            return _CudaCopy(event)
        assert self._pool is not None
        return _ThreadCopy(self._pool.submit(_copy_after, dst, src, after))

    def shutdown(self) -> None:
        """Stop the worker thread (CPU); pending copies finish first."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
