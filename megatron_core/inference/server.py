"""``tools/run_text_generation_server.py``: Megatron-LM's text generation REST API on Flask.

``PUT /api`` with JSON ``{"prompts": [str, ...], "tokens_to_generate": int}`` and optionally
``temperature``, ``top_k``, ``top_p``, ``random_seed``, ``logprobs``, ``add_BOS``, ``no_log`` (Megatron-LM's
field names) answers ``{"text": [prompt + continuation, ...], "segments": [[each token's text], ...],
"tokens": [[ids], ...], "logprobs": [[float, ...], ...] or null}`` (``logprobs``: each token's
log-probability given the ones before it, ``len(tokens) - 1`` per prompt, as Megatron-LM's;
``tokens_to_generate`` 0 scores the prompts and needs ``logprobs``; ``add_BOS`` prepends the EOD token,
Megatron-LM's BOS, and allows an empty prompt). Megatron-LM's ``stop_on_eol``, ``stop_on_double_eol``,
``prevent_newline_after_colon``, ``top_p_decay``, ``top_p_bound``, ``beam_width``, ``stop_token`` and
``length_penalty`` are accepted at their defaults only. A bad request gets HTTP 400 and a
one-line message. Rank 0 serves HTTP; each request is broadcast to every rank of the model-parallel
group (as Megatron-LM's ``send_do_generate``) so all ranks run the same generation. A lock
serialises requests: concurrent clients are answered one generation at a time, in arrival order.

An unexpected exception while a request runs (a bug, a fault in the model) fails that request, not the
server: the ranks exchange their outcome twice per request, after tokenising and after generating
(:func:`_agree`), so every rank knows the request failed before any moves on; rank 0 answers HTTP 500
with ``{"error": "generation failed on rank R: Type: first line"}``, the failing rank prints its
traceback on stderr, and the next request runs as usual. This covers a failure every rank meets alike
(the ranks run the same code on the same request, so a deterministic error strikes all of them at the
same collective) and a failure of any subset of ranks before generation starts. A rank failing alone
in the middle of the forward pass leaves the others inside a collective it never joins: the generation's
collectives run on the model-parallel groups, which time out after ``--distributed-timeout-minutes``
(Megatron-LM's flag, default 10), while the default group, which carries requests, the agreement and
the stop message, waits ``--server-timeout-minutes`` for the next request. The waiting ranks' timeout
is a failure inside a collective; the answer names the rank that failed first outside one, and since
gloo closes a group's connections on a timeout, the server then stops (exit status 1).
(Megatron-LM's server catches only its ValueError; any other exception ends its worker loop.)
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import socket
import sys
import threading
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from megatron_core.collectives import failures
from megatron_core.errors import ArgumentParser, ConfigError, report_line
from megatron_core.inference.generation import GenerationOutput
from megatron_core.inference.sampling import SamplingParams
from megatron_core.inference.text_generation_cli import (
    Generator,
    add_model_args,
    report_error,
    sampling_from_args,
    setup,
)
from megatron_core.tokenizer.base import lone_surrogate
from megatron_core.training.initialize import initialize_distributed, rank_from_env, shutdown

_STOP = "stop"
MAX_PROMPTS = 128  # per request, as Megatron-LM's MegatronGenerate.put

# SamplingParams' values as a client names them: the request's fields, not the command-line flags.
_FIELD_NAMES = {"temperature": "'temperature'", "top_k": "'top_k'", "top_p": "'top_p'", "seed": "'random_seed'"}


_FIELDS = ("prompts", "tokens_to_generate", "temperature", "top_k", "top_p", "random_seed", "logprobs", "add_BOS",
           "no_log")
# Megatron-LM's request fields this server does not implement, with the default they are accepted at.
# stop_token and length_penalty are its beam search's (its default stop_token is GPT-2's EOD id).
_AT_DEFAULT_ONLY = {"stop_on_eol": False, "stop_on_double_eol": False, "prevent_newline_after_colon": False,
                    "top_p_decay": 0.0, "top_p_bound": 0.0, "beam_width": None, "stop_token": 50256,
                    "length_penalty": 1}


@dataclass
class Request:
    """One parsed ``PUT /api`` body (what every rank needs to run the same generation)."""

    prompts: list[str]
    tokens_to_generate: int
    sampling: SamplingParams
    logprobs: bool = False
    add_bos: bool = False


def _flag(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise ConfigError(f"'{name}' must be true or false, got {value!r}")
    return value


def _check_fields(body: dict) -> None:
    unknown = set(body) - set(_FIELDS) - set(_AT_DEFAULT_ONLY)
    if unknown:
        raise ConfigError(f"unknown request fields {sorted(unknown)}; accepted: {', '.join(_FIELDS)}")
    for name, default in _AT_DEFAULT_ONLY.items():
        if name in body and body[name] != default:
            raise ConfigError(f"'{name}': {json.dumps(body[name])} is a Megatron-LM option this server does not "
                              f"implement; drop it or send its default {json.dumps(default)}")
    _flag(body, "no_log")  # accepted: request bodies are not logged here


def decode_body(data: bytes) -> Any:
    """The JSON value of a raw request body; ConfigError saying whether it is not text or not JSON.

    Read as Flask's ``get_json`` (Megatron-LM's server) reads it: :func:`json.loads` on the bytes, which
    takes UTF-8 and, told by the first bytes, UTF-16 or UTF-32 (RFC 8259 asks for UTF-8).
    """
    encoding = json.detect_encoding(data)
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as exc:
        name = encoding.upper()
        what = "not UTF-8 text" if encoding == "utf-8" else f"not {name} text (its first bytes say {name})"
        raise ConfigError(f"the request body is {what}: byte {exc.start} is {data[exc.start:exc.start + 1]!r}; "
                          f"send the JSON encoded as UTF-8") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"the request body is not valid JSON ({exc.msg}: line {exc.lineno} column {exc.colno}); "
                          f"send a JSON object with 'prompts' and 'tokens_to_generate'") from None


def parse_request(body: Any, defaults: SamplingParams) -> Request:
    """The :class:`Request` of a request body; ConfigError naming the bad field.

    The body's shape, types and sampling ranges are checked here, named by the request's fields (rank 0
    answers HTTP 400); :func:`generate` checks the ranges again, and the length limit, on every rank
    before its first collective.
    """
    if not isinstance(body, dict):
        raise ConfigError("the request body must be a JSON object with 'prompts' and 'tokens_to_generate'")
    prompts = body.get("prompts")
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ConfigError("'prompts' must be a non-empty list of strings")
    if len(prompts) > MAX_PROMPTS:
        # Megatron-LM's bound: the whole batch is one generation, its KV cache sized by the number of prompts.
        raise ConfigError(f"'prompts' holds {len(prompts)} prompts; at most {MAX_PROMPTS} per request (Megatron-LM's "
                          f"limit): split them over several requests")
    for index, prompt in enumerate(prompts):
        # JSON may spell half a UTF-16 pair; the tokenizer then fails inside generation (HTTP 500).
        if (problem := lone_surrogate(prompt)) is not None:
            raise ConfigError(f"'prompts'[{index}] holds {problem}: send each surrogate pair whole")
    tokens = body.get("tokens_to_generate", 64)
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 0:
        raise ConfigError("'tokens_to_generate' must be an integer >= 0")
    _check_fields(body)
    logprobs, add_bos = _flag(body, "logprobs"), _flag(body, "add_BOS")
    # Megatron-LM's checks: generation from its BOS alone is asked with an empty prompt, and scoring
    # (0 new tokens) returns nothing but the log-probabilities.
    if not add_bos and not all(prompts):
        raise ConfigError("an empty prompt needs 'add_BOS': true (generation starts from the BOS token alone)")
    if tokens == 0 and not logprobs:
        raise ConfigError("'tokens_to_generate' 0 scores the prompts: send 'logprobs': true (as Megatron-LM)")
    for name, kinds in (("temperature", (int, float)), ("top_p", (int, float)), ("top_k", (int,)),
                        ("random_seed", (int,))):
        # No silent casts: 1.7 is not a top_k, true is not a temperature, 1e30 is not a seed.
        if name in body and (isinstance(body[name], bool) or not isinstance(body[name], kinds)):
            raise ConfigError(f"'{name}' must be {'an integer' if kinds == (int,) else 'a number'}, "
                              f"got {body[name]!r}")
    params = SamplingParams(float(body.get("temperature", defaults.temperature)), body.get("top_k", defaults.top_k),
                            float(body.get("top_p", defaults.top_p)), body.get("random_seed", defaults.seed))
    params.validate(names=_FIELD_NAMES)
    return Request(prompts, tokens, params, logprobs, add_bos)


def _broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (the whole world is one model-parallel group: no DP here)."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# One rank's outcome of a request step: None, or (kind, message); kind "config" (a ConfigError: the
# client's fault, HTTP 400), "collective" (raised inside a torch.distributed call: another rank did not
# join it in time, and the group is out of step) or "internal" (anything else: HTTP 500).
Failure = tuple[str, str] | None


def _in_collective(exc: BaseException) -> bool:
    """True when ``exc`` was raised inside torch.distributed (a collective or send/recv): with gloo, a
    timeout there closes the group's connections, so the model-parallel groups cannot be used again."""
    frames = traceback.extract_tb(exc.__traceback__)
    return bool(frames) and f"torch{os.sep}distributed{os.sep}" in frames[-1].filename


def _failure(exc: Exception, rank: int) -> tuple[str, str]:
    """What this rank tells the others about ``exc``; an unexpected one's traceback goes to its stderr."""
    if isinstance(exc, ConfigError):
        return "config", str(exc)
    first_line = (str(exc).strip().splitlines() or [""])[0]
    message = f"{type(exc).__name__}: {first_line}" if first_line else type(exc).__name__
    if _in_collective(exc):  # a consequence (the cause is another rank's): one line, no traceback
        print(f"run_text_generation_server.py: rank {rank}: request failed in a collective: {message}",
              file=sys.stderr)
        return "collective", message
    print(f"run_text_generation_server.py: rank {rank}: request failed:", file=sys.stderr)
    traceback.print_exc(file=sys.stderr)
    return "internal", message


def _agree(failure: Failure) -> tuple[int, str, str] | None:
    """Every rank's outcome of the step just run, the same answer on every rank: None when all succeeded,
    else ``(rank, kind, message)``: the message of the lowest rank that failed outside a collective (the
    cause, when others only timed out waiting for it), else of the lowest failed rank; kind "collective"
    when any rank failed inside one (the groups are out of step), else that rank's kind. A collective: each
    rank must call it once per step, whether its own step failed or not."""
    failed = failures(failure)
    if not failed:
        return None
    rank, (kind, message) = next((f for f in failed if f[1][0] != "collective"), failed[0])
    return rank, "collective" if any(f[1][0] == "collective" for f in failed) else kind, message


def _run_request(gen: Generator, req: Request) -> tuple[GenerationOutput | None, tuple[int, str, str] | None]:
    """Tokenise and generate on this rank, in step with the others: ``(output, None)``, or ``(None, verdict)``
    when any rank failed (see :func:`_agree`). Every rank calls this with the same request."""
    rank = gen.parallel_state.rank
    ids: list[list[int]] = []
    failure: Failure = None
    try:
        ids = gen.tokenize(req.prompts)
        if req.add_bos:  # Megatron-LM's BOS is the EOD token
            ids = [[gen.tokenizer.eod] + p for p in ids] if gen.tokenizer is not None else ids
    except Exception as exc:  # any failure is agreed on, then answered; the server goes on
        failure = _failure(exc, rank)
    # Agreed before generation's first collective: a rank that failed alone here must not leave the others
    # waiting in it.
    verdict = _agree(failure)
    if verdict is not None:
        return None, verdict
    out = None
    try:
        out = gen.run(ids, req.tokens_to_generate, req.sampling, log_probs=req.logprobs)
    except Exception as exc:  # as above
        failure = _failure(exc, rank)
    verdict = _agree(failure)
    return (None, verdict) if verdict is not None else (out, None)


def _answer(gen: Generator, out: GenerationOutput | None, verdict: tuple[int, str, str] | None):
    """Rank 0's ``(JSON body, HTTP status)`` for a request's outcome."""
    if verdict is not None:
        rank, kind, message = verdict
        if kind == "config":
            return {"error": message}, 400
        if kind == "collective":
            return {"error": f"generation failed on rank {rank}: {message}; the other ranks waited for it inside a "
                             f"collective until --distributed-timeout-minutes and the model-parallel groups are out "
                             f"of step: the server stops, restart it"}, 500
        return {"error": f"generation failed on rank {rank}: {message}"}, 500
    assert out is not None and gen.tokenizer is not None
    try:  # rank 0 alone, after the ranks agreed: nothing left to agree on
        tokenizer = gen.tokenizer
        return {"text": [tokenizer.detokenize(t) for t in out.tokens],
                "segments": [[tokenizer.detokenize([t]) for t in tokens] for tokens in out.tokens],
                "tokens": out.tokens, "logprobs": out.log_probs}, 200
    except Exception as exc:  # as in _run_request
        return {"error": f"generation failed on rank 0: {_failure(exc, 0)[1]}"}, 500


def create_app(gen: Generator, defaults: SamplingParams, lock: threading.Lock | None = None,
               broken: threading.Event | None = None):
    """The Flask app of rank 0 (``PUT /api``); ``gen`` must be the rank's loaded generator.

    ``lock`` serialises every broadcast to the other ranks (requests, and the stop message of
    :func:`main`, which must not interleave with a generation in flight). ``broken`` is set when a
    request failed inside a collective (see :func:`_agree`): that request is answered, later ones get
    HTTP 503, and a SIGINT to this process, once the answer is sent, makes :func:`main` stop every rank."""
    from flask import Flask, jsonify, request  # noqa: PLC0415 - the server extra, only needed here

    app = Flask("megatron_text_generation")
    lock = lock if lock is not None else threading.Lock()
    broken = broken if broken is not None else threading.Event()

    @app.put("/api")
    def api():
        try:  # the body is read whatever its Content-Type (curl -d sends a form type)
            req = parse_request(decode_body(request.get_data(cache=False)), defaults)
        except ConfigError as exc:
            return jsonify({"error": str(exc)}), 400
        with lock:  # one generation at a time; every rank must see requests in the same order
            if broken.is_set():
                return jsonify({"error": "the server is stopping after a failed generation; restart it"}), 503
            _broadcast(("generate", req))
            out, verdict = _run_request(gen, req)
            if verdict is not None and verdict[1] == "collective":
                broken.set()
        body, status = _answer(gen, out, verdict)
        response = jsonify(body)
        if broken.is_set():  # Flask returns from run() on SIGINT, as on Ctrl-C; main() then stops the ranks
            response.call_on_close(lambda: os.kill(os.getpid(), signal.SIGINT))
        return response, status

    return app


def _worker_loop(gen: Generator) -> bool:
    """Ranks other than 0: run each broadcast request until rank 0 says stop; True when a request failed
    inside a collective (rank 0 then stops the server, :func:`create_app`).

    SIGINT is ignored here: a terminal's Ctrl-C (and torchrun, which forwards it) reaches every rank,
    and a KeyboardInterrupt between the two broadcasts of ``broadcast_object_list`` left this rank
    and rank 0 in different collectives until torchrun killed both. Rank 0 stops the loop instead."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    broken = False
    while True:
        message = _broadcast(None)
        if message[0] == _STOP:
            return broken
        verdict = _run_request(gen, message[1])[1]  # a failure is agreed with rank 0, which answers it
        broken = broken or (verdict is not None and verdict[1] == "collective")


def build_parser() -> argparse.ArgumentParser:
    """The server's flags: the model flags of the CLI plus where to listen."""
    p = ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=5000, help="TCP port (Megatron-LM's default 5000)")
    p.add_argument("--server-timeout-minutes", type=float, default=24 * 60,
                   help="how long the other ranks wait for the next request before giving up")
    p.add_argument("--distributed-timeout-minutes", type=float, default=10,
                   help="how long a rank waits inside a generation's collectives for the others (Megatron-LM's "
                        "flag and default): a rank that failed alone fails its request after this, and the "
                        "server stops")
    return p


def _check_port(host: str, port: int) -> None:
    """ConfigError for a ``--port`` out of range or, on rank 0 (the rank that serves HTTP), one that cannot
    be bound, before the model loads. Out of range, Flask took ``--port 99999`` as 34463 (the value mod 2^16)
    and ``-5`` raised OverflowError; a port in use was Flask's message on rank 0 alone, and torchrun's
    report named no root cause."""
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port must be in 0..65535 (0: any free port), got {port}")
    if rank_from_env() != 0:
        return
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Flask's server binds
            probe.bind(address)
    except OSError as exc:  # socket.gaierror (an unknown --host) included
        raise ConfigError(f"--host {host} --port {port} cannot be served ({exc.strerror or exc}); "
                          f"{_bind_fix(exc)}") from None


def _bind_fix(exc: OSError) -> str:
    """The fix for a failed bind: only a port in use is another program's; an unknown host name or an
    address of another machine needs another --host, a port below 1024 without the right another --port."""
    if isinstance(exc, socket.gaierror) or exc.errno == errno.EADDRNOTAVAIL:
        return "pass a --host of this machine (127.0.0.1, 0.0.0.0 for every interface, or its own name)"
    if exc.errno == errno.EACCES:
        return "pass a --port of 1024 or more (lower ports need privileges)"
    return "stop the program using that port or pass another --port (or --host)"


def main(argv: Sequence[str] | None = None,
         wrap_generator: Callable[[Generator], Generator] | None = None) -> int:
    """Serve until interrupted; returns the exit status (2 with a one-line message on a configuration error).

    ``wrap_generator`` is for tests only (None in the tool): it gets each rank's loaded Generator and
    returns the one to serve, e.g. a subclass that injects a fault to show the server survives it.
    """
    args = build_parser().parse_args(argv)
    context = None
    try:
        _check_port(args.host, args.port)
        defaults = sampling_from_args(args)
        for flag, minutes in (("--server-timeout-minutes", args.server_timeout_minutes),
                              ("--distributed-timeout-minutes", args.distributed_timeout_minutes)):
            if not minutes > 0:
                raise ConfigError(f"{flag} must be a positive number of minutes, got {minutes}")
        # The default group (requests, agreement, stop) waits for the next request; the model-parallel
        # groups (the generation's collectives) give up after --distributed-timeout-minutes.
        context = initialize_distributed(args.distributed_backend, timeout_minutes=args.server_timeout_minutes)
        gen = setup(args, need_tokenizer=True, timeout=timedelta(minutes=args.distributed_timeout_minutes))
        if wrap_generator is not None:
            gen = wrap_generator(gen)
    except ConfigError as exc:
        report_error("run_text_generation_server.py", exc, context)
        return 2
    lock, broken = threading.Lock(), threading.Event()
    try:
        if gen.parallel_state.rank == 0:
            print(f"serving PUT http://{args.host}:{args.port}/api", flush=True)
            create_app(gen, defaults, lock, broken).run(host=args.host, port=args.port, threaded=True)
        elif _worker_loop(gen):
            broken.set()
    except KeyboardInterrupt:
        pass
    finally:
        # Flask returns on Ctrl-C; a second SIGINT (torchrun forwards the terminal's) must not cut the
        # stop message or the shutdown barrier short, and a generation in flight finishes first.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if gen.parallel_state.rank == 0 and gen.parallel_state.world_size > 1:
            with lock:
                _broadcast((_STOP,))
    shutdown(context)  # also destroys the model-parallel groups
    if broken.is_set():
        report_line("run_text_generation_server.py: error: stopped: a generation failed inside a collective (see "
                    "the failing rank's traceback above); restart the server", gen.parallel_state.rank)
        return 1
    return 0
