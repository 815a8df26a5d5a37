"""The flat collectives (megatron_core.collectives) and the CPU host allocator setting.

gloo's reduce-scatter is done as an all-reduce plus a copy of this rank's chunk; these tests pin its
contract: the chunk equals the sum's slice, ``full`` is untouched unless it is declared scratch,
and an asynchronous handle delivers the chunk only once waited on. ``failures`` / ``lowest_failure``
give every rank the same list of the ranks whose step failed.
"""
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from harness import run_distributed

from megatron_core.collectives import all_gather_flat, failures, lowest_failure, reduce_scatter_flat


def _inputs(rank: int, n: int) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(100 + rank))


def _reduce_scatter(n: int) -> list[str]:
    rank, world = dist.get_rank(), dist.get_world_size()
    expected = sum(_inputs(r, n) for r in range(world))
    chunk = n // world
    mine = expected[rank * chunk:(rank + 1) * chunk]
    problems = []
    for async_op in (False, True):
        for scratch in (False, True):
            full = _inputs(rank, n)
            before = full.clone()
            out = torch.full((chunk,), float("nan"))
            handle = reduce_scatter_flat(out, full, None, async_op=async_op, full_is_scratch=scratch)
            if async_op:
                handle.wait()
                handle.wait()  # a second wait is a no-op
            if not torch.allclose(out, mine, rtol=1e-6, atol=1e-6):
                problems.append(f"async={async_op} scratch={scratch}: wrong chunk")
            if not scratch and not torch.equal(full, before):
                problems.append(f"async={async_op}: full was modified without full_is_scratch")
    shard = _inputs(rank, chunk)
    gathered = torch.empty(n)
    all_gather_flat(gathered, shard, None)
    if not torch.equal(gathered, torch.cat([_inputs(r, chunk) for r in range(world)])):
        problems.append("all_gather_flat: wrong concatenation")
    return problems


@pytest.mark.parametrize("shm", ["1", "0"])
@pytest.mark.parametrize("world", [2, 4])
def test_reduce_scatter_flat_on_gloo(world, shm, monkeypatch):
    """Through the shared-memory all-reduce (done when it returns) and through gloo's own asynchronous one
    (``MCORE_SHM_COLLECTIVES=0``), whose chunk is only there once its work is waited on."""
    monkeypatch.setenv("MCORE_SHM_COLLECTIVES", shm)
    for problems in run_distributed(_reduce_scatter, world, 24 << 10, timeout=60):
        assert problems == []


def test_flat_collectives_use_this_torch_releases_names():
    """torch 2.13 deprecates all_gather_into_tensor / reduce_scatter_tensor (a FutureWarning on every call,
    ``__deprecated__`` on the function); the *_single names are taken where they exist. The reduce-scatter
    runs on NCCL only, so its name is checked here rather than by a call."""
    from megatron_core import collectives
    for fn in (collectives._ALL_GATHER, collectives._REDUCE_SCATTER):
        assert getattr(fn, "__deprecated__", None) is None, f"{fn.__name__} is deprecated in this torch"


def _failures() -> list:
    rank, world = dist.get_rank(), dist.get_world_size()
    odd = f"rank {rank} failed" if rank % 2 else None  # every odd rank fails
    return [failures(odd), lowest_failure(odd), failures(None), lowest_failure(None),
            failures(f"only {rank}" if rank == world - 1 else None)]


@pytest.mark.parametrize("world", [1, 2, 4])
def test_failures_are_the_same_list_on_every_rank(world):
    """Every rank learns which ranks failed (lowest first) although only those ranks know it, as the
    checkpoint writers and the server agree on an error before raising; no failure gives [] and None."""
    odd = [(r, f"rank {r} failed") for r in range(1, world, 2)]
    last = [(world - 1, f"only {world - 1}")]
    expected = [odd, odd[0] if odd else None, [], None, last]
    assert run_distributed(_failures, world, timeout=60) == [expected] * world


def test_failures_without_a_process_group_are_this_ranks_own():
    assert not dist.is_initialized()
    assert failures("bad") == [(0, "bad")] and lowest_failure("bad") == (0, "bad")
    assert failures(None) == [] and lowest_failure(None) is None


def test_host_allocator_keeps_large_tensors_on_the_heap():
    """After configure_host_allocator, a 64 MiB tensor comes from the heap (brk), not a fresh mmap."""
    code = ("import logging\nimport torch\nfrom megatron_core import device\n"
            "logging.basicConfig(level=logging.INFO)\nprint(device.configure_host_allocator())\n"
            "t = torch.ones(16 << 20)\nptr = t.data_ptr()\n"
            "ranges = [l.split()[0].split('-') for l in open('/proc/self/maps') if l.rstrip().endswith('[heap]')]\n"
            "print(any(int(a, 16) <= ptr < int(b, 16) for a, b in ranges))\n")
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    tuned = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    plain = subprocess.run([sys.executable, "-c", code], env={**env, "MCORE_HOST_ALLOCATOR": "default"},
                           capture_output=True, text=True, timeout=60)
    if tuned.stdout.split()[:1] != ["True"]:
        pytest.skip(f"not glibc: {tuned.stdout.strip()} {tuned.stderr.strip()[-200:]}")
    assert tuned.stdout.split() == ["True", "True"], tuned.stderr
    assert plain.stdout.split() == ["False", "False"], plain.stderr
    assert "host allocator" not in tuned.stderr + plain.stderr  # logged only where glibc is missing


def test_multiprocessor_count_without_cuda_is_the_cpu_count():
    """Triton's backward kernels size their grid from it (triton_norms): one program per core on CPU."""
    from megatron_core import device
    if device.cuda_available():
        pytest.skip("a CUDA device: the count is its streaming multiprocessors")
    assert os.cpu_count() is not None and device.multiprocessor_count() == os.cpu_count()


def _shm_all_reduce(sizes: list[int]) -> list[str]:
    from megatron_core import shm_collectives
    rank, world = dist.get_rank(), dist.get_world_size()
    problems = []
    for n in sizes:
        for dtype in (torch.float32, torch.bfloat16):
            mine = _inputs(rank, n).to(dtype)
            ours, theirs = mine.clone(), mine.clone()
            if not shm_collectives.try_all_reduce(ours, None):
                problems.append("the shared-memory path was not taken on one machine")
                continue
            dist.all_reduce(theirs)
            exact = sum(_inputs(r, n).to(dtype).double() for r in range(world))
            # fp32: rounding only; bf16: N - 1 additions each rounding to 8 bits (|sum| < 16 here).
            rtol, atol = (1e-5, 1e-5) if dtype == torch.float32 else (0.0, (world - 1) * 2.0 ** -4)
            if not torch.allclose(ours.double(), exact, rtol=rtol, atol=atol):
                problems.append(f"n={n} {dtype}: wrong sum")
            gathered = [torch.empty_like(ours) for _ in range(world)]
            dist.all_gather(gathered, ours)
            if not all(torch.equal(g, ours) for g in gathered):
                problems.append(f"n={n} {dtype}: ranks hold different sums")
    handle = shm_collectives.all_reduce(torch.ones(8), None, async_op=True)
    if not handle.wait():
        problems.append("async handle")
    top = torch.full((3,), float(rank + 1))
    shm_collectives.all_reduce(top, None, op=dist.ReduceOp.MAX)  # not a sum: torch.distributed's own
    if not torch.equal(top, torch.full((3,), float(world))):
        problems.append(f"MAX gave {top.tolist()}")
    return problems


@pytest.mark.parametrize("world", [2, 4])
def test_shared_memory_all_reduce(world):
    """Sums (several pieces: 1.2M fp32 elements cross the 4 MiB slot) equal the exact sum, and every
    rank holds bitwise the same result, as replicated TP activations need."""
    for problems in run_distributed(_shm_all_reduce, world, [7, 1_200_000], timeout=120):
        assert problems == []


def _segment_fds() -> tuple[int, int]:
    """This process's open descriptors on shared-memory all-reduce segments, and how many of those
    segments still have a name in /dev/shm (the link of an unlinked file ends in " (deleted)")."""
    count = named = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # closed meanwhile (gloo's threads open and close sockets)
        if link.startswith("/dev/shm/mcore-allreduce-"):
            count += 1
            named += not link.endswith(" (deleted)")
    return count, named


def _shm_fallback(spread: bool) -> tuple[bool, bool, tuple[int, int]]:
    from megatron_core import shm_collectives
    if spread:  # each rank claims another machine: the group must stay on gloo
        shm_collectives._machine_id = lambda: f"host-{dist.get_rank()}"
    group = dist.new_group(list(range(dist.get_world_size())))
    x = torch.full((5,), float(dist.get_rank() + 1))
    used = shm_collectives.try_all_reduce(x, group)
    if not used:
        dist.all_reduce(x, group=group)
    return used, bool(torch.equal(x, torch.full((5,), 3.0))), _segment_fds()


def test_shared_memory_needs_one_machine_and_can_be_disabled(monkeypatch):
    # One descriptor per rank on the segment: the mapping's own (the creator closes its file), and the
    # segment already unlinked, so that nothing is left in /dev/shm after a crash.
    assert run_distributed(_shm_fallback, 2, False, timeout=60) == [(True, True, (1, 0))] * 2
    assert run_distributed(_shm_fallback, 2, True, timeout=60) == [(False, True, (0, 0))] * 2
    monkeypatch.setenv("MCORE_SHM_COLLECTIVES", "0")
    assert run_distributed(_shm_fallback, 2, False, timeout=60) == [(False, True, (0, 0))] * 2


def _mappings_after_destroy() -> list[tuple[int, int]]:
    import gc

    from megatron_core import shm_collectives
    from megatron_core.parallel_state import ParallelState

    def mapped() -> int:
        with open("/proc/self/maps") as f:
            return sum("mcore-allreduce-" in line for line in f)

    counts = []
    for _ in range(3):
        ps = ParallelState(2, 1)
        shm_collectives.all_reduce(torch.ones(4), ps.tp_group)
        alive = mapped()
        ps.destroy()
        del ps
        gc.collect()
        counts.append((alive, mapped()))
    return counts


def test_a_destroyed_group_releases_its_shared_segment():
    """Each TP group maps 2 x 2 x 4 MiB; once the ParallelState is destroyed and dropped, the mapping
    goes with it (the cache is keyed weakly by the group, and nothing else may hold the group)."""
    for counts in run_distributed(_mappings_after_destroy, 2, timeout=60):
        assert counts == [(1, 0)] * 3, counts
