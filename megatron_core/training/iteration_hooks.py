"""Megatron-LM's per-iteration extras around the training loop: manual garbage collection and profiling.

``--manual-gc`` turns Python's automatic collector off for the run and collects every
``--manual-gc-interval`` iterations instead, on every rank at the same iteration: an automatic
collection pauses one rank at a moment of its own, and in a job of many ranks each such pause holds
up the next collective of all of them (Megatron-LM's reason for the flag). With ``--manual-gc-eval``
(the default) a full collection runs before each evaluation and a young-generation one after it.

``--profile`` records iterations ``--profile-step-start`` to ``--profile-step-end`` on
``--profile-ranks``: with ``--use-pytorch-profiler`` a ``torch.profiler`` trace per rank in
``--tensorboard-dir`` (TensorBoard's profiler plugin, or Perfetto / chrome://tracing, reads it),
otherwise an NVIDIA Nsight Systems capture range (``nsys profile --capture-range=cudaProfilerApi``),
which needs CUDA. The schedule is Megatron-LM's: the profiler steps once at the start of every
iteration of this process (``wait`` = start - 1, one warm-up, ``active`` = end - start) and stops
after the iteration numbered ``--profile-step-end``.
"""
from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Iterator
from typing import Any

from megatron_core import device
from megatron_core.training.config import TrainingConfig


class IterationHooks:
    """Called by the training loop before and after each iteration and around each evaluation.

    ``rank`` is the global rank (``--profile-ranks`` names global ranks); ``trace_dir`` is
    ``--tensorboard-dir``; ``printer`` takes one line (the rank-0 printer). Use as a context manager:
    the collector's and profiler's states are restored on exit, also after an error.
    """

    def __init__(self, training: TrainingConfig, rank: int, trace_dir: str | None,
                 printer: Callable[[str], None]) -> None:
        self.training, self.trace_dir, self.printer = training, trace_dir, printer
        self.profiling = training.profile and rank in training.profile_ranks
        self._profiler: Any = None
        self._nvtx: contextlib.AbstractContextManager | None = None
        self._gc_was_enabled = gc.isenabled()

    def __enter__(self) -> IterationHooks:
        if self.training.manual_gc:
            gc.disable()
            gc.collect()
        if self.profiling and self.training.use_pytorch_profiler:
            self._profiler = _torch_profiler(self.training, self.trace_dir)
            self._profiler.start()
        elif self.profiling and not device.cuda_available():
            self.printer("> --profile without --use-pytorch-profiler marks an Nsight Systems capture range, which "
                         "needs CUDA: nothing is recorded here; add --use-pytorch-profiler to trace on the CPU")
            self.profiling = False
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop_profiling()
        if self.training.manual_gc and self._gc_was_enabled:
            gc.enable()

    def before_iteration(self, iteration: int) -> None:
        """``iteration``: the number of iterations done so far (0 before a fresh run's first)."""
        if not self.profiling:
            return
        if self._profiler is not None:
            self._profiler.step()
        elif iteration == self.training.profile_step_start:
            self._nvtx = device.cuda_profiler_start()

    def after_iteration(self, iteration: int) -> None:
        """``iteration``: the number of the iteration just done."""
        t = self.training
        if t.manual_gc and t.manual_gc_interval != 0 and iteration % t.manual_gc_interval == 0:
            gc.collect()
        if self.profiling and iteration == t.profile_step_end:
            self._stop_profiling()
            self.profiling = False

    @contextlib.contextmanager
    def evaluation(self) -> Iterator[None]:
        """Around an evaluation: with ``--manual-gc`` (and ``--manual-gc-eval``) a full collection before,
        and one of the objects the evaluation made (generation 0) after."""
        collect = self.training.manual_gc and self.training.manual_gc_eval
        if collect:
            gc.collect()
        yield
        if collect:
            gc.collect(generation=0)

    def _stop_profiling(self) -> None:
        if self._profiler is not None:
            profiler, self._profiler = self._profiler, None
            profiler.stop()
        if self._nvtx is not None:
            nvtx, self._nvtx = self._nvtx, None
            device.cuda_profiler_stop(nvtx)


def _torch_profiler(training: TrainingConfig, trace_dir: str | None) -> Any:
    """Megatron-LM's ``torch.profiler.profile`` for ``--use-pytorch-profiler`` (shapes and stacks recorded)."""
    from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.cuda_available() else [])
    start, end = training.profile_step_start, training.profile_step_end
    return profile(activities=activities,
                   schedule=schedule(wait=max(start - 1, 0), warmup=1 if start > 0 else 0, active=end - start,
                                     repeat=1),
                   on_trace_ready=tensorboard_trace_handler(str(trace_dir)), record_shapes=True, with_stack=True)
