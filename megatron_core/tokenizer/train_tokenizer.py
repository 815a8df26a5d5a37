"""Train a SentencePiece tokenizer model from plain-text files or JSONL.

    python tools/train_tokenizer.py --input corpus.jsonl --json-keys text \
        --vocab-size 32000 --model-prefix out/tokenizer --model-type bpe

writes ``out/tokenizer.model`` (and ``.vocab``) for ``--tokenizer-type SentencePieceTokenizer``.
Byte fallback is on, so any text (any language, emoji, control bytes) tokenizes without <unk>,
and normalization is off, so ``detokenize(tokenize(text)) == text``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Iterator, Sequence

from megatron_core.errors import ArgumentParser
from megatron_core.tokenizer.base import json_sentences, unique_json_keys

_JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")


def _is_json_input(path: str, input_format: str) -> bool:
    if input_format == "auto":
        return path.lower().endswith(_JSON_SUFFIXES)
    return input_format == "json"


def iter_training_lines(
    inputs: Sequence[str], json_keys: Sequence[str] = ("text",), input_format: str = "auto"
) -> Iterator[str]:
    """Non-empty lines of the inputs; JSONL documents are split into lines of their ``json_keys``.

    SentencePiece trains on "sentences" of at most a few KB, so documents are fed line by line.
    A key's value is a string or, as for ``preprocess_data``, a list of strings (sentences).
    Malformed JSON lines, and lines where any key's value is no such text or holds a lone UTF-16
    surrogate, are skipped whole (as ``preprocess_data`` skips them) with a note on stderr rather
    than aborting a long run. A key given twice is read once (``unique_json_keys``).
    """
    json_keys = unique_json_keys(json_keys)
    for path in inputs:
        as_json = _is_json_input(path, input_format)
        with open(path, encoding="utf-8", errors="replace") as f:
            for line_number, line in enumerate(f, start=1):
                if not as_json:
                    if line.strip():
                        yield line.rstrip("\n")
                    continue
                if not line.strip():
                    continue
                try:
                    document = json.loads(line)
                    texts = [document[key] for key in json_keys]
                except (ValueError, KeyError, TypeError) as exc:
                    print(f"warning: {path}:{line_number}: skipped ({type(exc).__name__}: {exc})", file=sys.stderr)
                    continue
                # The whole line is skipped (as preprocess_data skips it), not the run stopped:
                # SentencePiece's trainer fails as a whole on a lone surrogate.
                try:
                    sentences = [part for key, text in zip(json_keys, texts, strict=True)
                                 for part in json_sentences(key, text)]
                except ValueError as exc:
                    print(f"warning: {path}:{line_number}: skipped ({exc})", file=sys.stderr)
                    continue
                for text in sentences:
                    yield from (part for part in text.split("\n") if part.strip())


# unk, bos and eos (no pad piece): the ids set in train_sentencepiece.
_SPECIAL_PIECES = 3


def train_sentencepiece(
    inputs: Sequence[str],
    model_prefix: str,
    vocab_size: int,
    *,
    json_keys: Sequence[str] = ("text",),
    model_type: str = "bpe",
    input_format: str = "auto",
    character_coverage: float = 0.9995,
    byte_fallback: bool = True,
    input_sentence_size: int = 0,
    num_threads: int | None = None,
    verbose: bool = False,
) -> str:
    """Train a SentencePiece model and return the path of the written ``{model_prefix}.model``."""
    import sentencepiece

    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"--model-type must be bpe or unigram, got {model_type!r}")
    for path in inputs:
        if os.path.isdir(path):
            raise ValueError(f"--input {path!r} is a directory; give the files in it (e.g. {path.rstrip('/')}/*.jsonl)")
        if not os.path.isfile(path):
            raise ValueError(f"--input file not found: {path!r}")
    # SentencePiece's own bound (trainer_interface.cc), which it reports as an internal check failing.
    if not 0.98 <= character_coverage <= 1.0:
        raise ValueError(f"--character-coverage must be in [0.98, 1] (SentencePiece's range), got {character_coverage}")
    if not os.path.basename(model_prefix):  # SentencePiece would train first, then fail to write DIR/.model
        raise ValueError(f"--model-prefix {model_prefix!r} ends in a directory separator, so the files would be "
                         f"named '.model' and '.vocab'; give a file-name prefix, e.g. --model-prefix "
                         f"{os.path.join(model_prefix, 'tokenizer')}")
    parent = os.path.dirname(os.path.abspath(model_prefix))
    os.makedirs(parent, exist_ok=True)
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter_training_lines(inputs, json_keys, input_format),
            model_prefix=model_prefix,
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            byte_fallback=byte_fallback,
            # Lossless round trips: keep whitespace (indentation matters in code) and do not
            # NFKC-normalize; digits are split so numbers do not eat vocabulary.
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            unk_id=0,
            bos_id=1,
            eos_id=2,  # the EOD id of SentencePieceTokenizer
            pad_id=-1,
            input_sentence_size=input_sentence_size,
            shuffle_input_sentence=True,
            num_threads=num_threads or os.cpu_count() or 1,
            minloglevel=0 if verbose else 2,
        )
    except RuntimeError as exc:
        raise _training_error(str(exc), inputs, vocab_size, character_coverage, byte_fallback) from None
    return f"{model_prefix}.model"


class VocabSizeTooLargeError(ValueError):
    """``vocab_size`` is more pieces than the training text holds; ``most`` is SentencePiece's bound for it."""

    def __init__(self, message: str, most: int) -> None:
        super().__init__(message)
        self.most = most


def _training_error(message: str, inputs: Sequence[str], vocab_size: int, character_coverage: float,
                    byte_fallback: bool) -> ValueError:
    """SentencePiece's failure said with this tool's flags (it names its own, spelt with underscores, or
    quotes an internal check)."""
    # e.g. "Vocabulary size is smaller than required_chars. 256 vs 344. ... with --character_coverage option.":
    # byte fallback alone needs 256 byte pieces plus the special pieces plus one per frequent character.
    short = re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", message)
    if short:
        needed = int(short.group(2))
        byte_pieces = 256 if byte_fallback else 0
        parts = f"{byte_pieces} byte-fallback pieces, " if byte_fallback else ""
        parts += f"{_SPECIAL_PIECES} special pieces and {needed - byte_pieces - _SPECIAL_PIECES} characters"
        return ValueError(f"--vocab-size {vocab_size} is too small: the input's characters at --character-coverage "
                          f"{character_coverage} need {needed} pieces ({parts}); raise --vocab-size to at least "
                          f"{needed} (the pieces above it are the merges) or lower --character-coverage")
    # "Vocabulary size too high (300). Please set it to a value <= 276.": the text has too few distinct pieces.
    high = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", message)
    if high:
        return VocabSizeTooLargeError(f"--vocab-size {vocab_size} is more pieces than the input holds (at most "
                                      f"{high.group(2)}); lower --vocab-size or add text", int(high.group(2)))
    if "!sentences_.empty()" in message:
        return ValueError(f"--input {' '.join(inputs)}: no text to train on (every line blank or skipped); JSONL "
                          f"needs objects with the --json-keys strings, other files are read as plain text")
    return ValueError(f"sentencepiece training failed (--vocab-size {vocab_size}): {message}")


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags."""
    parser = ArgumentParser(description=__doc__.split("\n\n")[0],
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help="text or JSONL files")
    parser.add_argument("--json-keys", nargs="+", default=["text"],
                        help="JSONL keys holding the text, a string or a list of sentences (a key given twice is "
                             "read once)")
    parser.add_argument("--input-format", choices=("auto", "text", "json"), default="auto",
                        help="auto: .jsonl/.json/.ndjson files are JSON lines, others plain text")
    parser.add_argument("--vocab-size", type=int, required=True,
                        help="tokens in the trained vocabulary")
    parser.add_argument("--model-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    parser.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe",
                        help="SentencePiece algorithm: byte-pair encoding or the unigram language model")
    parser.add_argument("--character-coverage", type=float, default=0.9995,
                        help="fraction of the input's characters the vocabulary covers (rarer ones become byte pieces)")
    parser.add_argument("--input-sentence-size", type=int, default=0,
                        help="train on a random sample of this many lines (0: all)")
    parser.add_argument("--num-threads", type=int, default=None, help="trainer threads (None: all cores)")
    parser.add_argument("--verbose", action="store_true", help="print SentencePiece's own training log")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the process exit code."""
    args = build_parser().parse_args(argv)
    try:
        model = train_sentencepiece(
            args.input, args.model_prefix, args.vocab_size, json_keys=args.json_keys,
            model_type=args.model_type, input_format=args.input_format,
            character_coverage=args.character_coverage, input_sentence_size=args.input_sentence_size,
            num_threads=args.num_threads, verbose=args.verbose,
        )
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {model}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
