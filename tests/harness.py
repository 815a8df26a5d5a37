"""Run a function on N gloo ranks on the CPU and hand each rank's result (or exception) to pytest.

Ranks are forked (about 0.1 s each, against about 2 s to spawn a fresh interpreter) from the
pytest process, rendezvous through a file store, and report over a pipe. Every run has a
deadline: a rank that raises fails the run with its traceback, and ranks that hang are killed
and named.
"""
from __future__ import annotations

import multiprocessing as mp
import multiprocessing.connection
import os
import pickle
import queue
import shutil
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

DEFAULT_TIMEOUT = 120.0
_GRACE_AFTER_ERROR = 3.0  # let the other ranks report their own error before killing them


class RankError(RuntimeError):
    """A rank raised; carries the rank and its traceback."""


class RanksTimedOut(RuntimeError):
    """Some ranks did not finish within the deadline."""


def _worker(rank: int, world_size: int, store_path: str, fn: Callable, args: tuple, kwargs: dict,
            conn, timeout: float) -> None:
    status = 0
    try:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"] = str(rank), str(world_size), str(rank)
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)  # N ranks share 2 cores; more threads only contend
        dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank,
                                world_size=world_size, timeout=timedelta(seconds=timeout))
        try:
            result = fn(*args, **kwargs)
            # Plain pickle copies tensors by value; conn.send's would pass file descriptors that
            # die with this process before the parent reads them (ConnectionResetError under load).
            conn.send_bytes(pickle.dumps(("ok", rank, result)))
        finally:
            from megatron_core import parallel_state
            parallel_state.set_parallel_state(None)
            dist.destroy_process_group()
    except BaseException as exc:  # noqa: BLE001 - everything goes back to the parent
        status = 1
        try:
            conn.send_bytes(pickle.dumps(("error", rank, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")))
        except Exception:  # noqa: BLE001
            pass
    finally:
        conn.close()
        # Skip pytest's and torch's atexit handlers, which belong to the parent.
        os._exit(status)


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = DEFAULT_TIMEOUT,
                    **kwargs: Any) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` ranks; return the results ordered by rank.

    Raises :class:`RankError` naming the first rank that raised, or :class:`RanksTimedOut`
    naming the ranks that had not finished after ``timeout`` seconds.
    """
    if not 1 <= world_size <= 8:
        raise ValueError(f"world_size must be 1 to 8, got {world_size}")
    ctx = mp.get_context("fork")
    tmp = tempfile.mkdtemp(prefix="mcore-dist-")
    store = os.path.join(tmp, "store")
    procs, conns = [], {}
    try:
        for rank in range(world_size):
            parent_conn, child_conn = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_worker, args=(rank, world_size, store, fn, args, kwargs, child_conn, timeout),
                            daemon=True)
            p.start()
            child_conn.close()
            procs.append(p)
            conns[parent_conn] = rank
        results: dict[int, Any] = {}
        errors: list[tuple[int, str]] = []
        deadline = time.monotonic() + timeout
        first_error_at: float | None = None  # after the first failure the others get a short grace period
        pending = dict(conns)
        while pending:
            now = time.monotonic()
            limit = deadline if first_error_at is None else min(deadline, first_error_at + _GRACE_AFTER_ERROR)
            if now >= limit:
                break
            for conn in mp.connection.wait(list(pending), timeout=limit - now):
                rank = pending.pop(conn)
                try:
                    kind, _, payload = pickle.loads(conn.recv_bytes())
                except EOFError:
                    kind, payload = "error", "process exited without reporting (crashed or was killed)"
                if kind == "ok":
                    results[rank] = payload
                else:
                    if first_error_at is None:
                        first_error_at = time.monotonic()
                    errors.append((rank, payload))
        if errors:
            rank, text = _root_cause(errors)
            others = sorted(r for r, _ in errors if r != rank)
            extra = f" (ranks {others} also failed)" if others else ""
            raise RankError(f"rank {rank} of {world_size} raised{extra}:\n{text}")
        if pending:
            hung = sorted(pending.values())
            raise RanksTimedOut(f"ranks {hung} of {world_size} did not finish within {timeout:.0f} s")
        return [results[r] for r in range(world_size)]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        for p in procs:
            p.join(timeout=5)
        shutil.rmtree(tmp, ignore_errors=True)


def _root_cause(errors: list[tuple[int, str]]) -> tuple[int, str]:
    """The first error that is not merely a peer's broken connection (the symptom of another's)."""
    for rank, text in errors:
        head = text.split("\n", 1)[0]
        if "Connection closed" not in head and "Connection reset" not in head and "Gloo" not in head:
            return rank, text
    return errors[0]


class ProcessOutput:
    """``proc``'s output lines, read by a thread so that every wait has a deadline even when the
    process prints nothing (a plain ``readline`` would block past it)."""

    def __init__(self, proc) -> None:
        self.proc, self.lines, self.seen = proc, queue.Queue(), []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def _next(self, deadline: float):
        left = deadline - time.monotonic()
        if left <= 0:
            raise queue.Empty
        line = self.lines.get(timeout=left)
        if line is not None:
            self.seen.append(line)
        return line

    def until(self, needle: str, timeout: float = 60.0) -> str:
        """The output up to the line holding ``needle``; kills the process and fails after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        try:
            while (line := self._next(deadline)) is not None:
                if needle in line:
                    return "".join(self.seen)
        except queue.Empty:
            pass
        self.proc.kill()
        raise AssertionError(f"never saw {needle!r} within {timeout:.0f} s:\n{''.join(self.seen)[-3000:]}")

    def rest(self, timeout: float = 60.0) -> str:
        """All output once the process closes it; kills the process and fails after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        try:
            while self._next(deadline) is not None:
                pass
        except queue.Empty:
            self.proc.kill()
            raise AssertionError(f"output not closed within {timeout:.0f} s:\n{''.join(self.seen)[-3000:]}") from None
        self.proc.wait(timeout=timeout)
        return "".join(self.seen)
