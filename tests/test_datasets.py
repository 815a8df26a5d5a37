"""GPT datasets: index determinism and caching, sample contents, splits, blending, data-path parsing."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_core.datasets import (
    BlendedDataset,
    GPTDataset,
    GPTDatasetConfig,
    IndexedDataset,
    IndexedDatasetBuilder,
    MockGPTDataset,
    build_blending_indices,
    build_gpt_datasets,
    parse_data_path,
    parse_split,
    split_document_ranges,
)
from megatron_core.datasets.blended_dataset import normalize_weights
from megatron_core.datasets.gpt_indices import build_sample_index
from megatron_core.datasets.mock_indexed_dataset import MockIndexedDataset

EOD = 0


def write_dataset(prefix, num_docs, seed, base=1):
    """Documents of varied length (one empty) with unique-ish tokens ending in EOD; returns the docs."""
    rng = np.random.RandomState(seed)
    docs = []
    with IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.uint16) as builder:
        for d in range(num_docs):
            length = 0 if d == 3 else int(rng.randint(1, 40))
            tokens = list(base + (np.arange(length) + 50 * d) % 997)
            if length:
                tokens[-1] = EOD
            builder.add_document(tokens, [len(tokens)])
            docs.append(tokens)
        builder.finalize(str(prefix) + ".idx")
    return docs


def config(tmp_path, prefix, **kwargs):
    defaults = dict(seq_length=16, eod=EOD, seed=1234, data_path=[str(prefix)], split="100,0,0",
                    data_cache_path=str(tmp_path / "cache"))
    defaults.update(kwargs)
    return GPTDatasetConfig(**defaults)


def gpt(tmp_path, prefix, num_samples, docs=None, **kwargs):
    cfg = config(tmp_path, prefix, **kwargs)
    low = IndexedDataset(str(prefix))
    indices = np.arange(low.num_documents) if docs is None else docs
    return GPTDataset(low, str(prefix), indices, num_samples, "train", cfg)


@pytest.fixture
def data(tmp_path):
    prefix = tmp_path / "corpus_text_document"
    return prefix, write_dataset(prefix, 40, seed=0)


def test_indices_are_deterministic_cached_and_seeded(tmp_path, data):
    prefix, _ = data
    first = gpt(tmp_path, prefix, 100)
    assert not first.built_from_cache
    rebuilt = gpt(tmp_path, prefix, 100, data_cache_path=str(tmp_path / "other_cache"))
    reloaded = gpt(tmp_path, prefix, 100)
    assert reloaded.built_from_cache
    for name in ("document_index", "sample_index", "shuffle_index"):
        assert np.array_equal(getattr(first, name), getattr(rebuilt, name))
        assert np.array_equal(getattr(first, name), getattr(reloaded, name))
    assert all(torch.equal(first[i]["tokens"], reloaded[i]["tokens"]) for i in range(len(first)))
    other_seed = gpt(tmp_path, prefix, 100, seed=99)
    assert not other_seed.built_from_cache
    assert not np.array_equal(first.document_index, other_seed.document_index)
    assert not np.array_equal(first.shuffle_index, other_seed.shuffle_index)
    assert len(set(p.name for p in (tmp_path / "cache").glob("*-document_index.npy"))) == 2


def test_default_cache_dir_is_next_to_the_data(tmp_path, data):
    prefix, _ = data
    dataset = gpt(tmp_path, prefix, 10, data_cache_path=None)
    assert (tmp_path / "cache" / "GPTDataset_indices").is_dir() and dataset.cache_dir.startswith(str(tmp_path))


def test_samples_are_windows_of_the_shuffled_concatenation(tmp_path, data):
    prefix, docs = data
    seq = 16
    num_samples = 150  # more than one epoch (~750 tokens per epoch), so documents repeat
    dataset = gpt(tmp_path, prefix, num_samples)
    tokens_per_epoch = sum(len(d) for d in docs)
    epochs = -(-(num_samples * seq + 1) // tokens_per_epoch)
    # Every document appears once per epoch.
    assert sorted(dataset.document_index.tolist()) == sorted(list(range(len(docs))) * epochs)
    # Independent reconstruction: lay the documents end to end in document-index order and cut.
    flat = np.concatenate([np.asarray(docs[d], dtype=np.int64) for d in dataset.document_index])
    assert len(dataset) == (len(flat) - 1) // seq >= num_samples
    assert sorted(dataset.shuffle_index.tolist()) == list(range(len(dataset)))
    for i in range(len(dataset)):
        position = int(dataset.shuffle_index[i])
        expected = flat[position * seq: position * seq + seq + 1]
        assert dataset.get_tokens(i).tolist() == expected.tolist()
        sample = dataset[i]
        assert sample["tokens"].tolist() == expected[:-1].tolist()
        assert sample["labels"].tolist() == expected[1:].tolist()


def megatron_sample_index_loop(sizes, document_index, seq_length):
    """Megatron-LM's C++ build_sample_idx walk, restated as a plain loop (one extra label token)."""
    total = int(sum(sizes[d] for d in document_index))
    rows, position, offset = [(0, 0)], 0, 0
    for _ in range((total - 1) // seq_length):
        remaining = seq_length + 1
        while remaining:
            available = sizes[document_index[position]] - offset
            remaining -= available
            if remaining <= 0:
                offset += remaining + available - 1  # next sample starts on this sample's last token
                remaining = 0
            else:
                position, offset = position + 1, 0
        rows.append((position, offset))
    return np.array(rows)


def test_sample_index_matches_megatron_walk():
    rng = np.random.RandomState(0)
    for _ in range(200):
        num_docs = rng.randint(1, 15)
        sizes = rng.randint(0, 12, size=num_docs)
        sizes[rng.randint(num_docs)] += 1  # at least one token somewhere
        document_index = np.tile(np.arange(num_docs), rng.randint(1, 4))
        rng.shuffle(document_index)
        seq_length = rng.randint(1, 10)
        expected = megatron_sample_index_loop(sizes, document_index, seq_length)
        assert np.array_equal(build_sample_index(sizes, document_index, seq_length), expected)


def megatron_indices(sizes, documents, seq_length, num_samples, seed):
    """Megatron-LM ``GPTDataset._build_document_sample_shuffle_indices`` restated independently
    (its ``_get_num_epochs`` loop, ``_build_document_index`` with ``numpy.mgrid``, the 0.80
    separate-final-epoch threshold, ``_build_shuffle_index``; one extra label token per sample)."""
    tokens_per_epoch = int(sum(sizes[d] for d in documents))
    num_epochs, tokens = 1, tokens_per_epoch
    while tokens < num_samples * seq_length + 1:
        num_epochs, tokens = num_epochs + 1, tokens + tokens_per_epoch
    separate = False
    if num_epochs > 1:
        sans_final = ((num_epochs - 1) * tokens_per_epoch - 1) // seq_length
        per_epoch = (tokens_per_epoch - 1) // seq_length
        separate = num_samples - sans_final < int(0.80 * per_epoch)
    state = np.random.RandomState(seed)

    def document_index(epochs):
        index = np.mgrid[0:epochs, 0:len(documents)][1]
        index[:] = documents
        index = index.reshape(-1).astype(np.int32)
        state.shuffle(index)
        return index

    doc = np.concatenate((document_index(num_epochs - 1), document_index(1))) if separate \
        else document_index(num_epochs)
    sample = megatron_sample_index_loop(sizes, doc, seq_length)
    total = sample.shape[0] - 1
    first = np.arange(sans_final if separate else total, dtype=np.uint32)
    state.shuffle(first)
    shuffle = first
    if separate:
        last = np.arange(sans_final, total, dtype=np.uint32)
        state.shuffle(last)
        shuffle = np.concatenate((first, last))
    return doc, sample, shuffle, separate


@pytest.mark.parametrize("num_samples", [40, 60, 70, 100, 140, 150])
def test_multi_epoch_indices_follow_megatron_including_the_separate_final_epoch(tmp_path, data, num_samples):
    prefix, docs = data
    documents = np.arange(5, 35)  # a split: not every document, not starting at 0
    dataset = gpt(tmp_path, prefix, num_samples, docs=documents)
    sizes = [len(d) for d in docs]
    doc, sample, shuffle, separate = megatron_indices(sizes, documents, 16, num_samples, 1234)
    assert len(doc) > len(documents), "the case must span several epochs"
    assert dataset.document_index.tolist() == doc.tolist(), f"document index ({separate=})"
    assert dataset.sample_index.tolist() == sample.tolist(), f"sample index ({separate=})"
    assert dataset.shuffle_index.tolist() == shuffle.tolist(), f"shuffle index ({separate=})"


def test_final_epoch_rule_at_the_samples_per_epoch_boundary(tmp_path, data):
    # 639 tokens per epoch (documents 5..36): Megatron counts (639 - 1) // 16 = 39 samples per epoch;
    # 70 samples leave 70 - 39 = 31 for the final epoch, not fewer than int(0.8 * 39) = 31, so it is
    # not separate. Counting 640 // 16 = 40 per epoch (threshold 32) would make it separate.
    prefix, docs = data
    documents = np.arange(5, 37)
    sizes = [len(d) for d in docs]
    assert sum(sizes[5:37]) == 639
    doc, sample, shuffle, separate = megatron_indices(sizes, documents, 16, 70, 1234)
    dataset = gpt(tmp_path, prefix, 70, docs=documents)
    assert not separate
    assert dataset.document_index.tolist() == doc.tolist()
    assert dataset.shuffle_index.tolist() == shuffle.tolist()


def test_sample_index_of_a_corpus_shorter_than_one_sample():
    # A sample needs seq_length + 1 tokens (inputs and shifted labels): one token makes none.
    for lengths in ([1], [0], [0, 1]):
        index = build_sample_index(np.array(lengths), np.arange(len(lengths)), 1)
        assert index.tolist() == [[0, 0]], lengths


def test_multi_epoch_cases_cover_both_final_epoch_rules(tmp_path, data):
    prefix, docs = data
    sizes = [len(d) for d in docs]
    rules = {megatron_indices(sizes, np.arange(5, 35), 16, n, 1234)[3] for n in (40, 60, 70, 100, 140, 150)}
    assert rules == {True, False}


def test_document_order_follows_megatron_shuffle(tmp_path, data):
    prefix, docs = data
    dataset = gpt(tmp_path, prefix, None)  # one epoch
    expected = np.arange(len(docs))
    np.random.RandomState(1234).shuffle(expected)
    assert dataset.document_index.tolist() == expected.tolist()


def test_sample_fields(tmp_path, data):
    prefix, _ = data
    plain = gpt(tmp_path, prefix, 20)[0]
    masked = gpt(tmp_path, prefix, 20, eod_mask_loss=True)[0]
    assert plain["tokens"].dtype == torch.int64 and plain["tokens"].shape == (16,)
    assert plain["loss_mask"].dtype == torch.float32 and torch.all(plain["loss_mask"] == 1)
    assert torch.equal(plain["position_ids"], torch.arange(16))
    assert torch.equal(masked["loss_mask"], (masked["tokens"] != EOD).float())
    batch = next(iter(torch.utils.data.DataLoader(gpt(tmp_path, prefix, 20), batch_size=4)))
    assert batch["tokens"].shape == (4, 16)


def test_split_ranges_and_errors(tmp_path, data):
    assert parse_split("949,50,1") == pytest.approx([0.949, 0.05, 0.001])
    assert split_document_ranges("949,50,1", 1000) == [(0, 949), (949, 999), (999, 1000)]
    assert split_document_ranges("1,0,0", 10) == [(0, 10), None, None]
    assert split_document_ranges("80", 10) == [(0, 10), None, None]
    for bad in ("a,b,c", "1,2,3,4", "0,0,0", "-1,2,0"):
        with pytest.raises(ValueError, match="--split"):
            parse_split(bad)
    prefix, _ = data
    cfg = config(tmp_path, prefix, split="90,10,0")
    train, valid, test = build_gpt_datasets(cfg, [50, 10, 0])
    assert test is None
    assert train.indexed_indices.tolist() == list(range(36)) and valid.indexed_indices.tolist() == list(range(36, 40))
    with pytest.raises(ValueError, match="test split no documents"):
        build_gpt_datasets(cfg, [50, 10, 5])
    # A split that rounds to zero documents is an error only if samples are asked of it.
    with pytest.raises(ValueError, match="valid split no documents"):
        build_gpt_datasets(config(tmp_path, prefix, split="99,1,0"), [10, 1, 0])
    empty = tmp_path / "empty_text_document"
    with IndexedDatasetBuilder(str(empty) + ".bin", dtype=np.uint16) as builder:
        for _ in range(3):
            builder.add_document([], [0])
        builder.finalize(str(empty) + ".idx")
    with pytest.raises(ValueError, match=r"holds no tokens, but 1 samples are needed; its documents are all empty: "
                                         r"move the --split boundaries or add data$"):
        build_gpt_datasets(config(tmp_path, empty), [1, 0, 0])
    with pytest.raises(ValueError, match=r"the valid split .* move the --split boundaries, evaluate nothing "
                                         r"\(--eval-iters 0\) or add data$"):
        build_gpt_datasets(config(tmp_path, empty, split="34,33,33"), [0, 1, 0])


def test_blended_fractions_follow_weights(tmp_path):
    a, b = tmp_path / "a_text_document", tmp_path / "b_text_document"
    write_dataset(a, 30, seed=1, base=1)
    write_dataset(b, 30, seed=2, base=2000)
    cfg = config(tmp_path, a, data_path=["0.3", str(a), "0.7", str(b)])
    train, _, _ = build_gpt_datasets(cfg, [2000, 0, 0])
    assert isinstance(train, BlendedDataset) and len(train) == 2000
    fractions = np.bincount(np.asarray(train.dataset_index, dtype=np.int64), minlength=2) / 2000
    assert np.allclose(fractions, [0.3, 0.7], atol=0.01)
    for i in range(0, 2000, 97):
        sample = train[i]
        tokens = sample["tokens"][sample["tokens"] != EOD]
        assert bool(torch.all(tokens < 2000)) == (sample["dataset_id"] == 0)
    again, _, _ = build_gpt_datasets(config(tmp_path, a, data_path=["3", str(a), "7", str(b)],
                                            data_cache_path=str(tmp_path / "cache2")), [2000, 0, 0])
    assert np.array_equal(train.dataset_index, again.dataset_index)
    assert np.array_equal(train.dataset_sample_index, again.dataset_sample_index)
    # the blend's indices are cached next to its parts' (one description, two arrays) and read back
    cached = sorted(p.name.split("-", 1)[1] for p in (tmp_path / "cache").glob("*-BlendedDataset-*"))
    assert cached == ["BlendedDataset-dataset_index.npy", "BlendedDataset-dataset_sample_index.npy",
                      "BlendedDataset-description.json"]
    reread, _, _ = build_gpt_datasets(cfg, [2000, 0, 0])
    assert isinstance(reread.dataset_index, np.memmap)
    assert np.array_equal(reread.dataset_index, train.dataset_index)


def test_blending_indices_track_weights_at_every_prefix():
    weights = [0.2, 0.5, 0.3]
    index, sample_index = build_blending_indices(weights, 1000)
    counts = np.zeros(3)
    for i, d in enumerate(index):
        assert sample_index[i] == counts[d]
        counts[d] += 1
        assert np.all(np.abs(counts - np.array(weights) * (i + 1)) <= 1.0 + 1e-9)


def test_blending_indices_are_megatron_lms_at_the_first_steps():
    """Megatron-LM's helpers.cpp judges steps 0 and 1 against a prefix of 1 and step i >= 2 against i; with
    weights 1:1:5 step 2 serves the third dataset (taken from megatron-core 0.16.1's build_blending_indices)."""
    index, sample_index = build_blending_indices([1, 1, 5], 10)
    assert index.tolist() == [2, 0, 2, 1, 2, 2, 2, 0, 2, 2]
    assert sample_index.tolist() == [0, 0, 1, 0, 2, 3, 4, 1, 5, 6]


@pytest.mark.parametrize("weights", [[], [0.5, 0.0], [1.0, -1.0], [1.0, float("nan")], [float("inf"), 1.0]])
def test_blend_weights_must_be_positive_finite_numbers(weights):
    with pytest.raises(ValueError, match=r"^blend weights must be positive numbers, got "):
        normalize_weights(weights)


def test_parse_data_path(tmp_path, data):
    prefix, _ = data
    p = str(prefix)
    assert parse_data_path([p]) == ([p], [1.0])
    prefixes, weights = parse_data_path(["1", p, "3", p])
    assert prefixes == [p, p] and weights == pytest.approx([0.25, 0.75])
    with pytest.raises(ValueError, match="--data-path.*3 entries"):
        parse_data_path(["0.3", p, "0.7"])
    with pytest.raises(ValueError, match="--data-path weight 'B' is not a number"):
        parse_data_path(["0.5", p, "B", p])
    assert parse_data_path([p, p, p]) == ([p, p, p], None)  # Megatron-LM's form (3): prefixes, no weights
    with pytest.raises(ValueError, match="--data-path weight '-1'"):
        parse_data_path(["-1", p, "1", p])
    missing = str(tmp_path / "missing_text_document")
    with pytest.raises(ValueError, match="--data-path.*missing_text_document.idx"):
        parse_data_path(["0.5", p, "0.5", missing])
    with pytest.raises(ValueError, match="without the extension"):
        parse_data_path([p + ".bin"])


def test_mock_dataset(tmp_path):
    cfg = GPTDatasetConfig(seq_length=32, eod=99, mock=True, split="98,2,0", seed=5)
    train, valid, test = build_gpt_datasets(cfg, [64, 8, 0])
    assert isinstance(train, MockGPTDataset) and test is None
    assert len(train) >= 64 and len(valid) >= 8
    again = MockGPTDataset(cfg, 64, "train", train.indexed_indices)
    for i in range(0, 64, 7):
        tokens = train.get_tokens(i)
        assert len(tokens) == 33 and tokens.min() >= 0 and tokens.max() <= 99
        assert np.array_equal(tokens, again.get_tokens(i))
    assert set(train.indexed_indices.tolist()).isdisjoint(valid.indexed_indices.tolist())
    with pytest.raises(ValueError, match="--mock-data"):
        GPTDatasetConfig(seq_length=8, eod=0)
    # The mock vocabulary must hold the EOD id, and two ids at least (each check alone).
    for eod, vocab in ((5, 5), (-1, 4), (0, 1)):
        with pytest.raises(ValueError, match=rf"mock data needs 0 <= eod \({eod}\) < mock vocab size \({vocab}\)"):
            GPTDatasetConfig(seq_length=8, eod=eod, mock=True, mock_vocab_size=vocab)


def test_mock_documents_use_every_id_and_end_with_eod():
    """--mock-data's documents (MockIndexedDataset): every id of the mock vocabulary occurs, the EOD id only as
    each document's last token, and a maximum length of 1 (the smallest accepted) gives documents of EOD alone."""
    vocab, eod = 11, 4
    mock = MockIndexedDataset(num_documents=40, max_document_length=30, vocab_size=vocab, eod=eod)
    documents = [mock[d] for d in range(len(mock))]
    for d, tokens in enumerate(documents):
        assert len(tokens) == mock.sequence_lengths[d] and tokens[-1] == eod and eod not in tokens[:-1].tolist()
        assert np.array_equal(mock.get(d, 1, len(tokens) - 1), tokens[1:])
    assert set(np.concatenate(documents).tolist()) == set(range(vocab))
    short = MockIndexedDataset(num_documents=3, max_document_length=1, vocab_size=vocab, eod=eod)
    assert [short[d].tolist() for d in range(3)] == [[eod]] * 3
    with pytest.raises(ValueError, match="at least one document of at least one token"):
        MockIndexedDataset(num_documents=3, max_document_length=0, vocab_size=vocab, eod=eod)


def test_indexed_dataset_pickles_for_dataloader_workers(data):
    import pickle

    prefix, docs = data
    dataset = pickle.loads(pickle.dumps(IndexedDataset(str(prefix))))
    assert [dataset[i].tolist() for i in range(len(docs))] == docs


def test_per_split_paths_take_every_document_of_their_own_prefixes(tmp_path):
    """Megatron-LM's --train-data-path / --valid-data-path: each split reads all of its own data (--split
    does not apply), a blend per split is weighted as --data-path's, and a needed split without a path
    names its flag."""
    a, b, c = (tmp_path / f"{n}_text_document" for n in "abc")
    write_dataset(a, 30, seed=1, base=1)
    write_dataset(b, 20, seed=2, base=2000)
    write_dataset(c, 10, seed=3, base=4000)
    cfg = GPTDatasetConfig(seq_length=16, eod=EOD, seed=1234, train_data_path=["0.3", str(a), "0.7", str(b)],
                           valid_data_path=[str(c)], split="1,0,0", data_cache_path=str(tmp_path / "cache"))
    train, valid, test = build_gpt_datasets(cfg, [500, 12, 0])
    assert test is None
    assert isinstance(train, BlendedDataset) and len(train) == 500
    assert np.allclose(np.bincount(np.asarray(train.dataset_index, dtype=np.int64), minlength=2) / 500,
                       [0.3, 0.7], atol=0.01)
    assert [d.indexed_indices.tolist() for d in train.datasets] == [list(range(30)), list(range(20))]
    assert isinstance(valid, GPTDataset) and valid.indexed_indices.tolist() == list(range(10)) and len(valid) >= 12
    alone = GPTDataset(IndexedDataset(str(c)), str(c), np.arange(10), 12, "valid", cfg)
    assert all(torch.equal(valid[i]["tokens"], alone[i]["tokens"]) for i in range(12))
    assert all(bool(torch.all(valid[i]["tokens"][valid[i]["tokens"] != EOD] >= 4000)) for i in range(12))
    with pytest.raises(ValueError, match=r"^3 test samples are needed but no --test-data-path is given; give "
                                         r"--test-data-path PREFIX, evaluate nothing \(--eval-iters 0\)$"):
        build_gpt_datasets(cfg, [500, 12, 3])
    with pytest.raises(ValueError, match=r"--valid-data-path 'nowhere': missing"):
        build_gpt_datasets(GPTDatasetConfig(seq_length=16, eod=EOD, train_data_path=[str(a)],
                                            valid_data_path=["nowhere"]), [10, 1, 0])
    with pytest.raises(ValueError, match="give exactly one of --data-path PREFIX..., --train-data-path"):
        GPTDatasetConfig(seq_length=16, eod=EOD, data_path=[str(a)], train_data_path=[str(a)])


def test_a_data_path_of_prefixes_alone_is_weighted_by_their_lengths(tmp_path):
    """Megatron-LM's --data-path form (3), 'prefix1 prefix2': 'weights are inferred from the lengths of the
    contributing datasets' (each split's one-epoch sample count). It was refused ('weight ... is not a
    number'). The blend equals the weighted one given those counts as weights."""
    a, b = tmp_path / "a_text_document", tmp_path / "b_text_document"
    docs_a, docs_b = write_dataset(a, 30, seed=1, base=1), write_dataset(b, 12, seed=2, base=2000)
    seq = 16
    counts = [(sum(len(d) for d in docs) - 1) // seq for docs in (docs_a, docs_b)]
    assert counts[0] > 2 * counts[1] > 0
    unweighted, _, _ = build_gpt_datasets(config(tmp_path, a, data_path=[str(a), str(b)]), [300, 0, 0])
    weighted, _, _ = build_gpt_datasets(config(tmp_path, a, data_path=[str(counts[0]), str(a), str(counts[1]), str(b)],
                                               data_cache_path=str(tmp_path / "cache2")), [300, 0, 0])
    assert isinstance(unweighted, BlendedDataset) and len(unweighted) == 300
    assert np.array_equal(unweighted.dataset_index, weighted.dataset_index)
    assert np.array_equal(unweighted.dataset_sample_index, weighted.dataset_sample_index)
    for i in (0, 7, 299):
        assert torch.equal(unweighted[i]["tokens"], weighted[i]["tokens"])


def test_data_paths_given_as_one_string_or_as_paths_become_lists_of_strings(tmp_path):
    """Megatron-LM's --data-path "0.3 A 0.7 B" may reach the config as one string (a YAML or a library caller),
    and prefixes as pathlib.Path: both are stored as the list of strings argparse gives; an empty list is None."""
    cfg = GPTDatasetConfig(seq_length=8, eod=0, data_path="0.3 A 0.7 B")
    assert cfg.data_path == ["0.3", "A", "0.7", "B"]
    cfg = GPTDatasetConfig(seq_length=8, eod=0, train_data_path=[tmp_path / "a"], valid_data_path=[])
    assert cfg.train_data_path == [str(tmp_path / "a")] and cfg.valid_data_path is None
