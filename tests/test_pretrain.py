"""pretrain_gpt.py end to end: loss falls, parallel layouts reproduce the serial losses, log format, demo."""
import math
import os
import re
import subprocess
import sys
import time

import pytest
from harness import run_distributed

import pretrain_gpt
from megatron_core.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# 256 tokens (NullTokenizer 255 + EOD): the padded vocabulary is 256 at TP 1 and 2 alike, so every
# layout trains the same model. Dropout is off so that the layouts see the same computation.
TINY = ["--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
        "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "20", "--lr", "3e-3",
        "--lr-warmup-iters", "2", "--lr-decay-style", "cosine", "--min-lr", "3e-4", "--mock-data",
        "--vocab-size", "255", "--log-interval", "5", "--eval-interval", "10", "--eval-iters", "2",
        "--num-workers", "0", "--hidden-dropout", "0", "--attention-dropout", "0", "--seed", "7"]


def _train(argv):
    result = pretrain_gpt.main(argv)
    return result if result.is_logging_rank else None


def _refused(argv):
    """The ConfigError line a run stops with (None when it runs)."""
    try:
        pretrain_gpt.main(argv)
    except ConfigError as exc:
        return str(exc)
    return None


def _logged(results):
    """The result of the one rank that logs (the last pipeline stage's first TP and DP rank)."""
    logged = [r for r in results if r is not None]
    assert len(logged) == 1, f"{len(logged)} ranks logged"
    return logged[0]


@pytest.fixture(scope="module")
def serial():
    return _logged(run_distributed(_train, 1, TINY, timeout=120))


def test_loss_falls_and_lines_follow_megatron(serial, capfd):
    began = time.perf_counter()
    result = _logged(run_distributed(_train, 1, TINY, timeout=120))
    wall_ms = (time.perf_counter() - began) * 1000.0
    out = capfd.readouterr().out
    assert result.iteration == 20 and result.consumed_train_samples == 160 and len(result.losses) == 20
    assert sum(result.losses[-5:]) / 5 < sum(result.losses[:5]) / 5 - 0.25, result.losses
    assert result.losses == serial.losses  # the same run twice gives the same losses
    lines = [line for line in out.splitlines() if re.search(r"iteration +\d+/ +20 \|", line)]
    assert len(lines) == 4
    # Megatron-LM's parameter count line, printed once by the first data-parallel rank.
    assert len(re.findall(r"^ > number of parameters on \(tensor, pipeline\) model parallel rank \(0, 0\): \d+$",
                          out, re.M)) == 1
    pattern = (r"^ \[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] iteration +20/ +20 \| consumed samples: +160 \| "
               r"elapsed time per iteration \(ms\): [\d.]+ \| throughput per rank: [\d.]+ tokens/s, [\d.]+ TFLOP/s \| "
               r"learning rate: \d\.\d{6}E[+-]\d\d \| global batch size: +8 \| lm loss: \d\.\d{6}E[+-]\d\d \| "
               r"loss scale: 1\.0 \| grad norm: [\d.]+ \| number of skipped iterations: +0 \| "
               r"number of nan iterations: +0 \|$")
    assert re.match(pattern, lines[-1]), lines[-1]
    # Each line's time per iteration is its interval's mean: 5 of them fit in the whole run's wall time.
    per_iteration = [float(re.search(r"per iteration \(ms\): ([\d.]+)", line).group(1)) for line in lines]
    assert all(0 < 5 * ms < wall_ms for ms in per_iteration), (per_iteration, wall_ms)
    # The logged loss is the mean over the interval's iterations, to the printed precision.
    logged = float(re.search(r"lm loss: (\S+) \|", lines[-1]).group(1))
    assert logged == pytest.approx(sum(result.losses[15:]) / 5, rel=1e-6)
    assert "learning rate: 3.000000E-04" in lines[-1]  # cosine decay ends at --min-lr
    val = re.search(r"validation loss at iteration 20 \| lm loss value: (\S+) \| lm loss PPL: (\S+) \|", out)
    assert val and float(val.group(1)) == pytest.approx(result.val_losses[20], rel=1e-6)
    assert float(val.group(2)) == pytest.approx(2.718281828 ** result.val_losses[20], rel=1e-5)


@pytest.mark.parametrize("world,extra", [
    (4, ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]),
    (2, ["--use-distributed-optimizer"]),
], ids=["tp2-pp2", "dp2-zero1"])
def test_parallel_layouts_reproduce_serial_losses(serial, world, extra):
    result = _logged(run_distributed(_train, world, TINY + extra, timeout=180))
    assert len(result.losses) == len(serial.losses)
    for i, (got, want) in enumerate(zip(result.losses, serial.losses, strict=True), start=1):
        assert abs(got - want) <= 1e-5 * abs(want), f"iteration {i}: {got} vs serial {want}"
    assert result.val_losses[20] == pytest.approx(serial.val_losses[20], rel=1e-5)


def test_torchrun_launch_tp2():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(REPO, "pretrain_gpt.py"), *TINY, "--train-iters", "4", "--log-interval", "2",
           "--eval-iters", "1", "--tensor-model-parallel-size", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tensor parallel 2, pipeline parallel 1, data parallel 1" in proc.stdout
    lines = re.findall(r"iteration +(\d+)/ +4 \| consumed samples: +(\d+) \|", proc.stdout)
    assert lines == [("2", "16"), ("4", "32")], proc.stdout  # printed once, by the logging rank
    assert "validation loss at iteration 4 | lm loss value:" in proc.stdout


def test_demo_pipeline_runs_end_to_end(tmp_path, capfd):
    small = ["--demo", "--demo-dir", str(tmp_path), "--num-layers", "1", "--hidden-size", "32",
             "--num-attention-heads", "2", "--seq-length", "32", "--max-position-embeddings", "32",
             "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "6", "--eval-iters", "2",
             "--log-interval", "3", "--save-interval", "6", "--tensorboard-dir", str(tmp_path / "tb"),
             "--lr-warmup-iters", "1"]  # the demo warms up over 20 of its 500 iterations
    result = _logged(run_distributed(_train, 1, small, timeout=120))
    out = capfd.readouterr().out
    assert sorted(result.val_losses) == [0, 6] and result.saved_iterations == [6]
    assert "demo: validation lm loss" in out and "-> " in out
    assert re.search(r"> demo: wrote \d+ standard-library modules \([\d.]+ MB\) to ", out)
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:  # without the package: one line, and training goes on
        assert out.count("tensorboard is not installed") == 1
    assert (tmp_path / "checkpoints" / "latest_checkpointed_iteration.txt").read_text() == "6"
    # The files hold what the demo promises: the corpus, tokenized with the trained tokenizer, one
    # document per JSONL line with EOD appended; the run's losses are finite.
    import json

    import numpy as np

    from megatron_core.datasets import IndexedDataset
    from megatron_core.tokenizer.build import build_tokenizer

    tokenizer = build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(tmp_path / "tokenizer.model"))
    assert tokenizer.vocab_size == 1024
    texts = [json.loads(line)["text"] for line in (tmp_path / "corpus.jsonl").read_text().splitlines()]
    dataset = IndexedDataset(str(tmp_path / "stdlib_text_document"))
    assert dataset.num_documents == len(texts) > 10
    for d in (0, len(texts) // 2, len(texts) - 1):
        assert np.asarray(dataset[d]).tolist() == tokenizer.tokenize(texts[d]) + [tokenizer.eod], f"document {d}"
    assert all(math.isfinite(v) and 0 < v < 10 for v in result.losses + list(result.val_losses.values()))


def _matmul_weights(preset):
    """Elements of the 2-D weights a tiny model multiplies by: every matrix but the embedding tables
    (a lookup, not a matmul); the output layer counts once, tied to the word embedding or not."""
    from megatron_core import parallel_state
    from megatron_core.models.gpt import GPTModel
    from megatron_core.models.presets import gpt2_config, llama_config

    make = gpt2_config if preset == "gpt2" else llama_config
    extra = {} if preset == "gpt2" else dict(num_query_groups=2, ffn_hidden_size=48)
    config = make(num_layers=2, hidden_size=32, num_attention_heads=4, **extra)
    ps = parallel_state.initialize_model_parallel(1)
    model = GPTModel(config, 128, 8, parallel_state=ps, make_vocab_size_divisible_by=64)
    n = sum(p.numel() for name, p in model.named_parameters() if p.dim() == 2 and "embedding" not in name)
    if config.share_embeddings_and_output_weights:
        n += 128 * 32  # the output projection reuses the word embedding
    return n, config.ffn_hidden_size, config.num_query_groups, config.kv_channels


@pytest.mark.parametrize("preset", ["gpt2", "llama"])
def test_flops_count_every_matmul_weight_of_the_model(preset):
    # Megatron-LM's (and PaLM's) count: 6 FLOPs per weight per token forward + backward, plus
    # 12 * layers * seq * (heads * kv_channels) per token for the attention scores and values.
    from megatron_core.training.flops import flops_per_iteration

    (n, ffn, groups, kv), = run_distributed(_matmul_weights, 1, preset, timeout=60)
    per_token = 6 * n + 12 * 2 * 8 * 4 * kv
    assert flops_per_iteration(3, 8, 2, 32, ffn, 4, kv, groups, preset == "llama", 128) == 3 * 8 * per_token


def _seeded_streams():
    import random

    import numpy as np

    from megatron_core import parallel_state
    from megatron_core.training.pretrain import set_seeds

    ps = parallel_state.initialize_model_parallel(1, 2)
    set_seeds(7, parallel_state=ps)
    return ps.pp_rank, random.random(), float(np.random.rand())


def test_set_seeds_seeds_python_and_numpy_per_pipeline_stage():
    # Megatron-LM's _set_random_seed: Python's and NumPy's global streams (which user data code may
    # draw from) start at seed + 100 x pipeline rank.
    import random

    import numpy as np

    for pp_rank, python_draw, numpy_draw in run_distributed(_seeded_streams, 2, timeout=60):
        assert python_draw == random.Random(7 + 100 * pp_rank).random(), pp_rank
        assert numpy_draw == np.random.RandomState(7 + 100 * pp_rank).rand(), pp_rank


def test_log_line_numbers_are_the_intervals_means_and_rates():
    # Three iterations of 8 samples (32 tokens, 3 TFLOP each) in 0.25 + 0.75 + 0 s on 2 ranks: 333.3 ms
    # per iteration, 24 * 32 / 1 s / 2 = 384 tokens/s and 24 * 3 / 1 s / 2 = 36 TFLOP/s per rank; the
    # loss is the mean over the iterations that advanced (the skipped one is counted, not averaged).
    from megatron_core.training.config import LoggingConfig
    from megatron_core.training.training_log import TrainingLog

    printed = []
    log = TrainingLog(LoggingConfig(log_interval=3), 6, printed.append, None, 3e12, 32, 2)
    common = dict(grad_norm=1.5, num_zeros=None, learning_rate=1e-3, loss_scale=1.0, batch_size=8)
    assert log.add(iteration=1, losses={"lm loss": 2.0}, skipped=False, consumed_samples=8, seconds=0.25,
                   **common) is None
    assert log.add(iteration=2, losses={"lm loss": 4.0}, skipped=False, consumed_samples=16, seconds=0.75,
                   **common) is None
    line = log.add(iteration=3, losses={"lm loss": 100.0}, skipped=True, consumed_samples=16, seconds=0.0,
                   **common)
    assert printed == [line]
    assert re.search(r"iteration +3/ +6 \| consumed samples: +16 \| elapsed time per iteration \(ms\): 333\.3 \| "
                     r"throughput per rank: 384\.0 tokens/s, 36\.0000 TFLOP/s \|", line), line
    assert "| lm loss: 3.000000E+00 |" in line and "| grad norm: 1.500 |" in line
    assert "number of skipped iterations:   1 | number of nan iterations:   0 |" in line
    # The next interval starts from zero: a NaN loss is counted (not averaged), the last num zeros and
    # loss scale are shown.
    common.update(loss_scale=512.0)
    log.add(iteration=4, losses={"lm loss": float("nan")}, skipped=False, consumed_samples=24, seconds=0.5,
            **common)
    log.add(iteration=5, losses={"lm loss": 6.0}, skipped=False, consumed_samples=32, seconds=0.5, **common)
    line = log.add(iteration=6, losses={"lm loss": 8.0}, skipped=False, consumed_samples=40, seconds=0.5,
                   **dict(common, num_zeros=3))
    assert re.search(r"elapsed time per iteration \(ms\): 500\.0 \| throughput per rank: 256\.0 tokens/s, "
                     r"24\.0000 TFLOP/s \|", line), line
    # Megatron-LM's training_log formats the count as ' num zeros: {:.1f} |' (a float, like the loss scale).
    assert "| lm loss: 7.000000E+00 | loss scale: 512.0 | grad norm: 1.500 | num zeros: 3.0 |" in line, line
    assert "number of skipped iterations:   0 | number of nan iterations:   1 |" in line
    # One iteration per line: its own time and loss; the line ends with the nan count, as Megatron-LM's
    # (the --timing-log-level block follows it on lines of its own).
    log = TrainingLog(LoggingConfig(log_interval=1), 6, None, None, 3e12, 32, 1)
    line = log.add(iteration=1, losses={"lm loss": 1.5}, skipped=False, consumed_samples=8, seconds=0.25,
                   **common)
    assert "elapsed time per iteration (ms): 250.0 |" in line and "| lm loss: 1.500000E+00 |" in line
    assert line.endswith("number of nan iterations:   0 |"), line


def _write_corpus(prefix, num_docs, seed):
    import numpy as np

    from megatron_core.datasets import IndexedDatasetBuilder

    rng = np.random.RandomState(seed)
    with IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.uint16) as builder:
        for _ in range(num_docs):
            tokens = rng.randint(0, 255, size=int(rng.randint(20, 80))).tolist() + [255]  # NullTokenizer's EOD
            builder.add_document(tokens, [len(tokens)])
        builder.finalize(str(prefix) + ".idx")


def test_per_split_data_paths_train_on_all_of_their_data(tmp_path):
    """--train-data-path A --valid-data-path B (Megatron-LM's flags): training sees every document of A,
    as --data-path A --split 100,0,0 does (the same losses), and validation reads B."""
    a, b = str(tmp_path / "a_text_document"), str(tmp_path / "b_text_document")
    _write_corpus(a, 60, seed=1)
    _write_corpus(b, 20, seed=2)
    base = [x for x in TINY if x != "--mock-data"] + ["--train-iters", "6", "--eval-interval", "6",
                                                     "--data-cache-path", str(tmp_path / "cache")]
    per_split = _logged(run_distributed(_train, 1, base + ["--train-data-path", a, "--valid-data-path", b],
                                        timeout=120))
    one_path = _logged(run_distributed(_train, 1, base + ["--data-path", a, "--split", "100,0,0", "--eval-iters", "0"],
                                       timeout=120))
    assert per_split.losses == one_path.losses and len(per_split.losses) == 6
    assert sorted(per_split.val_losses) == [6] and math.isfinite(per_split.val_losses[6])


def test_skip_train_evaluates_a_checkpoint_on_valid_data_path_alone(tmp_path):
    """--skip-train with only --valid-data-path (no training split needed): the loaded checkpoint's
    validation loss is the one the training run logged at that iteration on the same data."""
    a, b = str(tmp_path / "a_text_document"), str(tmp_path / "b_text_document")
    _write_corpus(a, 30, seed=1)
    _write_corpus(b, 20, seed=2)
    base = [x for x in TINY if x != "--mock-data"] + ["--train-iters", "2", "--eval-interval", "2", "--eval-iters",
                                                     "1", "--data-cache-path", str(tmp_path / "cache"),
                                                     "--valid-data-path", b]
    trained = _logged(run_distributed(_train, 1, base + ["--train-data-path", a, "--save", str(tmp_path / "ck")],
                                      timeout=120))
    evaluated = _logged(run_distributed(_train, 1, base + ["--skip-train", "--load", str(tmp_path / "ck")],
                                        timeout=120))
    assert sorted(trained.val_losses) == [2] and evaluated.val_losses == trained.val_losses
