"""megatron_core.errors: the one-line report of a ConfigError on rank 0, torchrun's error file, and the
excepthook that gives a user's own script the same line instead of a traceback.

The hook is checked in a fresh interpreter (a real uncaught exception); the reporting functions in
this process. tests/test_failures_launch.py checks the same line under a real torchrun.
"""
import importlib
import json
import os
import subprocess
import sys

import pytest

from megatron_core.errors import ConfigError, record_for_launcher, report_line

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_report_line_prints_on_rank_zero_or_every_rank(capsys, monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)
    report_line("error: a", 0)
    report_line("error: b", 1)
    report_line("error: c", 1, every_rank=True)
    assert capsys.readouterr().err.splitlines() == ["error: a", "error: c"]


def test_every_rank_hands_the_line_to_torchrun_once(tmp_path, capsys, monkeypatch):
    path = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(path))
    report_line("error: first", 1)  # a rank that prints nothing still records the line
    assert capsys.readouterr().err == ""
    assert json.loads(path.read_text())["message"] == "error: first"
    record_for_launcher("error: second")  # a file already written (by torchrun's own handler) stays
    assert json.loads(path.read_text())["message"] == "error: first"


def _uncaught(raise_line: str, rank: str) -> subprocess.CompletedProcess:
    code = ("from megatron_core.errors import ConfigError, report_uncaught_config_errors\n"
            "report_uncaught_config_errors()\nreport_uncaught_config_errors()\n" + raise_line + "\n")
    env = {k: v for k, v in os.environ.items() if k != "TORCHELASTIC_ERROR_FILE"}
    env.update(PYTHONPATH=REPO, RANK=rank)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)


def test_an_uncaught_config_error_is_one_line_on_rank_zero():
    proc = _uncaught("raise ConfigError('--foo 3 is bad; use --foo 2')", "0")
    assert proc.returncode == 1 and proc.stderr == "error: --foo 3 is bad; use --foo 2\n"
    proc = _uncaught("raise ConfigError('--foo 3 is bad; use --foo 2')", "1")
    assert proc.returncode == 1 and proc.stderr == ""


def test_other_uncaught_exceptions_keep_their_traceback():
    proc = _uncaught("raise KeyError('a bug of ours')", "0")
    assert proc.returncode == 1
    assert proc.stderr.startswith("Traceback (most recent call last):")
    assert proc.stderr.rstrip().endswith("KeyError: 'a bug of ours'")
    assert issubclass(ConfigError, ValueError)


ENTRY_POINTS = [("megatron_core.inference.text_generation_cli", "run_text_generation.py"),
                ("megatron_core.inference.server", "run_text_generation_server.py"),
                ("megatron_core.inference.client", "text_generation_cli.py"),
                ("megatron_core.checkpoint.convert", "convert.py"),
                ("megatron_core.datasets.preprocess_data", "preprocess_data.py"),
                ("megatron_core.tokenizer.train_tokenizer", "train_tokenizer.py"),
                ("megatron_core.engine.consolidate", "zero_to_fp32.py")]


@pytest.mark.parametrize("module,script", ENTRY_POINTS, ids=[script for _, script in ENTRY_POINTS])
def test_the_tools_report_a_bad_flag_in_one_line(module, script, capsys, monkeypatch):
    """Each tool's parser error is one line on rank 0 and exit status 2, as pretrain_gpt.py's; argparse's own
    printed the whole usage first (57 lines for run_text_generation.py, on every rank under torchrun)."""
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)
    monkeypatch.setattr(sys, "argv", [script])
    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as exit_info:
        main(["--fp32-residual-connections"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"{script}: error: ") and err[0].endswith(f"(see python {script} --help)"), err
    monkeypatch.setenv("RANK", "1")  # the other ranks of a torchrun print nothing
    with pytest.raises(SystemExit):
        main(["--fp32-residual-connections"])
    assert capsys.readouterr().err == ""
