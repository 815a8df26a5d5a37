"""The package layout: only ``megatron_core`` is installed, the library never imports app code, and it
works from a directory that has its own ``tools/`` and ``models/`` packages (a Megatron-LM checkout)."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
APP_PACKAGES = {"tools", "models", "pretrain_gpt", "tests", "bench", "scripts"}


def _imported_top_levels(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_library_imports_no_app_code():
    offenders = {str(p.relative_to(ROOT)): sorted(_imported_top_levels(p) & APP_PACKAGES)
                 for p in (ROOT / "megatron_core").rglob("*.py")}
    assert {k: v for k, v in offenders.items() if v} == {}


def _foreign_checkout(tmp_path: Path) -> Path:
    """A directory whose own ``tools`` and ``models`` packages refuse to be imported."""
    for name in ("tools", "models"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"raise ImportError('the foreign {name} package was imported')\n")
    return tmp_path


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_library_and_commands_work_beside_foreign_tools_and_models(tmp_path):
    cwd = _foreign_checkout(tmp_path)
    code = ("import megatron_core.models.gpt, megatron_core.checkpoint.convert, megatron_core.training.demo, "
            "megatron_core.datasets.preprocess_data, megatron_core.tokenizer.train_tokenizer; "
            "from megatron_core.models.presets import llama_config; print(llama_config(num_layers=1).activation)")
    done = _run(["-c", code], cwd)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "swiglu"
    for script in ("tools/preprocess_data.py", "tools/train_tokenizer.py", "tools/checkpoint/convert.py",
                   "pretrain_gpt.py"):
        done = _run([str(ROOT / script), "--help"], cwd)
        assert done.returncode == 0 and "usage:" in done.stdout, (script, done.stderr[-2000:])


def test_wheel_installs_only_the_library(tmp_path):
    pytest.importorskip("setuptools")
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (wheel,) = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_levels = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top_levels == {"megatron_core"}
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "mcore-preprocess-data = megatron_core.datasets.preprocess_data:main" in text


def test_named_architectures_match_their_model_cards():
    sys.path.insert(0, str(ROOT))
    try:
        from models import ARCHITECTURES
    finally:
        sys.path.remove(str(ROOT))
    shapes = {name: (c.num_layers, c.hidden_size, c.num_attention_heads, c.num_query_groups, c.ffn_hidden_size,
                     c.activation)
              for name, c in ((n, f()) for n, f in ARCHITECTURES.items())}
    assert shapes["gpt2-small"] == (12, 768, 12, 12, 3072, "gelu_tanh")
    assert shapes["gpt2-xl"] == (48, 1600, 25, 25, 6400, "gelu_tanh")
    assert shapes["llama2-7b"] == (32, 4096, 32, 32, 11008, "swiglu")
    assert shapes["llama2-13b"] == (40, 5120, 40, 40, 13824, "swiglu")
    assert shapes["llama3-8b"] == (32, 4096, 32, 8, 14336, "swiglu")
    assert ARCHITECTURES["llama3-8b"]().rotary_base == 500000.0
    assert ARCHITECTURES["gpt2-small"](num_layers=2).num_layers == 2
