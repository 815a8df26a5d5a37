"""How many microbatches make a global batch: ``global = micro x microbatches x data-parallel size``.

Optionally the global batch ramps up as Megatron-LM's ``--rampup-batch-size start increment
samples``: it starts at ``start`` and grows by ``increment`` in equal steps spread over the first
``samples`` consumed training samples, then stays at ``--global-batch-size``.
"""
from __future__ import annotations

from collections.abc import Sequence


def check_interleaved_microbatches(num_microbatches: int, pipeline_model_parallel_size: int,
                                   virtual_pipeline_model_parallel_size: int | None) -> None:
    """The interleaved 1F1B schedule runs microbatches in groups of one per pipeline rank."""
    p, v = pipeline_model_parallel_size, virtual_pipeline_model_parallel_size
    if v is not None and v > 1 and num_microbatches % p != 0:
        raise ValueError(
            f"the interleaved pipeline schedule ({v} virtual stages) needs the number of microbatches "
            f"({num_microbatches}) to be a multiple of --pipeline-model-parallel-size {p}; change "
            f"--global-batch-size / (--micro-batch-size x data-parallel size), or drop the virtual stages")


class MicrobatchCalculator:
    """Number of microbatches per step and the current global batch size (with optional ramp-up)."""

    def __init__(self, global_batch_size: int, micro_batch_size: int, data_parallel_size: int,
                 rampup_batch_size: Sequence[int] | None = None,
                 pipeline_model_parallel_size: int = 1,
                 virtual_pipeline_model_parallel_size: int | None = None) -> None:
        for name, value in (("--global-batch-size", global_batch_size), ("--micro-batch-size", micro_batch_size),
                            ("data-parallel size", data_parallel_size)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size
        self.data_parallel_size = data_parallel_size
        self._pp, self._vpp = pipeline_model_parallel_size, virtual_pipeline_model_parallel_size
        self._rampup = self._parse_rampup(rampup_batch_size) if rampup_batch_size is not None else None
        for batch in self._reachable_batch_sizes():
            self._check(batch)  # every batch the run will see, so a bad setting fails before step 1
        self.update(0)

    def _parse_rampup(self, rampup: Sequence[int]) -> tuple[int, int, int]:
        if len(rampup) != 3:
            raise ValueError(f"--rampup-batch-size takes three values <start> <increment> <ramp-up samples>, "
                             f"got {list(rampup)}")
        start, increment, samples = (int(x) for x in rampup)
        if start < 1 or increment < 1 or samples < 0:
            raise ValueError(f"--rampup-batch-size {start} {increment} {samples}: start and increment must be "
                             f">= 1 and ramp-up samples >= 0")
        if start > self.global_batch_size or (self.global_batch_size - start) % increment != 0:
            raise ValueError(f"--rampup-batch-size start {start} with increment {increment} does not reach "
                             f"--global-batch-size {self.global_batch_size}: (global - start) must be a "
                             f"non-negative multiple of the increment")
        return start, increment, samples

    def _reachable_batch_sizes(self) -> list[int]:
        if self._rampup is None:
            return [self.global_batch_size]
        start, increment, _ = self._rampup
        return list(range(start, self.global_batch_size + 1, increment))

    def _check(self, global_batch: int) -> None:
        per_step = self.micro_batch_size * self.data_parallel_size
        if global_batch % per_step != 0:
            what = (f"--global-batch-size {global_batch}" if global_batch == self.global_batch_size
                    else f"global batch size {global_batch} (reached during --rampup-batch-size)")
            raise ValueError(f"{what} is not divisible by --micro-batch-size {self.micro_batch_size} x "
                             f"data-parallel size {self.data_parallel_size} = {per_step}; choose a global "
                             f"batch that is a multiple of {per_step}")
        check_interleaved_microbatches(global_batch // per_step, self._pp, self._vpp)

    def batch_size_at(self, consumed_samples: int) -> int:
        """The global batch size after ``consumed_samples`` training samples."""
        if self._rampup is None:
            return self.global_batch_size
        start, increment, samples = self._rampup
        increments = (self.global_batch_size - start) // increment
        if consumed_samples >= samples or increments == 0:
            return self.global_batch_size
        samples_per_increment = samples / increments
        return start + int(consumed_samples / samples_per_increment) * increment

    def update(self, consumed_samples: int) -> None:
        """Recompute the current global batch and microbatch count (call before each step)."""
        self.current_global_batch_size = self.batch_size_at(consumed_samples)
        self.num_microbatches = self.current_global_batch_size // (self.micro_batch_size * self.data_parallel_size)
