"""``tools/text_generation_cli.py``: Megatron-LM's interactive client for the text generation server.

    python tools/text_generation_cli.py localhost:5000

As Megatron-LM's ``tools/text_generation_cli.py``: asks for a prompt and a number of tokens, sends
``PUT /api`` with ``{"prompts": [prompt], "tokens_to_generate": n}`` and prints the text, until end of
input (Ctrl-D). A server's HTTP 400 answer is printed as ``Error 400: <its message>`` and the loop goes on;
a token count that is not a whole number is asked again (Megatron-LM ``eval``s it); a server that cannot
be reached is one ``error:`` line and exit status 1. Standard library only (``urllib``), so the client
runs where the server's Flask is not installed.
"""
from __future__ import annotations

import json
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

from megatron_core.errors import ArgumentParser
from megatron_core.tokenizer.base import lone_surrogate


def api_url(address: str) -> str:
    """``http://ADDRESS/api`` for Megatron-LM's ``host:port`` argument; a full ``http(s)://...`` URL is kept."""
    if address.startswith(("http://", "https://")):
        return address if address.rstrip("/").endswith("/api") else address.rstrip("/") + "/api"
    return f"http://{address}/api"


def address_error(url: str) -> str | None:
    """Why ``url`` (from :func:`api_url`) names no server, or None: a host that is empty or holds a space or
    control character, or a port that is not a number in 0..65535 (``http.client`` would raise ``InvalidURL``
    at the first request, after a prompt was typed)."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - the property raises ValueError for a port that is no number or out of range
    except ValueError as exc:
        return str(exc)
    host = parts.hostname or ""
    if not host or any(ch.isspace() or not ch.isprintable() for ch in host):
        return f"no host name in {parts.netloc!r}"
    return None


def put_api(url: str, body: dict[str, Any], timeout: float) -> tuple[int, dict[str, Any]]:
    """``(HTTP status, JSON answer)`` of ``PUT url`` with ``body``; an answer that is not JSON becomes
    ``{"error": its first line}``. Raises ``urllib.error.URLError`` (an OSError) when the server cannot be reached."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="PUT",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        text = raw.decode(errors="replace").strip().splitlines()
        return status, {"error": text[0] if text else f"HTTP {status} with an empty body"}


def _ask_tokens(ask: Callable[[str], str]) -> int:
    """The number of tokens to generate, asked until it is a whole number >= 0 (EOFError at end of input)."""
    while True:
        answer = ask("Enter number of tokens to generate: ").strip()
        try:
            count = int(answer)
        except ValueError:
            count = -1
        if count >= 0:
            return count
        print(f"error: {answer!r} is not a number of tokens; give a whole number, 0 or more", flush=True)


def main(argv: Sequence[str] | None = None, ask: Callable[[str], str] = input) -> int:
    """The interactive loop; returns the exit status (0 at end of input, 1 when the server is unreachable)."""
    parser = ArgumentParser(prog="text_generation_cli.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("url", help="the server's host:port (Megatron-LM's argument), or its http:// URL")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for one answer")
    args = parser.parse_args(argv)
    if not args.timeout > 0:  # urllib: 0 is a non-blocking socket, a negative value a ValueError traceback
        parser.error(f"--timeout must be a number of seconds > 0, got {args.timeout:g}")
    url = api_url(args.url)
    problem = address_error(url)
    if problem is not None:
        parser.error(f"url {args.url!r} is not the server's host:port ({problem}); give e.g. localhost:5000")
    while True:
        try:
            prompt = ask("Enter prompt: ")
            # A byte that is not UTF-8: input() raises (a strict stdin, e.g. an en_US.UTF-8 locale) or returns a
            # lone surrogate (surrogateescape, the C locale), which the server's tokenizer cannot take.
            problem = lone_surrogate(prompt)
            if problem is not None:
                print(f"error: the prompt is not UTF-8 text ({problem}); type it again in UTF-8", flush=True)
                continue
            tokens = _ask_tokens(ask)
        except UnicodeDecodeError as exc:
            print(f"error: the input is not UTF-8 text ({exc.reason} at byte {exc.start}); type it again in UTF-8",
                  flush=True)
            continue
        except (EOFError, KeyboardInterrupt):
            print(flush=True)
            return 0
        try:
            status, answer = put_api(url, {"prompts": [prompt], "tokens_to_generate": tokens}, args.timeout)
        except OSError as exc:
            reason = getattr(exc, "reason", exc)
            print(f"error: cannot reach the text generation server at {url} ({reason}); start it with "
                  f"tools/run_text_generation_server.py or check the address", file=sys.stderr, flush=True)
            return 1
        if status != 200:
            print(f"Error {status}: {answer.get('error', answer)}", flush=True)
        else:
            print("Megatron Response: ", flush=True)
            print(answer["text"][0], flush=True)
