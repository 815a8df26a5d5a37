"""Bad inputs end with one line naming the fix and a non-zero exit code, never a traceback."""
import contextlib
import io
import json
import os
import subprocess
import sys

import pytest
import torch.distributed
from harness import run_distributed

import pretrain_gpt

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
        "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "2", "--lr", "1e-3",
        "--log-interval", "1", "--eval-iters", "1", "--num-workers", "0"]
MOCK = ["--mock-data", "--vocab-size", "255"]


def _cli(argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = pretrain_gpt.cli(argv)
    torch.distributed.barrier()  # no rank tears the group down while another is still joining it
    return code, err.getvalue()


@pytest.fixture(scope="module")
def small_tokenizer(tmp_path_factory):
    from megatron_core.tokenizer.train_tokenizer import train_sentencepiece

    d = tmp_path_factory.mktemp("tok")
    text = d / "text.txt"
    text.write_text("\n".join(f"def function_{i}(x):\n    return x * {i} + {i * i}" for i in range(300)))
    return train_sentencepiece([str(text)], str(d / "tok"), 320)


def _cases(tmp_path, tokenizer):
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"text": "fine"}\n{"text": "broken\n')
    return {
        "missing data path": (1, TINY + ["--data-path", str(tmp_path / "nope_text_document"), "--vocab-size", "255"],
                              "--data-path", "tools/preprocess_data.py"),
        "malformed JSONL": (1, TINY + ["--demo", "--demo-dir", str(tmp_path / "demo"), "--demo-input", str(bad_jsonl)],
                            f"{bad_jsonl}:2: not valid JSON", "fix or delete that line"),
        "tokenizer larger than --vocab-size": (
            1, TINY + ["--mock-data", "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", tokenizer,
                       "--vocab-size", "300"], "has 320 tokens but --vocab-size is 300", "raise --vocab-size"),
        "heads not divisible by TP": (2, TINY + MOCK + ["--tensor-model-parallel-size", "2", "--num-attention-heads",
                                                        "3", "--hidden-size", "48"],
                                      "--num-attention-heads 3 is not divisible by --tensor-model-parallel-size 2",
                                      "use a TP size that divides"),
        "global batch not divisible": (2, TINY + MOCK + ["--global-batch-size", "6"],
                                       "--global-batch-size 6 is not divisible by --micro-batch-size 2 x "
                                       "data-parallel size 2", "choose a global batch that is a multiple of 4"),
        # Each was torch's own message (no flag named) with a pointer to MCORE_TRACEBACK, from the optimizer.
        "adam beta out of range": (1, TINY + MOCK + ["--adam-beta1", "1.5"], "--adam-beta1 must be in [0, 1), got 1.5"),
        "negative adam eps": (1, TINY + MOCK + ["--adam-eps=-1e-8"], "--adam-eps must be >= 0, got -1e-08"),
        "negative weight decay": (1, TINY + MOCK + ["--weight-decay", "-0.1"],
                                  "--weight-decay must be >= 0, got -0.1"),
        "negative momentum": (1, TINY + MOCK + ["--optimizer", "sgd", "--sgd-momentum", "-0.5"],
                              "--sgd-momentum must be >= 0, got -0.5"),
    }


@pytest.mark.parametrize("case", ["missing data path", "malformed JSONL", "tokenizer larger than --vocab-size",
                                  "heads not divisible by TP", "global batch not divisible", "adam beta out of range",
                                  "negative adam eps", "negative weight decay", "negative momentum"])
def test_bad_input_is_one_line(case, tmp_path, small_tokenizer):
    world, argv, *needles = _cases(tmp_path, small_tokenizer)[case]
    results = run_distributed(_cli, world, argv, timeout=60)
    assert all(code == 2 for code, _ in results)
    text = results[0][1]
    assert text.count("\n") == 1 and text.startswith("error: "), text
    for needle in needles:
        assert needle in text, text
    assert all(not err for _, err in results[1:])  # said once, by rank 0


def test_command_line_exit_code_and_no_traceback(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json at all\n")
    proc = subprocess.run([sys.executable, os.path.join(REPO, "pretrain_gpt.py"), "--demo", "--demo-dir",
                           str(tmp_path / "demo"), "--demo-input", str(bad)],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith(f"error: --demo-input {bad}:1: not valid JSON")


def test_demo_input_with_a_lone_surrogate_is_one_line_naming_it(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "ab\\udc00"}\n')
    proc = subprocess.run([sys.executable, os.path.join(REPO, "pretrain_gpt.py"), "--demo", "--demo-dir",
                           str(tmp_path / "demo"), "--demo-input", str(bad)],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"error: --demo-input {bad}:2: \"text\" holds a lone surrogate '\\udc00' at "
                                  "character 2"), proc.stderr


def test_demo_input_too_small_for_the_demo_tokenizer_names_the_input_not_vocab_size(tmp_path):
    # It said "lower --vocab-size" (or, before, quoted SentencePiece's internal check): the demo's tokenizer size is
    # fixed, and pretrain_gpt.py's --vocab-size is another thing.
    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps({"text": f"doc {i}: the cat sat"}) + "\n" for i in range(5)))
    proc = subprocess.run([sys.executable, os.path.join(REPO, "pretrain_gpt.py"), "--demo", "--demo-dir",
                           str(tmp_path / "demo"), "--demo-input", str(small)],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith(f"error: --demo-input {small}: too little text for the demo's 1024-token tokenizer "
                                  "(it holds at most "), proc.stderr
    assert proc.stderr.endswith("pieces); give more documents\n"), proc.stderr


def test_a_world_that_does_not_fit_a_legacy_checkpoints_layout_says_where_the_sizes_came_from(tmp_path):
    """--use-checkpoint-args takes a legacy checkpoint's TP / PP (it loads under them only): the error named
    --tensor-model-parallel-size 2, which the user never typed, and no way to change it."""
    from megatron_core.checkpoint.convert import main as convert
    from tests.hf_testing import tiny_hf_gpt2

    tiny_hf_gpt2().save_pretrained(tmp_path / "hf")
    assert convert(["--model-type", "GPT", "--loader", "hf", "--saver", "core", "--load-dir", str(tmp_path / "hf"),
                    "--save-dir", str(tmp_path / "ckpt"), "--target-tensor-parallel-size", "2"]) == 0
    argv = ["--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "2", "--lr", "1e-3",
            "--eval-iters", "0", "--num-workers", "0", "--mock-data", "--load", str(tmp_path / "ckpt"), "--finetune",
            "--use-checkpoint-args"]
    proc = subprocess.run([sys.executable, os.path.join(REPO, "pretrain_gpt.py"), *argv],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("error: world size 1 is not divisible by --tensor-model-parallel-size 2 x "), \
        proc.stderr
    assert proc.stderr.endswith("(with --use-checkpoint-args, a legacy checkpoint's own sizes: it loads under them "
                                "only; re-shard it with tools/checkpoint/convert.py --target-tensor-parallel-size / "
                                "--target-pipeline-parallel-size to change them)\n"), proc.stderr


def test_a_demo_dir_that_is_a_file_or_under_one_is_one_line(tmp_path):
    """--demo-dir naming a file (or a path under one) was os.makedirs' FileExistsError / NotADirectoryError
    traceback on rank 0."""
    blocker = tmp_path / "afile"
    blocker.write_text("")
    for demo_dir, expected in ((blocker, f"error: --demo-dir {blocker} is an existing file, not a directory; give a "
                                         f"directory (it is created if missing)\n"),
                               (blocker / "sub", f"error: --demo-dir {blocker / 'sub'} is not writable (Not a "
                                                 f"directory); give a directory this job can write to\n")):
        proc = subprocess.run([sys.executable, os.path.join(REPO, "pretrain_gpt.py"), "--demo", "--demo-dir",
                               str(demo_dir)], capture_output=True, text=True, timeout=60, cwd=REPO)
        assert proc.returncode == 2 and proc.stderr == expected, proc.stderr
