"""A Hugging Face model converted by tools/checkpoint/convert.py trains from pretrain_gpt.py --load.

The converted checkpoint holds only the model (no optimizer, RNG or scheduler). Its validation
loss at iteration 0 under TP=2 must equal the Hugging Face model's own loss on the same samples.
"""
import pytest
import torch
import torch.nn.functional as F
from harness import run_distributed

import pretrain_gpt
from megatron_core.checkpoint.convert import main as convert
from megatron_core.datasets import GPTDatasetConfig, build_gpt_datasets
from tests.hf_testing import tiny_hf_gpt2

SEQ, MICRO, GLOBAL, EVAL_ITERS, TRAIN_ITERS, SEED = 32, 2, 4, 2, 2, 1234
ARGS = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", str(SEQ),
        "--max-position-embeddings", str(SEQ), "--openai-gelu", "--mock-data", "--vocab-size", "255",
        "--micro-batch-size", str(MICRO), "--global-batch-size", str(GLOBAL), "--train-iters", str(TRAIN_ITERS),
        "--lr", "1e-4", "--eval-iters", str(EVAL_ITERS), "--eval-at-start", "--log-interval", "1",
        "--num-workers", "0", "--seed", str(SEED), "--tensor-model-parallel-size", "2"]


def _train(argv):
    result = pretrain_gpt.main(argv)
    return result if result.is_logging_rank else None


def _hf_validation_loss(hf) -> float:
    """The HF model's mean token loss on the validation samples every evaluation uses."""
    config = GPTDatasetConfig(seq_length=SEQ, eod=255, seed=SEED, mock=True, mock_vocab_size=256)
    _, valid, _ = build_gpt_datasets(config, [TRAIN_ITERS * GLOBAL, EVAL_ITERS * GLOBAL, 0])
    samples = [valid[i] for i in range(EVAL_ITERS * GLOBAL)]
    tokens = torch.stack([s["tokens"] for s in samples])
    labels = torch.stack([s["labels"] for s in samples])
    with torch.no_grad():
        logits = hf(tokens).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(), labels.reshape(-1)).item()


@pytest.mark.parametrize("finetune", [True, False], ids=["finetune", "plain-load"])
def test_converted_hf_checkpoint_loads_and_trains(finetune, tmp_path):
    hf = tiny_hf_gpt2(vocab_size=256, hidden=32, layers=2, heads=4, positions=SEQ)
    hf.save_pretrained(tmp_path / "hf")
    assert convert(["--model-type", "GPT", "--loader", "hf", "--saver", "core", "--load-dir", str(tmp_path / "hf"),
                    "--save-dir", str(tmp_path / "ckpt"), "--target-tensor-parallel-size", "2"]) == 0
    argv = ARGS + ["--load", str(tmp_path / "ckpt")] + (["--finetune"] if finetune else [])
    result = [r for r in run_distributed(_train, 2, argv, timeout=120) if r is not None][0]
    start = min(result.val_losses)
    assert result.val_losses[start] == pytest.approx(_hf_validation_loss(hf), rel=1e-5)
    assert result.iteration == TRAIN_ITERS and len(result.losses) == TRAIN_ITERS - start
