"""Tokenizers: SentencePiece training + round trips, GPT-2 BPE, Hugging Face, Null, and flag errors."""
from __future__ import annotations

import glob
import json
import os
import pickle
import re
import subprocess
import sys

import pytest

from megatron_core.tokenizer import NullTokenizer, build_tokenizer, train_tokenizer
from megatron_core.tokenizer.base import NO_TOKEN
from megatron_core.tokenizer.train_tokenizer import iter_training_lines, train_sentencepiece

SAMPLES = (
    "def f(x):\n    return x + 1\n",
    "  leading and trailing spaces  ",
    "unicode: café, naïve, 日本語, emoji 🚀, tab\there",
    "",
)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def stdlib_text(max_bytes: int = 12_000) -> str:
    """A few KB of real text that exists on every Python install: stdlib sources."""
    parts, size = [], 0
    for path in sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py"))):
        with open(path, encoding="utf-8") as f:
            chunk = f.read(2000)
        parts.append(chunk)
        size += len(chunk)
        if size >= max_bytes:
            break
    return "\n".join(parts)


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(stdlib_text(), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def spm_model(corpus_file, tmp_path_factory):
    prefix = tmp_path_factory.mktemp("spm") / "tok"
    return train_sentencepiece([corpus_file], str(prefix), vocab_size=400, model_type="bpe")


def test_sentencepiece_round_trip_and_specials(spm_model):
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=spm_model)
    assert tok.vocab_size == 400
    assert tok.eod == 2 and tok.bos == 1 and tok.pad == -1
    for text in SAMPLES:
        ids = tok.tokenize(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.detokenize(ids) == text  # byte fallback + identity normalization: lossless
    # Megatron's GPT flavour name is accepted too.
    assert build_tokenizer("GPTSentencePieceTokenizer", tokenizer_model=spm_model).eod == tok.eod
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.tokenize(SAMPLES[2]) == tok.tokenize(SAMPLES[2])


def test_llama2_tokenizer_prepends_bos_through_preprocessing_export_and_reshard(spm_model, tmp_path):
    """Megatron-LM's --tokenizer-type Llama2Tokenizer (its Mixtral example, docs/llama_mistral.md) was an invalid
    choice. As Megatron-LM's _Llama2Tokenizer: SentencePiece with the bos id before every tokenized text, eos as
    EOD; the exported Hugging Face tokenizer adds the same bos, and a core re-shard keeps the type."""
    from transformers import AutoTokenizer

    from megatron_core.checkpoint.convert import load_core, save_core
    from megatron_core.checkpoint.hf_tokenizer import save_tokenizer
    from megatron_core.datasets.indexed_dataset import IndexedDataset
    from megatron_core.datasets.preprocess_data import main as preprocess
    from megatron_core.training.arguments import parse_args
    from tests.hf_testing import tiny_hf_gpt2

    tok = build_tokenizer("Llama2Tokenizer", tokenizer_model=spm_model)
    plain = build_tokenizer("SentencePieceTokenizer", tokenizer_model=spm_model)
    text = "def main():\n    return 0"
    assert tok.tokenize(text) == [tok.bos] + plain.tokenize(text) and tok.bos == 1
    assert (tok.eod, tok.vocab_size, tok.detokenize(tok.tokenize(text)[1:])) == (plain.eod, 400, text)
    assert parse_args(["--tokenizer-type", "Llama2Tokenizer"]).tokenizer_type == "Llama2Tokenizer"
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"text": text}) + "\n" + json.dumps({"text": "x = 1"}) + "\n")
    assert preprocess(["--input", str(corpus), "--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model",
                       spm_model, "--output-prefix", str(tmp_path / "d"), "--append-eod"]) == 0
    docs = IndexedDataset(str(tmp_path / "d_text_document"))
    assert [list(docs[i][:1]) + list(docs[i][-1:]) for i in range(2)] == [[tok.bos, tok.eod]] * 2
    save_tokenizer(tok, str(tmp_path / "hf"))
    assert AutoTokenizer.from_pretrained(str(tmp_path / "hf"))(text)["input_ids"] == tok.tokenize(text)
    # A core checkpoint carrying it (as the converter writes) reads back as Llama2Tokenizer.
    tiny_hf_gpt2(vocab_size=400).save_pretrained(tmp_path / "model")
    from megatron_core.checkpoint.convert import load_hf
    model = load_hf(str(tmp_path / "model"))
    model.tokenizer = tok
    save_core(model, str(tmp_path / "core"), tp=1)
    assert type(load_core(str(tmp_path / "core")).tokenizer).__name__ == "Llama2Tokenizer"


@pytest.mark.parametrize("unk, bos, eos, pad", [(1, -1, 0, -1), (1, 0, 2, 3), (1, 2, 3, 0)])
def test_sentencepiece_special_ids_at_zero(tmp_path, unk, bos, eos, pad):
    # Id 0 is a real id: a model whose eos, bos or pad piece is 0 keeps it (-1 alone means "none").
    import sentencepiece

    prefix = str(tmp_path / "ids")
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(stdlib_text(4000).splitlines()), model_prefix=prefix, vocab_size=400,
        byte_fallback=True, unk_id=unk, bos_id=bos, eos_id=eos, pad_id=pad, minloglevel=2, num_threads=1)
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=prefix + ".model")
    as_id = lambda i: NO_TOKEN if i < 0 else i  # noqa: E731
    assert (tok.eod, tok.bos, tok.pad) == (eos, as_id(bos), as_id(pad))


def test_train_from_jsonl_unigram_and_cli(tmp_path, corpus_file, capsys):
    text = open(corpus_file, encoding="utf-8").read()
    jsonl = tmp_path / "docs.jsonl"
    with open(jsonl, "w", encoding="utf-8") as f:
        for i in range(0, len(text), 800):
            f.write(json.dumps({"content": text[i:i + 800]}) + "\n")
        f.write("not json\n")  # skipped with a warning, not fatal
    model = train_sentencepiece([str(jsonl)], str(tmp_path / "uni"), 400, json_keys=["content"], model_type="unigram")
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=model)
    assert tok.detokenize(tok.tokenize(SAMPLES[2])) == SAMPLES[2]
    rc = train_tokenizer.main(["--input", corpus_file, "--vocab-size", "400", "--model-prefix", str(tmp_path / "cli")])
    assert rc == 0 and os.path.isfile(tmp_path / "cli.model")
    assert capsys.readouterr().err.endswith(f"wrote {tmp_path / 'cli'}.model\n")


def test_training_lines_of_jsonl_and_text(tmp_path):
    # By suffix ("auto"), a .jsonl file gives its documents' lines and a .txt file its own lines;
    # --input-format json/text overrides the suffix.
    jsonl, txt = tmp_path / "a.jsonl", tmp_path / "b.txt"
    jsonl.write_text(json.dumps({"text": "one\ntwo"}) + "\n\n" + json.dumps({"text": "three"}) + "\n")
    txt.write_text('{"text": "x"}\n\nplain\n')
    assert list(iter_training_lines([str(jsonl)])) == ["one", "two", "three"]
    assert list(iter_training_lines([str(txt)])) == ['{"text": "x"}', "plain"]
    assert list(iter_training_lines([str(txt)], input_format="json")) == ["x"]
    assert list(iter_training_lines([str(jsonl)], input_format="text"))[0] == json.dumps({"text": "one\ntwo"})


def test_train_vocab_too_small_is_a_clear_error(tmp_path, corpus_file):
    """The count said 'the input's characters need 295 pieces' of a text of 36 characters: 256 of them are
    byte-fallback pieces, which the message now says, so the vocabulary left for merges is no surprise."""
    with pytest.raises(ValueError, match=r"^--vocab-size 100 is too small: the input's characters at "
                                         r"--character-coverage 0.9995 need (\d+) pieces \(256 byte-fallback "
                                         r"pieces, 3 special pieces and (\d+) characters\); raise --vocab-size "
                                         r"to at least \1 \(the pieces above it are the merges\) or lower "
                                         r"--character-coverage$") as info:
        train_sentencepiece([corpus_file], str(tmp_path / "small"), vocab_size=100)
    chars = int(re.search(r"and (\d+) characters", str(info.value)).group(1))
    distinct = set(open(corpus_file, encoding="utf-8").read()) - {"\n"}  # lines are the training sentences
    assert 0.9 * len(distinct) <= chars <= len(distinct), (chars, len(distinct))


@pytest.mark.parametrize("case", ["no-text", "vocab-too-large", "coverage", "directory", "prefix"])
def test_train_failures_name_the_flag_not_an_internal_check(tmp_path, corpus_file, case):
    """They were "sentencepiece training failed (--vocab-size 300): INTERNAL: src/trainer_interface.cc(467)
    [!sentences_.empty()]" (no usable line), "... [(trainer_spec_.vocab_size()) == (model_proto->pieces_size())]
    Vocabulary size too high" and "... [trainer_spec.character_coverage() >= 0.98 && ...]": each blamed
    --vocab-size or quoted SentencePiece's source."""
    jsonl = tmp_path / "keyless.jsonl"
    jsonl.write_text(json.dumps({"body": "text under another key"}) + "\n\n")
    inputs, vocab_size, kwargs, expected = {
        "no-text": ([str(jsonl)], 300, {}, f"--input {jsonl}: no text to train on (every line blank or skipped); "
                                           "JSONL needs objects with the --json-keys strings"),
        "vocab-too-large": ([corpus_file], 100_000, {}, r"--vocab-size 100000 is more pieces than the input holds "
                                                         r"(at most "),
        "coverage": ([corpus_file], 400, {"character_coverage": 2.0},
                     "--character-coverage must be in [0.98, 1] (SentencePiece's range), got 2.0"),
        # Was "--input file not found".
        "directory": ([str(tmp_path)], 400, {}, f"--input '{tmp_path}' is a directory; give the files in it"),
        # Was "sentencepiece training failed (--vocab-size 400): NOT_FOUND: "DIR/.model": No such file or
        # directory", after the training.
        "prefix": ([corpus_file], 400, {"model_prefix": str(tmp_path / "out") + os.sep},
                   f"--model-prefix '{tmp_path / 'out'}{os.sep}' ends in a directory separator, so the files would "
                   f"be named '.model' and '.vocab'; give a file-name prefix, e.g. --model-prefix "
                   f"{tmp_path / 'out' / 'tokenizer'}"),
    }[case]
    prefix = kwargs.pop("model_prefix", str(tmp_path / "tok"))
    with pytest.raises(ValueError) as info:
        train_sentencepiece(inputs, prefix, vocab_size, **kwargs)
    assert str(info.value).startswith(expected) and "INTERNAL" not in str(info.value), str(info.value)


def _train_byte_level_bpe(tmp_path):
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([stdlib_text(6000)], vocab_size=400, min_frequency=2,
                            show_progress=False, special_tokens=["<|endoftext|>"])
    bpe.save_model(str(tmp_path))
    return bpe, str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt")


def test_gpt2_bpe_round_trip(tmp_path):
    reference, vocab, merges = _train_byte_level_bpe(tmp_path)
    tok = build_tokenizer("GPT2BPETokenizer", vocab_file=vocab, merge_file=merges)
    assert tok.vocab_size == len(json.load(open(vocab)))
    assert tok.eod == json.load(open(vocab))["<|endoftext|>"]
    for text in SAMPLES:
        ids = tok.tokenize(text)
        assert ids == reference.encode(text).ids
        assert tok.detokenize(ids) == text
    assert pickle.loads(pickle.dumps(tok)).tokenize("x = 1") == tok.tokenize("x = 1")
    # transformers' pure-Python GPT2Tokenizer is an independent implementation of GPT-2's BPE.
    from transformers import GPT2Tokenizer

    slow = GPT2Tokenizer(vocab, merges)
    for text in SAMPLES + (stdlib_text(3000)[1000:2500], "Hello world's 123 don't  \n\n  x"):
        assert tok.tokenize(text) == slow.encode(text)


def test_gpt2_bpe_missing_endoftext(tmp_path):
    _, vocab, merges = _train_byte_level_bpe(tmp_path)
    table = json.load(open(vocab))
    del table["<|endoftext|>"]
    json.dump(table, open(vocab, "w"))
    with pytest.raises(ValueError, match="--vocab-file"):
        build_tokenizer("GPT2BPETokenizer", vocab_file=vocab, merge_file=merges)


def test_gpt2_bpe_missing_merge_file_names_the_flag(tmp_path):
    # A real vocab.json next to a merges path that does not exist: the error names --merge-file
    # rather than whatever the tokenizers library says about the missing file.
    _, vocab, _ = _train_byte_level_bpe(tmp_path)
    missing = str(tmp_path / "no_such_merges.txt")
    with pytest.raises(ValueError, match=f"merge file .*not found: {missing!r}; pass --merge-file"):
        build_tokenizer("GPT2BPETokenizer", vocab_file=vocab, merge_file=missing)


def _save_hf_tokenizer_json(path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    hf.train_from_iterator([stdlib_text(6000)], trainer=trainer)
    hf.save(str(path))
    return hf


def test_huggingface_tokenizer_from_file_and_dir(tmp_path):
    reference = _save_hf_tokenizer_json(tmp_path / "tokenizer.json")
    for location in (tmp_path / "tokenizer.json", tmp_path):
        tok = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(location))
        assert tok.eod == reference.token_to_id("<|endoftext|>")
        assert tok.pad == reference.token_to_id("<pad>")
        assert tok.vocab_size == reference.get_vocab_size()
        for text in SAMPLES:
            assert tok.detokenize(tok.tokenize(text)) == text
    # A tokenizer_config.json beside it decides which token is eos.
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<pad>"}}))
    assert build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(tmp_path)).eod == reference.token_to_id("<pad>")


def test_huggingface_transformers_directory_without_tokenizer_json(tmp_path):
    # A saved GPT-2 tokenizer directory with tokenizer_config.json, vocab.json and merges.txt but no
    # tokenizer.json (as transformers 4 wrote slow tokenizers) is loaded through transformers; ids
    # and specials are the saved tokenizer's.
    import shutil

    from transformers import GPT2Tokenizer

    _, vocab, merges = _train_byte_level_bpe(tmp_path)
    slow = GPT2Tokenizer(vocab, merges)
    saved = tmp_path / "saved"
    slow.save_pretrained(str(saved))
    if os.path.exists(saved / "tokenizer.json"):  # transformers 5 writes one, and no vocab.json
        os.remove(saved / "tokenizer.json")
    shutil.copy(vocab, saved)
    shutil.copy(merges, saved)
    tok = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(saved))
    assert (tok.eod, tok.bos, tok.pad) == (slow.eos_token_id, slow.bos_token_id, NO_TOKEN)
    assert tok.vocab_size == len(slow)
    assert tok.tokenize(SAMPLES[0]) == slow.encode(SAMPLES[0])


def test_huggingface_never_downloads(tmp_path):
    with pytest.raises(ValueError, match="--tokenizer-model"):
        build_tokenizer("HuggingFaceTokenizer", tokenizer_model="gpt2")


def test_null_tokenizer():
    tok = build_tokenizer("NullTokenizer", vocab_size=100)
    assert isinstance(tok, NullTokenizer)
    assert tok.vocab_size == 101 and tok.eod == 100 == tok.vocab_size - 1  # Megatron-LM's convention
    assert tok.tokenize("5 17\n 99") == [5, 17, 99]
    assert tok.tokenize("0 100") == [0, 100]  # the range's ends: the first plain id and EOD
    assert tok.detokenize([5, 17, 99]) == "5 17 99"
    assert tok.tokenize("") == []
    with pytest.raises(ValueError):
        tok.tokenize("5 seven")
    with pytest.raises(ValueError):
        tok.tokenize("101")


@pytest.mark.parametrize(
    "kwargs, flag",
    [
        (dict(tokenizer_type="Nope"), "--tokenizer-type"),
        (dict(tokenizer_type="SentencePieceTokenizer"), "--tokenizer-model"),
        # A missing file is "not found", not "not a SentencePiece .model file" (what sentencepiece's error became).
        (dict(tokenizer_type="SentencePieceTokenizer", tokenizer_model="/no/such.model"),
         r"not found: '/no/such\.model'; pass --tokenizer-model"),
        (dict(tokenizer_type="GPT2BPETokenizer", merge_file="m.txt"), "--vocab-file"),
        (dict(tokenizer_type="GPT2BPETokenizer", vocab_file=__file__), "--merge-file"),
        (dict(tokenizer_type="GPT2BPETokenizer", vocab_file="/no/vocab.json", merge_file=__file__),
         r"vocab file .*not found: '/no/vocab\.json'; pass --vocab-file"),
        (dict(tokenizer_type="HuggingFaceTokenizer"), "--tokenizer-model"),
        (dict(tokenizer_type="NullTokenizer"), "--vocab-size"),
    ],
)
def test_build_tokenizer_errors_name_the_flag(kwargs, flag):
    tokenizer_type = kwargs.pop("tokenizer_type")
    with pytest.raises(ValueError, match=flag):
        build_tokenizer(tokenizer_type, **kwargs)


def test_training_skips_a_lone_surrogate_line_instead_of_failing(tmp_path, corpus_file, capsys):
    # One JSON line spelling half a UTF-16 pair made SentencePiece's trainer fail as a whole, with a binding
    # error blamed on --vocab-size; a value that is no string was dropped without a word.
    jsonl = tmp_path / "c.jsonl"
    lines = [json.dumps({"text": line}) for line in open(corpus_file, encoding="utf-8").read().splitlines()]
    lines[3:3] = ['{"text": "half \\ud800 pair"}', '{"text": 7}']
    jsonl.write_text("\n".join(lines) + "\n")
    model = train_sentencepiece([str(jsonl)], str(tmp_path / "tok"), vocab_size=400)
    assert os.path.isfile(model)
    err = capsys.readouterr().err
    assert "c.jsonl:4: skipped (key 'text' holds a lone surrogate '\\ud800' at character 5" in err, err
    assert "c.jsonl:5: skipped (key 'text' holds int, not a string or a list of strings)" in err, err


def test_a_line_with_one_bad_key_is_skipped_whole_as_preprocess_data_skips_it(tmp_path, capsys):
    # With several --json-keys, only the bad key's text was dropped while the warning said the line was
    # skipped; preprocess_data skips the whole line, so the two tools saw different corpora.
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text('{"title": "kept title", "text": "kept body"}\n'
                     '{"title": "dropped title", "text": "half \\udc00 pair"}\n'
                     '{"title": "dropped too", "text": 3}\n')
    lines = list(iter_training_lines([str(jsonl)], json_keys=("title", "text")))
    assert lines == ["kept title", "kept body"]
    err = capsys.readouterr().err
    assert "c.jsonl:2: skipped (key 'text' holds a lone surrogate '\\udc00'" in err, err
    assert "c.jsonl:3: skipped (key 'text' holds int, not a string or a list of strings)" in err, err


def test_a_json_key_given_twice_is_read_once(tmp_path, corpus_file):
    """--json-keys text text fed SentencePiece every document twice (230 sentences for 115); the key is read once,
    as preprocess_data reads it, with a warning naming --json-keys and the key."""
    text = open(corpus_file, encoding="utf-8").read()
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": text[i:i + 800]}) + "\n" for i in range(0, len(text), 800)))

    def loaded(*keys):
        proc = subprocess.run(
            [sys.executable, os.path.join(REPO, "tools", "train_tokenizer.py"), "--input", str(jsonl), "--json-keys",
             *keys, "--vocab-size", "400", "--model-prefix", str(tmp_path / "tok"), "--verbose"],
            capture_output=True, text=True, timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        counts = re.findall(r"Loaded all (\d+) sentences", proc.stderr)
        warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
        return int(counts[0]), warnings

    once, none = loaded("text")
    assert once > 0 and none == []
    assert loaded("text", "text") == (once, ["warning: --json-keys names 'text' more than once; each key is read once"])


def test_a_list_of_sentences_is_trained_on_as_preprocess_data_reads_it(tmp_path, capsys):
    # A value that is a list of strings (Megatron-LM's sentence-split JSONL, which preprocess_data reads) was
    # skipped as 'list, not a string'; a list holding anything but strings is still a skipped line.
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text(json.dumps({"text": ["first sentence.", "", "second\nwith two lines."]}) + "\n"
                     + json.dumps({"text": ["kept", 7]}) + "\n" + json.dumps({"text": "plain"}) + "\n")
    assert list(iter_training_lines([str(jsonl)])) == ["first sentence.", "second", "with two lines.", "plain"]
    assert "c.jsonl:2: skipped (key 'text' element 1 holds int, not a string)" in capsys.readouterr().err
