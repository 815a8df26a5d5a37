"""tools/run_text_generation_server.py under a real torchrun TP=2 launch, queried over HTTP on 127.0.0.1:
concurrent PUT /api requests each get the same greedy continuation as Hugging Face ``generate``, and a
bad request gets HTTP 400 with a one-line message."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from equivalence import assert_rel_close

from tests.hf_testing import tiny_hf_gpt2
from tests.test_text_generation_cli import _save_tokenizer_json

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(REPO, "tools", "run_text_generation_server.py")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _put(port, body, timeout=60):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/api", data=json.dumps(body).encode(), method="PUT",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _wait_until_serving(proc, port, deadline=120):
    start = time.time()
    while time.time() - start < deadline:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError("the server did not start listening")


def test_server_answers_concurrent_requests_under_tp2(tmp_path):
    hf_model = tiny_hf_gpt2(vocab_size=300)
    hf_model.save_pretrained(tmp_path / "hf")
    tok = _save_tokenizer_json(tmp_path / "hf" / "tokenizer.json")
    eod = tok.token_to_id("<|endoftext|>")
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", TOOL,
           "--load", str(tmp_path / "hf"), "--tensor-model-parallel-size", "2", "--port", str(port), "--top_k", "1"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _wait_until_serving(proc, port)
        bodies = [{"prompts": ["def f(x):", "the quick"], "tokens_to_generate": 6},
                  {"prompts": ["the lazy dog"], "tokens_to_generate": 4},
                  {"prompts": ["return x"], "tokens_to_generate": 5},
                  {"prompts": ["brown fox jumps", "def"], "tokens_to_generate": 3}]
        with ThreadPoolExecutor(len(bodies)) as pool:
            answers = list(pool.map(lambda b: _put(port, b), bodies))
        for body, (status, answer) in zip(bodies, answers, strict=True):
            assert status == 200, answer
            for prompt, text, tokens in zip(body["prompts"], answer["text"], answer["tokens"], strict=True):
                ids = tok.encode(prompt).ids
                out = hf_model.generate(torch.tensor([ids]), max_new_tokens=body["tokens_to_generate"],
                                        do_sample=False, eos_token_id=eod, pad_token_id=eod,
                                        attention_mask=torch.ones(1, len(ids), dtype=torch.long))
                assert tokens == out[0].tolist(), f"{prompt!r}: server tokens differ from HF generate"
                assert text == tok.decode(tokens, skip_special_tokens=False) and text.startswith(prompt)
        status, answer = _put(port, {"prompts": ["x"], "tokens_to_generate": -1})
        assert status == 400 and "tokens_to_generate" in answer["error"]
        status, answer = _put(port, {"prompts": ["x" * 4], "tokens_to_generate": 40})
        assert status == 400 and "--max-position-embeddings" in answer["error"]
        status, answer = _put(port, {"prompts": ["x"], "tokens_to_generate": 2, "top_p": 1.5})
        assert status == 400 and answer["error"] == "'top_p' must be in [0, 1], got 1.5", answer
        # Each answered 500 (a traceback on rank 0) and killed rank 1's worker loop, so the TP2 server was dead.
        nan_message = "'temperature' must be a finite number >= 0, got nan"
        for field, value, message in (("temperature", float("nan"), nan_message),
                                      ("random_seed", 1e30, "'random_seed' must be an integer, got 1e+30"),
                                      ("random_seed", 10**26, "'random_seed' must be in [0, 2**64)"),
                                      ("top_k", 1.7, "'top_k' must be an integer, got 1.7")):
            status, answer = _put(port, {"prompts": ["x"], "tokens_to_generate": 2, field: value})
            assert status == 400 and message in answer["error"], (field, value, answer)
        # A JSON body sent without Content-Type: application/json (curl -d) is read, not called "not an object".
        req = urllib.request.Request(f"http://127.0.0.1:{port}/api", method="PUT",
                                     data=json.dumps({"prompts": ["the"], "tokens_to_generate": 1}).encode())
        with urllib.request.urlopen(req, timeout=60) as resp:
            assert resp.status == 200 and len(json.loads(resp.read())["tokens"]) == 1
        # Both answered "the request body must be a JSON object": a Latin-1 body, and a body cut short.
        for data, message in ((b'{"prompts": ["caf\xe9"]}', "the request body is not UTF-8 text: byte 17 is "
                                                            "b'\\xe9'; send the JSON encoded as UTF-8"),
                              (b'{"prompts": ["the"], ', "the request body is not valid JSON (Expecting property "
                                                         "name enclosed in double quotes: line 1 column 22)")):
            req = urllib.request.Request(f"http://127.0.0.1:{port}/api", method="PUT", data=data)
            with pytest.raises(urllib.error.HTTPError) as answer:
                urllib.request.urlopen(req, timeout=60)
            assert answer.value.code == 400 and json.loads(answer.value.read())["error"].startswith(message)
        # UTF-16 with its byte-order mark is read, as Flask's get_json (Megatron-LM's server) reads it.
        body = json.dumps({"prompts": ["the"], "tokens_to_generate": 1}).encode("utf-16")
        with urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/api", method="PUT", data=body),
                                    timeout=60) as resp:
            assert resp.status == 200 and len(json.loads(resp.read())["tokens"]) == 1
        status, answer = _put(port, {"prompts": ["the"], "tokens_to_generate": 2})  # still serving after errors
        assert status == 200 and len(answer["tokens"][0]) <= len(tok.encode("the").ids) + 2
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


# A test-only server: the tool's main() serving a Generator subclass that injects faults through real
# paths (a forward hook on the loaded model, the tokenize step); nothing a user runs is replaced.
FAULTY_SERVER = """
import sys
import time

from megatron_core.inference import server
from megatron_core.inference.text_generation_cli import Generator


class FaultyGenerator(Generator):
    def tokenize(self, prompts):
        if self.parallel_state.rank == 1 and prompts[0].startswith("FAIL-RANK1"):
            raise KeyError("injected: rank 1 alone, while tokenising")
        return super().tokenize(prompts)

    def run(self, prompts, tokens_to_generate, sampling, **kwargs):
        calls = []

        def hook(module, args, output):  # every rank, after the TP collectives of 3 forward passes
            calls.append(None)
            if len(calls) == 3:
                raise RuntimeError("injected: every rank, in decoding step 3\\nsecond line")

        def alone(module, args, output):  # rank 1 alone, mid-generation: the others wait in a collective
            calls.append(None)
            if len(calls) == 2 and self.parallel_state.rank == 1:
                raise RuntimeError("injected: rank 1 alone, in decoding step 2")

        def slow(module, args, output):  # a long generation, for a Ctrl-C to arrive during it
            time.sleep(0.25)
        text = self.tokenizer.detokenize(list(prompts[0]))
        handle = (self.loaded.model.register_forward_hook(hook) if text.startswith("FAIL-ALL") else
                  self.loaded.model.register_forward_hook(alone) if text.startswith("FAIL-ALONE") else
                  self.loaded.model.register_forward_hook(slow) if text.startswith("SLOW") else None)
        try:
            return super().run(prompts, tokens_to_generate, sampling, **kwargs)
        finally:
            if handle is not None:
                handle.remove()


sys.exit(server.main(wrap_generator=lambda gen: FaultyGenerator(**vars(gen))))
"""


def _start_faulty_server(tmp_path, port, *flags):
    """FAULTY_SERVER on 2 ranks under torchrun, serving a tiny random GPT-2 greedily on ``port``."""
    hf_model = tiny_hf_gpt2(vocab_size=300)
    hf_model.save_pretrained(tmp_path / "hf")
    _save_tokenizer_json(tmp_path / "hf" / "tokenizer.json")
    script = tmp_path / "faulty_server.py"
    script.write_text(FAULTY_SERVER)
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           "--load", str(tmp_path / "hf"), *flags, "--port", str(port), "--top_k", "1"]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def test_an_exception_inside_generation_fails_the_request_not_the_server(tmp_path):
    """A fault raised inside generation (on every rank, mid-decoding; or on rank 1 alone, before generating)
    ended rank 1's worker loop (and rank 0 answered Flask's HTML 500): the TP 2 server was dead. Now the
    ranks agree the request failed, the client gets HTTP 500 and one line, and the next requests work."""
    port = _free_port()
    proc = _start_faulty_server(tmp_path, port, "--tensor-model-parallel-size", "2")
    try:
        _wait_until_serving(proc, port)
        good = {"prompts": ["the quick"], "tokens_to_generate": 5}
        status, expected = _put(port, good, timeout=30)
        assert status == 200, expected
        status, answer = _put(port, {"prompts": ["FAIL-ALL now"], "tokens_to_generate": 5}, timeout=30)
        assert (status, answer) == (500, {"error": "generation failed on rank 0: RuntimeError: injected: every "
                                                   "rank, in decoding step 3"}), (status, answer)
        status, answer = _put(port, {"prompts": ["FAIL-RANK1 now"], "tokens_to_generate": 5}, timeout=30)
        assert (status, answer) == (500, {"error": "generation failed on rank 1: KeyError: 'injected: rank 1 "
                                                   "alone, while tokenising'"}), (status, answer)
        assert _put(port, good, timeout=30) == (200, expected)  # in step again: the same greedy answer
        status, answer = _put(port, {"prompts": ["x" * 4], "tokens_to_generate": 40}, timeout=30)
        assert status == 400 and "--max-position-embeddings" in answer["error"]
        assert _put(port, {"prompts": ["FAIL-ALL", "the"], "tokens_to_generate": 4}, timeout=30)[0] == 500
        assert _put(port, good, timeout=30) == (200, expected)
        assert proc.poll() is None
        # Ctrl-C while a generation runs (20 forward passes of 0.25 s): the request is answered, then the
        # stop message goes out (after it, under the request lock: not into the generation's collectives).
        with ThreadPoolExecutor(1) as pool:
            slow = pool.submit(_put, port, {"prompts": ["SLOW the"], "tokens_to_generate": 20}, 60)
            time.sleep(2.0)
            os.killpg(proc.pid, signal.SIGINT)
            status, answer = slow.result(timeout=60)
        assert status == 200 and answer["text"][0].startswith("SLOW the"), answer
        _, err = proc.communicate(timeout=30)  # exits by itself, without torchrun's 30 s kill
        assert "forcefully exiting" not in err and "Broken pipe" not in err, err[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    assert err.count("request failed:") == 5, err[-3000:]  # each failing rank logged its traceback: 2 + 1 + 2
    assert err.count("RuntimeError: injected: every rank, in decoding step 3") == 4, err[-3000:]
    assert err.count("KeyError: 'injected: rank 1 alone, while tokenising'") == 1, err[-3000:]


@pytest.mark.parametrize("layout", [["--tensor-model-parallel-size", "2"], ["--pipeline-model-parallel-size", "2"]],
                         ids=["tp2", "pp2"])
def test_a_rank_failing_alone_mid_generation_stops_the_server_after_the_collective_timeout(tmp_path, layout):
    """Rank 1 raises alone in the middle of a generation while rank 0 waits for it inside a collective (TP 2:
    the vocabulary all-gather; PP 2: the chosen token's broadcast). That waited for --server-timeout-minutes
    (24 h by default). The generation's groups now time out after --distributed-timeout-minutes (3 s here):
    the request gets HTTP 500 naming rank 1's exception, and the server, whose groups are out of step after
    a gloo timeout, stops by itself with status 1 and one line."""
    port = _free_port()
    proc = _start_faulty_server(tmp_path, port, *layout, "--distributed-timeout-minutes", "0.05")
    try:
        _wait_until_serving(proc, port)
        assert _put(port, {"prompts": ["the quick"], "tokens_to_generate": 3}, timeout=30)[0] == 200
        start = time.time()
        status, answer = _put(port, {"prompts": ["FAIL-ALONE now"], "tokens_to_generate": 5}, timeout=60)
        waited = time.time() - start
        assert status == 500 and answer["error"].startswith(
            "generation failed on rank 1: RuntimeError: injected: rank 1 alone, in decoding step 2; the other ranks "
            "waited for it inside a collective until --distributed-timeout-minutes"), answer
        assert 3 <= waited < 30, waited
        _, err = proc.communicate(timeout=60)  # stops by itself
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    assert proc.returncode != 0
    ours = [line for line in err.splitlines() if line.startswith("run_text_generation_server.py: error:")]
    assert ours == ["run_text_generation_server.py: error: stopped: a generation failed inside a collective (see the "
                    "failing rank's traceback above); restart the server"], err[-3000:]  # rank 0's, once
    assert err.count("RuntimeError: injected: rank 1 alone, in decoding step 2") == 1, err[-3000:]  # its traceback
    assert err.count("rank 0: request failed in a collective: RuntimeError:") == 1, err[-3000:]  # one line


def _serve(argv):
    import contextlib
    import io

    from megatron_core.inference import server

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = server.main(argv)
    torch.distributed.barrier()
    return code, err.getvalue()


def test_a_world_larger_than_one_model_replica_is_refused_naming_the_fix(tmp_path):
    """As Megatron-LM's server: every process holds part of the one replica (world = TP x PP), no DP."""
    from harness import run_distributed

    results = run_distributed(_serve, 2, ["--load", str(tmp_path / "any"), "--tensor-model-parallel-size", "1"],
                              timeout=60)
    assert [code for code, _ in results] == [2, 2], results
    text = results[0][1]
    assert text == ("run_text_generation_server.py: error: --tensor-model-parallel-size 1 x "
                    "--pipeline-model-parallel-size 1 needs 1 process but 2 were started: generation runs one model "
                    "replica (no data parallelism); launch 1 (torchrun --nproc_per_node 1) or choose sizes whose "
                    "product is 2\n"), text
    assert results[1][1] == ""  # said once, by rank 0


def test_ctrl_c_stops_a_tp2_server_at_once_without_a_traceback_of_ours(tmp_path):
    """A terminal's Ctrl-C (SIGINT to torchrun and every rank) ends a TP=2 server within seconds (after
    answering Megatron-LM's ``logprobs`` requests over HTTP).

    Rank 1 waits in the broadcast of the next request: its KeyboardInterrupt landed between the two
    broadcasts of ``broadcast_object_list`` (or in the shutdown barrier) while rank 0 sent the stop
    message, so both hung until torchrun killed them 30 s later, and rank 1 printed a traceback from
    our shutdown barrier."""
    hf_model = tiny_hf_gpt2(vocab_size=300)
    hf_model.save_pretrained(tmp_path / "hf")
    tok = _save_tokenizer_json(tmp_path / "hf" / "tokenizer.json")
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", TOOL,
           "--load", str(tmp_path / "hf"), "--port", str(port), "--top_k", "1"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _wait_until_serving(proc, port)
        status, answer = _put(port, {"prompts": ["the quick"], "tokens_to_generate": 2})
        assert status == 200 and answer["logprobs"] is None, answer
        # Megatron-LM's "logprobs": each token's log-probability given those before it (was refused as an
        # unknown field); tokens_to_generate 0 scores the prompts. Against HF's log_softmax, fp32 1e-5.
        for body in ({"prompts": ["the quick", "def f(x):"], "tokens_to_generate": 3, "logprobs": True},
                     {"prompts": ["the lazy dog"], "tokens_to_generate": 0, "logprobs": True}):
            status, answer = _put(port, body)
            assert status == 200, answer
            for tokens, scores in zip(answer["tokens"], answer["logprobs"], strict=True):
                ids = torch.tensor([tokens])
                ref = hf_model(ids).logits.log_softmax(-1)[0, :-1].gather(-1, ids[0, 1:, None])[:, 0].detach()
                assert_rel_close(torch.tensor(scores), ref, 1e-5, f"server logprobs of {body}")
        status, answer = _put(port, {"prompts": ["x"], "tokens_to_generate": 1, "logprobs": "yes"})
        assert status == 400 and answer["error"] == "'logprobs' must be true or false, got 'yes'", answer
        # Megatron-LM's other fields: add_BOS prepends its BOS (the EOD token), no_log is taken, "segments"
        # holds each token's text; the options not implemented are refused by name unless at their default.
        status, answer = _put(port, {"prompts": ["the quick"], "tokens_to_generate": 2, "add_BOS": True,
                                     "no_log": True, "stop_on_eol": False, "top_p_decay": 0.0, "beam_width": None})
        eod = tok.token_to_id("<|endoftext|>")
        assert status == 200 and answer["tokens"][0][:len(tok.encode("the quick").ids) + 1] == \
            [eod] + tok.encode("the quick").ids, answer
        assert answer["segments"][0] == [tok.decode([t], skip_special_tokens=False) for t in answer["tokens"][0]]
        # Megatron-LM generates from its BOS alone: an empty prompt is taken with add_BOS (was refused).
        status, answer = _put(port, {"prompts": ["", "the"], "tokens_to_generate": 2, "add_BOS": True,
                                     "logprobs": True})
        assert status == 200 and answer["tokens"][0][0] == eod and answer["text"][0].startswith("<|endoftext|>")
        assert len(answer["logprobs"][0]) == len(answer["tokens"][0]) - 1, answer
        status, answer = _put(port, {"prompts": ["x"], "tokens_to_generate": 1, "stop_on_eol": True})
        assert status == 400 and answer["error"] == ("'stop_on_eol': true is a Megatron-LM option this server does "
                                                     "not implement; drop it or send its default false"), answer
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal sends to the foreground process group
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    assert "megatron_core" not in err and "run_text_generation_server.py\", line" not in err, err[-3000:]
    assert "forcefully exiting" not in err, err[-3000:]
    assert f"serving PUT http://127.0.0.1:{port}/api" in out, out  # where to send requests, as Megatron-LM's


def test_request_fields_are_checked_as_megatron_lm_checks_them():
    """Megatron-LM's MegatronGenerate.put: an empty prompt needs add_BOS; tokens_to_generate 0 needs logprobs
    (scoring without log-probabilities answers nothing); its beam-search fields stop_token and length_penalty
    are taken at their defaults (50256, 1) like the other options not implemented here; temperature is at
    most 100."""
    from megatron_core.errors import ConfigError
    from megatron_core.inference.sampling import SamplingParams
    from megatron_core.inference.server import parse_request

    defaults = SamplingParams(1.0, 0, 0.0, 1234)
    req = parse_request({"prompts": ["", "a"], "add_BOS": True, "tokens_to_generate": 1}, defaults)
    assert req.prompts == ["", "a"] and req.add_bos
    for body, message in (({"prompts": ["a", ""], "tokens_to_generate": 1}, "empty prompt needs 'add_BOS': true"),
                          ({"prompts": ["a"], "tokens_to_generate": 0},
                           "'tokens_to_generate' 0 scores the prompts: send 'logprobs': true"),
                          ({"prompts": ["a"], "stop_token": 7}, "'stop_token': 7 is a Megatron-LM option"),
                          # Any number was taken, each request one batch (Megatron-LM answers 400 past 128).
                          ({"prompts": ["a"] * 129}, "'prompts' holds 129 prompts; at most 128 per request "
                                                     "(Megatron-LM's limit): split them over several requests"),
                          # Past float32's range the logits became nan: HTTP 500 from torch.multinomial.
                          ({"prompts": ["a"], "temperature": 1e308}, "'temperature' must be at most 100 (Megatron-LM's "
                                                                     "bound), got 1e+308")):
        try:
            parse_request(body, defaults)
        except ConfigError as exc:
            assert message in str(exc), (body, str(exc))
        else:
            raise AssertionError(f"{body} was accepted")
    req = parse_request({"prompts": ["a"], "stop_token": 50256, "length_penalty": 1}, defaults)
    assert req.tokens_to_generate == 64
    assert len(parse_request({"prompts": ["a"] * 128}, defaults).prompts) == 128


def test_a_prompt_with_a_lone_surrogate_is_a_bad_request_naming_it():
    # JSON may spell half a UTF-16 pair; the tokenizer failed on it inside generation: HTTP 500
    # "generation failed on rank 0: TypeError: TextInputSequence must be str" (a Hugging Face tokenizer).
    from megatron_core.errors import ConfigError
    from megatron_core.inference.sampling import SamplingParams
    from megatron_core.inference.server import parse_request

    body = json.loads('{"prompts": ["fine", "a\\ud800b"], "tokens_to_generate": 2}')  # as Flask decodes it
    with pytest.raises(ConfigError, match=r"^'prompts'\[1\] holds a lone surrogate '\\ud800' at character 1 "):
        parse_request(body, SamplingParams(1.0, 0, 0.0, 1234))
