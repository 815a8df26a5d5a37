"""Fail fast with the root cause when one pipeline stage raises.

When a stage raises, its process exits and gloo fails every peer blocked on it with "Connection
closed by peer" (measured: well under a second), and those peers exit in turn, so a failure
spreads down and up the pipeline instead of hanging. That message names no cause, though. The
rank that raised first therefore writes its error into the job's key-value store before it
unwinds (and so before its sockets close); a peer whose schedule then fails looks there and
raises :class:`PipelineStageError` carrying the original error. A rank that dies without raising
(``kill -9``, the out-of-memory killer) publishes nothing; its peers then say that a peer was lost
instead of naming the first survivor whose socket broke.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import timedelta

import torch.distributed as dist

from megatron_core.parallel_state import ParallelState

_COUNT_KEY = "mcore/pipeline_failure/count"
_MESSAGE_KEY = "mcore/pipeline_failure/message"


class PipelineStageError(RuntimeError):
    """A peer pipeline stage failed first; the message carries its error."""


def _store():
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - no store (e.g. a custom backend): just lose the root cause
        return None


def _publish(parallel_state: ParallelState, exc: BaseException) -> None:
    store = _store()
    if store is None:
        return
    try:
        if store.add(_COUNT_KEY, 1) == 1:  # first failure wins; later ones are usually its symptoms
            summary = (str(exc).strip().splitlines() or [""])[0]  # one line: peers quote it in theirs
            store.set(_MESSAGE_KEY, f"global rank {parallel_state.rank} ({parallel_state.describe()}) "
                                    f"raised {type(exc).__name__}: {summary}")
    except Exception:  # noqa: BLE001 - reporting must never mask the real error
        pass


def _peer_failure() -> str | None:
    store = _store()
    if store is None:
        return None
    previous = store.timeout
    try:
        store.set_timeout(timedelta(seconds=5))  # already failing: never wait long on a dying store
        if store.check([_MESSAGE_KEY]):
            return store.get(_MESSAGE_KEY).decode()
    except Exception:  # noqa: BLE001
        pass
    finally:
        store.set_timeout(previous)
    return None


# What gloo and NCCL say when the process at the other end of a connection has gone away.
_PEER_LOSS_MESSAGES = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "ECONNRESET",
                       "EPIPE", "Connection refused", "NCCL communicator was aborted", "remote process exited")


def is_peer_loss(exc: BaseException) -> bool:
    """Whether ``exc`` is a communication failure caused by a vanished peer rather than an error of its own."""
    text = str(exc)
    return any(message in text for message in _PEER_LOSS_MESSAGES)


@contextlib.contextmanager
def report_stage_failures(parallel_state: ParallelState) -> Iterator[None]:
    """Run a schedule; publish this rank's error, or re-raise a peer's as :class:`PipelineStageError`."""
    try:
        yield
    except PipelineStageError:
        raise
    except Exception as exc:
        if parallel_state.world_size > 1:
            first_line = str(exc).split("\n", 1)[0]
            root = _peer_failure()
            if root is not None and not root.startswith(f"global rank {parallel_state.rank} "):
                raise PipelineStageError(f"{root}; this rank stopped on: {first_line}") from exc
            if is_peer_loss(exc):
                # A broken connection is a symptom: the peer died without raising (killed, out of memory,
                # its machine lost). Never publish it as the root cause, which would name a survivor.
                raise PipelineStageError(
                    f"a peer was lost: global rank {parallel_state.rank} ({parallel_state.describe()}) stopped on "
                    f"{type(exc).__name__}: {first_line}; no rank reported an error, so a peer process died "
                    f"(killed, out of memory, or its machine failed): check the other ranks' logs") from exc
            _publish(parallel_state, exc)
        raise
