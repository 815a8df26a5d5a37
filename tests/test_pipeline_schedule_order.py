"""The schedules' order of compute and exchanges, replayed on every rank without processes.

The real schedule code runs against a recording stand-in for the model and the communicator; a
replay then plays the ranks' recorded programs against each other with rendezvous semantics (an
exchange completes only once every matching send and receive has been posted, as with gloo). This
checks, for many layouts and far faster than forked ranks could: no deadlock, every message
received by the call that expects it, every microbatch forwarded and backwarded once per chunk in
order, and an idle time that matches the published bubble, (p - 1) / (v m) of the compute.
"""
from collections import defaultdict
from fractions import Fraction

import pytest

from megatron_core.autotune.activations import in_flight
from megatron_core.autotune.layout import Layout
from megatron_core.pipeline_parallel import InterleavedSchedule, P2PCommunicator, one_forward_one_backward

FORWARD, BACKWARD = Fraction(1), Fraction(2)  # time units; backward costs twice the forward


class _Stage:
    def __init__(self, p: int, rank: int) -> None:
        self.pp_size, self.pp_rank = p, rank

    def is_pipeline_first_stage(self) -> bool:
        return self.pp_rank == 0

    def is_pipeline_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1


class _Record:
    """What all ranks did: programs, sent payloads per stream, and what each receiver expected."""

    def __init__(self):
        self.sent = defaultdict(list)      # (src, dst, kind) -> payloads in send order
        self.received = defaultdict(int)   # (src, dst, kind) -> receives posted so far
        self.expectations = []             # (placeholder, payload the consumer expected)


class _RecordingRunner:
    """MicrobatchRunner's interface; records compute steps instead of running a model.

    Payloads name their consumer: ("activation" | "gradient", chunk that uses it, microbatch).
    """

    def __init__(self, p, rank, v, m, forward_only, program, record):
        self.parallel_state, self.model, self.num_microbatches = _Stage(p, rank), [None] * v, m
        self.forward_only, self.program, self.record = forward_only, program, record
        self.done = defaultdict(int)  # ("F" | "B", chunk) -> microbatches done
        self.in_flight = self.peak_in_flight = 0  # chunk activations held for a later backward

    def is_first(self, c):
        return self.parallel_state.pp_rank == 0 and c == 0

    def is_last(self, c):
        return self.parallel_state.pp_rank == self.parallel_state.pp_size - 1 and c == len(self.model) - 1

    def _expect(self, received, payload):
        assert (received is None) == (payload is None), f"expected {payload}, got {received}"
        if received is not None:
            self.record.expectations.append((received, payload))

    def forward(self, c, data_iterator, input_tensor):
        mb = self.done["F", c]
        self._expect(input_tensor, None if self.is_first(c) else ("activation", c, mb))
        self.program.append(("compute", FORWARD / len(self.model)))
        self.done["F", c] += 1
        self.in_flight += not self.forward_only
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        # The next piece's input.
        return ("activation", c + (self.parallel_state.pp_rank == self.parallel_state.pp_size - 1), mb)

    def backward(self, input_tensor, output, output_grad):
        _, consumer, mb = output
        c = consumer - (self.parallel_state.pp_rank == self.parallel_state.pp_size - 1)
        assert mb == self.done["B", c], f"chunk {c}: backward of microbatch {mb} out of order"
        self._expect(output_grad, None if self.is_last(c) else ("gradient", c, mb))
        self.program.append(("compute", BACKWARD / len(self.model)))
        self.done["B", c] += 1
        self.in_flight -= 1
        return ("gradient", c - (self.parallel_state.pp_rank == 0), mb)

    def enable_grad_sync(self):
        pass

    def disable_grad_sync(self):
        pass


class _RecordingComm(P2PCommunicator):
    """Records each exchange; a receive returns a placeholder (stream, index) resolved afterwards."""

    def __init__(self, p, rank, program, record):
        self.parallel_state, self.program, self.record = _Stage(p, rank), program, record

    def communicate(self, *, send_next=None, send_prev=None, recv_prev=False, recv_next=False):
        rank, p = self.parallel_state.pp_rank, self.parallel_state.pp_size
        nxt, prv = (rank + 1) % p, (rank - 1) % p
        ops, received = [], []
        for payload, key in ((send_next, (rank, nxt, "activation")), (send_prev, (rank, prv, "gradient"))):
            if payload is not None:
                ops.append(("send", key, len(self.record.sent[key])))
                self.record.sent[key].append(payload)
        for wanted, key in ((recv_prev, (prv, rank, "activation")), (recv_next, (nxt, rank, "gradient"))):
            index = self.record.received[key]
            if wanted:
                ops.append(("recv", key, index))
                self.record.received[key] += 1
            received.append((key, index) if wanted else None)
        self.program.append(("exchange", ops))
        return tuple(received)


def _programs(p, v, m, forward_only):
    """Each rank's program; checks that every receive got the payload its consumer expected and
    that no rank keeps more activations alive than the schedule's warm-up allows."""
    record, programs = _Record(), []
    for rank in range(p):
        program = []
        runner = _RecordingRunner(p, rank, v, m, forward_only, program, record)
        comm = _RecordingComm(p, rank, program, record)
        if v == 1:
            one_forward_one_backward(runner, comm, None)
        else:
            InterleavedSchedule(runner, comm, [None] * v).run()
        expected_done = {("F", c): m for c in range(v)}
        if not forward_only:
            expected_done.update({("B", c): m for c in range(v)})
        assert dict(runner.done) == expected_done, f"rank {rank} ran {dict(runner.done)}"
        # Chunk activations held at once: the warm-up forwards plus the one in flight, as the autotuner
        # predicts them (its activation memory is this count times a chunk's saved tensors).
        bound = in_flight(Layout(pp=p, vpp=v if v > 1 else None), m, rank)
        assert runner.peak_in_flight == (0 if forward_only else bound)
        programs.append(program)
    received = {k: n for k, n in record.received.items() if n}
    assert received == {k: len(v) for k, v in record.sent.items()}, "sends and receives differ"
    for (key, index), payload in record.expectations:
        assert record.sent[key][index] == payload, f"{key} message {index}: {record.sent[key][index]} != {payload}"
    return programs


def _replay(p, programs):
    """Finish time of each rank when an exchange completes once all its partners have posted."""
    clock, position, posted_at = [Fraction(0)] * p, [0] * p, [None] * p
    post_times = defaultdict(dict)  # (src, dst, kind) -> {("send" | "recv", index): time posted}
    while not all(position[r] == len(programs[r]) for r in range(p)):
        progressed = False
        for rank in range(p):
            while position[rank] < len(programs[rank]):
                kind, what = programs[rank][position[rank]]
                if kind == "compute":
                    clock[rank] += what
                else:
                    if posted_at[rank] is None:
                        posted_at[rank] = clock[rank]
                        for op, key, index in what:
                            post_times[key][op, index] = clock[rank]
                    partners = [post_times[key].get(("recv" if op == "send" else "send", index))
                                for op, key, index in what]
                    if any(t is None for t in partners):
                        break
                    clock[rank], posted_at[rank] = max([posted_at[rank], *partners]), None
                position[rank] += 1
                progressed = True
        if not progressed:
            raise AssertionError(f"deadlock: ranks stuck at program positions {position}")
    return clock


LAYOUTS = [(p, v, m) for p in (2, 3, 4, 8) for v in (1, 2, 3) for m in (p, 2 * p, 3 * p)] + \
          [(p, 1, m) for p in (2, 4) for m in (1, 3, 5)]


@pytest.mark.parametrize("p,v,m", LAYOUTS)
def test_schedule_is_consistent_and_has_the_published_bubble(p, v, m):
    programs = _programs(p, v, m, forward_only=False)
    step = max(_replay(p, programs))
    compute = m * (FORWARD + BACKWARD)
    if m >= p:
        assert (step - compute) / compute == Fraction(p - 1, v * m)
    else:  # fewer microbatches than stages: the pipeline never fills
        assert step == (m + p - 1) * (FORWARD + BACKWARD)


@pytest.mark.parametrize("p,v,m", [(2, 1, 4), (4, 1, 3), (2, 2, 4), (4, 2, 8), (3, 3, 6)])
def test_forward_only_schedule_is_consistent(p, v, m):
    programs = _programs(p, v, m, forward_only=True)
    assert max(_replay(p, programs)) == (m * v + p - 1) * FORWARD / v
