"""The TP / sequence-parallel communication mappings, forward and backward, at TP 2.

Each mapping is checked against its definition (Megatron-LM's ``mappings.py``) on tensors that
differ by rank, so a wrong rank slice, a missing or extra reduction, or the wrong dimension shows.
"""
import pytest
import torch
import torch.distributed as dist
from harness import RankError, run_distributed

from megatron_core import parallel_state
from megatron_core.tensor_parallel import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
    scatter_to_tensor_model_parallel_region,
)

SHAPE = (4, 3, 6)  # [s, b, h]


def _full(seed):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def _run(name, x, grad, *extra):
    x = x.clone().requires_grad_()
    fn = {"copy": copy_to_tensor_model_parallel_region, "reduce": reduce_from_tensor_model_parallel_region,
          "scatter": scatter_to_tensor_model_parallel_region, "gather": gather_from_tensor_model_parallel_region,
          "scatter_seq": scatter_to_sequence_parallel_region, "gather_seq": gather_from_sequence_parallel_region,
          "reduce_scatter_seq": reduce_scatter_to_sequence_parallel_region}[name]
    out = fn(x, *extra)
    out.backward(grad)
    return out.detach(), x.grad


def _mappings():
    ps = parallel_state.initialize_model_parallel(dist.get_world_size())
    r, g = ps.tp_rank, ps.tp_group
    mine = {k: _full(10 * k + r) for k in range(4)}  # different on every rank
    results = {
        "copy": _run("copy", mine[0], mine[1], g),
        "reduce": _run("reduce", mine[0], mine[1], g),
        "scatter": _run("scatter", _full(5), mine[1].chunk(2, -1)[0], g),
        "gather": _run("gather", mine[0].chunk(2, -1)[0], mine[1], g),
        "scatter_seq": _run("scatter_seq", _full(5), mine[1].chunk(2, 0)[0], g),
        "gather_seq": _run("gather_seq", mine[0].chunk(2, 0)[0], mine[1], g),
        "gather_seq_split": _run("gather_seq", mine[0].chunk(2, 0)[0], mine[1], g, False),
        "reduce_scatter_seq": _run("reduce_scatter_seq", mine[0], mine[1].chunk(2, 0)[0], g),
    }
    return r, results


def _checker(rank, got):
    def check(name, out, grad):
        assert torch.equal(got[name][0], out), f"rank {rank} {name}: forward"
        assert torch.equal(got[name][1], grad), f"rank {rank} {name}: backward"
    return check


def test_mappings_forward_and_backward_follow_their_definitions():
    results = dict(run_distributed(_mappings, 2, timeout=60))
    x = {r: {k: _full(10 * k + r) for k in range(4)} for r in (0, 1)}  # what each rank held
    for r in (0, 1):
        check = _checker(r, results[r])
        check("copy", x[r][0], x[0][1] + x[1][1])
        check("reduce", x[0][0] + x[1][0], x[r][1])
        grads = {q: x[q][1].chunk(2, -1)[0] for q in (0, 1)}
        check("scatter", _full(5).chunk(2, -1)[r], torch.cat([grads[0], grads[1]], -1))
        check("gather", torch.cat([x[0][0].chunk(2, -1)[0], x[1][0].chunk(2, -1)[0]], -1), x[r][1].chunk(2, -1)[r])
        grads = {q: x[q][1].chunk(2, 0)[0] for q in (0, 1)}
        check("scatter_seq", _full(5).chunk(2, 0)[r], torch.cat([grads[0], grads[1]], 0))
        gathered = torch.cat([x[0][0].chunk(2, 0)[0], x[1][0].chunk(2, 0)[0]], 0)
        check("gather_seq", gathered, (x[0][1] + x[1][1]).chunk(2, 0)[r])  # a + b == b + a exactly
        check("gather_seq_split", gathered, x[r][1].chunk(2, 0)[r])
        check("reduce_scatter_seq", (x[0][0] + x[1][0]).chunk(2, 0)[r],
              torch.cat([x[0][1].chunk(2, 0)[0], x[1][1].chunk(2, 0)[0]], 0))


def _indivisible_sequence():
    ps = parallel_state.initialize_model_parallel(dist.get_world_size())
    scatter_to_sequence_parallel_region(torch.zeros(5, 1, 2), ps.tp_group)


def test_sequence_not_divisible_by_tp_is_rejected():
    with pytest.raises(RankError, match="sequence length 5 is not divisible by the tensor-parallel size 2"):
        run_distributed(_indivisible_sequence, 2, timeout=60)


@pytest.mark.parametrize("mapping", [copy_to_tensor_model_parallel_region, reduce_from_tensor_model_parallel_region,
                                     scatter_to_tensor_model_parallel_region, gather_from_tensor_model_parallel_region,
                                     scatter_to_sequence_parallel_region, gather_from_sequence_parallel_region,
                                     reduce_scatter_to_sequence_parallel_region])
def test_no_group_is_the_identity_forward_and_backward(mapping):
    """``group=None`` (no process group, as serial code passes) is a group of one: the tensor itself
    comes back and its gradient passes through unchanged, without torch.distributed initialized."""
    assert not dist.is_initialized()
    x = _full(1).requires_grad_()
    out = mapping(x, None)
    assert out is x
    (out * _full(2)).sum().backward()
    assert torch.equal(x.grad, _full(2))
