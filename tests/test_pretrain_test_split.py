"""The test split is evaluated once at the end of a run (and by --skip-train), as Megatron-LM's pretrain does.

Both data forms, on real mmap datasets: ``--data-path --split a,b,c`` and ``--test-data-path``. The loss
printed on Megatron-LM's line ``validation loss at iteration N on test set | lm loss value: ...`` must
equal the loss a Hugging Face model with the run's weights computes on the same ``eval_iters x
global_batch_size`` test samples (the weights go through tools/checkpoint/convert.py both ways).
"""
import re

import pytest
import torch
import torch.nn.functional as F
from harness import run_distributed
from test_pretrain import _logged, _train, _write_corpus

from megatron_core.checkpoint.convert import main as convert
from megatron_core.datasets import GPTDatasetConfig, build_gpt_datasets
from tests.hf_testing import tiny_hf_gpt2

SEQ, MICRO, GLOBAL, EVAL_ITERS, SEED = 32, 2, 4, 2, 1234
ARGS = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", str(SEQ),
        "--max-position-embeddings", str(SEQ), "--openai-gelu", "--vocab-size", "255",
        "--micro-batch-size", str(MICRO), "--global-batch-size", str(GLOBAL), "--lr", "1e-3",
        "--eval-iters", str(EVAL_ITERS), "--log-interval", "1", "--num-workers", "0", "--seed", str(SEED)]
LINE = r"validation loss at iteration {} on test set \| lm loss value: (\S+) \| lm loss PPL: (\S+) \|"


def _hf_checkpoint(tmp_path, tp):
    """A tiny random GPT-2 converted to a Megatron checkpoint at tensor parallel size ``tp``."""
    hf = tiny_hf_gpt2(vocab_size=256, hidden=32, layers=2, heads=4, positions=SEQ)
    hf.save_pretrained(tmp_path / "hf")
    assert convert(["--model-type", "GPT", "--loader", "hf", "--saver", "core", "--load-dir", str(tmp_path / "hf"),
                    "--save-dir", str(tmp_path / "ckpt"), "--target-tensor-parallel-size", str(tp)]) == 0
    return hf, str(tmp_path / "ckpt")


def _hf_loss(hf, dataset, count=EVAL_ITERS * GLOBAL) -> float:
    """The HF model's mean token loss on the first ``count`` samples of ``dataset`` (every token counts)."""
    samples = [dataset[i] for i in range(count)]
    tokens = torch.stack([s["tokens"] for s in samples])
    labels = torch.stack([s["labels"] for s in samples])
    with torch.no_grad():
        logits = hf(tokens).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(), labels.reshape(-1)).item()


def _printed_test_loss(out, iteration):
    found = re.findall(LINE.format(iteration), out)
    assert len(found) == 1, out
    return float(found[0][0])


def test_end_of_training_evaluates_the_split_test_share(tmp_path, capfd):
    """--data-path A --split 50,25,25: after training, the test share's loss is the trained weights' loss."""
    corpus, cache = str(tmp_path / "a_text_document"), str(tmp_path / "cache")
    _write_corpus(corpus, 40, seed=3)
    _, ckpt = _hf_checkpoint(tmp_path, tp=1)
    train_iters = 2
    argv = ARGS + ["--data-path", corpus, "--split", "50,25,25", "--data-cache-path", cache, "--load", ckpt,
                   "--train-iters", str(train_iters), "--eval-interval", "10", "--save", str(tmp_path / "trained")]
    result = _logged(run_distributed(_train, 1, argv, timeout=120))
    out = capfd.readouterr().out
    assert result.iteration == train_iters and result.test_loss is not None
    assert _printed_test_loss(out, train_iters) == pytest.approx(result.test_loss, rel=1e-6)
    # The trained weights, back to Hugging Face, on the same test samples the run built.
    assert convert(["--model-type", "GPT", "--loader", "core", "--saver", "hf", "--load-dir", str(tmp_path / "trained"),
                    "--save-dir", str(tmp_path / "hf_trained")]) == 0
    from transformers import GPT2LMHeadModel

    trained = GPT2LMHeadModel.from_pretrained(tmp_path / "hf_trained").float().eval()
    config = GPTDatasetConfig(seq_length=SEQ, eod=255, seed=SEED, data_path=[corpus], split="50,25,25",
                              data_cache_path=cache)
    _, valid, test = build_gpt_datasets(config, [train_iters * GLOBAL, EVAL_ITERS * GLOBAL, EVAL_ITERS * GLOBAL])
    expected = _hf_loss(trained, test)
    assert result.test_loss == pytest.approx(expected, rel=1e-5)
    # Not the validation split's loss: the two splits are different documents.
    assert result.val_losses[train_iters] == pytest.approx(_hf_loss(trained, valid), rel=1e-5)
    assert abs(expected - result.val_losses[train_iters]) > 1e-3


def test_skip_train_evaluates_validation_and_test_data_paths(tmp_path, capfd):
    """--skip-train --valid-data-path B --test-data-path C under TP 2: both losses are the loaded weights'."""
    valid_path, test_path = str(tmp_path / "b_text_document"), str(tmp_path / "c_text_document")
    _write_corpus(valid_path, 12, seed=4)
    _write_corpus(test_path, 12, seed=5)
    hf, ckpt = _hf_checkpoint(tmp_path, tp=2)
    cache = str(tmp_path / "cache")
    argv = ARGS + ["--skip-train", "--load", ckpt, "--valid-data-path", valid_path, "--test-data-path", test_path,
                   "--data-cache-path", cache, "--tensor-model-parallel-size", "2", "--train-iters", "1"]
    result = _logged(run_distributed(_train, 2, argv, timeout=120))
    out = capfd.readouterr().out
    it = result.iteration  # the converted checkpoint's iteration: no training
    assert result.exit_reason == "skip-train" and result.losses == [] and sorted(result.val_losses) == [it]
    config = GPTDatasetConfig(seq_length=SEQ, eod=255, seed=SEED, valid_data_path=[valid_path],
                              test_data_path=[test_path], data_cache_path=cache)
    _, valid, test = build_gpt_datasets(config, [0, EVAL_ITERS * GLOBAL, EVAL_ITERS * GLOBAL])
    assert result.val_losses[it] == pytest.approx(_hf_loss(hf, valid), rel=1e-5)
    assert result.test_loss == pytest.approx(_hf_loss(hf, test), rel=1e-5)
    assert _printed_test_loss(out, it) == pytest.approx(result.test_loss, rel=1e-6)
    assert f"validation loss at iteration {it} | lm loss value:" in out


def test_no_test_split_no_test_evaluation(tmp_path, capfd):
    """A zero test share (--split 80,20,0) or no --test-data-path: nothing is evaluated on a test split."""
    corpus = str(tmp_path / "a_text_document")
    _write_corpus(corpus, 30, seed=3)
    base = ARGS + ["--train-iters", "1", "--eval-interval", "1", "--eval-iters", "1",
                   "--data-cache-path", str(tmp_path / "cache")]
    split = _logged(run_distributed(_train, 1, base + ["--data-path", corpus, "--split", "80,20,0"], timeout=120))
    per_split = _logged(run_distributed(_train, 1, base + ["--train-data-path", corpus, "--valid-data-path", corpus],
                                        timeout=120))
    out = capfd.readouterr().out
    assert split.test_loss is None and per_split.test_loss is None and "on test set" not in out
    assert sorted(split.val_losses) == [1] and sorted(per_split.val_losses) == [1]


@pytest.mark.parametrize("pp", [1, 2])
def test_no_validation_split_skips_validation_with_one_warning(tmp_path, capfd, pp):
    """A zero validation share (--split 100,0,0, common in Megatron-LM scripts) or --train-data-path without
    --valid-data-path: Megatron-LM builds no validation set and skips every evaluation; so does this run, saying
    so in one warning (it stopped with an error before). Training's losses are those of the same run with
    --eval-iters 0."""
    corpus = str(tmp_path / "a_text_document")
    _write_corpus(corpus, 30, seed=3)
    base = ARGS + ["--train-iters", "2", "--eval-interval", "1", "--data-cache-path", str(tmp_path / "cache"),
                   "--pipeline-model-parallel-size", str(pp)]
    split = _logged(run_distributed(_train, pp, base + ["--data-path", corpus, "--split", "100,0,0"], timeout=120))
    split_out = capfd.readouterr()
    per_split = _logged(run_distributed(_train, pp, base + ["--train-data-path", corpus], timeout=120))
    per_split_out = capfd.readouterr()
    no_evaluation = _logged(run_distributed(_train, pp, base + ["--data-path", corpus, "--split", "100,0,0",
                                                                 "--eval-iters", "0"], timeout=120))
    for result, captured, why in [(split, split_out, "--split '100,0,0' gives validation no share"),
                                  (per_split, per_split_out, "no --valid-data-path")]:
        assert result.iteration == 2 and result.val_losses == {} and result.test_loss is None
        assert "validation loss" not in captured.out
        assert result.losses == no_evaluation.losses
        warning = (f"warning: {why}: the --eval-iters {EVAL_ITERS} validation runs are skipped, as Megatron-LM "
                   f"skips them")
        assert (captured.out + captured.err).count(warning) == 1, captured


def test_a_test_share_without_documents_names_the_zero_share(tmp_path):
    """Megatron-LM's default --split 969,30,1 on a small corpus gives the test split no document: the error
    (raised where a pretrain run asks for its test samples) names a zero test share as a fix."""
    corpus = str(tmp_path / "a_text_document")
    _write_corpus(corpus, 40, seed=3)
    config = GPTDatasetConfig(seq_length=SEQ, eod=255, seed=SEED, data_path=[corpus], split="969,30,1",
                              data_cache_path=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=r"gives the test split no documents .* \(40 documents in all\), but 8 test "
                                         r"samples are needed; give test a larger share of --split, a zero test share "
                                         r"\(--split A,B,0: no test evaluation\), evaluate nothing"):
        build_gpt_datasets(config, [8, 8, 8])


def test_default_split_on_a_small_corpus_trains_without_a_test_set(tmp_path, capfd, caplog):
    """Megatron-LM's default --split 969,30,1 gives a 40-document corpus no test document: the run
    trains and validates as it did before test evaluation existed, says in one warning that the test
    set is not evaluated, and prints no test line."""
    corpus = str(tmp_path / "a_text_document")
    _write_corpus(corpus, 40, seed=3)
    result = _logged(run_distributed(_train, 1, ARGS + ["--train-iters", "1", "--eval-interval", "1",
                                                       "--data-path", corpus, "--data-cache-path",
                                                       str(tmp_path / "cache")], timeout=120))
    captured = capfd.readouterr()
    assert result.test_loss is None and sorted(result.val_losses) == [1]
    assert "on test set" not in captured.out
    warnings = [line for line in (captured.out + captured.err).splitlines() if "the test set is not evaluated" in line]
    assert len(warnings) == 1 and "gives the test split no documents" in warnings[0], captured.err


def test_a_blend_whose_test_share_misses_one_prefix_is_refused_naming_it(tmp_path):
    """--data-path 0.5 A 0.5 B --split 90,5,5 where B's 5% holds no document: the run trained and skipped
    the whole test set with a warning, A's test documents included. As Megatron-LM's blended builder (an
    error for a blend's empty share, NVIDIA/Megatron-LM#957/#5519): one line naming B and the fixes.
    Empty in every prefix, the test split is still skipped as for a single prefix (EmptySplitError)."""
    from test_pretrain_errors import _cli

    from megatron_core.datasets.builder import EmptySplitError

    a, b = str(tmp_path / "a_text_document"), str(tmp_path / "b_text_document")
    _write_corpus(a, 40, seed=3)  # test share: documents 38, 39
    _write_corpus(b, 8, seed=4)  # test share: round(0.95 * 8) = 8 .. 8, none
    argv = ARGS + ["--train-iters", "1", "--eval-interval", "1", "--data-path", "0.5", a, "0.5", b,
                   "--split", "90,5,5", "--data-cache-path", str(tmp_path / "cache")]
    [(code, err)] = run_distributed(_cli, 1, argv, timeout=120)
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: --split '90,5,5' gives the test split no documents of {b!r} (8 documents) while "
                          f"the other --data-path prefixes have some; "), err
    assert "give test a larger share of --split, a zero test share (--split A,B,0: no test evaluation)" in err, err
    config = GPTDatasetConfig(seq_length=SEQ, eod=255, seed=SEED, data_path=["0.5", a, "0.5", b], split="90,5,5",
                              data_cache_path=str(tmp_path / "cache"))
    _, _, test = build_gpt_datasets(config, [8, 8, 0])  # no test samples asked: no test split, no error
    assert test is None
    _write_corpus(b, 20, seed=4)  # 969,30,1: neither A's nor B's test share holds a document
    config = GPTDatasetConfig(seq_length=SEQ, eod=255, seed=SEED, data_path=["0.5", a, "0.5", b], split="969,30,1",
                              data_cache_path=str(tmp_path / "cache"))
    with pytest.raises(EmptySplitError, match="gives the test split no documents of") as info:
        build_gpt_datasets(config, [8, 8, 8])
    assert info.value.split == "test"
