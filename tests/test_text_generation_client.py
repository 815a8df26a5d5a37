"""tools/text_generation_cli.py, Megatron-LM's interactive client, against a running
tools/run_text_generation_server.py: it prints the server's text for each prompt, a bad request's
HTTP 400 message, asks again for a token count that is not a number, ends at end of input, and a
server that cannot be reached is one error line (exit status 1). The tool was missing."""
import os
import signal
import subprocess
import sys

from test_text_generation_server import _free_port, _put, _wait_until_serving

from tests.hf_testing import tiny_hf_gpt2
from tests.test_text_generation_cli import _save_tokenizer_json

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVER = os.path.join(REPO, "tools", "run_text_generation_server.py")
CLIENT = os.path.join(REPO, "tools", "text_generation_cli.py")
ENV = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}


def _client(address, stdin, *flags):
    return subprocess.run([sys.executable, CLIENT, address, *flags], input=stdin, capture_output=True, text=True,
                          timeout=120, cwd=REPO, env=ENV)


def test_the_client_prints_the_servers_answers_and_its_errors(tmp_path):
    tiny_hf_gpt2(vocab_size=300).save_pretrained(tmp_path / "hf")
    _save_tokenizer_json(tmp_path / "hf" / "tokenizer.json")
    port = _free_port()
    server = subprocess.Popen([sys.executable, SERVER, "--load", str(tmp_path / "hf"), "--port", str(port),
                               "--top_k", "1"], cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, start_new_session=True)
    try:
        _wait_until_serving(server, port)
        status, answer = _put(port, {"prompts": ["def f(x):"], "tokens_to_generate": 5})
        assert status == 200, answer
        proc = _client(f"127.0.0.1:{port}", "def f(x):\n5\nthe quick\nmany\n100\n")
        assert proc.returncode == 0 and proc.stderr == "", proc.stderr
        out = proc.stdout
        assert f"Megatron Response: \n{answer['text'][0]}\n" in out, out
        assert "error: 'many' is not a number of tokens; give a whole number, 0 or more\n" in out, out
        assert "Error 400: longest prompt (" in out and "exceeds the model's --max-position-embeddings" in out, out
        assert out.count("Enter prompt: ") == 3, out  # the third reaches end of input
    finally:
        os.killpg(server.pid, signal.SIGINT)
        server.wait(timeout=60)


def test_an_unreachable_server_is_one_line():
    proc = _client(f"127.0.0.1:{_free_port()}", "hello\n3\n")
    assert proc.returncode == 1, proc
    assert proc.stderr.startswith("error: cannot reach the text generation server at http://127.0.0.1:") and \
        proc.stderr.count("\n") == 1, proc.stderr


def test_an_address_that_is_no_host_and_port_is_one_line_before_the_prompt():
    for address, why in (("local host:5000", "no host name in 'local host:5000'"),
                         ("localhost:abc", "Port could not be cast to integer value as 'abc'"),
                         ("localhost:99999", "Port out of range 0-65535")):
        proc = _client(address, "hello\n3\n")
        assert proc.returncode == 2 and proc.stdout == "", proc
        assert proc.stderr.splitlines() == [
            f"text_generation_cli.py: error: url {address!r} is not the server's host:port ({why}); give e.g. "
            f"localhost:5000 (see python text_generation_cli.py --help)"], proc.stderr


def test_a_timeout_that_is_not_positive_is_one_line():
    """--timeout -1 was socket's 'ValueError: Timeout value out of range' traceback at the first request
    (0 would make urllib's socket non-blocking)."""
    for value in ("-1", "0"):
        proc = _client(f"127.0.0.1:{_free_port()}", "hello\n3\n", "--timeout", value)
        assert proc.returncode == 2 and proc.stdout == "", proc
        assert proc.stderr.splitlines() == [
            f"text_generation_cli.py: error: --timeout must be a number of seconds > 0, got {float(value):g} "
            f"(see python text_generation_cli.py --help)"], proc.stderr
    # Any positive number of seconds is taken, a fraction too: the client goes on to ask the server.
    proc = _client(f"127.0.0.1:{_free_port()}", "hello\n3\n", "--timeout", "0.5")
    assert proc.returncode == 1 and proc.stderr.startswith("error: cannot reach the text generation server"), proc


def test_a_prompt_that_is_not_utf8_is_asked_again_not_sent():
    """A non-UTF-8 byte typed or pasted: a strict stdin (an en_US.UTF-8 locale) ended the client in a
    UnicodeDecodeError traceback; a surrogateescape one (the C locale) sent a lone surrogate the server's
    tokenizer failed on. Nothing is sent: the port has no server, yet no 'cannot reach' line."""
    for encoding, expected in (("utf-8:strict", "error: the input is not UTF-8 text (invalid start byte at byte 2); "
                                                "type it again in UTF-8\n"),
                               ("utf-8:surrogateescape", "error: the prompt is not UTF-8 text (a lone surrogate "
                                                         "'\\udcff' at character 2 (not Unicode text)); type it again "
                                                         "in UTF-8\n")):
        proc = subprocess.run([sys.executable, CLIENT, f"127.0.0.1:{_free_port()}"], input=b"ab\xffc\n", timeout=120,
                              capture_output=True, cwd=REPO, env={**ENV, "PYTHONIOENCODING": encoding})
        out, err = proc.stdout.decode(), proc.stderr.decode()
        assert proc.returncode == 0 and err == "", (encoding, err)
        assert out == f"Enter prompt: {expected}Enter prompt: \n", (encoding, out)
