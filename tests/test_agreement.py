"""training.agreement.agreed: a ValueError on any rank fails every rank (a ConfigError: on the ranks that
passed it names the lowest failing rank, a failing rank gives its own message); without a failure every rank
gets its own result; in one process without a process group it is the plain call."""
import pytest
import torch.distributed as dist
from harness import run_distributed

from megatron_core.errors import ConfigError
from megatron_core.training.agreement import agreed


def _check(fail_on):
    rank = dist.get_rank()

    def step():
        if rank in fail_on:
            raise ValueError(f"bad shard on rank {rank}")
        return rank * 10

    try:
        return "ok", agreed(step)
    except ConfigError as exc:
        return "ConfigError", str(exc)
    except ValueError as exc:
        return "ValueError", str(exc)


@pytest.mark.parametrize("fail_on,expected", [
    ((), [("ok", 0), ("ok", 10)]),
    ((1,), [("ConfigError", "(on rank 1) bad shard on rank 1"), ("ConfigError", "bad shard on rank 1")]),
    ((0, 1), [("ConfigError", "bad shard on rank 0"), ("ConfigError", "bad shard on rank 1")]),
], ids=["none", "rank1", "both"])
def test_a_failure_on_any_rank_fails_every_rank_alike(fail_on, expected):
    assert run_distributed(_check, 2, fail_on, timeout=60) == expected


def test_without_a_process_group_it_is_the_plain_call():
    assert not dist.is_initialized()
    assert agreed(lambda x: x + 1, 1) == 2
    with pytest.raises(ValueError, match="^alone$"):
        agreed(lambda: (_ for _ in ()).throw(ValueError("alone")))
