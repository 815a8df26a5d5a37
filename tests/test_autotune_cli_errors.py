"""tools/autotune.py: input the search cannot act on is one line before any minutes are spent, and a
failed trial says why.

A tokenizer larger than --vocab-size was searched for (about half a minute of profiling), then every
trial failed and the tool printed "trial ... failed: ['=====...']" (torchrun's report border, the last
stderr line) and wrote the failing launch line as the best layout. An unknown flag pointed at
``pretrain_gpt.py --help``.
"""
import re

from megatron_core.autotune import cli
from megatron_core.tokenizer.train_tokenizer import train_sentencepiece

FLAGS = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
         "--global-batch-size", "4", "--lr", "1e-3", "--train-iters", "2", "--eval-iters", "0", "--num-workers", "0",
         "--world-size", "2", "--memory-per-device", "1", "--no-offload", "--micro-batch-sizes", "2"]


def test_a_tokenizer_larger_than_the_vocab_size_is_refused_before_the_search(tmp_path, capsys):
    (tmp_path / "corpus.txt").write_text("def main(argv):\n    return len(argv) + 1\n" * 200, encoding="utf-8")
    model = train_sentencepiece([str(tmp_path / "corpus.txt")], str(tmp_path / "tok"), vocab_size=300)
    code = cli.main(FLAGS + ["--mock-data", "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", model,
                             "--vocab-size", "299", "--output", str(tmp_path / "run.sh")])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == "" and not (tmp_path / "run.sh").exists(), captured
    assert captured.err.endswith(f"error: the tokenizer (SentencePieceTokenizer, {model}) has 300 tokens but "
                                 f"--vocab-size is 299; raise --vocab-size to at least 300 or leave it out (the "
                                 f"model then takes the tokenizer's size)\n"), captured.err
    assert "profiling" not in captured.err


def test_when_every_trial_fails_the_error_is_the_runs_own_line_and_nothing_is_written(tmp_path, capsys):
    """Data tokenized with a 300-token SentencePiece model, trained with a NullTokenizer of 128 ids: the
    search cannot see it (it reads no data), every trial stops at the first out-of-vocabulary id."""
    from megatron_core.datasets.preprocess_data import main as preprocess

    (tmp_path / "corpus.jsonl").write_text("".join(f'{{"text": "def f{i}(x):\\n    return x * {i} + {i % 7}"}}\n'
                                                   for i in range(400)), encoding="utf-8")
    model = train_sentencepiece([str(tmp_path / "corpus.jsonl")], str(tmp_path / "tok"), vocab_size=300)
    assert preprocess(["--input", str(tmp_path / "corpus.jsonl"), "--tokenizer-type", "SentencePieceTokenizer",
                       "--tokenizer-model", model, "--output-prefix", str(tmp_path / "data"), "--workers", "1"]) == 0
    code = cli.main(FLAGS + ["--vocab-size", "100", "--make-vocab-size-divisible-by", "64", "--data-path",
                             str(tmp_path / "data_text_document"), "--trials", "1", "--trial-iters", "2",
                             "--output", str(tmp_path / "run.sh")])
    captured = capsys.readouterr()
    assert code == 2 and not (tmp_path / "run.sh").exists(), captured.out[-2000:]
    # Every rank of a trial meets an id of its own: the line is the first failing rank's ("error: token id ...")
    # or, when a peer published first, a rank's line naming that peer's ("error: global rank 1 (...) raised
    # ValueError: token id ..."); which rank is first is a race, so either form is the run's own line.
    own = r"error: (global rank \d \(.*\) raised ValueError: )?token id \d+ is outside the vocabulary \[0, 128\)"
    assert re.search(rf"failed: {own}", captured.out), captured.out[-2000:]
    last = captured.err.strip().splitlines()[-1]
    assert re.match(rf"error: every trial failed, so no layout is written; the first: {own}", last), last


def test_failure_line_reads_through_torchrun_s_report():
    report = ("error: --lr is required\n[W] torchrun noise\n=====\nRoot Cause (first observed failure):\n"
              "  traceback : error: --lr is required\n=====\n")
    assert cli.failure_line(report) == "error: --lr is required"
    assert cli.failure_line("Traceback (most recent call last):\n  boom\nRuntimeError: x\n====\n") == "RuntimeError: x"


def test_failure_line_is_the_first_failing_rank_s_not_a_peer_s():
    """Since a rank stopped by a peer prints its own one error: line (pretrain_gpt.py), that line can come after
    the root one; the trial then reported "error: global rank 0 ... raised ...; this rank stopped on ..." or
    "error: a peer was lost ..." instead of the cause, as torchrun's Root Cause names it."""
    cause = "error: token id 250 is outside the vocabulary [0, 128)"
    peer = ("error: global rank 0 (rank 0/2: tp 0/1 pp 0/1 dp 0/2) raised ValueError: token id 250 ...; "
            "this rank stopped on: x")
    report = (f"{cause}\n{peer}\n" + "=" * 20 + "\nFailures:\n[1]:\n  rank      : 1 (local_rank: 1)\n"
              f"  traceback : {peer}\n" + "-" * 20 + "\nRoot Cause (first observed failure):\n[0]:\n"
              f"  rank      : 0 (local_rank: 0)\n  traceback : {cause}\n" + "=" * 20 + "\n")
    assert cli.failure_line(report) == cause
    killed = ("error: a peer was lost: global rank 0 ...\n" + "-" * 20 + "\nRoot Cause (first observed failure):\n"
              "[0]:\n  exitcode  : -9 (pid: 2158)  (SIGKILL)\n  error_file: <N/A>\n"
              "  traceback : Signal 9 (SIGKILL) received by PID 2158\n" + "=" * 20 + "\n")
    assert cli.failure_line(killed) == "traceback : Signal 9 (SIGKILL) received by PID 2158"


def test_an_unknown_flag_points_at_the_tools_own_help(capsys):
    assert cli.main(FLAGS + ["--vocab-size", "255", "--mock-data", "--bogus"]) == 2
    assert capsys.readouterr().err == "error: unrecognized arguments: --bogus (see python tools/autotune.py --help)\n"


def test_no_layout_in_memory_names_the_smallest_need(capsys):
    """--memory-per-device 0.0001 said 'no layout of 2 ranks fits in 0.000 GiB per rank'."""
    assert cli.main(FLAGS + ["--mock-data", "--vocab-size", "255", "--memory-per-device", "0.0001"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: no layout of 2 ranks fits in 0.1 MiB per rank; the smallest, tp"), last
    assert last.endswith(" MiB (raise --memory-per-device, or give more ranks with --world-size)"), last


def test_progress_bars_only_on_a_terminal(capsys):
    """Redirected to a file (a job log), the bars wrote every update as a \\r-joined line."""
    assert cli.main(FLAGS + ["--mock-data", "--vocab-size", "255", "--top", "1"]) == 0
    err = capsys.readouterr().err
    assert "profiling layers" not in err and "predicting" not in err and "\r" not in err, err[-500:]


def test_trials_run_in_the_callers_directory(tmp_path, capsys, monkeypatch):
    """Relative --data-path / --tokenizer-model, as a user types them: the search read them from the working
    directory, but every trial ran in the checkout and failed with "missing 'data_text_document.idx'"."""
    from megatron_core.datasets.preprocess_data import main as preprocess

    (tmp_path / "corpus.jsonl").write_text("".join(f'{{"text": "def f{i}(x):\\n    return x * {i} + {i % 7}"}}\n'
                                                   for i in range(400)), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    train_sentencepiece(["corpus.jsonl"], "tok", vocab_size=300)
    assert preprocess(["--input", "corpus.jsonl", "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model",
                       "tok.model", "--output-prefix", "data", "--workers", "1"]) == 0
    code = cli.main(FLAGS + ["--data-path", "data_text_document", "--split", "90,10,0", "--tokenizer-type",
                             "SentencePieceTokenizer", "--tokenizer-model", "tok.model", "--trials", "1",
                             "--trial-iters", "2", "--output", "run.sh"])
    captured = capsys.readouterr()
    assert code == 0 and "failed" not in captured.out and "measured nan" not in captured.out, captured.out[-2000:]
    assert (tmp_path / "run.sh").exists()
