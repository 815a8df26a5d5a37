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
