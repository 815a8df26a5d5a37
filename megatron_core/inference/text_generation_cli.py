"""``tools/run_text_generation.py``: continue prompts with a model from a checkpoint or a Hugging Face dir.

::

    python tools/run_text_generation.py --load CKPT --tokenizer-type SentencePieceTokenizer \
        --tokenizer-model tok.model --prompt "def main(" --tokens-to-generate 32 --top_k 1
    torchrun --nproc_per_node 2 tools/run_text_generation.py --load HF_DIR --tensor-model-parallel-size 2 ...

Flag names are Megatron-LM's (``--temperature``, ``--top_k``, ``--top_p``, ``--seed``; the request field
``tokens_to_generate``). Every rank runs the same generation; rank 0 prints (and writes ``--output``).
"""
from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from megatron_core.errors import ArgumentParser, ConfigError, report_line
from megatron_core.inference.generation import GenerationOutput, generate
from megatron_core.inference.loading import LoadedModel, build_inference_model, inference_tokenizer
from megatron_core.inference.megatron_flags import add_megatron_args, check_and_cast, check_parallel_sizes
from megatron_core.inference.sampling import SamplingParams
from megatron_core.parallel_state import ParallelState, initialize_model_parallel
from megatron_core.tokenizer.base import MegatronTokenizer, lone_surrogate
from megatron_core.training.initialize import initialize_distributed, rank_from_env, shutdown


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The flags shared by the generation CLI and the server: where the model and tokenizer come from."""
    p.add_argument("--load", required=True, help="training checkpoint directory (torch_dist or legacy, saved "
                                                 "under any layout) or Hugging Face save_pretrained directory")
    p.add_argument("--load-iteration", type=int, default=None, help="checkpoint iteration (default: the tracker's)")
    p.add_argument("--tensor-model-parallel-size", type=int, default=None, help="TP size (default: world size / PP)")
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1, help="PP size")
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=128, help="vocabulary padding multiple")
    p.add_argument("--tokenizer-type", default=None, help="as in training; default: the tokenizer saved in "
                                                           "a Hugging Face --load directory")
    p.add_argument("--tokenizer-model", default=None, help="SentencePiece .model or tokenizer.json / directory")
    p.add_argument("--vocab-file", default=None, help="GPT-2 vocab.json (GPT2BPETokenizer)")
    p.add_argument("--merge-file", default=None, help="GPT-2 merges.txt (GPT2BPETokenizer)")
    p.add_argument("--vocab-size", type=int, default=None, help="NullTokenizer: the number of ids before its EOD, "
                   "as in training (default: the one a training checkpoint records)")
    p.add_argument("--distributed-backend", default="gloo", choices=["gloo", "nccl"], help="process group backend")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0: greedy); the "
                   "defaults (1.0, --top_k 0, --top_p 0) sample the whole vocabulary, as Megatron-LM's")
    p.add_argument("--top_k", type=int, default=0, help="keep the k most likely tokens (1: greedy)")
    p.add_argument("--top_p", type=float, default=0.0, help="nucleus sampling threshold (0: off)")
    p.add_argument("--seed", type=int, default=1234, help="sampling seed")
    p.add_argument("--no-kv-cache", action="store_true", help="recompute the whole prefix at every step")
    add_megatron_args(p)


def build_parser() -> argparse.ArgumentParser:
    """The CLI's flags."""
    p = ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    add_model_args(p)
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for a batch)")
    p.add_argument("--prompt-tokens", action="append", default=[],
                   help="a prompt as comma-separated token ids (repeatable; needs no tokenizer)")
    p.add_argument("--tokens-to-generate", type=int, default=32, help="new tokens per prompt at most")
    p.add_argument("--output", default=None, help="write {prompts, text, tokens} as JSON here (rank 0)")
    return p


@dataclass
class Generator:
    """A loaded model, its tokenizer (None when prompts come as token ids) and the process layout."""

    loaded: LoadedModel
    tokenizer: MegatronTokenizer | None
    parallel_state: ParallelState
    use_kv_cache: bool

    def tokenize(self, prompts: Sequence[str]) -> list[list[int]]:
        """Each text prompt as token ids (this rank's tokenizer; one must be loaded)."""
        assert self.tokenizer is not None
        return [self.tokenizer.tokenize(p) for p in prompts]

    def run(self, prompts: Sequence[Sequence[int]], tokens_to_generate: int,
            sampling: SamplingParams, log_probs: bool = False) -> GenerationOutput:
        """Generate on every rank (all ranks must call this with the same arguments)."""
        eod = self.tokenizer.eod if self.tokenizer is not None else None
        return generate(self.loaded.model, prompts, tokens_to_generate, eod_id=eod,
                        vocab_size=self.loaded.vocab_size, sampling=sampling, use_kv_cache=self.use_kv_cache,
                        parallel_state=self.parallel_state, return_log_probs=log_probs)


def sampling_from_args(args: argparse.Namespace) -> SamplingParams:
    """The sampling flags as :class:`SamplingParams` (validated)."""
    params = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
    params.validate()
    return params


def setup(args: argparse.Namespace, need_tokenizer: bool, timeout: timedelta | None = None) -> Generator:
    """Build the parallel layout and this rank's model (and tokenizer); the process group must exist.
    ``timeout``: the model-parallel groups' (None: torch's default).

    Every process holds part of one model replica: as Megatron-LM's text generation server, the world
    must be TP x PP (no data parallelism). Raises ConfigError naming the fix otherwise.
    """
    check_parallel_sizes(args)
    world, pp = dist.get_world_size(), args.pipeline_model_parallel_size
    tp = args.tensor_model_parallel_size or max(world // pp, 1)
    if tp * pp != world:
        needed = f"{tp * pp} process{'es' if tp * pp > 1 else ''}"
        raise ConfigError(f"--tensor-model-parallel-size {tp} x --pipeline-model-parallel-size {pp} needs {needed} "
                          f"but {world} were started: generation runs one model replica (no data parallelism); "
                          f"launch {tp * pp} (torchrun --nproc_per_node {tp * pp}) or choose sizes whose product "
                          f"is {world}")
    ps = initialize_model_parallel(tp, pp, timeout=timeout)
    loaded = build_inference_model(args.load, ps, args.load_iteration, args.make_vocab_size_divisible_by)
    check_and_cast(args, loaded.model)
    tokenizer = loaded.tokenizer  # its EOD stops generation even for prompts given as token ids
    if need_tokenizer or args.tokenizer_type is not None:
        tokenizer = inference_tokenizer(args.load, loaded.tokenizer, args.tokenizer_type, args.tokenizer_model,
                                        args.vocab_file, args.merge_file, args.vocab_size)
    return Generator(loaded, tokenizer, ps, not args.no_kv_cache)


def report_error(tool: str, exc: ConfigError, context: Any) -> None:
    """``TOOL: error: message`` once (rank 0: every rank reaches the same verdict); the group is torn down."""
    report_line(f"{tool}: error: {exc}", rank_from_env())
    if context is not None:
        shutdown(context)  # also destroys the model-parallel groups


def _prompts(args: argparse.Namespace, tokenizer: MegatronTokenizer | None) -> list[list[int]]:
    if args.prompt and args.prompt_tokens:
        raise ConfigError("pass either --prompt or --prompt-tokens, not both")
    if args.prompt_tokens:
        try:
            return [[int(t) for t in p.split(",")] for p in args.prompt_tokens]
        except ValueError:
            raise ConfigError("--prompt-tokens takes comma-separated integers, e.g. 5,17,99") from None
    if not args.prompt:
        raise ConfigError("nothing to generate from: pass --prompt TEXT (repeatable) or --prompt-tokens IDS")
    for prompt in args.prompt:
        # A byte that is not UTF-8 reaches sys.argv as a lone surrogate (PEP 383); the tokenizer fails on it.
        if (problem := lone_surrogate(prompt)) is not None:
            raise ConfigError(f"--prompt {prompt!r} is not UTF-8 text: {problem}; pass the prompt in UTF-8")
    assert tokenizer is not None
    return [tokenizer.tokenize(p) for p in args.prompt]


def _check_output(path: str | None) -> None:
    """ConfigError for an ``--output`` that cannot be written, before the model is loaded."""
    if path is None:
        return
    if os.path.isdir(path):
        raise ConfigError(f"--output {path} is a directory; give a file name in it")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ConfigError(f"--output {path}: directory {parent} does not exist")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (2 with a one-line message on a configuration error)."""
    args = build_parser().parse_args(argv)
    context = None
    try:
        _check_output(args.output)
        sampling = sampling_from_args(args)
        context = initialize_distributed(args.distributed_backend, timeout_minutes=30)
        gen = setup(args, need_tokenizer=bool(args.prompt))
        out = gen.run(_prompts(args, gen.tokenizer), args.tokens_to_generate, sampling)
    except ConfigError as exc:
        report_error("run_text_generation.py", exc, context)
        return 2
    if gen.parallel_state.rank == 0:
        text = [gen.tokenizer.detokenize(t) for t in out.tokens] if gen.tokenizer is not None else None
        for i, tokens in enumerate(out.tokens):
            print(f"[{i}] {text[i] if text is not None else tokens}")
        if args.output:
            with open(args.output, "w") as f:
                json.dump({"prompts": args.prompt or args.prompt_tokens, "text": text, "tokens": out.tokens}, f)
    shutdown(context)  # also destroys the model-parallel groups
    return 0
