"""Process group start-up for ``pretrain_gpt.py``: torchrun, one plain process, or an existing group.

Inside a test harness (or any caller that already called ``init_process_group``) the existing
group is used and left alone; otherwise this module creates it and ``shutdown`` destroys it.

Shutdown is deterministic (a rank that tears down a group while a peer still uses it can make gloo
abort at exit, "terminate called without an active exception"): on a clean exit every rank waits
at a barrier of the default group, then the model-parallel groups are destroyed, then the default
group. On an error nothing waits (a failed peer may never arrive); groups are still destroyed.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from megatron_core import device, parallel_state
from megatron_core.errors import ConfigError


@dataclass
class DistributedContext:
    """Who this process is and whether it owns the default process group."""

    rank: int
    world_size: int
    local_rank: int
    owns_process_group: bool


def world_size_from_env() -> int:
    """The world size before any group exists (torchrun sets WORLD_SIZE)."""
    if dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank_from_env() -> int:
    """The global rank: the process group's when initialised, else ``$RANK`` (torchrun's), else 0."""
    if dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def set_cpu_threads() -> None:
    """Share the cores among the ranks on this machine unless the user chose (OMP_NUM_THREADS)."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(local_ranks, 1)))


_LAUNCHER_PID: int | None = None  # torchrun's agent, the parent of this worker; None when not launched by it
LAUNCHER_POLL_SECONDS = 0.5


def launcher_alive() -> bool:
    """False once the torchrun agent that started this worker has died (True outside torchrun)."""
    return _LAUNCHER_PID is None or os.getppid() == _LAUNCHER_PID


def _watch_launcher() -> None:
    while launcher_alive():
        time.sleep(LAUNCHER_POLL_SECONDS)
    # The agent is gone (kill -9, node failure): a worker left behind would keep training and writing
    # checkpoints into the directory the user is about to resume from. Stop at once, without a save.
    print(f"error: the launcher (pid {_LAUNCHER_PID}) died; worker pid {os.getpid()} stops without saving",
          file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def watch_launcher() -> None:
    """Under torchrun, stop this worker when its launcher dies (the agent reaps and restarts workers;
    nothing does once it is killed). A daemon thread polls the parent pid."""
    global _LAUNCHER_PID
    if "TORCHELASTIC_RUN_ID" not in os.environ or _LAUNCHER_PID is not None:
        return
    _LAUNCHER_PID = os.getppid()
    threading.Thread(target=_watch_launcher, name="launcher-watchdog", daemon=True).start()


# Launchers other than torchrun, by the process count each sets in every process it starts.
FOREIGN_LAUNCHERS = (("OMPI_COMM_WORLD_SIZE", "mpirun (Open MPI)"), ("PMI_SIZE", "mpirun (MPICH) or srun --mpi"),
                     ("SLURM_STEP_NUM_TASKS", "srun"))


def check_launcher() -> None:
    """Raise ConfigError when mpirun or srun started several processes without torchrun's variables.

    Each would otherwise make its own one-process group and train alone, all of them writing the
    same checkpoint directory. (``$SLURM_STEP_NUM_TASKS`` is set by ``srun`` for the processes of a
    job step, not in an ``sbatch`` script's own shell.)
    """
    if "WORLD_SIZE" in os.environ:
        return
    for variable, launcher in FOREIGN_LAUNCHERS:
        count = os.environ.get(variable, "")
        if count.isdigit() and int(count) > 1:
            raise ConfigError(f"{count} processes were started by {launcher} (${variable}={count}) without "
                              f"torchrun's RANK, WORLD_SIZE and MASTER_ADDR, so each would train alone; launch "
                              f"with torchrun on each node (scripts/pretrain_gpt_multinode.sbatch) or set them")


def initialize_distributed(backend: str, timeout_minutes: float) -> DistributedContext:
    """Join (or create) the default process group and bind this rank to its device.

    Raises ConfigError when another launcher started several processes (:func:`check_launcher`)."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_initialized():
        device.set_local_device(local_rank)
        return DistributedContext(dist.get_rank(), dist.get_world_size(), local_rank, False)
    check_launcher()
    set_cpu_threads()
    watch_launcher()
    device.set_local_device(local_rank)
    timeout = timedelta(minutes=timeout_minutes)
    if "MASTER_ADDR" in os.environ and "WORLD_SIZE" in os.environ:
        if backend == "gloo" and os.environ.get("MASTER_ADDR") in ("localhost", "127.0.0.1"):
            # One machine: keep gloo on the loopback device; its hostname may not resolve to a usable one.
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        dist.init_process_group(backend, timeout=timeout)  # torchrun's env:// rendezvous
    else:
        # A plain `python pretrain_gpt.py`: a one-rank group needs no rendezvous.
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return DistributedContext(dist.get_rank(), dist.get_world_size(), local_rank, True)


def _exiting_cleanly() -> bool:
    """No exception is propagating (called from a ``finally`` block, this tells success from failure)."""
    return sys.exc_info()[0] is None


def quiesce() -> None:
    """On a clean exit, wait until every rank has finished all its collectives (a default-group barrier)."""
    if _exiting_cleanly() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def teardown_model_parallel() -> None:
    """Quiesce (clean exit only), then destroy the model-parallel groups in the order they were made."""
    quiesce()
    parallel_state.destroy_model_parallel()


def shutdown(context: DistributedContext) -> None:
    """Quiesce (clean exit only), destroy any model-parallel groups still alive, then the default group
    if this module created it. Call it from the entry point's ``finally``."""
    if not dist.is_initialized():
        return
    teardown_model_parallel()
    if context.owns_process_group:
        dist.destroy_process_group()
