"""Issue #14, data: a re-preprocessed corpus rebuilds its index cache (3); writing nothing is an error (9)."""
import contextlib
import io
import os

import numpy as np
import pytest

from megatron_core.datasets import GPTDataset, GPTDatasetConfig, IndexedDataset, IndexedDatasetBuilder
from megatron_core.datasets.preprocess_data import main as preprocess_main


def _write(prefix, lengths):
    with IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16) as builder:
        for d, length in enumerate(lengths):
            builder.add_document([1 + (d * 7 + i) % 50 for i in range(length)], [length])
        builder.finalize(prefix + ".idx")


def _dataset(prefix, cache):
    config = GPTDatasetConfig(seq_length=8, eod=0, seed=5, data_path=[prefix], split="100,0,0", data_cache_path=cache)
    low = IndexedDataset(prefix)
    return GPTDataset(low, prefix, np.arange(low.num_documents), 40, "train", config)


def test_a_corpus_with_the_same_counts_but_other_lengths_rebuilds_its_index(tmp_path):
    prefix, cache = str(tmp_path / "corpus_text_document"), str(tmp_path / "cache")
    lengths = [3, 30, 5, 22, 9, 17, 12, 2] * 3
    _write(prefix, lengths)
    first = _dataset(prefix, cache)
    assert not first.built_from_cache and _dataset(prefix, cache).built_from_cache
    _write(prefix, lengths[::-1])  # re-preprocessed: same documents and tokens in all, other lengths
    again = _dataset(prefix, cache)
    fresh = _dataset(prefix, str(tmp_path / "fresh_cache"))
    assert not again.built_from_cache
    assert np.array_equal(again.sample_index, fresh.sample_index)
    assert not np.array_equal(again.sample_index, first.sample_index)


@pytest.mark.parametrize("content,needle", [
    (b"", "no documents"),
    (bytes(np.random.RandomState(0).randint(0, 256, 4000, dtype=np.uint8)), "non-blank lines were bad"),
    ('{"text": "caf\u00e9 cr\u00e8me br\u00fbl\u00e9e"}\n'.encode("latin-1") * 3, "invalid UTF-8"),
])
def test_preprocessing_that_writes_nothing_is_an_error(tmp_path, content, needle):
    source = tmp_path / "input.jsonl"
    source.write_bytes(content)
    prefix = str(tmp_path / "out")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = preprocess_main(["--input", str(source), "--output-prefix", prefix, "--tokenizer-type", "NullTokenizer",
                                "--vocab-size", "255"])
    last = err.getvalue().strip().splitlines()[-1]
    assert code == 1 and last.startswith(f"error: --input {source}: ") and needle in last, err.getvalue()
    assert "nothing was written" in last and not [p for p in os.listdir(tmp_path) if p.startswith("out")]


def test_an_empty_validation_split_names_the_flags_that_fix_it(tmp_path):
    """A library caller asking valid samples of a zero share (--split 100,0,0) is told which flags change that
    (pretrain_gpt.py asks none then: it skips validation with a warning, test_pretrain_test_split.py)."""
    from megatron_core.datasets.builder import build_gpt_datasets

    prefix = str(tmp_path / "corpus_text_document")
    _write(prefix, [12] * 10)
    config = GPTDatasetConfig(seq_length=8, eod=0, seed=5, data_path=[prefix], split="100,0,0",
                              data_cache_path=str(tmp_path / "cache"))
    with pytest.raises(ValueError) as info:
        build_gpt_datasets(config, [16, 8, 0])
    assert str(info.value) == (
        f"--split '100,0,0' gives the valid split no documents of {prefix!r} (10 documents in all), but 8 valid "
        f"samples are needed; give valid a larger share of --split, evaluate nothing (--eval-iters 0), or add data")
