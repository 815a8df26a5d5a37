"""``pretrain``: build everything from a :class:`RunConfig`, load, train, evaluate, save; Megatron-LM's outline.

The model-specific parts come from the caller (``pretrain_gpt.py``): a model provider building the
chunks of this rank and a ``forward_step_func`` for the schedules. Everything returns to the
caller as a :class:`TrainResult`; nothing here calls ``sys.exit``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megatron_core import device
from megatron_core.collectives import any_rank
from megatron_core.errors import ConfigError
from megatron_core.microbatches import MicrobatchCalculator
from megatron_core.parallel_state import ParallelState, initialize_model_parallel
from megatron_core.pipeline_parallel.stage_errors import PipelineStageError, is_peer_loss
from megatron_core.training import checkpoint_io, checkpointing, data_loading, dist_checkpoint, health
from megatron_core.training.agreement import agreed
from megatron_core.training.config import (
    CheckpointConfig,
    DataConfig,
    ModelConfig,
    ModelInfo,
    RunConfig,
    SchedulerConfig,
    TrainingConfig,
)
from megatron_core.training.flops import flops_per_iteration
from megatron_core.training.initialize import teardown_model_parallel
from megatron_core.training.iteration_hooks import IterationHooks
from megatron_core.training.lr_scheduler import OptimizerParamScheduler
from megatron_core.training.signal_handler import ExitSignalHandler
from megatron_core.training.timers import Timers, interval_timing
from megatron_core.training.training_log import (
    Printers,
    TrainingLog,
    make_tensorboard_writer,
    theoretical_memory_line,
    validation_lines,
    write_validation_tensorboard,
)
from megatron_core.training.training_loop import (
    StepResult,
    TrainState,
    evaluate,
    learning_rates,
    loss_scale,
    train_step,
)
from megatron_core.transformer.config import resolved

# (model config, padded vocabulary size, this rank's process groups) -> this rank's model chunks
ModelProvider = Callable[[ModelConfig, int, ParallelState], list]


@dataclass
class TrainResult:
    """What a run did; losses are filled on the last pipeline stage only."""

    iteration: int
    consumed_train_samples: int
    loaded_iteration: int
    losses: list[float] = field(default_factory=list)  # "lm loss" of every iteration trained by this call
    val_losses: dict[int, float] = field(default_factory=dict)  # iteration -> validation "lm loss"
    test_loss: float | None = None  # the test split's "lm loss" at the end (None without a test split)
    saved_iterations: list[int] = field(default_factory=list)
    exit_reason: str = "completed"
    is_logging_rank: bool = False


def set_seeds(seed: int, parallel_state: ParallelState) -> None:
    """Megatron-LM's seeding: ``seed + 100 x pipeline rank`` everywhere, per-TP-rank tracker stream."""
    stage_seed = seed + 100 * parallel_state.pp_rank
    random.seed(stage_seed)
    np.random.seed(stage_seed)
    parallel_state.manual_seed(seed)


@dataclass
class _Run:
    """Everything the loop needs, built once."""

    config: RunConfig
    parallel_state: ParallelState
    out: Printers
    model: list
    optimizer: Any
    scheduler: OptimizerParamScheduler
    forward_step_func: Callable
    model_info: ModelInfo
    calculator: MicrobatchCalculator
    tokenizer: Any = None
    train_ds: Any = None
    valid_ds: Any = None
    test_ds: Any = None
    writer: Any = None
    last_eval_iteration: int | None = None  # the same on every rank (evaluation is collective)
    pending_save: Any = None  # an asynchronous torch_dist save in flight (dist_checkpointing.SaveRequest)
    save_format: str = "torch_dist"  # what _save writes: see dist_checkpoint.save_format

    @property
    def training(self) -> TrainingConfig:
        return self.config.training

    @property
    def data(self) -> DataConfig:
        return self.config.data

    @property
    def checkpoint(self) -> CheckpointConfig:
        return self.config.checkpoint


def pretrain(config: RunConfig, model_provider: ModelProvider, forward_step_func: Callable) -> TrainResult:
    """Train as ``config`` says; the default process group must exist (``initialize_distributed``).

    Raises ConfigError (on every rank alike) for bad data, tokenizer or checkpoint input.
    """
    p = config.parallel
    parallel_state = initialize_model_parallel(
        p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.virtual_pipeline_model_parallel_size,
        timeout=timedelta(minutes=p.distributed_timeout_minutes))
    try:
        if config.training.deterministic_mode:
            torch.use_deterministic_algorithms(True)
        set_seeds(config.training.seed, parallel_state)
        run = _setup(config, parallel_state, model_provider, forward_step_func)
        return _train_and_evaluate(run)
    finally:
        teardown_model_parallel()  # a barrier first on a clean exit: no group dies while a peer uses it


def _setup(config: RunConfig, parallel_state: ParallelState, model_provider: ModelProvider,
           forward_step_func: Callable) -> _Run:
    out, ps = Printers(parallel_state), parallel_state
    out.rank0(f"> world size {ps.world_size}: tensor parallel {ps.tp_size}, pipeline parallel {ps.pp_size}"
              f"{f' x {ps.vpp_size} virtual stages' if ps.vpp_size else ''}, data parallel {ps.dp_size}")
    o = config.optimizer
    precision = "bf16" if o.bf16 else "fp16" if o.fp16 else "fp32"
    offload = " + NVMe offload" if o.nvme_offload_path else " + CPU offload" if o.optimizer_cpu_offload else ""
    offload += " (overlapped host copies)" if offload and o.overlap_cpu_optimizer_d2h_h2d else ""
    out.rank0(f"> ZeRO stage {config.ddp.zero_stage}{offload}, {precision}, micro batch "
              f"{config.training.micro_batch_size}, global batch {config.training.global_batch_size}, "
              f"clip grad {o.clip_grad}")
    if config.checkpoint.save is not None:  # found out now, not at the first save after hours of training
        agreed(checkpoint_io.check_writable, config.checkpoint.save)
    tokenizer, padded_vocab, model = agreed(_build_model, config, ps, model_provider)
    out.rank0(f"> tokenizer {config.data.tokenizer_type}: {tokenizer.vocab_size} tokens, padded to {padded_vocab}")
    if ps.dp_rank == 0:
        count = sum(p.numel() for chunk in model for p in chunk.parameters())
        print(f" > number of parameters on (tensor, pipeline) model parallel rank ({ps.tp_rank}, {ps.pp_rank}): "
              f"{count}", flush=True)
    from megatron_core.distributed import DistributedDataParallel
    from megatron_core.optimizer import get_megatron_optimizer

    where = device.current_device()  # weights are drawn on the CPU; move them to this rank's device
    # agreed: the same-model check fails in the DP groups whose ranks differ (its collectives stay in the DP
    # group); every rank hears of it, not only those, instead of the others waiting in their next collective.
    model = agreed(lambda chunks: [DistributedDataParallel(config.ddp, c.to(where), ps) for c in chunks], model)
    optimizer = get_megatron_optimizer(config.optimizer, model, ps)
    s = config.scheduler
    if config.training.skip_train:  # evaluation only: no schedule to check (the step count stays 0)
        s = dataclasses.replace(s, lr=max(s.lr, 0.0), min_lr=0.0, lr_decay_style="constant", lr_warmup_steps=0,
                                lr_decay_steps=0, weight_decay_incr_style="constant")
    scheduler = OptimizerParamScheduler(
        optimizer, s.lr_warmup_init, s.lr, s.min_lr, s.lr_warmup_steps, s.lr_decay_steps, s.lr_decay_style,
        s.start_weight_decay, s.end_weight_decay, s.wd_incr_steps, s.weight_decay_incr_style,
        s.use_checkpoint_opt_param_scheduler, s.override_opt_param_scheduler, s.wsd_decay_steps, s.lr_wsd_decay_style)
    training = config.training
    _warn_short_run(s, training, out)
    calculator = MicrobatchCalculator(training.global_batch_size, training.micro_batch_size, ps.dp_size,
                                      training.rampup_batch_size, ps.pp_size, ps.vpp_size)
    # agreed: only the logging rank opens the directory; a failure there stops every rank at once
    writer = agreed(make_tensorboard_writer, config.logging.tensorboard_dir, out.is_logging_rank, out.last,
                    config.logging.tensorboard_queue_size)
    return _Run(config, ps, out, model, optimizer, scheduler, forward_step_func,
                config.model_info(tokenizer.vocab_size, padded_vocab), calculator, tokenizer=tokenizer, writer=writer)


def _warn_short_run(s: SchedulerConfig, training: TrainingConfig, out: Printers) -> None:
    """A run that ends inside its warmup never reaches the peak rate: legal (a smoke test), but said."""
    total = training.train_samples or training.train_iters * training.global_batch_size
    if not training.skip_train and total < s.lr_warmup_steps:
        reached = s.lr_warmup_init + (s.lr - s.lr_warmup_init) * total / s.lr_warmup_steps
        out.rank0(f"warning: the run ends after {total} samples, inside the learning-rate warmup of "
                  f"{s.lr_warmup_steps:g} samples: the rate reaches {reached:.3g}, not --lr {s.lr:g}; shorten the "
                  f"warmup or train longer")


def _build_model(config: RunConfig, parallel_state: ParallelState, model_provider: ModelProvider) -> tuple:
    tokenizer, padded_vocab = data_loading.build_run_tokenizer(config.data, parallel_state.tp_size)
    return tokenizer, padded_vocab, model_provider(config.model, padded_vocab, parallel_state)


def _build_data(run: _Run) -> None:
    """Datasets on the ranks that read data; rank 0 first, so it alone writes the index cache."""
    training, ps = run.training, run.parallel_state
    # --skip-train evaluates only: no training split (a per-split run then needs no --train-data-path).
    train_samples = 0 if training.skip_train else \
        max(training.train_samples or training.train_iters * training.global_batch_size, 1)
    needs = any(data_loading.chunk_needs_data(ps, i if ps.vpp_size else None, run.data.every_chunk_reads_data)
                for i in range(len(run.model)))

    def build(turn: bool) -> tuple:
        if not turn:
            return run.train_ds, run.valid_ds, run.test_ds
        return data_loading.build_datasets(run.data, training, run.tokenizer, train_samples, run.out.rank0)

    run.train_ds, run.valid_ds, run.test_ds = agreed(build, ps.rank == 0)
    run.train_ds, run.valid_ds, run.test_ds = agreed(build, ps.rank != 0 and needs)


def _train_and_evaluate(run: _Run) -> TrainResult:
    ps, out = run.parallel_state, run.out
    # Said after every rank agreed: never "loaded" from rank 0 while another rank's shard is damaged.
    messages: list[str] = []
    checkpoint, optimizer = run.checkpoint, run.optimizer
    scheduler: OptimizerParamScheduler | None = run.scheduler
    if run.training.skip_train:  # evaluation only: the weights, never the optimizer or the schedule
        checkpoint, optimizer, scheduler = dataclasses.replace(checkpoint, no_load_optim=True), None, None
    loaded_format = "torch_dist" if dist_checkpoint.holds_dist_checkpoint(checkpoint) else "torch"
    if loaded_format == "torch_dist":  # collective: not under ``agreed``
        loaded = dist_checkpoint.load_checkpoint(checkpoint, run.model, optimizer, scheduler, ps,
                                                 run.config.model.transformer, run.model_info,
                                                 printer=messages.append)
    else:
        loaded = agreed(checkpointing.load_checkpoint, checkpoint, run.model, optimizer, scheduler, ps,
                        run.config.model.transformer, run.model_info, printer=messages.append)
    run.save_format = dist_checkpoint.save_format(checkpoint, loaded_format if loaded.loaded else None,
                                                  printer=messages.append)
    for line in messages:
        out.rank0(line)
    state = TrainState(iteration=loaded.iteration, consumed_train_samples=loaded.consumed_train_samples)
    if checkpoint.ckpt_convert_format is not None:
        return _convert(run, state, loaded_format, loaded)
    _build_data(run)
    result = TrainResult(iteration=state.iteration, consumed_train_samples=state.consumed_train_samples,
                         loaded_iteration=loaded.iteration, is_logging_rank=out.is_logging_rank)
    if run.training.eval_at_start and not run.training.skip_train:
        _evaluate_and_print(run, state, result)
    if run.training.skip_train:
        result.exit_reason = "skip-train"
    elif state.iteration < run.training.train_iters:
        out.rank0(f"> training from iteration {state.iteration} to {run.training.train_iters}")
        # train_step and saves name their own iteration; this catches the rest (logging, evaluation, exit checks)
        with _name_a_lost_peer(run, lambda: f"training, after iteration {state.iteration}"):
            _train(run, state, result)
    else:
        out.rank0(f"> nothing to train: the checkpoint is at iteration {state.iteration} and --train-iters is "
                  f"{run.training.train_iters}; raise --train-iters to train further (when the learning-rate "
                  f"decay follows --train-iters, add --override-opt-param-scheduler to decay over the new "
                  f"length, or --use-checkpoint-opt-param-scheduler to keep the saved schedule)")
        result.exit_reason = "nothing-to-train"
    if result.exit_reason in ("completed", "skip-train", "nothing-to-train") and \
            run.last_eval_iteration != state.iteration:
        _evaluate_and_print(run, state, result)
    if result.exit_reason in ("completed", "skip-train", "nothing-to-train"):
        _evaluate_and_print(run, state, result, test=True)
    if run.writer is not None:
        run.writer.close()
    result.iteration, result.consumed_train_samples = state.iteration, state.consumed_train_samples
    result.losses = state.loss_history
    return result


def _convert(run: _Run, state: TrainState, loaded_format: str, loaded: checkpointing.LoadResult) -> TrainResult:
    """Megatron-LM's ``--ckpt-convert-format``: save what was loaded to ``--ckpt-convert-save``/FORMAT, then stop.
    An optimizer or RNG state the load did not restore is left out (and ``save_flags`` say so): this run's fresh
    ones would pass for the saved run's on a resume of the converted checkpoint."""
    c = run.checkpoint
    if not loaded.loaded:
        raise ConfigError(f"--ckpt-convert-format: --load {c.load} holds no checkpoint to convert")
    assert c.ckpt_convert_save is not None and c.ckpt_convert_format is not None  # arguments.compat checks
    save = os.path.join(c.ckpt_convert_save, c.ckpt_convert_format)
    agreed(checkpoint_io.check_writable, save, "--ckpt-convert-save")
    run.config = dataclasses.replace(run.config, checkpoint=dataclasses.replace(
        c, save=save, async_save=False, no_save_optim=c.no_save_optim or not loaded.optimizer_loaded,
        no_save_rng=c.no_save_rng or not loaded.rng_loaded))
    run.save_format = c.ckpt_convert_format
    result = TrainResult(state.iteration, state.consumed_train_samples, state.iteration, exit_reason="converted",
                         is_logging_rank=run.out.is_logging_rank)
    _save(run, state, result)
    run.out.rank0(f"> converted checkpoint: {loaded_format} -> {c.ckpt_convert_format} in {save}")
    if run.writer is not None:
        run.writer.close()
    return result


def _evaluate_and_print(run: _Run, state: TrainState, result: TrainResult, test: bool = False) -> None:
    """Evaluate the validation split (or, with ``test``, the test split: once, at the end, Megatron-LM's
    ``validation loss at iteration N on test set`` line) on ``--eval-iters`` global batches; nothing when no
    rank built that split (``build_datasets``)."""
    if run.training.eval_iters == 0 or not _any_rank((run.test_ds if test else run.valid_ds) is not None):
        return
    split = "test" if test else "validation"
    if not test:
        run.last_eval_iteration = state.iteration
    losses = evaluate(run.forward_step_func, run.test_ds if test else run.valid_ds, run.model, run.parallel_state,
                      run.training, run.data)
    if _any_rank(any(not math.isfinite(v) for v in losses.values())):
        raise health.TrainingDivergedError(f"iteration {state.iteration}: the {split} loss is inf or nan; the "
                                           f"weights are damaged: resume from an earlier checkpoint (--ckpt-step N)")
    if not run.out.is_logging_rank or not losses:
        return
    loss = losses.get("lm loss", next(iter(losses.values())))
    if test:
        result.test_loss = loss
    else:
        result.val_losses[state.iteration] = loss
    for line in validation_lines(f"iteration {state.iteration}{' on test set' if test else ''}", losses):
        run.out.last(line)
    write_validation_tensorboard(run.writer, losses, state.iteration, state.consumed_train_samples, split)


def _save(run: _Run, state: TrainState, result: TrainResult) -> None:
    if run.checkpoint.save is None or state.iteration in result.saved_iterations:
        return
    _wait_for_save(run)
    with _name_a_lost_peer(run, f"saving iteration {state.iteration} to {run.checkpoint.save}"):
        if run.save_format == "torch_dist":
            request = dist_checkpoint.save_checkpoint(
                run.checkpoint, state.iteration, state.consumed_train_samples, run.model, run.optimizer,
                run.scheduler, run.parallel_state, run.config.model.transformer, run.model_info, run.data,
                printer=run.out.rank0)
            # A synchronous save has finished already: waiting for it would print its "finished" line a second time.
            run.pending_save = request if run.checkpoint.async_save else None
        else:
            checkpointing.save_checkpoint(run.checkpoint, state.iteration, state.consumed_train_samples, run.model,
                                          run.optimizer, run.scheduler, run.parallel_state,
                                          run.config.model.transformer, run.model_info, printer=run.out.rank0,
                                          tokenizer=dist_checkpoint.tokenizer_identity(run.data))
    result.saved_iterations.append(state.iteration)


def _wait_for_save(run: _Run) -> None:
    """Finish an asynchronous torch_dist save still in flight (before the next one, and at exit), and say so as
    Megatron-LM's finalisation of an asynchronous save does."""
    if run.pending_save is not None:
        request, run.pending_save = run.pending_save, None
        with _name_a_lost_peer(run, f"saving {request.final_dir}"):
            request.wait()
        run.out.rank0(f"  successfully saved checkpoint at iteration {request.iteration:7d} to {run.checkpoint.save} "
                      f"(torch_dist, asynchronous save finished)")


@contextlib.contextmanager
def _name_a_lost_peer(run: _Run, what: str | Callable[[], str]) -> Iterator[None]:
    """A peer killed (kill -9, the out-of-memory killer) during a save or a training step's collectives outside the
    pipeline schedule (loss all-reduce, optimizer): say so, as the schedules do (``PipelineStageError``), instead
    of gloo's bare "Connection reset by peer". ``what``: the activity, e.g. "saving iteration 4 to DIR" (or a
    function giving it when the error is raised)."""
    try:
        yield
    except RuntimeError as exc:
        if isinstance(exc, PipelineStageError) or run.parallel_state.world_size == 1 or not is_peer_loss(exc):
            raise
        activity = what if isinstance(what, str) else what()
        raise PipelineStageError(
            f"a peer was lost while {activity}: global rank {run.parallel_state.rank} stopped on "
            f"{type(exc).__name__}: {str(exc).splitlines()[0]}; a peer process died (killed, out of memory, or its "
            f"machine failed): check the other ranks' logs; latest_checkpointed_iteration.txt names the newest "
            f"complete checkpoint") from exc


def _flops_per_sample(config: RunConfig, padded_vocab: int) -> float:
    t = config.model.transformer
    return flops_per_iteration(1, config.data.seq_length, t.num_layers, t.hidden_size,
                               resolved(t.ffn_hidden_size, "ffn_hidden_size"), t.num_attention_heads,
                               resolved(t.kv_channels, "kv_channels"), resolved(t.num_query_groups, "num_query_groups"),
                               t.activation == "swiglu", padded_vocab)


def _any_rank(flag: bool) -> bool:
    return any_rank([flag])[0]


@dataclass
class _Loop:
    """What the training loop keeps between iterations."""

    log: TrainingLog
    iterators: list
    timers: Timers
    handler: ExitSignalHandler
    skips: health.SkipWatch
    hooks: IterationHooks
    start_time: float


def _train(run: _Run, state: TrainState, result: TrainResult) -> None:
    ps, training = run.parallel_state, run.training
    loop = _Loop(
        log=TrainingLog(run.config.logging, training.train_iters, run.out.last, run.writer,
                        _flops_per_sample(run.config, run.model_info.padded_vocab_size), run.data.seq_length,
                        ps.world_size, memory_printer=run.out.dp_first, theoretical_memory=(lambda: run.out.rank0(
                            theoretical_memory_line(run.config, run.model_info.padded_vocab_size, ps.pp_rank,
                                                    run.calculator.current_global_batch_size)))
                        if ps.rank == 0 else None),
        iterators=data_loading.data_iterators(run.train_ds, state.consumed_train_samples, training.micro_batch_size,
                                              ps, run.data.num_workers, len(run.model),
                                              run.data.every_chunk_reads_data),
        timers=Timers(), handler=ExitSignalHandler(),
        skips=health.SkipWatch(training.max_skipped_iters_at_min_loss_scale),
        hooks=IterationHooks(training, dist.get_rank(), run.config.logging.tensorboard_dir,
                             lambda line: print(line, flush=True)),
        start_time=time.monotonic())
    for chunk in run.model:
        chunk.train()
    if training.exit_signal_handler:
        loop.handler.install()
    try:
        with loop.hooks:
            while state.iteration < training.train_iters:
                reason = _iteration(run, loop, state, result)
                if reason is not None:
                    run.out.rank0(f"> exiting at iteration {state.iteration}: {reason}")
                    _save(run, state, result)
                    _wait_for_save(run)
                    result.exit_reason = reason
                    return
    finally:
        loop.handler.release()
        data_loading.shutdown_data_iterators(loop.iterators)
    _save(run, state, result)
    _wait_for_save(run)


def _iteration(run: _Run, loop: _Loop, state: TrainState, result: TrainResult) -> str | None:
    """Train, log, evaluate and save one iteration; returns why to stop after it, or None."""
    training = run.training
    run.calculator.update(state.consumed_train_samples)
    batch = run.calculator.current_global_batch_size
    loop.hooks.before_iteration(state.iteration)
    began = time.perf_counter()
    with _name_a_lost_peer(run, f"training iteration {state.iteration + 1}"):
        step = train_step(run.forward_step_func, loop.iterators, run.model, run.optimizer, run.scheduler,
                          run.parallel_state, run.calculator.num_microbatches, batch, run.data.seq_length,
                          training.micro_batch_size, loop.timers, iteration=state.iteration + 1,
                          check_for_nan=training.check_for_nan_in_loss_and_grad,
                          empty_unused_memory_level=training.empty_unused_memory_level,
                          calculate_per_token_loss=run.config.ddp.calculate_per_token_loss)
    seconds = time.perf_counter() - began
    loop.skips.update(state.iteration + 1, step.skipped, run.optimizer)
    state.iteration += 1
    state.consumed_train_samples += batch
    if "lm loss" in step.losses:
        state.loss_history.append(step.losses["lm loss"])
    _log_iteration(run, loop.log, state, step, batch, seconds, loop.timers)
    loop.hooks.after_iteration(state.iteration)
    if state.iteration % training.eval_interval == 0:
        with loop.hooks.evaluation():
            _evaluate_and_print(run, state, result)
    if run.checkpoint.save_interval and state.iteration % run.checkpoint.save_interval == 0:
        _save(run, state, result)
    return _exit_reason(run, state, loop.handler, loop.start_time)


def _log_iteration(run: _Run, log: TrainingLog, state: TrainState, step: StepResult, batch: int, seconds: float,
                   timers: Timers) -> None:
    """Hand the iteration to the log; with ``--log-params-norm`` the norm is computed (collectively, on every
    rank) at the iterations whose line or TensorBoard scalars show it."""
    logging, iteration = run.config.logging, state.iteration
    shown = iteration % logging.log_interval == 0 or (
        logging.tensorboard_dir is not None and iteration % logging.tensorboard_log_interval == 0)
    params_norm = run.optimizer.params_norm() if logging.log_params_norm and shown else None
    lr, decoupled_lr = learning_rates(run.optimizer)
    # On every rank: the gather of --timing-log-level 1/2 is a collective.
    block = interval_timing(timers, logging, run.writer, iteration, run.parallel_state.world_group)
    line = log.add(iteration=iteration, losses=step.losses, skipped=step.skipped, grad_norm=step.grad_norm,
                   num_zeros=step.num_zeros, learning_rate=lr, decoupled_learning_rate=decoupled_lr,
                   loss_scale=loss_scale(run.optimizer), batch_size=batch,
                   consumed_samples=state.consumed_train_samples, seconds=seconds, params_norm=params_norm)
    if line is not None and block:
        run.out.last(block)  # after the line, as Megatron-LM's Timers.log


def _exit_reason(run: _Run, state: TrainState, handler: ExitSignalHandler, start_time: float) -> str | None:
    """Why to stop after this iteration, agreed by every rank, or None."""
    training = run.training
    if training.exit_signal_handler and handler.signal_received_any():
        return "signal"
    if training.exit_duration_in_mins is not None:
        if _any_rank(time.monotonic() - start_time > training.exit_duration_in_mins * 60.0):
            return "exit-duration"
    if training.exit_interval and state.iteration % training.exit_interval == 0:
        return "exit-interval"
    return None
