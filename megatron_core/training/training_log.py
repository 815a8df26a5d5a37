"""The per-interval progress line in Megatron-LM's format, validation lines, and TensorBoard.

Only the logging rank (the last pipeline stage's first TP and DP rank, where the loss lives)
prints; :class:`TrainingLog` still runs everywhere so that every rank keeps the same counters.
:class:`Printers` prints on the ranks each kind of message belongs to, one write per message.
"""
from __future__ import annotations

import math
import sys
from collections.abc import Callable
from datetime import datetime
from typing import Any

from megatron_core import device
from megatron_core.parallel_state import ParallelState
from megatron_core.training.config import LoggingConfig, RunConfig
from megatron_core.training.errors import ConfigError

Printer = Callable[[str], None]


def _emit(text: str) -> None:
    # One write per message: ranks share the terminal or log file, and print's separate write of the newline
    # (an unbuffered or write-through stdout) let another rank's line land in the middle of this one.
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


class Printers:
    """``rank0`` for setup messages (global rank 0), ``last`` for progress (the loss-holding rank)."""

    def __init__(self, parallel_state: ParallelState) -> None:
        self.rank, self.is_rank0, self.is_dp_first = parallel_state.rank, parallel_state.rank == 0, \
            parallel_state.dp_rank == 0
        self.is_logging_rank = (parallel_state.is_pipeline_last_stage() and parallel_state.tp_rank == 0
                                and parallel_state.dp_rank == 0)

    def rank0(self, text: str) -> None:
        """Print ``text`` on global rank 0 only."""
        if self.is_rank0:
            _emit(text)

    def last(self, text: str) -> None:
        """Print ``text`` on the logging rank only (last pipeline stage, TP and DP rank 0)."""
        if self.is_logging_rank:
            _emit(text)

    def dp_first(self, text: str) -> None:
        """Print ``[Rank r] text`` on every DP rank 0 (each TP and PP rank's), as Megatron-LM's ``report_memory``."""
        if self.is_dp_first:
            _emit(f"[Rank {self.rank}] {text}")


def make_tensorboard_writer(directory: str | None, is_logging_rank: bool, printer: Printer,
                            queue_size: int = 1000) -> Any:
    """A ``SummaryWriter`` on the logging rank, holding up to ``queue_size`` events before it writes
    (``--tensorboard-queue-size``), or None (with one line when tensorboard is missing).

    Raises ConfigError naming ``--tensorboard-dir`` when the directory cannot be created or written
    (``SummaryWriter`` creates it and opens its event file at once)."""
    if directory is None or not is_logging_rank:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        printer(f"> tensorboard is not installed (pip install tensorboard): not writing events to {directory}")
        return None
    try:
        return SummaryWriter(log_dir=directory, max_queue=queue_size)
    except OSError as exc:
        raise ConfigError(f"--tensorboard-dir {directory} cannot be written ({exc.strerror or exc}); give a "
                          f"directory this job can create and write to") from None


def theoretical_memory_line(config: RunConfig, vocab_size: int, pp_rank: int,
                            global_batch_size: int | None = None) -> str:
    """Megatron-LM's ``report_theoretical_memory`` line, ``Theoretical memory footprints: weight and
    optimizer=X MB, activation=Y MB, total=Z MB`` (MiB, 2 decimals), from the autotuner's prediction for
    pipeline rank ``pp_rank`` of this run's layout (:func:`megatron_core.autotune.search.rank_memory`, on
    the device the run trains on) instead of Megatron-LM's closed formula. ``vocab_size``: the model's
    vocabulary (padded or not); ``global_batch_size``: the batch of the iteration the line is printed at
    (its microbatches bound those in flight; Megatron-LM passes ``get_num_microbatches()`` there, the
    ramped count under ``--rampup-batch-size``), None for the final ``--global-batch-size``."""
    from megatron_core.autotune.layout import from_run_config
    from megatron_core.autotune.memory import BucketSettings
    from megatron_core.autotune.search import rank_memory

    spec, layout = from_run_config(config, vocab_size, global_batch_size)
    memory = rank_memory(spec, layout, pp_rank, on_cpu=device.current_device().type == "cpu",
                         buckets=BucketSettings.from_ddp_config(config.ddp), optimizer=config.optimizer.optimizer,
                         sgd_momentum=config.optimizer.sgd_momentum,
                         overlap_grad_reduce=config.ddp.overlap_grad_reduce)
    mib = 1024 ** 2
    return (f"Theoretical memory footprints: weight and optimizer={memory.weight_and_optimizer / mib:.2f} MB, "
            f"activation={memory.activation / mib:.2f} MB, total={memory.total / mib:.2f} MB")


class TrainingLog:
    """Accumulates iteration results and prints one line every ``log_interval`` iterations."""

    def __init__(self, config: LoggingConfig, train_iters: int, printer: Printer | None, writer: Any,
                 flops_per_sample: float, tokens_per_sample: int, world_size: int,
                 memory_printer: Printer | None = None, theoretical_memory: Callable[[], None] | None = None) -> None:
        """``memory_printer``: after the first line, Megatron-LM's ``(after N iterations) memory (MB) | ...``
        (:func:`device.memory_report_mib`) goes to it once; pretrain prints it on every DP rank 0, as
        Megatron-LM's ``report_memory``. ``theoretical_memory``: called once just before that report, to print
        :func:`theoretical_memory_line` (pretrain: on global rank 0, as Megatron-LM's ``report_theoretical_memory``);
        computed there, not before training, so that rank 0 starts its first iteration with the others."""
        self.config, self.train_iters = config, train_iters
        self.printer, self.writer, self.memory_printer = printer, writer, memory_printer
        self.theoretical_memory = theoretical_memory
        self.flops_per_sample, self.tokens_per_sample = flops_per_sample, tokens_per_sample
        self.world_size = world_size
        self._reset()

    def _reset(self) -> None:
        self.loss_sums: dict[str, float] = {}
        self.advanced = self.skipped = self.nan = 0
        self.seconds = 0.0
        self.samples = 0

    def add(self, *, iteration: int, losses: dict[str, float], skipped: bool, grad_norm: float | None,
            num_zeros: int | None, learning_rate: float, loss_scale: float, batch_size: int,
            consumed_samples: int, seconds: float,
            decoupled_learning_rate: float | None = None, params_norm: float | None = None) -> str | None:
        """Record one iteration; returns the log line when one is due (on every rank).

        ``decoupled_learning_rate`` (``--decoupled-lr``'s group, None without one) is logged after the
        learning rate and to TensorBoard as ``decoupled-learning-rate``; ``params_norm``
        (``--log-params-norm``) after the zero count, and as ``params-norm``: Megatron-LM's ``training_log``.
        """
        self.seconds += seconds
        self.samples += batch_size
        got_nan = any(not math.isfinite(v) for v in losses.values())
        if skipped:
            self.skipped += 1
        elif got_nan:
            self.nan += 1
        else:
            self.advanced += 1
            for key, value in losses.items():
                self.loss_sums[key] = self.loss_sums.get(key, 0.0) + value
        rates = (learning_rate, decoupled_learning_rate)
        norms = {"grad-norm": grad_norm, "num-zeros": num_zeros, "params-norm": params_norm}
        self._tensorboard(iteration, losses, rates, loss_scale, norms, batch_size, consumed_samples)
        if iteration % self.config.log_interval != 0:
            return None
        line = self._line(iteration, rates, loss_scale, norms, batch_size, consumed_samples)
        if self.printer is not None:
            self.printer(line)
        if self.theoretical_memory is not None:
            self.theoretical_memory()
            self.theoretical_memory = None  # once, as the memory report
        if self.memory_printer is not None:
            fields = " | ".join(f"{name}: {mib}" for name, mib in device.memory_report_mib().items())
            self.memory_printer(f"(after {iteration} iterations) memory (MB) | {fields}")
            self.memory_printer = None  # once, after the first line (memory after the optimizer state exists)
        self._reset()
        return line

    def _line(self, iteration: int, rates: tuple[float, float | None], loss_scale: float,
              norms: dict[str, float | int | None], batch_size: int, consumed_samples: int) -> str:
        iterations = self.advanced + self.skipped + self.nan
        per_iteration = self.seconds / max(iterations, 1)
        tokens_per_s = self.samples * self.tokens_per_sample / max(self.seconds, 1e-12) / self.world_size
        tflops = self.samples * self.flops_per_sample / max(self.seconds, 1e-12) / self.world_size / 1e12
        parts = [f" [{datetime.now().strftime('%Y-%m-%d %H:%M:%S')}] iteration {iteration:8d}/{self.train_iters:8d}",
                 f" consumed samples: {consumed_samples:12d}",
                 f" elapsed time per iteration (ms): {per_iteration * 1000.0:.1f}",
                 f" throughput per rank: {tokens_per_s:.1f} tokens/s, {tflops:.4f} TFLOP/s",
                 f" learning rate: {rates[0]:.6E}"]
        if rates[1] is not None:
            parts.append(f" decoupled learning rate: {rates[1]:.6E}")
        parts.append(f" global batch size: {batch_size:5d}")
        for key, total in self.loss_sums.items():
            parts.append(f" {key}: {total / max(self.advanced, 1):.6E}")
        parts.append(f" loss scale: {loss_scale:.1f}")
        if norms["grad-norm"] is not None:
            parts.append(f" grad norm: {norms['grad-norm']:.3f}")
        if norms["num-zeros"] is not None:
            parts.append(f" num zeros: {norms['num-zeros']:.1f}")  # Megatron-LM's format: 3.0, not 3
        if norms["params-norm"] is not None:
            parts.append(f" params norm: {norms['params-norm']:.3f}")
        parts.append(f" number of skipped iterations: {self.skipped:3d}")
        parts.append(f" number of nan iterations: {self.nan:3d}")
        return " |".join(parts) + " |"

    def _tensorboard(self, iteration: int, losses: dict[str, float], rates: tuple[float, float | None],
                     loss_scale: float, norms: dict[str, float | int | None], batch_size: int,
                     consumed_samples: int) -> None:
        if self.writer is None or iteration % self.config.tensorboard_log_interval != 0:
            return
        w = self.writer
        w.add_scalar("learning-rate", rates[0], iteration)
        w.add_scalar("learning-rate vs samples", rates[0], consumed_samples)
        if rates[1] is not None:
            w.add_scalar("decoupled-learning-rate", rates[1], iteration)
        w.add_scalar("batch-size", batch_size, iteration)
        for key, value in losses.items():
            w.add_scalar(key, value, iteration)
            w.add_scalar(f"{key} vs samples", value, consumed_samples)
        w.add_scalar("loss-scale", loss_scale, iteration)
        if self.config.log_world_size_to_tensorboard:
            w.add_scalar("world-size", self.world_size, iteration)
            w.add_scalar("world-size vs samples", self.world_size, consumed_samples)
        for tag, norm in norms.items():
            if norm is not None:
                w.add_scalar(tag, norm, iteration)
                w.add_scalar(f"{tag} vs samples", norm, consumed_samples)
        if self.config.log_memory_to_tensorboard:
            for tag, used in device.memory_stats().items():
                w.add_scalar(tag, used, iteration)


def validation_lines(prefix: str, losses: dict[str, float]) -> list[str]:
    """Megatron-LM's block: a dashed rule, ``validation loss at ... | lm loss value: ... | lm loss PPL: ...``."""
    text = f" validation loss at {prefix} | "
    for key, value in losses.items():
        text += f"{key} value: {value:.6E} | {key} PPL: {perplexity(value):.6E} | "
    rule = "-" * (len(text) + 1)
    return [rule, text, rule]


def write_validation_tensorboard(writer: Any, losses: dict[str, float], iteration: int, consumed_samples: int,
                                 split: str = "validation") -> None:
    """Loss and perplexity scalars of an evaluation (no-op without a writer).

    Tags are Megatron-LM's ``lm loss validation`` (``... vs samples``, ``... ppl``); the test split's are
    ``lm loss test`` and so on (Megatron-LM writes its test loss under the validation tags, at the same step).
    """
    if writer is None:
        return
    for key, value in losses.items():
        writer.add_scalar(f"{key} {split}", value, iteration)
        writer.add_scalar(f"{key} {split} vs samples", value, consumed_samples)
        writer.add_scalar(f"{key} {split} ppl", perplexity(value), iteration)
    writer.flush()


def perplexity(loss: float) -> float:
    """``exp(loss)`` with the loss capped at 20 so that an early, large loss does not overflow the log."""
    return math.exp(min(20.0, loss))
