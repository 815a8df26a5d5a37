"""tools/preprocess_data.py: tokens round-trip, bad lines, progress, and Megatron-LM's byte layout."""
from __future__ import annotations

import glob
import json
import os
import re
import struct
import subprocess
import sys

import numpy as np
import pytest

from megatron_core.datasets import preprocess_data
from megatron_core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from megatron_core.tokenizer import build_tokenizer
from megatron_core.tokenizer.train_tokenizer import train_sentencepiece

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16}


def read_megatron_index(prefix):
    """An independent reader of Megatron-LM's .idx/.bin, written from the format description."""
    with open(prefix + ".idx", "rb") as f:
        raw = f.read()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    (version,) = struct.unpack("<Q", raw[9:17])
    (code,) = struct.unpack("<B", raw[17:18])
    count, doc_count = struct.unpack("<QQ", raw[18:34])
    assert version == 1
    pos = 34
    lengths = struct.unpack(f"<{count}i", raw[pos:pos + 4 * count])
    pos += 4 * count
    pointers = struct.unpack(f"<{count}q", raw[pos:pos + 8 * count])
    pos += 8 * count
    documents = struct.unpack(f"<{doc_count}q", raw[pos:pos + 8 * doc_count])
    pos += 8 * doc_count
    assert pos == len(raw)
    dtype = np.dtype(DTYPES[code]).newbyteorder("<")
    data = open(prefix + ".bin", "rb").read()
    sequences = [
        np.frombuffer(data[p:p + n * dtype.itemsize], dtype=dtype).tolist()
        for p, n in zip(pointers, lengths, strict=True)
    ]
    assert sum(lengths) * dtype.itemsize == len(data)
    return code, list(documents), sequences


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    text = []
    for path in sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py")))[:8]:
        text.append(open(path, encoding="utf-8").read(1500))
    corpus = tmp_path_factory.mktemp("spm") / "corpus.txt"
    corpus.write_text("\n".join(text), encoding="utf-8")
    return train_sentencepiece([str(corpus)], str(corpus.parent / "tok"), vocab_size=400)


def stdlib_documents(n=30):
    docs = []
    for path in sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py")))[:n]:
        with open(path, encoding="utf-8") as f:
            docs.append({"text": f.read(600), "title": os.path.basename(path)})
    docs.append({"text": "unicode ünïcödé 日本 🚀", "title": "u"})
    docs.append({"text": "", "title": "empty"})  # no tokens, so no EOD either (as Megatron)
    return docs


def write_jsonl(path, docs, bad_lines=()):
    """Write docs; bad_lines maps 1-based line numbers to raw text inserted there."""
    lines = [json.dumps(d) for d in docs]
    for number, raw in sorted(dict(bad_lines).items()):
        lines.insert(number - 1, raw)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def run_main(tmp_path, model, *extra):
    return preprocess_data.main([
        "--input", str(tmp_path / "in.jsonl"), "--output-prefix", str(tmp_path / "out" / "data"),
        "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", model, *extra,
    ])


def test_two_workers_round_trip_and_byte_layout(tmp_path, spm_model, capsys):
    docs = stdlib_documents()
    write_jsonl(tmp_path / "in.jsonl", docs)
    rc = run_main(tmp_path, spm_model, "--json-keys", "text", "title", "--append-eod", "--workers", "2",
                  "--log-interval", "10")
    assert rc == 0
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=spm_model)
    for key in ("text", "title"):
        expected = [tok.tokenize(d[key]) + ([tok.eod] if d[key] else []) for d in docs]
        prefix = str(tmp_path / "out" / f"data_{key}_document")
        dataset = IndexedDataset(prefix)
        assert len(dataset) == len(docs) == dataset.num_documents
        assert [dataset[i].tolist() for i in range(len(dataset))] == expected
        assert dataset.get(0, 3, 5).tolist() == expected[0][3:8]
        code, documents, sequences = read_megatron_index(prefix)
        assert code == 8  # uint16: vocab 400 < 65500
        assert documents == list(range(len(docs) + 1))
        assert sequences == expected
    err = capsys.readouterr().err
    assert "Processed 10 documents" in err and "docs/s" in err and "MB/s" in err


def test_bad_lines_are_skipped_with_line_numbers(tmp_path, spm_model, capsys):
    docs = stdlib_documents(5)
    write_jsonl(tmp_path / "in.jsonl", docs, {3: "{not json", 5: json.dumps({"title": "no text"})})
    assert run_main(tmp_path, spm_model, "--workers", "2") == 0
    err = capsys.readouterr().err
    assert "in.jsonl:3:" in err and "invalid JSON" in err
    assert "in.jsonl:5:" in err and "missing key 'text'" in err
    assert "Skipped 2 bad line(s)." in err.splitlines()
    assert f"Wrote {tmp_path / 'out' / 'data_text_document'}.bin/.idx ({len(docs)} documents," in err
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=spm_model)
    dataset = IndexedDataset(str(tmp_path / "out" / "data_text_document"))
    assert [dataset[i].tolist() for i in range(len(dataset))] == [tok.tokenize(d["text"]) for d in docs]


def test_bad_line_is_fatal_with_on_bad_line_error(tmp_path, spm_model):
    write_jsonl(tmp_path / "in.jsonl", stdlib_documents(5), {4: '{"text": 1'})
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "preprocess_data.py"), "--input", str(tmp_path / "in.jsonl"),
         "--output-prefix", str(tmp_path / "out" / "data"), "--tokenizer-type", "SentencePieceTokenizer",
         "--tokenizer-model", spm_model, "--workers", "2", "--on-bad-line", "error"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    error_lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "in.jsonl:4:" in error_lines[0]
    assert not os.path.exists(tmp_path / "out" / "data_text_document.idx")  # no half-written output


def test_tokenizer_flag_errors_are_one_line(tmp_path, capsys):
    write_jsonl(tmp_path / "in.jsonl", [{"text": "1 2 3"}])
    rc = preprocess_data.main(["--input", str(tmp_path / "in.jsonl"), "--output-prefix", str(tmp_path / "o"),
                               "--tokenizer-type", "NullTokenizer"])
    assert rc == 1 and "--vocab-size" in capsys.readouterr().err


def test_a_wrong_tokenizer_file_or_a_directory_as_input_is_one_line(tmp_path, capsys):
    """--tokenizer-model naming a JSONL (not a SentencePiece model) raised sentencepiece's RuntimeError
    traceback; --input naming a directory said 'file not found'."""
    write_jsonl(tmp_path / "in.jsonl", [{"text": "hello"}])
    common = ["--output-prefix", str(tmp_path / "o"), "--tokenizer-type", "SentencePieceTokenizer"]
    rc = preprocess_data.main(["--input", str(tmp_path / "in.jsonl"), "--tokenizer-model", str(tmp_path / "in.jsonl"),
                               *common])
    assert rc == 1 and capsys.readouterr().err == (
        f"error: --tokenizer-model {str(tmp_path / 'in.jsonl')!r} is not a SentencePiece .model file; pass one "
        f"(train one with tools/train_tokenizer.py), or the --tokenizer-type that reads this file\n")
    rc = preprocess_data.main(["--input", str(tmp_path), "--tokenizer-model", "unused.model", *common])
    assert rc == 1 and capsys.readouterr().err == (
        f"error: --input {str(tmp_path)!r} is a directory; pass its JSONL files (e.g. --input {tmp_path}/*.jsonl)\n")


def test_null_tokenizer_large_vocab_uses_int32(tmp_path):
    write_jsonl(tmp_path / "in.jsonl", [{"text": "1 2 70000"}, {"text": "99999"}])
    rc = preprocess_data.main(["--input", str(tmp_path / "in.jsonl"), "--output-prefix", str(tmp_path / "o"),
                               "--tokenizer-type", "NullTokenizer", "--vocab-size", "100000", "--append-eod"])
    assert rc == 0
    code, _, sequences = read_megatron_index(str(tmp_path / "o_text_document"))
    assert code == 4 and sequences == [[1, 2, 70000, 100000], [99999, 100000]]


def test_builder_writes_and_reader_reads_hand_made_files(tmp_path):
    # Our writer, the independent reader: several sequences per document, int32.
    builder = IndexedDatasetBuilder(str(tmp_path / "a.bin"), dtype=np.int32)
    builder.add_item([5, 6, 7])
    builder.add_item([])
    builder.end_document()
    builder.add_document([1, 2, 3, 4], [1, 3])
    builder.finalize(str(tmp_path / "a.idx"))
    assert read_megatron_index(str(tmp_path / "a")) == (4, [0, 2, 4], [[5, 6, 7], [], [1], [2, 3, 4]])
    # A file written byte by byte in the test (as Megatron-LM would), read by IndexedDataset.
    seqs = [[10, 11], [12, 13, 14]]
    with open(tmp_path / "m.idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 8, 2, 3))
        f.write(struct.pack("<2i", 2, 3) + struct.pack("<2q", 0, 4) + struct.pack("<3q", 0, 1, 2))
    np.array(sum(seqs, []), dtype="<u2").tofile(tmp_path / "m.bin")
    dataset = IndexedDataset(str(tmp_path / "m"))
    assert dataset.dtype == np.uint16 and [x.tolist() for x in dataset[0:2]] == seqs
    assert dataset.document_indices.tolist() == [0, 1, 2]


def test_reader_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.idx"):
        IndexedDataset(str(tmp_path / "nothing"))
    (tmp_path / "bad.idx").write_bytes(b"NOTANIDX" + bytes(40))
    (tmp_path / "bad.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="bad.idx"):
        IndexedDataset(str(tmp_path / "bad"))
    (tmp_path / "short.idx").write_bytes(b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 8, 5, 6))
    (tmp_path / "short.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="short.idx.*truncated"):
        IndexedDataset(str(tmp_path / "short"))
    # A whole file less its last document index entry (8 bytes): truncated, not misread.
    builder = IndexedDatasetBuilder(str(tmp_path / "cut.bin"), dtype=np.int32)
    builder.add_document([1, 2, 3], [1, 2])
    builder.finalize(str(tmp_path / "cut.idx"))
    raw = (tmp_path / "cut.idx").read_bytes()
    (tmp_path / "cut.idx").write_bytes(raw[:-8])
    with pytest.raises(ValueError, match=f"cut.idx.*truncated: {len(raw) - 8} bytes, its header implies {len(raw)}"):
        IndexedDataset(str(tmp_path / "cut"))


def test_sequence_index_past_either_end_is_an_index_error(tmp_path):
    builder = IndexedDatasetBuilder(str(tmp_path / "a.bin"), dtype=np.int32)
    builder.add_document([1, 2, 3], [1, 2])
    builder.finalize(str(tmp_path / "a.idx"))
    dataset = IndexedDataset(str(tmp_path / "a"))
    assert dataset[-1].tolist() == [2, 3] and dataset[-2].tolist() == [1]
    for idx in (2, -3):
        with pytest.raises(IndexError, match=f"sequence {idx} out of range for 2 sequences"):
            dataset[idx]


@pytest.mark.parametrize("tokens", [[1, 70000], [-1, 5], [-1, 70000]])
def test_token_ids_outside_the_dtype_are_refused_not_wrapped(tmp_path, tokens):
    with IndexedDatasetBuilder(str(tmp_path / "a.bin"), dtype=np.uint16) as builder:
        message = rf"token id range \[{min(tokens)}, {max(tokens)}\] does not fit in uint16"
        with pytest.raises(ValueError, match=message):
            builder.add_item(tokens)
        with pytest.raises(ValueError, match="does not fit in uint16"):
            builder.add_document(np.array(tokens, dtype=np.int64), [len(tokens)])


def test_add_index_appends_every_document_of_another_dataset(tmp_path):
    """Megatron-LM's merge (tools/merge_datasets.py): documents, sequences and tokens of each part in order."""
    parts = {"a": [([5, 6, 7], [2, 1]), ([8], [1])], "b": [([1, 2], [2]), ([3, 4, 9], [1, 1, 1])]}
    for name, documents in parts.items():
        with IndexedDatasetBuilder(str(tmp_path / f"{name}.bin"), dtype=np.uint16) as builder:
            for tokens, lengths in documents:
                builder.add_document(tokens, lengths)
            builder.finalize(str(tmp_path / f"{name}.idx"))
    merged = IndexedDatasetBuilder(str(tmp_path / "m.bin"), dtype=np.uint16)
    merged.add_index(str(tmp_path / "a"))
    merged.add_index(str(tmp_path / "b"))
    merged.finalize(str(tmp_path / "m.idx"))
    assert read_megatron_index(str(tmp_path / "m")) == (
        8, [0, 2, 3, 4, 7], [[5, 6], [7], [8], [1, 2], [3], [4], [9]])
    with IndexedDatasetBuilder(str(tmp_path / "x.bin"), dtype=np.int32) as other_dtype:
        with pytest.raises(ValueError, match="a' holds uint16 tokens but this builder writes int32"):
            other_dtype.add_index(str(tmp_path / "a"))


def test_megatron_flags_are_accepted_or_refused_with_the_reason(tmp_path, capsys):
    """Megatron-LM's scripts pass --dataset-impl mmap, --keep-sequential-samples, --split-sentences,
    --partitions: the first two name what always happens here, the others stop with the reason."""
    write_jsonl(tmp_path / "in.jsonl", [{"text": "1 2 3"}, {"text": "4 5"}])
    common = ["--input", str(tmp_path / "in.jsonl"), "--output-prefix", str(tmp_path / "o"),
              "--tokenizer-type", "NullTokenizer", "--vocab-size", "10"]
    assert preprocess_data.main(common + ["--dataset-impl", "mmap", "--keep-sequential-samples"]) == 0
    for flag, needle in ((["--split-sentences"], "--split-sentences: sentence splitting"),
                         (["--partitions", "2"], "--partitions: use --workers N instead")):
        with pytest.raises(SystemExit) as info:
            preprocess_data.main(common + flag)
        error_lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
        assert info.value.code == 2 and len(error_lines) == 1 and needle in error_lines[0], error_lines


PROGRESS = re.compile(r"Processed (\d+) documents \(([\d.]+) docs/s, ([\d.]+) MB/s\)\.")


def test_progress_lines_count_documents_and_agree_on_the_rate(tmp_path, spm_model, capsys):
    """The summary line counts the documents and tokens written. With --log-interval 10 over 25
    documents, progress lines at 10 and 20, then the final one at 25. Both rates
    share one elapsed time, so MB/s must equal docs/s x (bytes read so far / documents) / 2**20 (MiB,
    as Megatron-LM's preprocess_data.py), up to the printed rounding."""
    docs = [{"text": f"document {i} " + "alpha beta gamma delta " * (40 + 7 * i)} for i in range(25)]
    write_jsonl(tmp_path / "in.jsonl", docs)
    line_bytes = [len(line) for line in (tmp_path / "in.jsonl").read_bytes().splitlines(keepends=True)]
    assert run_main(tmp_path, spm_model, "--log-interval", "10") == 0
    err = capsys.readouterr().err
    prefix = tmp_path / "out" / "data_text_document"
    tokens = sum(IndexedDataset(str(prefix)).sequence_lengths)
    assert f"Wrote {prefix}.bin/.idx (25 documents, {tokens} tokens)" in err.splitlines(), err
    progress = [PROGRESS.fullmatch(line) for line in err.splitlines() if "Processed" in line]
    assert all(progress), progress
    counts = [int(m[1]) for m in progress]
    assert counts == [10, 20, 25], counts
    for m, count in zip(progress, counts, strict=True):
        docs_rate, mb_rate = float(m[2]), float(m[3])
        assert docs_rate > 0 and mb_rate > 0
        expected = docs_rate * sum(line_bytes[:count]) / count / 2 ** 20
        # docs/s is printed to 0.05 (relative 0.05 / docs_rate), MB/s to 0.005.
        slack = expected * 0.05 / docs_rate + 0.005 + 1e-9
        assert abs(mb_rate - expected) <= slack, (m[0], expected)


def test_a_lone_surrogate_is_a_bad_line_named_as_such(tmp_path, spm_model, capsys):
    # JSON can spell half a UTF-16 pair ("\ud83d" without its "\ude80"); the tokenizer's binding then failed
    # with "Unable to cast Python instance of type <class 'str'> to C++ type '?'".
    docs = stdlib_documents(3)
    write_jsonl(tmp_path / "in.jsonl", docs, {2: '{"text": "rocket \\ud83d alone"}'})
    assert run_main(tmp_path, spm_model) == 0
    err = capsys.readouterr().err
    assert "in.jsonl:2: skipped line: key 'text' holds a lone surrogate '\\ud83d' at character 7" in err, err
    assert "C++" not in err
    assert len(IndexedDataset(str(tmp_path / "out" / "data_text_document"))) == len(docs)


def test_a_json_key_given_twice_writes_each_document_once(tmp_path, spm_model, capsys):
    """--json-keys text text wrote every document twice into the one text dataset (and counted the tokens twice);
    Megatron-LM's per-key dicts collapse the repeat, so the files equal those of --json-keys text."""
    docs = stdlib_documents(4)
    write_jsonl(tmp_path / "in.jsonl", docs)
    assert run_main(tmp_path, spm_model, "--append-eod") == 0
    prefix = tmp_path / "out" / "data_text_document"
    once = {ext: (tmp_path / "out" / f"data_text_document{ext}").read_bytes() for ext in (".bin", ".idx")}
    assert run_main(tmp_path, spm_model, "--append-eod", "--json-keys", "text", "title", "text") == 0
    assert {ext: (tmp_path / "out" / f"data_text_document{ext}").read_bytes() for ext in (".bin", ".idx")} == once
    tokens = sum(IndexedDataset(str(prefix)).sequence_lengths)
    assert f"Wrote {prefix}.bin/.idx ({len(docs)} documents, {tokens} tokens)" in capsys.readouterr().err.splitlines()


def test_chunk_size_and_a_directory_as_output_prefix_are_one_line_before_any_output(tmp_path, spm_model, capsys):
    """--chunk-size 0 with --workers 2 was multiprocessing's 'Chunksize must be 1+, not 0', after the dataset
    already at the prefix had been truncated and removed; --output-prefix DIR/ was '[Errno 2] No such file or
    directory: DIR/_text_document.bin'."""
    write_jsonl(tmp_path / "in.jsonl", stdlib_documents(3))
    assert run_main(tmp_path, spm_model) == 0
    earlier = {p: open(p, "rb").read() for p in glob.glob(str(tmp_path / "out" / "data_text_document.*"))}
    capsys.readouterr()
    assert run_main(tmp_path, spm_model, "--workers", "2", "--chunk-size", "0") == 1
    assert capsys.readouterr().err == "error: --chunk-size must be at least 1, got 0\n"
    assert len(earlier) == 2 and {p: open(p, "rb").read() for p in earlier} == earlier
    directory = str(tmp_path / "new") + os.sep
    rc = preprocess_data.main(["--input", str(tmp_path / "in.jsonl"), "--output-prefix", directory,
                               "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", spm_model])
    assert rc == 1 and capsys.readouterr().err == (
        f"error: --output-prefix {directory!r} ends in a directory separator, so the files would be named "
        f"'_{{key}}_document.bin'; give a file-name prefix, e.g. --output-prefix {directory}corpus\n")
    assert not os.path.exists(directory)


def test_a_list_of_sentences_is_one_document_of_each_sentences_tokens(tmp_path, spm_model, capsys):
    """A --json-keys value that is a list of strings (the form Megatron-LM's --split-sentences pre-pass writes) was
    skipped as 'holds list, not a string'. Megatron-LM's Encoder.encode tokenizes each sentence on its own and
    concatenates the tokens (an empty sentence adds none), the EOD after the last; a list holding anything but
    strings stays a bad line naming the key, the element and the line."""
    docs = [{"text": ["a b.", "c d."]}, {"text": ["def f(x):", "", "    return x  # 🚀 ünï"]},
            {"text": "a plain string"}, {"text": ["only one"]}, {"text": ["", ""]}]
    write_jsonl(tmp_path / "in.jsonl", docs, {3: json.dumps({"text": ["fine", 7]}), 5: '{"text": ["x", "\\ud800"]}'})
    assert run_main(tmp_path, spm_model, "--append-eod", "--workers", "2") == 0
    err = capsys.readouterr().err
    where = tmp_path / "in.jsonl"
    assert f"warning: {where}:3: skipped line: key 'text' element 1 holds int, not a string" in err.splitlines(), err
    assert "in.jsonl:5: skipped line: key 'text' element 1 holds a lone surrogate '\\ud800' at character 0" in err, err
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=spm_model)
    expected = []
    for doc in docs:
        sentences = doc["text"] if isinstance(doc["text"], list) else [doc["text"]]
        ids = [i for sentence in sentences for i in tok.tokenize(sentence)]
        expected.append(ids + [tok.eod] if ids else ids)
    prefix = str(tmp_path / "out" / "data_text_document")
    dataset = IndexedDataset(prefix)
    assert len(dataset) == dataset.num_documents == len(docs)
    assert [dataset[i].tolist() for i in range(len(dataset))] == expected
    _, documents, sequences = read_megatron_index(prefix)
    assert documents == list(range(len(docs) + 1)) and sequences == expected
