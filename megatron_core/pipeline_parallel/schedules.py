"""Forward-backward schedules: no pipelining, 1F1B, and (in ``interleaved.py``) interleaved 1F1B.

All share one keyword-only signature (see :func:`get_forward_backward_func`). The user supplies
``forward_step_func(data_iterator, model) -> (output, loss_func)``, where on the last stage
``loss_func(output)`` returns ``(loss, {name: value})`` or, for per-token averaging,
``(loss_sum, num_tokens, {name: value})``. Losses are averaged over microbatches (or, with
``calculate_per_token_loss=True``, summed and divided by the total token count in
``finalize_model_grads_func(model, num_tokens=...)``). The schedules return the per-microbatch
dicts on the last stage (an empty list elsewhere) and know nothing of DDP or the optimizer: they
only call the hooks ``no_sync_func``, ``finalize_model_grads_func`` and ``grad_scale_func``.
"""
from __future__ import annotations

import functools
from collections import deque
from collections.abc import Callable
from typing import Any

import torch

from megatron_core.parallel_state import ParallelState, get_parallel_state
from megatron_core.pipeline_parallel.interleaved import forward_backward_pipelining_with_interleaving
from megatron_core.pipeline_parallel.microbatch_runner import (
    ForwardStepFunc,
    MicrobatchRunner,
    as_list,
    communicator_for,
    deallocate_output_tensor,
    grad_mode,
)
from megatron_core.pipeline_parallel.p2p_communication import P2PCommunicator
from megatron_core.pipeline_parallel.stage_errors import report_stage_failures


def _single_chunk(model: Any, data_iterator: Any, schedule: str) -> tuple[list, Any]:
    model = as_list(model)
    if len(model) != 1:
        raise ValueError(f"{schedule} takes one model chunk, got {len(model)}; virtual pipeline stages need "
                         f"--num-layers-per-virtual-pipeline-stage (the interleaved schedule)")
    if isinstance(data_iterator, (list, tuple)):
        if len(data_iterator) != 1:
            raise ValueError(f"{schedule} takes one data iterator, got a list of {len(data_iterator)}")
        data_iterator = data_iterator[0]
    return model, data_iterator


def forward_backward_no_pipelining(
        *, forward_step_func: ForwardStepFunc, data_iterator: Any, model: Any, num_microbatches: int,
        seq_length: int | None = None, micro_batch_size: int | None = None, forward_only: bool = False,
        no_sync_func: Callable | None = None, finalize_model_grads_func: Callable | None = None,
        grad_scale_func: Callable | None = None, calculate_per_token_loss: bool = False,
        hidden_size: int | None = None, sequence_parallel: bool | None = None,
        pipeline_dtype: torch.dtype | None = None, parallel_state: ParallelState | None = None) -> list:
    """Gradient accumulation over microbatches on one stage; grads sync on the last microbatch only."""
    ps = get_parallel_state(parallel_state)
    model, data_iterator = _single_chunk(model, data_iterator, "forward_backward_no_pipelining")
    runner = MicrobatchRunner(parallel_state=ps, forward_step_func=forward_step_func, model=model,
                              num_microbatches=num_microbatches, forward_only=forward_only,
                              no_sync_func=no_sync_func, finalize_model_grads_func=finalize_model_grads_func,
                              grad_scale_func=grad_scale_func, calculate_per_token_loss=calculate_per_token_loss)
    with report_stage_failures(ps):
        with grad_mode(forward_only):
            runner.disable_grad_sync()
            for i in range(num_microbatches):
                if i == num_microbatches - 1:
                    runner.enable_grad_sync()
                loss = runner.forward(0, data_iterator, None)
                if not forward_only:
                    runner.backward(None, loss, None)
        return runner.finish()


def forward_backward_pipelining_without_interleaving(
        *, forward_step_func: ForwardStepFunc, data_iterator: Any, model: Any, num_microbatches: int,
        seq_length: int, micro_batch_size: int, forward_only: bool = False,
        no_sync_func: Callable | None = None, finalize_model_grads_func: Callable | None = None,
        grad_scale_func: Callable | None = None, calculate_per_token_loss: bool = False,
        hidden_size: int | None = None, sequence_parallel: bool | None = None,
        pipeline_dtype: torch.dtype | None = None, parallel_state: ParallelState | None = None) -> list:
    """1F1B: ``p - rank - 1`` warm-up forwards, then one forward / one backward, then cool-down backwards.

    At most ``p - rank`` microbatches' activations are alive on a rank (instead of all of them).
    """
    ps = get_parallel_state(parallel_state)
    model, data_iterator = _single_chunk(model, data_iterator, "forward_backward_pipelining_without_interleaving")
    runner = MicrobatchRunner(parallel_state=ps, forward_step_func=forward_step_func, model=model,
                              num_microbatches=num_microbatches, forward_only=forward_only,
                              no_sync_func=no_sync_func, finalize_model_grads_func=finalize_model_grads_func,
                              grad_scale_func=grad_scale_func, calculate_per_token_loss=calculate_per_token_loss)
    comm = communicator_for(ps, model, seq_length, micro_batch_size, hidden_size, sequence_parallel, pipeline_dtype)
    with report_stage_failures(ps):
        with grad_mode(forward_only):
            one_forward_one_backward(runner, comm, data_iterator)
        return runner.finish()


def one_forward_one_backward(runner: MicrobatchRunner, comm: P2PCommunicator, data_iterator: Any) -> None:
    """The 1F1B order of one rank: which microbatch step and which exchange come when.

    Drives ``runner`` (``forward(chunk, data_iterator, input)``, ``backward(input, output, output_grad)``,
    ``enable_grad_sync``/``disable_grad_sync``, ``is_last``) and ``comm`` (a :class:`P2PCommunicator`);
    any objects with those methods can replay the schedule, e.g. to check its order and bubble
    without running a model. Megatron-LM's ``forward_backward_pipelining_without_interleaving`` order.
    """
    ps, m, forward_only = runner.parallel_state, runner.num_microbatches, runner.forward_only
    warmup = min(ps.pp_size - ps.pp_rank - 1, m)
    steady = m - warmup
    last_stage = runner.is_last(0)
    # (input, output) of microbatches awaiting their backward
    saved: deque[tuple[torch.Tensor | None, torch.Tensor]] = deque()

    def forward(input_tensor):
        output = runner.forward(0, data_iterator, input_tensor)
        if not forward_only:
            saved.append((input_tensor, output))
        return output

    runner.disable_grad_sync()
    for _ in range(warmup):
        output = forward(comm.recv_forward())
        comm.send_forward(output)
        deallocate_output_tensor(output)  # only non-last stages warm up: output was just sent

    input_tensor = comm.recv_forward() if steady > 0 else None
    for i in range(steady):
        last_iteration = i == steady - 1
        output = forward(input_tensor)
        if forward_only:
            comm.send_forward(output)
            input_tensor = None if last_iteration else comm.recv_forward()
            continue
        output_grad = comm.send_forward_recv_backward(output)
        if not last_stage:
            deallocate_output_tensor(output)
        if last_iteration and warmup == 0:
            runner.enable_grad_sync()  # the last stage: this is the last microbatch's backward
        saved_input, saved_output = saved.popleft()
        input_grad = runner.backward(saved_input, saved_output, output_grad)
        if last_iteration:
            comm.send_backward(input_grad)
        else:
            input_tensor = comm.send_backward_recv_forward(input_grad)

    if forward_only:
        return
    for i in range(warmup):  # cool-down: the backwards of the warm-up microbatches
        if i == warmup - 1:
            runner.enable_grad_sync()
        output_grad = comm.recv_backward()
        saved_input, saved_output = saved.popleft()
        comm.send_backward(runner.backward(saved_input, saved_output, output_grad))


def get_forward_backward_func(parallel_state: ParallelState | None = None) -> Callable[..., list]:
    """The schedule for this layout, with ``parallel_state`` bound; call it with keywords only.

    No pipelining for one stage, interleaved 1F1B with virtual stages, 1F1B otherwise.
    """
    ps = get_parallel_state(parallel_state)
    schedule: Callable[..., list]
    if ps.pp_size == 1:
        schedule = forward_backward_no_pipelining
    elif ps.vpp_size is not None and ps.vpp_size > 1:
        schedule = forward_backward_pipelining_with_interleaving
    else:
        schedule = forward_backward_pipelining_without_interleaving
    return functools.partial(schedule, parallel_state=ps)
