"""Pretrain a GPT model: Megatron-LM's ``pretrain_gpt.py`` command line, on CPU (gloo) or GPUs.

    python pretrain_gpt.py --demo                       # tiny GPT on the Python standard library, CPU
    torchrun --nproc_per_node 8 pretrain_gpt.py --tensor-model-parallel-size 2 ...  # Megatron-LM's flags

The flags are parsed and validated here, once, into a typed ``RunConfig``; everything below takes
that. ``main(argv)`` returns a :class:`TrainResult` (and raises :class:`ConfigError` on bad input),
so tests can run it inside their own process group; ``cli()`` is the command line, which turns
such errors into one line on stderr and a non-zero exit code.
"""
from __future__ import annotations

import functools
import importlib
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from megatron_core import device
from megatron_core.datasets import document_attention_mask
from megatron_core.errors import report_line
from megatron_core.models.gpt import build_gpt_model_chunks
from megatron_core.parallel_state import ParallelState
from megatron_core.pipeline_parallel import PipelineStageError
from megatron_core.training.arguments import config_from_args, parse_args
from megatron_core.training.arguments.validate import validate_args
from megatron_core.training.config import ModelConfig
from megatron_core.training.demo import demo_argv, prepare_demo_data
from megatron_core.training.errors import ConfigError
from megatron_core.training.initialize import initialize_distributed, rank_from_env, shutdown
from megatron_core.training.pretrain import TrainResult, pretrain
from megatron_core.training.training_log import perplexity
from megatron_core.transformer.spec import ModuleSpec

TRACEBACK_ENV = "MCORE_TRACEBACK"  # set to 1 to see the full traceback of a configuration error


_BUILT_IN_SPECS = "megatron_core.transformer.layer_specs"  # what --transformer-impl names (compat.apply)


def layer_spec(spec: tuple[str, str] | None, qk_layernorm: bool = False) -> ModuleSpec | None:
    """The layer spec named by ``--spec MODULE FUNCTION`` (None: the built-in choice), as Megatron-LM's.

    ``MODULE.FUNCTION`` is a ``ModuleSpec`` or a function of no arguments returning one; the built-in
    ones (``--transformer-impl``) are given ``qk_layernorm``. Raises ConfigError naming the flag when it
    cannot be imported, is not a spec, or has no query/key norms under ``--qk-layernorm``.
    """
    if spec is None:
        return None
    module_name, name = spec
    flag = f"--spec {module_name} {name}"
    kwargs = {"qk_layernorm": qk_layernorm} if module_name == _BUILT_IN_SPECS else {}
    try:
        target = getattr(importlib.import_module(module_name), name)
        result = target if isinstance(target, ModuleSpec) or not callable(target) else target(**kwargs)
    except ImportError as exc:
        raise ConfigError(f"{flag}: {exc}; give a module importable from the working directory or PYTHONPATH "
                          f"(--transformer-impl transformer_engine needs transformer_engine installed)") from None
    except AttributeError:
        raise ConfigError(f"{flag}: module {module_name} has no {name}") from None
    if not isinstance(result, ModuleSpec):
        raise ConfigError(f"{flag}: gave a {type(result).__name__}, not a ModuleSpec")
    if qk_layernorm and not _has_qk_norms(result):
        raise ConfigError(f"--qk-layernorm: the layer of {flag} has no q_layernorm/k_layernorm; fill them in "
                          f"that spec, or drop --qk-layernorm")
    return result


def _has_qk_norms(spec: ModuleSpec) -> bool:
    attention = getattr(spec.submodules, "self_attention", None)
    parts = getattr(attention, "submodules", None)
    return getattr(parts, "q_layernorm", None) is not None and getattr(parts, "k_layernorm", None) is not None


def model_provider(config: ModelConfig, padded_vocab_size: int,
                   parallel_state: ParallelState) -> list[torch.nn.Module]:
    """This rank's GPT model chunks (one per virtual pipeline stage), with the ``--spec`` layer if given."""
    # The vocabulary is already padded by --make-vocab-size-divisible-by x TP; don't pad it again.
    return build_gpt_model_chunks(config.transformer, padded_vocab_size, config.max_position_embeddings,
                                  parallel_state, make_vocab_size_divisible_by=1,
                                  transformer_layer_spec=layer_spec(config.spec, config.transformer.qk_layernorm))


def get_batch(data_iterator: Any | None, seq_length: int, micro_batch_size: int) -> dict[str, torch.Tensor | None]:
    """The next micro batch on the device: ``tokens``, ``labels``, ``loss_mask``, ``position_ids`` [b, s] and
    ``attention_mask`` [b, 1, s, s] bool (True = masked; None, i.e. causal, unless ``--reset-attention-mask``).

    The document mask is built here, on the device, from the tokens and the EOD id the samples name
    (``attention_mask_eod``, Megatron-LM's ``get_ltor_masks_and_position_ids`` convention), not carried by
    the data loader. A middle pipeline chunk reads no data, unless ``--reset-position-ids``/
    ``--reset-attention-mask`` make every chunk read it (``DataConfig.every_chunk_reads_data``); without data
    it gets the plain position ids (RoPE needs them on every stage) and no mask."""
    where = device.current_device()
    if data_iterator is None:
        positions = torch.arange(seq_length, device=where).expand(micro_batch_size, seq_length)
        return {"tokens": None, "labels": None, "loss_mask": None, "position_ids": positions, "attention_mask": None}
    batch = next(data_iterator)
    keys = ("tokens", "labels", "loss_mask", "position_ids")
    out = {key: batch[key].to(where, non_blocking=True) if key in batch else None for key in keys}
    eod = batch.get("attention_mask_eod")  # [b], on the host: no device sync to read it
    out["attention_mask"] = None if eod is None else document_attention_mask(out["tokens"], int(eod[0]))
    return out


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor) -> tuple:
    """Masked per-token loss: the sum and the token count (the schedule divides), reported as [sum, count]."""
    losses = output_tensor.float().view(-1)
    mask = loss_mask.view(-1).float()
    loss_sum = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int64)
    report = torch.stack([loss_sum.detach(), mask.sum().detach()])
    return loss_sum, num_tokens, {"lm loss": report}


def forward_step(data_iterator: Any | None, model: torch.nn.Module, *, seq_length: int,
                 micro_batch_size: int) -> tuple:
    """One micro batch through one model chunk: ``(output, loss_func)`` for the schedules."""
    batch = get_batch(data_iterator, seq_length, micro_batch_size)
    output = model(batch["tokens"], batch["position_ids"], attention_mask=batch["attention_mask"],
                   labels=batch["labels"])
    return output, functools.partial(loss_func, batch["loss_mask"])


def _expand_demo(argv: list[str]) -> list[str]:
    """``--demo`` puts its own flags first, so every flag the user gives overrides them."""
    if "--demo" not in argv:
        return argv
    first = parse_args(argv)
    return demo_argv(first.demo_dir, first.demo_input) + argv


def main(argv: Sequence[str] | None = None) -> TrainResult | None:
    """Run ``pretrain_gpt.py`` with ``argv``; returns what the run did (None with ``--demo-prepare-only``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(_expand_demo(argv))
    backend = args.distributed_backend or device.default_backend()
    context = initialize_distributed(backend, args.distributed_timeout_minutes)
    if args.demo and "OMP_NUM_THREADS" not in os.environ:
        # One thread runs the tiny model at a steady pace; two threads are faster on an idle 2-core
        # machine but many times slower whenever another process wants a core (they spin-wait).
        torch.set_num_threads(1)
    try:
        if args.demo or args.demo_prepare_only:
            _prepare_demo(args, context.rank)
            if args.demo_prepare_only:
                return None
        config = config_from_args(validate_args(args, context.world_size))
        step = functools.partial(forward_step, seq_length=config.data.seq_length,
                                 micro_batch_size=config.training.micro_batch_size)
        result = pretrain(config, model_provider, step)
        if args.demo and result.is_logging_rank and len(result.val_losses) >= 2:
            _print_demo_summary(result)
        return result
    finally:
        shutdown(context)


def _prepare_demo(args: Any, rank: int) -> None:
    """Rank 0 builds the demo data; the others wait for it."""
    error = None
    if rank == 0:
        try:
            prepare_demo_data(args.demo_dir, args.demo_input)
        except ConfigError as exc:
            error = exc
    if dist.get_world_size() > 1:
        flag = torch.tensor([1 if error else 0])
        dist.all_reduce(flag)
        if flag.item() and error is None:
            raise ConfigError("the demo data could not be prepared (see rank 0's error)")
    if error is not None:
        raise error


def _print_demo_summary(result: TrainResult) -> None:
    (first_it, first), (last_it, last) = min(result.val_losses.items()), max(result.val_losses.items())
    print(f"demo: validation lm loss {first:.3f} at iteration {first_it} -> {last:.3f} at iteration {last_it} "
          f"(perplexity {perplexity(first):.1f} -> {perplexity(last):.1f})", flush=True)


def cli(argv: Sequence[str] | None = None) -> int:
    """The command line: a configuration error is one line on stderr and exit code 2; Ctrl-C one line and 130;
    a rank stopped by another rank's failure (``PipelineStageError``: a peer raised, its traceback is in that
    rank's log, or died) one line on every such rank and exit code 1.

    ``--autotune`` hands the same flags to the layout search (``tools/autotune.py``) instead of training.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--autotune" in argv:
        from megatron_core.autotune.cli import main as autotune

        return autotune([a for a in argv if a != "--autotune"])
    interrupted = _record_ctrl_c()
    try:
        main(argv)
    except KeyboardInterrupt:  # Ctrl-C (torchrun forwards it to every rank): say what is kept, once
        if os.environ.get(TRACEBACK_ENV) == "1":
            raise
        return _interrupted()
    except ValueError as exc:  # ConfigError and the libraries' own argument checks
        if os.environ.get(TRACEBACK_ENV) == "1":
            raise
        if isinstance(exc, ConfigError):
            report_line(f"error: {exc}", rank_from_env())
        else:  # a library's own check may fail on one rank only
            report_line(f"error: {exc} (set {TRACEBACK_ENV}=1 for the traceback)", rank_from_env(), every_rank=True)
        return 130 if interrupted else 2
    except PipelineStageError as exc:
        # Not this rank's error: a traceback from each of the surviving ranks (hundreds of lines after a
        # kill -9 at 8 ranks) would only bury the line that says what happened and where.
        if os.environ.get(TRACEBACK_ENV) == "1":
            raise
        if interrupted:
            return _interrupted()
        report_line(f"error: {exc}", rank_from_env(), every_rank=True)
        return 1
    except Exception:
        # After Ctrl-C a rank blocked in a collective sees its peer's connection close: not a crash to show.
        if not interrupted or os.environ.get(TRACEBACK_ENV) == "1":
            raise
        return _interrupted()
    return 0


def _record_ctrl_c() -> list[int]:
    """Note a SIGINT (then raise KeyboardInterrupt, as Python's default handler) in the list returned."""
    seen: list[int] = []
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        def on_sigint(signum: int, frame: Any) -> None:
            seen.append(signum)
            raise KeyboardInterrupt
        signal.signal(signal.SIGINT, on_sigint)
    return seen


def _interrupted() -> int:
    report_line("error: interrupted (Ctrl-C); the checkpoints already saved are complete (a save in progress is "
                "discarded); SIGTERM instead stops after the current iteration and saves one", rank_from_env())
    return 130  # 128 + SIGINT, as a shell reports it


if __name__ == "__main__":
    sys.exit(cli())
