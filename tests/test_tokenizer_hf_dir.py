"""A Hugging Face Llama directory as the tokenizer: our ids are the ones transformers gives for it.

The directory is built here, nothing downloaded: a SentencePiece BPE model trained on stdlib text,
read by transformers' Llama tokenizer (bos added, as Llama's tokenizer_config says) and saved with
``save_pretrained``, with ``tokenizer.model`` beside it as Hub Llama directories hold it. The bare
SentencePiece model adds no bos, and encodes leading spaces and ``<s>`` in the text differently.
"""
from __future__ import annotations

import json
import os
import shutil

import pytest
from test_tokenizer import stdlib_text

from megatron_core.tokenizer import build_tokenizer
from megatron_core.tokenizer.train_tokenizer import train_sentencepiece

TEXTS = ("Hello world", " leading space", "def f(x):\n    return x + 1\n", "café, 日本語 🚀", "", "<s> in text </s>")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from transformers import LlamaTokenizerFast

    root = tmp_path_factory.mktemp("llama_tok")
    (root / "corpus.txt").write_text(stdlib_text(), encoding="utf-8")
    model = train_sentencepiece([str(root / "corpus.txt")], str(root / "sp"), vocab_size=400, model_type="bpe")
    os.makedirs(root / "slow")
    shutil.copy(model, root / "slow" / "tokenizer.model")
    directory = root / "llama"
    LlamaTokenizerFast.from_pretrained(str(root / "slow"), add_bos_token=True).save_pretrained(str(directory))
    shutil.copy(model, directory / "tokenizer.model")
    return str(directory)


def _hf_ids(path, text):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path, local_files_only=True)(text)["input_ids"]


def test_directory_tokenizer_gives_transformers_ids(llama_dir):
    from megatron_core.checkpoint.hf_tokenizer import dir_tokenizer_flags, load_dir_tokenizer

    assert dir_tokenizer_flags(llama_dir) == {"tokenizer_type": "HuggingFaceTokenizer", "tokenizer_model": llama_dir}
    for tok in (load_dir_tokenizer(llama_dir), build_tokenizer("HuggingFaceTokenizer", tokenizer_model=llama_dir)):
        assert (tok.bos, tok.eod, tok.vocab_size) == (1, 2, 400)
        for text in TEXTS:
            assert tok.tokenize(text) == _hf_ids(llama_dir, text), text
        assert tok.tokenize("Hello world")[0] == tok.bos
    # The converter's record of a SentencePiece run keeps it on its .model file.
    assert dir_tokenizer_flags(llama_dir, "Llama2Tokenizer")["tokenizer_type"] == "Llama2Tokenizer"


def test_tokenizer_model_with_its_config_reads_through_transformers(llama_dir, tmp_path):
    """A directory of tokenizer.model and tokenizer_config.json (no tokenizer.json, as older Llama repos):
    transformers converts the model and adds bos; so does the directory tokenizer, and it exports."""
    from megatron_core.checkpoint.hf_tokenizer import load_dir_tokenizer, save_tokenizer

    only_model = tmp_path / "only_model"
    os.makedirs(only_model)
    shutil.copy(os.path.join(llama_dir, "tokenizer.model"), only_model)
    config = json.loads(open(os.path.join(llama_dir, "tokenizer_config.json")).read())
    (only_model / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": True}))
    tok = load_dir_tokenizer(str(only_model))
    for text in TEXTS:
        assert tok.tokenize(text) == _hf_ids(str(only_model), text), text
    save_tokenizer(tok, str(tmp_path / "exported"))
    assert _hf_ids(str(tmp_path / "exported"), TEXTS[2]) == tok.tokenize(TEXTS[2])


def test_converted_llama_checkpoint_and_preprocessing_keep_the_bos(llama_dir, tmp_path):
    """convert.py --loader hf carries the directory's tokenizer into the core checkpoint, and
    --use-checkpoint-args then trains with it; preprocess_data writes bos ... eod per document."""
    from hf_testing import tiny_hf_llama

    from megatron_core.checkpoint.convert import load_core
    from megatron_core.checkpoint.convert import main as convert
    from megatron_core.datasets.indexed_dataset import IndexedDataset
    from megatron_core.datasets.preprocess_data import main as preprocess
    from megatron_core.training.arguments.checkpoint_args import _records

    model_dir = tmp_path / "model"
    tiny_hf_llama(vocab_size=400).save_pretrained(str(model_dir))
    for name in os.listdir(llama_dir):
        shutil.copy(os.path.join(llama_dir, name), model_dir)
    assert convert(["--model-type", "GPT", "--loader", "hf", "--saver", "core", "--load-dir", str(model_dir),
                    "--save-dir", str(tmp_path / "core")]) == 0
    core = load_core(str(tmp_path / "core"))
    assert [core.tokenizer.tokenize(t) for t in TEXTS] == [_hf_ids(llama_dir, t) for t in TEXTS]
    flags = _records(str(tmp_path / "core"), None)[2]
    assert flags["tokenizer_type"] == "HuggingFaceTokenizer"
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS[:4]))
    assert preprocess(["--input", str(corpus), "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
                       llama_dir, "--output-prefix", str(tmp_path / "d"), "--append-eod"]) == 0
    docs = IndexedDataset(str(tmp_path / "d_text_document"))
    assert [list(docs[i]) for i in range(4)] == [_hf_ids(llama_dir, t) + [2] for t in TEXTS[:4]]


def test_tokenizer_model_alone_is_the_bare_sentencepiece_model(llama_dir, tmp_path):
    """Without a tokenizer_config.json nothing says how transformers would wrap the model: the directory's
    tokenizer is the SentencePiece model itself (its own ids, no bos), not Hugging Face's Llama reading."""
    import sentencepiece

    from megatron_core.checkpoint.hf_tokenizer import dir_tokenizer_flags, load_dir_tokenizer

    alone = tmp_path / "alone"
    os.makedirs(alone)
    spm_file = shutil.copy(os.path.join(llama_dir, "tokenizer.model"), alone)
    assert dir_tokenizer_flags(str(alone)) == {"tokenizer_type": "SentencePieceTokenizer", "tokenizer_model": spm_file}
    processor = sentencepiece.SentencePieceProcessor(model_file=spm_file)
    tok = load_dir_tokenizer(str(alone))
    for text in TEXTS:
        assert tok.tokenize(text) == processor.encode(text), text


@pytest.mark.parametrize("kind", ["SentencePieceTokenizer", "Llama2Tokenizer"])
def test_sentencepiece_type_given_the_directory_says_what_to_pass(llama_dir, kind):
    with pytest.raises(ValueError, match=f"^--tokenizer-model '{llama_dir}' is a directory; pass its tokenizer.model "
                                         f"file, or --tokenizer-type HuggingFaceTokenizer"):
        build_tokenizer(kind, tokenizer_model=llama_dir)


def test_huggingface_type_given_the_sentencepiece_file_says_what_to_pass(llama_dir):
    # It was tokenizers' 'is not a valid tokenizer.json: stream did not contain valid UTF-8', naming no fix.
    model = os.path.join(llama_dir, "tokenizer.model")
    with pytest.raises(ValueError, match=f"^--tokenizer-model '{model}' is a SentencePiece model, not a "
                                         f"tokenizer.json; pass its directory .* or --tokenizer-type "
                                         f"SentencePieceTokenizer$"):
        build_tokenizer("HuggingFaceTokenizer", tokenizer_model=model)


def test_llama_mistral_loader_with_llama2_model_size_puts_bos_first(llama_dir, tmp_path):
    """Megatron-LM's llama_mistral loader records Llama2Tokenizer for --model-size llama2-*, whose
    tokenizer.model it is given (docs/llama_mistral.md); here that was a plain SentencePieceTokenizer."""
    from hf_testing import tiny_hf_llama

    from megatron_core.checkpoint.convert import load_core
    from megatron_core.checkpoint.convert import main as convert

    tiny_hf_llama(vocab_size=400).save_pretrained(str(tmp_path / "model"))
    spm = os.path.join(llama_dir, "tokenizer.model")
    assert convert(["--model-type", "GPT", "--loader", "llama_mistral", "--checkpoint-type", "hf", "--model-size",
                    "llama2-7B", "--saver", "core", "--load-dir", str(tmp_path / "model"), "--save-dir",
                    str(tmp_path / "core"), "--tokenizer-model", spm]) == 0
    tok = load_core(str(tmp_path / "core")).tokenizer
    assert type(tok).__name__ == "Llama2Tokenizer"
    assert tok.tokenize("Hello world") == _hf_ids(llama_dir, "Hello world")
