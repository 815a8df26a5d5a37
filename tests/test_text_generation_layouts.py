"""tools/run_text_generation.py under a pipeline split other than the training run's.

A run trained with block recompute of 2 layers per chunk, served at PP 4 (one layer per chunk), was
refused ("recompute_num_layers (2) exceeds the layers of a pipeline chunk (1)"): recompute saves
activations for backward, which generation never runs. Greedy tokens at PP 4 equal those at PP 1.
"""
import json
import os
import subprocess
import sys

import pytest
from harness import run_distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(REPO, "tools", "run_text_generation.py")
ARGS = ["--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
        "--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "2", "--lr", "0.01",
        "--mock-data", "--vocab-size", "255", "--eval-iters", "0", "--num-workers", "0",
        "--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", "2"]


def _generate(load, world, out):
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world), TOOL,
              "--pipeline-model-parallel-size", str(world)] if world > 1 else [sys.executable, TOOL]
    proc = subprocess.run([*launch, "--load", str(load), "--prompt-tokens", "5,17,99", "--tokens-to-generate", "4",
                           "--top_k", "1", "--output", str(out)], capture_output=True, text=True, timeout=180,
                          cwd=REPO, env={**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.load(open(out))["tokens"]


@pytest.mark.parametrize("ckpt_format", ["torch_dist", "torch"])
def test_block_recompute_checkpoint_generates_under_one_layer_chunks(ckpt_format, tmp_path):
    from test_pretrain import _train
    run_distributed(_train, 1, ARGS + ["--save", str(tmp_path / "ckpt"), "--ckpt-format", ckpt_format], timeout=120)
    serial = _generate(tmp_path / "ckpt", 1, tmp_path / "pp1.json")
    assert _generate(tmp_path / "ckpt", 4, tmp_path / "pp4.json") == serial
