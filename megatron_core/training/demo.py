"""``pretrain_gpt.py --demo``: a corpus from the Python standard library, a tokenizer, and tiny-GPT flags.

Preparation is idempotent: each step is skipped when its output exists, and a stamp file is
written last, so an interrupted preparation is redone rather than half-reused.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sysconfig
import time
from collections.abc import Callable

from megatron_core.tokenizer.base import lone_surrogate
from megatron_core.training.checkpoint_io import check_writable
from megatron_core.training.errors import ConfigError

DEMO_VOCAB_SIZE = 1024
DEMO_CORPUS_BYTES = 3_000_000  # enough text for a tiny model to learn from in a few minutes
_STAMP_VERSION = 1
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "lib2to3"})


def dataset_name(demo_input: str | None) -> str:
    """``stdlib`` for the built-in corpus, else the input file's name without extension (``my.jsonl`` -> ``my``)."""
    if not demo_input:
        return "stdlib"
    stem = os.path.basename(demo_input).split(".")[0]
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in stem) or "input"


def demo_paths(demo_dir: str, demo_input: str | None = None) -> dict[str, str]:
    """Where the demo keeps its files; each input gets its own tokenizer, dataset and checkpoints
    (the standard-library corpus keeps the original names)."""
    name = dataset_name(demo_input)
    tag = "" if name == "stdlib" else f"_{name}"
    return {
        "corpus": os.path.join(demo_dir, "corpus.jsonl"),
        "tokenizer_prefix": os.path.join(demo_dir, f"tokenizer{tag}"),
        "tokenizer_model": os.path.join(demo_dir, f"tokenizer{tag}.model"),
        "output_prefix": os.path.join(demo_dir, name),
        "data_prefix": os.path.join(demo_dir, f"{name}_text_document"),
        "checkpoints": os.path.join(demo_dir, f"checkpoints{tag}"),
        "stamp": os.path.join(demo_dir, f"demo_data{tag}.json"),
    }


def demo_argv(demo_dir: str, demo_input: str | None = None) -> list[str]:
    """The demo's flags (a tiny GPT on CPU); flags the user adds after ``--demo`` override them.

    It saves to and loads from its own checkpoint directory, so a rerun resumes (or, when the run
    is complete, says there is nothing to train) instead of training over its own checkpoint.
    """
    p = demo_paths(demo_dir, demo_input)
    return [
        "--num-layers", "4", "--hidden-size", "128", "--num-attention-heads", "4",
        "--seq-length", "128", "--max-position-embeddings", "128",
        "--micro-batch-size", "8", "--global-batch-size", "16", "--train-iters", "500",
        "--lr", "2e-3", "--min-lr", "2e-4", "--lr-decay-style", "cosine", "--lr-warmup-iters", "20",
        "--weight-decay", "0.1", "--clip-grad", "1.0", "--adam-beta2", "0.95",
        "--hidden-dropout", "0.0", "--attention-dropout", "0.0",
        "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", p["tokenizer_model"],
        "--data-path", p["data_prefix"], "--split", "98,2,0", "--num-workers", "0",
        "--log-interval", "10", "--eval-interval", "100", "--eval-iters", "8", "--eval-at-start",
        "--save", p["checkpoints"], "--save-interval", "500", "--load", p["checkpoints"],
    ]


def _stdlib_files() -> list[str]:
    root = sysconfig.get_paths()["stdlib"]
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        found += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py")]
    return found


def build_stdlib_corpus(path: str, max_bytes: int = DEMO_CORPUS_BYTES, seed: int = 1234) -> tuple[int, int]:
    """Write ``{"text": source}`` lines for standard-library modules; returns (documents, bytes)."""
    files = _stdlib_files()
    random.Random(seed).shuffle(files)  # so the validation split is not just the last modules alphabetically
    documents, total = 0, 0
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as out:
        for name in files:
            try:
                with open(name, encoding="utf-8") as f:
                    text = f.read()
            except (OSError, UnicodeDecodeError):
                continue
            if not text.strip():
                continue
            out.write(json.dumps({"text": text}) + "\n")
            documents, total = documents + 1, total + len(text.encode("utf-8"))
            if total >= max_bytes:
                break
    os.replace(tmp, path)
    return documents, total


def check_jsonl(path: str, key: str = "text") -> int:
    """Count documents (each line's ``key`` a string or a list of strings); a missing file or a malformed line is a
    :class:`ConfigError` naming the line."""
    if not os.path.isfile(path):
        raise ConfigError(f"--demo-input {path!r} does not exist; "
                          f"give a JSONL file with one {{\"{key}\": ...}} per line")
    count = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                doc = json.loads(raw)
            except (ValueError, UnicodeDecodeError) as exc:
                raise ConfigError(f"--demo-input {path}:{number}: not valid JSON ({exc}); each line must be a JSON "
                                  f"object like {{\"{key}\": \"...\"}}: fix or delete that line") from None
            # A list of strings is Megatron-LM's sentence-split document, which the data tools read too.
            value = doc.get(key) if isinstance(doc, dict) else None
            texts = [value] if isinstance(value, str) else value
            if not isinstance(texts, list) or not all(isinstance(text, str) for text in texts):
                raise ConfigError(f"--demo-input {path}:{number}: expected a JSON object with a \"{key}\" field "
                                  f"holding a string or a list of strings: fix or delete that line")
            for text in texts:
                if (problem := lone_surrogate(text)) is not None:
                    raise ConfigError(f"--demo-input {path}:{number}: \"{key}\" holds {problem}: fix the line's "
                                      f"JSON escapes or delete the line")
            count += 1
    if count == 0:
        raise ConfigError(f"--demo-input {path!r} holds no documents")
    return count


def prepare_demo_data(demo_dir: str, demo_input: str | None = None,
                      printer: Callable[[str], None] = print) -> dict[str, str]:
    """Corpus, SentencePiece tokenizer and indexed dataset in ``demo_dir`` (reused when complete)."""
    from megatron_core.datasets.preprocess_data import preprocess
    from megatron_core.tokenizer.train_tokenizer import VocabSizeTooLargeError, train_sentencepiece

    p = demo_paths(demo_dir, demo_input)
    wanted = {"version": _STAMP_VERSION, "vocab_size": DEMO_VOCAB_SIZE,
              "input": os.path.abspath(demo_input) if demo_input else "stdlib"}
    complete = all(os.path.isfile(p["data_prefix"] + ext) for ext in (".bin", ".idx"))
    if _read_stamp(p["stamp"]) == wanted and complete and os.path.isfile(p["tokenizer_model"]):
        printer(f"> demo data in {demo_dir} is ready (delete {p['stamp']} to rebuild)")
        return p
    check_writable(demo_dir, "--demo-dir")  # a file there was os.makedirs' traceback
    start = time.monotonic()
    if demo_input:
        count = check_jsonl(demo_input)
        corpus = demo_input
        printer(f"> demo: using {count} documents from {demo_input}")
    else:
        corpus = p["corpus"]
        count, size = build_stdlib_corpus(corpus)
        printer(f"> demo: wrote {count} standard-library modules ({size / 1e6:.1f} MB) to {corpus}")
    try:
        train_sentencepiece([corpus], p["tokenizer_prefix"], DEMO_VOCAB_SIZE, num_threads=os.cpu_count())
    except VocabSizeTooLargeError as exc:  # its --vocab-size is no flag of the demo's
        raise ConfigError(f"--demo-input {demo_input}: too little text for the demo's {DEMO_VOCAB_SIZE}-token "
                          f"tokenizer (it holds at most {exc.most} pieces); give more documents") from None
    except ValueError as exc:
        raise ConfigError(f"demo tokenizer training failed: {exc}") from None
    printer(f"> demo: trained a {DEMO_VOCAB_SIZE}-token SentencePiece tokenizer: {p['tokenizer_model']}")
    stats = preprocess(argparse.Namespace(
        input=[corpus], output_prefix=p["output_prefix"], json_keys=["text"], tokenizer_type="SentencePieceTokenizer",
        tokenizer_model=p["tokenizer_model"], vocab_file=None, merge_file=None, vocab_size=None, append_eod=True,
        workers=1, log_interval=0, on_bad_line="error"))
    printer(f"> demo: tokenized {stats.documents} documents into {stats.tokens['text']} tokens: {p['data_prefix']} "
            f"({time.monotonic() - start:.1f} s for the data)")
    with open(p["stamp"], "w") as f:
        json.dump(wanted, f)
    return p


def _read_stamp(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
