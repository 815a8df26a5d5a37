"""Tokenize JSONL into Megatron-LM's mmap indexed dataset (``.bin`` + ``.idx``), one pair per JSON key.

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus \
        --tokenizer-type SentencePieceTokenizer --tokenizer-model tok.model \
        --json-keys text --append-eod --workers 8

writes ``data/corpus_text_document.bin/.idx``; pass ``--data-path data/corpus_text_document`` to
training. The files are byte-compatible with Megatron-LM's own preprocess_data.py.

A key's value is a string, or a list of strings (the sentence-split form Megatron-LM's
``--split-sentences`` pre-pass writes): as Megatron-LM, each sentence is tokenized on its own and the
tokens are concatenated into the document (an empty sentence adds nothing), the EOD after the last.
The ``.bin`` then equals Megatron-LM's; the ``.idx`` holds one sequence per document, where
Megatron-LM's records one per sentence, because GPTDataset reads one sequence per document.
"""
from __future__ import annotations

import argparse
import functools
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from megatron_core.datasets.indexed_dataset import (
    IndexedDatasetBuilder,
    data_file_path,
    index_file_path,
    optimal_dtype,
)
from megatron_core.errors import ArgumentParser
from megatron_core.tokenizer import TOKENIZER_TYPES, MegatronTokenizer, build_tokenizer
from megatron_core.tokenizer.base import json_sentences, unique_json_keys


class BadLineError(ValueError):
    """A malformed input line under ``--on-bad-line error``."""


@dataclass(frozen=True)
class TokenizerSpec:
    """Everything needed to rebuild the tokenizer inside a worker process (hashable, picklable)."""

    tokenizer_type: str
    tokenizer_model: str | None = None
    vocab_file: str | None = None
    merge_file: str | None = None
    vocab_size: int | None = None

    def build(self) -> MegatronTokenizer:
        """Construct the tokenizer."""
        return build_tokenizer(
            self.tokenizer_type, tokenizer_model=self.tokenizer_model, vocab_file=self.vocab_file,
            merge_file=self.merge_file, vocab_size=self.vocab_size,
        )


@functools.lru_cache(maxsize=4)
def _process_tokenizer(spec: TokenizerSpec) -> MegatronTokenizer:
    # One tokenizer per process, built on first use: tasks carry only the small spec.
    return spec.build()


@dataclass(frozen=True)
class _Encoded:
    file_index: int
    line_number: int
    num_bytes: int
    tokens: tuple[np.ndarray, ...] | None  # one array per json key; None for a bad line
    error: str | None = None


@dataclass(frozen=True)
class _EncodeLine:
    """Worker callable: one raw JSONL line -> token arrays for each key, or the reason it is bad."""

    spec: TokenizerSpec
    json_keys: tuple[str, ...]
    append_eod: bool

    def __call__(self, item: tuple[int, int, bytes]) -> _Encoded:
        file_index, line_number, raw = item
        # Outside the try: a tokenizer that cannot be built is fatal, not a bad line per line.
        tokenizer = _process_tokenizer(self.spec)
        try:
            tokens = self._encode(tokenizer, raw)
        except Exception as exc:  # anything this one line triggers is that line's problem
            return _Encoded(file_index, line_number, len(raw), None, _describe(exc))
        return _Encoded(file_index, line_number, len(raw), tokens)

    def _encode(self, tokenizer: MegatronTokenizer, raw: bytes) -> tuple[np.ndarray, ...]:
        document = json.loads(raw)
        if not isinstance(document, dict):
            raise TypeError(f"expected a JSON object, got {type(document).__name__}")
        arrays = []
        for key in self.json_keys:
            # As Megatron-LM's Encoder.encode: each sentence (a string is one) tokenized on its own, the
            # token lists concatenated; an empty document gets no EOD.
            ids: list[int] = []
            for sentence in json_sentences(key, document[key]):
                ids.extend(tokenizer.tokenize(sentence))
            if ids and self.append_eod:
                ids.append(tokenizer.eod)
            arrays.append(np.asarray(ids, dtype=np.int64))
        return tuple(arrays)


def _describe(exc: Exception) -> str:
    if isinstance(exc, KeyError):
        return f"missing key {exc.args[0]!r}"
    if isinstance(exc, json.JSONDecodeError):
        return f"invalid JSON ({exc.msg} at column {exc.colno})"
    if isinstance(exc, UnicodeDecodeError):
        return f"invalid UTF-8 ({exc.reason} at byte {exc.start})"
    return str(exc) or type(exc).__name__


def _iter_lines(inputs: Sequence[str]) -> Iterator[tuple[int, int, bytes]]:
    # Bytes, not text: a stray invalid UTF-8 byte must be one bad line, not a crash of the reader.
    for file_index, path in enumerate(inputs):
        with open(path, "rb") as f:
            for line_number, raw in enumerate(f, start=1):
                if raw.strip():  # blank lines are not documents
                    yield file_index, line_number, raw


@dataclass
class PreprocessStats:
    """What a run did."""

    documents: int = 0
    skipped: int = 0
    tokens: dict[str, int] = field(default_factory=dict)
    output_prefixes: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


def output_prefix_for(output_prefix: str, key: str) -> str:
    """Megatron-LM's naming: ``{output_prefix}_{key}_document``."""
    return f"{output_prefix}_{key}_document"


def _spec_from_args(args: argparse.Namespace) -> TokenizerSpec:
    return TokenizerSpec(args.tokenizer_type, args.tokenizer_model, args.vocab_file, args.merge_file, args.vocab_size)


def _log_progress(stats: PreprocessStats, num_bytes: int, start: float) -> None:
    elapsed = max(time.monotonic() - start, 1e-9)
    print(
        f"Processed {stats.documents} documents ({stats.documents / elapsed:.1f} docs/s, "
        f"{num_bytes / elapsed / 1024 ** 2:.2f} MB/s).",
        file=sys.stderr, flush=True,
    )


def _with_defaults(args: argparse.Namespace) -> argparse.Namespace:
    # Callers may hand over a Namespace built elsewhere (e.g. with only Megatron-LM's flags, or
    # --input as one path); fill in whatever is missing from the parser's defaults.
    filled = argparse.Namespace(**vars(args))
    parser = build_parser()
    for action in parser._actions:  # noqa: SLF001 - argparse offers no public list of dests
        if action.dest != "help" and not hasattr(filled, action.dest):
            setattr(filled, action.dest, parser.get_default(action.dest))
    if isinstance(filled.input, str):
        filled.input = [filled.input]
    if isinstance(filled.json_keys, str):
        filled.json_keys = [filled.json_keys]
    return filled


def preprocess(args: argparse.Namespace) -> PreprocessStats:
    """Run the conversion described by parsed ``args``; raises ValueError/BadLineError on failure."""
    args = _with_defaults(args)
    for path in args.input:
        if os.path.isdir(path):
            raise ValueError(f"--input {path!r} is a directory; pass its JSONL files (e.g. --input {path}/*.jsonl)")
        if not os.path.isfile(path):
            raise ValueError(f"--input file not found: {path!r}")
    if args.workers < 1:
        raise ValueError(f"--workers must be at least 1, got {args.workers}")
    if args.chunk_size < 1:  # before any output is opened: a flag error must not truncate an earlier dataset
        raise ValueError(f"--chunk-size must be at least 1, got {args.chunk_size}")
    if not os.path.basename(args.output_prefix):
        raise ValueError(f"--output-prefix {args.output_prefix!r} ends in a directory separator, so the files would "
                         f"be named '_{{key}}_document.bin'; give a file-name prefix, e.g. "
                         f"--output-prefix {os.path.join(args.output_prefix, 'corpus')}")
    spec = _spec_from_args(args)
    tokenizer = spec.build()  # fail on bad tokenizer flags before spawning workers
    dtype = optimal_dtype(tokenizer.vocab_size)
    out_dir = os.path.dirname(os.path.abspath(args.output_prefix))
    os.makedirs(out_dir, exist_ok=True)

    stats = PreprocessStats()
    keys = unique_json_keys(args.json_keys)
    builders = {}
    for key in keys:
        prefix = output_prefix_for(args.output_prefix, key)
        stats.output_prefixes[key], stats.tokens[key] = prefix, 0
        builders[key] = IndexedDatasetBuilder(data_file_path(prefix), dtype=dtype)

    encode = _EncodeLine(spec, keys, args.append_eod)
    start, num_bytes, ok, first_bad = time.monotonic(), 0, False, ""
    pool = multiprocessing.Pool(args.workers) if args.workers > 1 else None
    try:
        lines = _iter_lines(args.input)
        results = pool.imap(encode, lines, args.chunk_size) if pool else map(encode, lines)
        for result in results:
            num_bytes += result.num_bytes
            if result.tokens is None:
                where = f"{args.input[result.file_index]}:{result.line_number}"
                if args.on_bad_line == "error":
                    raise BadLineError(f"{where}: {result.error} (pass --on-bad-line skip to skip such lines)")
                stats.skipped += 1
                first_bad = first_bad or f"{where}: {result.error}"
                print(f"warning: {where}: skipped line: {result.error}", file=sys.stderr, flush=True)
                continue
            for key, tokens in zip(keys, result.tokens, strict=True):
                # One sequence per document, even an empty one, so document i stays sequence i.
                builders[key].add_document(tokens, [tokens.size])
                stats.tokens[key] += int(tokens.size)
            stats.documents += 1
            if args.log_interval > 0 and stats.documents % args.log_interval == 0:
                _log_progress(stats, num_bytes, start)
        _check_wrote_something(args.input, stats, first_bad)
        for key in keys:
            builders[key].finalize(index_file_path(stats.output_prefixes[key]))
        ok = True
    finally:
        if pool is not None:
            if ok:
                pool.close()
            else:
                pool.terminate()
            pool.join()
        if not ok:  # leave no half-written dataset that a later run could mistake for a good one
            for key, builder in builders.items():
                builder.data_file.close()
                for path in (data_file_path(stats.output_prefixes[key]), index_file_path(stats.output_prefixes[key])):
                    if os.path.exists(path):
                        os.remove(path)
    stats.seconds = time.monotonic() - start
    _log_progress(stats, num_bytes, start)
    if stats.skipped:
        print(f"Skipped {stats.skipped} bad line(s).", file=sys.stderr)
    return stats


def _check_wrote_something(inputs: Sequence[str], stats: PreprocessStats, first_bad: str) -> None:
    """A dataset without a single token is an error (an empty, binary or wrongly encoded input), not a result."""
    empty = [key for key, count in stats.tokens.items() if count == 0]
    if stats.documents and not empty:
        return
    what = (f"{stats.documents} documents but no tokens under --json-keys {' '.join(empty)}" if stats.documents
            else "no documents")
    bad = f"; all {stats.skipped} non-blank lines were bad, the first: {first_bad}" if stats.skipped else ""
    raise ValueError(f"--input {' '.join(inputs)}: {what}{bad}; nothing was written. The input must be JSONL in "
                     f"UTF-8, one {{\"text\": ...}} object per line")


_SENTENCES = ("sentence splitting (for BERT-style sentence-order data) is not supported: GPT training reads whole "
              "documents; drop the flag (a --json-keys value that is a list of sentences is read as one document)")
# Megatron-LM's flags this tool does not implement, with the reason (never argparse's bare "unrecognized").
_REFUSED = {
    "--split-sentences": _SENTENCES,
    "--keep-newlines": _SENTENCES,
    "--lang": _SENTENCES,
    "--partitions": "use --workers N instead: one pool of N tokenizer processes over all the --input files",
}


class _Refuse(argparse.Action):
    """Consumes the flag and its values, then stops with the reason."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        parser.error(f"{option_string}: {_REFUSED[str(option_string)]}")


def build_parser() -> argparse.ArgumentParser:
    """Megatron-LM's preprocess_data.py flags, plus --on-bad-line and --chunk-size."""
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_argument_group("input data")
    group.add_argument("--input", nargs="+", required=True, help="JSONL file(s), one JSON object per line")
    group.add_argument("--json-keys", nargs="+", default=["text"],
                       help="keys to tokenize, one dataset per key; a value is a string or a list of sentences")
    group.add_argument("--on-bad-line", choices=("skip", "error"), default="skip",
                       help="malformed JSON, a missing key or a value that is no text: report and skip the line, "
                            "or stop")
    group = parser.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    group.add_argument("--tokenizer-model", default=None, help="SentencePiece .model / HF tokenizer path")
    group.add_argument("--vocab-file", default=None, help="GPT-2 vocab.json")
    group.add_argument("--merge-file", default=None, help="GPT-2 merges.txt")
    group.add_argument("--vocab-size", type=int, default=None, help="NullTokenizer vocabulary size")
    group.add_argument("--append-eod", action="store_true", help="append the EOD token to each document")
    group = parser.add_argument_group("output data")
    group.add_argument("--output-prefix", required=True, help="writes PREFIX_{key}_document.bin/.idx")
    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=1, help="tokenizer worker processes")
    group.add_argument("--chunk-size", type=int, default=64, help="lines handed to a worker at a time")
    group.add_argument("--log-interval", type=int, default=1000, help="report progress every N documents")
    group = parser.add_argument_group("Megatron-LM compatibility")
    group.add_argument("--dataset-impl", default="mmap", choices=["mmap"],
                       help="accepted: the output is always Megatron-LM's mmap indexed format")
    group.add_argument("--keep-sequential-samples", action="store_true",
                       help="accepted: documents are always written in input order")
    for flag in _REFUSED:
        group.add_argument(flag, action=_Refuse, nargs="*", default=None, help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (errors are one line on stderr)."""
    args = build_parser().parse_args(argv)
    try:
        stats = preprocess(args)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; partial outputs removed", file=sys.stderr)
        return 130
    for key, prefix in stats.output_prefixes.items():
        print(f"Wrote {prefix}.bin/.idx ({stats.documents} documents, {stats.tokens[key]} tokens)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
