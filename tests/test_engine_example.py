"""examples/engine: the converted transformers script runs under a real ``torchrun`` with 2 ranks.

It trains a few ZeRO-2 steps from ``examples/engine/ds_config.json`` on the bytes of the README, saves
a checkpoint, and ``tools/zero_to_fp32.py`` turns it into a Hugging Face folder that loads.
"""

import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_example_script_under_torchrun(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        os.path.join(ROOT, "examples", "engine", "train_causal_lm.py"),
        "--deepspeed",
        "--deepspeed_config",
        os.path.join(ROOT, "examples", "engine", "ds_config.json"),
        "--text",
        os.path.join(ROOT, "README.md"),
        "--max-steps",
        "8",
        "--save-dir",
        str(tmp_path / "ckpt"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "epoch 0: 4 optimizer steps" in proc.stdout and "[engine] step=4" in proc.stdout, proc.stdout
    assert (tmp_path / "ckpt" / "latest").read_text() == "global_step4"
    tool = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "zero_to_fp32.py"), str(tmp_path / "ckpt"), str(tmp_path / "hf")],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert tool.returncode == 0, tool.stdout + tool.stderr
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))
    logits = model(input_ids=torch.arange(16).view(1, 16)).logits
    assert logits.shape == (1, 16, 256) and torch.isfinite(logits).all()


def test_example_script_with_a_misspelt_key_ends_in_one_line(tmp_path):
    """A user's script that does not catch ConfigError still ends with one ``error:`` line, no traceback."""
    config = tmp_path / "ds_config.json"
    config.write_text('{"train_batch_size": 4, "train_micro_batch_size_per_gpu": 4, '
                      '"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}, "gradient_clippin": 1.0}')
    cmd = [sys.executable, os.path.join(ROOT, "examples", "engine", "train_causal_lm.py"), "--deepspeed",
           "--deepspeed_config", str(config), "--text", os.path.join(ROOT, "README.md"), "--max-steps", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=str(tmp_path))
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    # torch.distributed prefixes a rank's stderr lines with "[rank0]: "
    errors = [line for line in proc.stderr.splitlines() if line.split("]: ", 1)[-1].startswith("error:")]
    assert len(errors) == 1 and "gradient_clippin" in errors[0] and "gradient_clipping" in errors[0], proc.stderr
