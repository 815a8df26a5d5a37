"""Tokenizer, datasets and per-rank data iterators, as Megatron-LM's ``build_train_valid_test_data_iterators``.

Samples are consumed in order of their index: a global batch is ``num_microbatches`` runs of
``micro_batch_size x DP`` consecutive samples, and DP rank ``r`` takes the ``r``-th micro batch of
each run. Resuming at ``consumed_samples`` therefore continues exactly where a run stopped, and a
one-process run sees the same global batches as a data-parallel one.
"""
from __future__ import annotations

import functools
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from megatron_core import device
from megatron_core.parallel_state import ParallelState
from megatron_core.tensor_parallel.utils import pad_vocab_size
from megatron_core.tokenizer import MegatronTokenizer, build_tokenizer
from megatron_core.training.config import DataConfig, TrainingConfig
from megatron_core.training.errors import ConfigError


def build_run_tokenizer(config: DataConfig, tp_size: int) -> tuple[MegatronTokenizer, int]:
    """The tokenizer and the padded vocabulary size of the model's embedding.

    With ``--vocab-size`` and a real tokenizer, the flag is an upper bound the tokenizer must fit.
    """
    if config.tokenizer_type is None:
        raise ConfigError("--tokenizer-type is required (SentencePieceTokenizer, GPT2BPETokenizer, "
                          "HuggingFaceTokenizer, or NullTokenizer with --vocab-size N)")
    try:
        tokenizer = build_tokenizer(config.tokenizer_type, tokenizer_model=config.tokenizer_model,
                                    vocab_file=config.vocab_file, merge_file=config.merge_file,
                                    vocab_size=config.vocab_size)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    size = model_vocab_size(config.tokenizer_type, tokenizer, config.vocab_size,
                            config.tokenizer_model or config.vocab_file)
    return tokenizer, pad_vocab_size(size, config.make_vocab_size_divisible_by, tp_size)


def model_vocab_size(tokenizer_type: str, tokenizer: MegatronTokenizer, vocab_size: int | None,
                     source: str | None) -> int:
    """The model's vocabulary before padding (tokens): ``--vocab-size`` when given with a real tokenizer,
    else the tokenizer's size. ConfigError naming both when the tokenizer has more tokens than the flag
    (``source`` is its file, for the message)."""
    size = tokenizer.vocab_size
    if tokenizer_type == "NullTokenizer" or vocab_size is None:
        return size
    if size > vocab_size:
        raise ConfigError(
            f"the tokenizer ({tokenizer_type}, {source}) has {size} tokens but --vocab-size is {vocab_size}; raise "
            f"--vocab-size to at least {size} or leave it out (the model then takes the tokenizer's size)")
    return vocab_size


def dataset_config(config: DataConfig, tokenizer: MegatronTokenizer, seed: int) -> Any:
    """The data package's ``GPTDatasetConfig`` for this run."""
    from megatron_core.datasets import GPTDatasetConfig

    try:
        return GPTDatasetConfig(seq_length=config.seq_length, eod=tokenizer.eod, seed=seed,
                                data_path=config.data_path, train_data_path=config.train_data_path,
                                valid_data_path=config.valid_data_path, test_data_path=config.test_data_path,
                                mock=config.mock_data, split=config.split,
                                data_cache_path=config.data_cache_path, eod_mask_loss=config.eod_mask_loss,
                                reset_position_ids=config.reset_position_ids,
                                reset_attention_mask=config.reset_attention_mask,
                                pad=tokenizer.pad, mock_vocab_size=tokenizer.vocab_size if config.mock_data else None)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def has_test_split(config: DataConfig) -> bool:
    """Whether the run has a test split: ``--test-data-path``, or a positive test share of ``--split``.

    Decided from the flags alone (the test samples to ask for); whether the test set is evaluated
    is decided at the end by every rank from whether any rank built it (a share of --split can hold
    no document of a small corpus).
    """
    return _has_split(config, 2)


def _has_split(config: DataConfig, index: int) -> bool:
    """Split ``index`` (0 train, 1 valid, 2 test) has its own prefixes or a positive share of ``--split``."""
    from megatron_core.datasets.splits import split_matrix

    if config.train_data_path or config.valid_data_path or config.test_data_path:
        return (config.train_data_path, config.valid_data_path, config.test_data_path)[index] is not None
    return split_matrix(config.split)[index] is not None


def build_datasets(config: DataConfig, training: TrainingConfig, tokenizer: MegatronTokenizer,
                   train_samples: int, note: Callable[[str], None] = print) -> tuple[Any, Any, Any]:
    """(train, valid, test) datasets; valid and test hold ``eval_iters`` global batches each.

    Every evaluation reuses the same validation batches; the test split is evaluated once, at the end
    (Megatron-LM's ``eval_iters x global_batch_size`` test samples). Valid is None without a validation split
    (a zero share of ``--split``, or no ``--valid-data-path``: said through ``note``, as Megatron-LM skips
    validation then). Test is None without a test split,
    or when the test share of ``--split`` holds no document (of any prefix of a blend; said through
    ``note``). A blend whose test share is empty in some prefixes only is an error naming them.
    """
    from megatron_core.datasets import build_gpt_datasets
    from megatron_core.datasets.builder import EmptySplitError

    valid_samples = training.eval_iters * training.global_batch_size
    test_samples = valid_samples if has_test_split(config) else 0
    if valid_samples and not _has_split(config, 1):
        # Megatron-LM builds no validation set then and skips every evaluation; said here, not silent.
        per_split = config.train_data_path or config.test_data_path
        why = "no --valid-data-path" if per_split else f"--split {config.split!r} gives validation no share"
        note(f"warning: {why}: the --eval-iters {training.eval_iters} validation runs are skipped, as Megatron-LM "
             f"skips them")
        valid_samples = 0
    dataset_cfg = dataset_config(config, tokenizer, training.seed)
    try:
        try:
            return build_gpt_datasets(dataset_cfg, [train_samples, valid_samples, test_samples])
        except EmptySplitError as exc:
            if exc.split != "test":
                raise
            # Megatron-LM's default --split 969,30,1 leaves a small corpus no test document: train and
            # validate as before, evaluate no test set, and say so (the run's pre-test behaviour).
            note(f"warning: {str(exc).split('; give test')[0]}; the test set is not evaluated")
            return build_gpt_datasets(dataset_cfg, [train_samples, valid_samples, 0])
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


class PretrainingSampler:
    """Yields this DP rank's micro batches of sample indices from ``consumed_samples`` on."""

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int, dp_rank: int,
                 dp_size: int) -> None:
        if total_samples <= 0:
            raise ConfigError(f"the dataset has no samples ({total_samples})")
        self.total_samples, self.consumed_samples = total_samples, consumed_samples
        self.micro_batch_size, self.dp_rank, self.dp_size = micro_batch_size, dp_rank, dp_size

    def __len__(self) -> int:
        return max(self.total_samples - self.consumed_samples, 0) // (self.micro_batch_size * self.dp_size)

    def __iter__(self) -> Iterator[list[int]]:
        per_step = self.micro_batch_size * self.dp_size
        start = self.dp_rank * self.micro_batch_size
        for first in range(self.consumed_samples, self.total_samples - per_step + 1, per_step):
            yield list(range(first + start, first + start + self.micro_batch_size))


_PR_SET_PDEATHSIG = 1  # prctl(2)


def _worker_init(parent_pid: int, worker_id: int) -> None:
    """DataLoader workers ignore SIGTERM and SIGINT, and die with their rank.

    Schedulers (Slurm), torchrun and a terminal's Ctrl-C signal the whole process group: a worker killed
    by it made the main process fail ("DataLoader worker ... is killed by signal: Terminated") instead of
    finishing its iteration and saving. The main process stops its workers itself.

    A worker inherits its rank's sockets (fork), so when the rank dies (``kill -9``, the out-of-memory
    killer) its peers saw the connections close only when the workers noticed, at torch's next
    parent check (every 5 s): on Linux the kernel now kills the worker with its parent
    (``prctl(PR_SET_PDEATHSIG, SIGKILL)``), and the peers fail at once (measured: a TP 2 peer's
    "a peer was lost" line 5.1 s after the kill before, under 1 s after).
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    libc = device.host_libc()
    if libc is not None and hasattr(libc, "prctl"):
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent_pid:  # the rank died before the line above: nobody is left to serve
            os._exit(0)


class _PretrainingDataLoader(torch.utils.data.DataLoader):
    """torch's DataLoader, warning once, in terms of ``--num-workers``, when it has more workers than CPUs.

    torch checks at construction and again at every new iterator, from two source lines, so its
    warning printed at least twice per loader (``_get_iterator``'s per epoch once filters changed).
    """

    def check_worker_number_rationality(self) -> None:
        if getattr(self, "_workers_checked", False):
            return
        self._workers_checked = True
        cpus = device.usable_cores()
        if self.num_workers > cpus:
            _warn_more_workers_than_cpus(self.num_workers, cpus)


@functools.cache  # once per process, however many loaders (train, valid, each model chunk) and epochs
def _warn_more_workers_than_cpus(num_workers: int, cpus: int) -> None:
    print(f"warning: --num-workers {num_workers} is more than the {cpus} CPU(s) this rank may use (its affinity): "
          "the workers share them with training; lower --num-workers if steps wait for data",
          file=sys.stderr, flush=True)


def data_loader(dataset: Any, consumed_samples: int, micro_batch_size: int, parallel_state: ParallelState,
                num_workers: int) -> torch.utils.data.DataLoader:
    """A loader over this DP rank's micro batches."""
    if num_workers > 0 and multiprocessing.current_process().daemon:
        num_workers = 0  # a daemonic process (e.g. a test harness rank) may not start worker processes
    sampler = PretrainingSampler(len(dataset), consumed_samples, micro_batch_size, parallel_state.dp_rank,
                                 parallel_state.dp_size)
    # Its own generator: starting an iterator draws a worker seed, which must not come from the global
    # RNG that dropout uses (a resumed run would otherwise drop out differently from an uninterrupted one).
    return _PretrainingDataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                  persistent_workers=False, pin_memory=False,
                                  worker_init_fn=functools.partial(_worker_init, os.getpid())
                                  if num_workers else None,
                                  generator=torch.Generator().manual_seed(consumed_samples))


def shutdown_data_iterators(iterators: Iterable[Any]) -> None:
    """Stop the worker processes of these DataLoader iterators now (``None`` entries and iterators
    without workers are skipped); the iterators cannot be used afterwards.

    Called when training or an evaluation ends, and above all when it raises: the exception's traceback
    keeps the iterators alive until the interpreter exits, where multiprocessing stops leftover children
    with SIGTERM, which the workers ignore (``_worker_init``), and then joins them forever:
    a rank whose peer died hung instead of exiting. torch's own ``__del__`` shutdown is what runs here.
    """
    for iterator in iterators:
        shutdown = getattr(iterator, "_shutdown_workers", None)  # torch's _MultiProcessingDataLoaderIter
        if shutdown is not None:
            shutdown()


def chunk_needs_data(parallel_state: ParallelState, vp_stage: int | None, every_chunk: bool = False) -> bool:
    """The first chunk (tokens) and the last chunk (labels, loss mask) read samples; with ``every_chunk``
    (``DataConfig.every_chunk_reads_data``) the middle ones do too, for the position ids and the tokens their
    attention mask is built from."""
    return every_chunk or parallel_state.is_pipeline_first_stage(vp_stage) or \
        parallel_state.is_pipeline_last_stage(vp_stage)


def data_iterators(dataset: Any, consumed_samples: int, micro_batch_size: int, parallel_state: ParallelState,
                   num_workers: int, num_chunks: int, every_chunk: bool = False) -> list[Iterator | None]:
    """One iterator per model chunk that reads data (each sees the same sample order), else None;
    ``every_chunk``: as :func:`chunk_needs_data`."""
    iterators: list[Iterator | None] = []
    for chunk in range(num_chunks):
        vp_stage = chunk if parallel_state.vpp_size else None
        if dataset is None or not chunk_needs_data(parallel_state, vp_stage, every_chunk):
            iterators.append(None)
        else:
            loader = data_loader(dataset, consumed_samples, micro_batch_size, parallel_state, num_workers)
            iterators.append(iter(loader))
    return iterators
