"""Interleaved 1F1B: each rank holds ``v`` model chunks (virtual stages); the bubble shrinks by ``v``.

Chunk ``c`` of rank ``r`` is model piece ``c * p + r`` (see ``layer_split``), so activations go
round the ring of ranks ``v`` times. Microbatches run in groups of ``p``: a rank's ``k``-th forward
step is chunk ``(k mod p*v) // p`` on microbatch ``(k // (p*v)) * p + k mod p``, and backward steps
visit the chunks in reverse. This ordering is the same on every rank, so a rank's ``i``-th received
activation (or gradient) belongs to its ``i``-th forward (backward) step that takes one: received
tensors are routed by that count. Which exchanges are paired in one batched call follows
Megatron-LM's schedule, so that no rank waits on a neighbour that is itself waiting.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

import torch

from megatron_core.microbatches import check_interleaved_microbatches
from megatron_core.parallel_state import ParallelState, get_parallel_state
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


def forward_backward_pipelining_with_interleaving(
        *, forward_step_func: ForwardStepFunc, data_iterator: Any, model: Any, num_microbatches: int,
        seq_length: int, micro_batch_size: int, forward_only: bool = False,
        no_sync_func: Callable | None = None, finalize_model_grads_func: Callable | None = None,
        grad_scale_func: Callable | None = None, calculate_per_token_loss: bool = False,
        hidden_size: int | None = None, sequence_parallel: bool | None = None,
        pipeline_dtype: torch.dtype | None = None, parallel_state: ParallelState | None = None) -> list:
    """Interleaved 1F1B over ``model`` (a list of chunks) and ``data_iterator`` (one per chunk)."""
    ps = get_parallel_state(parallel_state)
    model = as_list(model)
    if ps.vpp_size is not None and len(model) != ps.vpp_size:
        raise ValueError(f"the interleaved schedule got {len(model)} model chunks but the parallel state has "
                         f"{ps.vpp_size} virtual pipeline stages; build one chunk per virtual stage")
    if not isinstance(data_iterator, (list, tuple)) or len(data_iterator) != len(model):
        raise ValueError(f"the interleaved schedule needs data_iterator to be a list with one iterator per model "
                         f"chunk ({len(model)}); got {type(data_iterator).__name__}")
    check_interleaved_microbatches(num_microbatches, ps.pp_size, len(model))
    runner = MicrobatchRunner(parallel_state=ps, forward_step_func=forward_step_func, model=model,
                              num_microbatches=num_microbatches, forward_only=forward_only,
                              no_sync_func=no_sync_func, finalize_model_grads_func=finalize_model_grads_func,
                              grad_scale_func=grad_scale_func, calculate_per_token_loss=calculate_per_token_loss)
    comm = communicator_for(ps, model, seq_length, micro_batch_size, hidden_size, sequence_parallel, pipeline_dtype)
    with report_stage_failures(ps):
        with grad_mode(forward_only):
            InterleavedSchedule(runner, comm, list(data_iterator)).run()
        return runner.finish()


class InterleavedSchedule:
    """The interleaved 1F1B order of one rank, for one call: step bookkeeping, queues of received
    tensors and saved activations.

    ``run()`` drives ``runner`` (the :class:`MicrobatchRunner` interface) and ``comm`` (a
    :class:`P2PCommunicator`) over ``data_iterators`` (one per chunk); any objects with those
    methods can replay the schedule, e.g. to check its order and bubble without running a model.
    """

    def __init__(self, runner: MicrobatchRunner, comm: P2PCommunicator, data_iterators: list) -> None:
        self.runner, self.comm, self.data_iterators = runner, comm, data_iterators
        ps = runner.parallel_state
        self.p, self.rank, self.v, self.m = ps.pp_size, ps.pp_rank, len(runner.model), runner.num_microbatches
        self.total = self.m * self.v
        # received activations, not yet used
        self.inputs: list[deque[torch.Tensor]] = [deque() for _ in range(self.v)]
        # received gradients, not yet used
        self.output_grads: list[deque[torch.Tensor]] = [deque() for _ in range(self.v)]
        # (input, output) awaiting backward
        self.saved: list[deque[tuple[torch.Tensor | None, torch.Tensor]]] = [deque() for _ in range(self.v)]
        # Next forward / backward step whose received tensor has not arrived yet (see module doc).
        self.next_input_step = self._next_step(0, forward=True)
        self.next_grad_step = self._next_step(0, forward=False)

    # ---- step bookkeeping ---------------------------------------------------------------------
    def chunk(self, step: int, forward: bool) -> int:
        """The model chunk of forward (or backward) step ``step`` of this rank (see the module doc)."""
        c = (step % (self.p * self.v)) // self.p
        return c if forward else self.v - 1 - c

    def microbatch(self, step: int) -> int:
        """The microbatch of step ``step`` (the same for forward and backward steps)."""
        return (step // (self.p * self.v)) * self.p + step % self.p

    def _next_step(self, step: int, forward: bool) -> int:
        """First step >= ``step`` that receives a tensor (first chunk of rank 0 / last of rank p-1 do not)."""
        edge = self.runner.is_first if forward else self.runner.is_last
        while step < self.total and edge(self.chunk(step, forward)):
            step += 1
        return step

    def _store_received(self, from_prev: torch.Tensor | None, from_next: torch.Tensor | None) -> None:
        if from_prev is not None:
            self.inputs[self.chunk(self.next_input_step, True)].append(from_prev)
            self.next_input_step = self._next_step(self.next_input_step + 1, forward=True)
        if from_next is not None:
            self.output_grads[self.chunk(self.next_grad_step, False)].append(from_next)
            self.next_grad_step = self._next_step(self.next_grad_step + 1, forward=False)

    def all_warmup(self) -> bool:
        """Every forward before any backward: evaluation, or as many microbatches as ranks."""
        return self.runner.forward_only or self.m == self.p

    def warmup_steps(self) -> int:
        """Forward steps before the first backward: ``2 (p - rank - 1) + (v - 1) p`` (Megatron-LM)."""
        if self.all_warmup():
            return self.total
        return min(self.total, 2 * (self.p - self.rank - 1) + (self.v - 1) * self.p)

    # ---- compute ------------------------------------------------------------------------------
    def forward(self, step: int) -> torch.Tensor | None:
        """Run forward step ``step``; returns the activation to send on (None on the last stage)."""
        c = self.chunk(step, forward=True)
        input_tensor = None if self.runner.is_first(c) else self.inputs[c].popleft()
        output = self.runner.forward(c, self.data_iterators[c], input_tensor)
        if not self.runner.forward_only:
            self.saved[c].append((input_tensor, output))
        return None if self.runner.is_last(c) else output

    def backward(self, step: int) -> torch.Tensor | None:
        """Run backward step ``step``; returns the gradient to send back (None on the first stage)."""
        c = self.chunk(step, forward=False)
        output_grad = None if self.runner.is_last(c) else self.output_grads[c].popleft()
        if self.microbatch(step) == self.m - 1:
            self.runner.enable_grad_sync()  # this chunk's last microbatch: let DP sync its grads
        input_tensor, output = self.saved[c].popleft()
        input_grad = self.runner.backward(input_tensor, output, output_grad)
        self.runner.disable_grad_sync()
        return None if self.runner.is_first(c) else input_grad

    def exchange(self, send_next=None, send_prev=None, recv_prev=False, recv_next=False) -> None:
        """One batched exchange with the neighbours; received tensors are queued for their steps."""
        self._store_received(*self.comm.communicate(send_next=send_next, send_prev=send_prev,
                                                    recv_prev=recv_prev, recv_next=recv_next))
        deallocate_output_tensor(send_next)

    # ---- the schedule -------------------------------------------------------------------------
    def run(self) -> None:
        """Warm-up forwards, steady 1F1B, cool-down backwards over all ``m * v`` steps of this rank."""
        p, rank, v, total = self.p, self.rank, self.v, self.total
        first_rank, last_rank = rank == 0, rank == p - 1
        warmup = self.warmup_steps()
        steady = total - warmup
        self.runner.disable_grad_sync()
        self.exchange(recv_prev=not first_rank)
        for k in range(warmup):
            output = self.forward(k)
            recv_prev = not (first_rank and self.chunk(k + 1, True) == 0) and k != total - 1
            # The last warm-up exchange also fetches the gradient for the first backward.
            recv_next = k == warmup - 1 and not self.all_warmup() and not last_rank
            self.exchange(send_next=output, recv_prev=recv_prev, recv_next=recv_next)

        for k in range(steady):
            output = self.forward(warmup + k)
            input_grad = self.backward(k)
            # Rank 0 runs p - 1 forward steps ahead of rank p - 1 (and rank p - 1 that much ahead of
            # rank 0 in backward steps): nothing comes round the ring when the partner step was on
            # the last (first) chunk.
            recv_prev = not (first_rank and self.chunk(warmup + k - (p - 1), True) == v - 1) and k != steady - 1
            recv_next = not (last_rank and self.chunk(k - (p - 1), False) == 0)
            self.exchange(send_next=output, send_prev=input_grad, recv_prev=recv_prev, recv_next=recv_next)

        if self.runner.forward_only:
            return
        if self.all_warmup():
            self.exchange(recv_next=not last_rank)
        for k in range(steady, total):
            input_grad = self.backward(k)
            recv_next = not (last_rank and self.chunk(k + 1, False) == v - 1) and k != total - 1
            self.exchange(send_prev=input_grad, recv_next=recv_next)
