"""``tools/autotune.py``: pick the parallel layout for pretrain_gpt.py's model and training flags.

    python tools/autotune.py --num-layers 4 --hidden-size 64 --num-attention-heads 4 --seq-length 64 \\
        --global-batch-size 16 --mock-data --vocab-size 255 --lr 1e-3 --train-iters 100 \\
        --world-size 4 --memory-per-device 2 --output run.sh --output-deepspeed-json ds.json --trials 2

Takes pretrain_gpt.py's flags (its own parser; layout flags given there are replaced by the search),
predicts memory (:mod:`.memory`) and step time (:mod:`.cost`, measured on this machine) for every
layout (:mod:`.search`), prints a table, writes the best launchable layout as a torchrun line and as
a DeepSpeed JSON, and with ``--trials N`` runs the top N for a few iterations and keeps the measured best.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence

from megatron_core.autotune.layout import Layout, ModelSpec, from_run_config
from megatron_core.autotune.memory import BucketSettings
from megatron_core.autotune.search import GIB, ZERO_STAGE_FLAGS, Candidate, enumerate_layouts, format_bytes, search
from megatron_core.distributed.distributed_data_parallel_config import DistributedDataParallelConfig
from megatron_core.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Flags the search decides: dropped from the user's command line before the chosen ones are added.
LAYOUT_FLAGS = {"--tensor-model-parallel-size": 1, "--pipeline-model-parallel-size": 1,
                "--num-layers-per-virtual-pipeline-stage": 1, "--micro-batch-size": 1, "--sequence-parallel": 0,
                "--use-distributed-optimizer": 0, "--recompute-activations": 0, "--recompute-granularity": 1,
                "--recompute-method": 1, "--recompute-num-layers": 1, "--zero-stage": 1,
                "--data-parallel-sharding-strategy": 1, "--optimizer-cpu-offload": 0}
AUTOTUNE_FLAGS = {"--world-size": 1, "--memory-per-device": 1, "--trials": 1, "--trial-iters": 1, "--output": 1,
                  "--output-deepspeed-json": 1, "--top": 1, "--no-offload": 0,
                  "--micro-batch-sizes": -1}


def build_parser() -> argparse.ArgumentParser:
    """pretrain_gpt.py's parser plus the autotune group."""
    from megatron_core.training.arguments import build_parser as pretrain_parser

    parser = pretrain_parser()
    parser.prog = "tools/autotune.py"
    g = parser.add_argument_group("autotune", "layout search")
    g.add_argument("--world-size", type=int, default=None, help="ranks to plan for (default: CPU cores)")
    g.add_argument("--memory-per-device", type=float, default=None,
                   help="GiB per rank (default: this machine's memory / world size)")
    g.add_argument("--trials", type=int, default=0, help="run the top N layouts for a few iterations")
    g.add_argument("--trial-iters", type=int, default=3, help="iterations per trial")
    g.add_argument("--output", default=None, help="write the best layout's torchrun command line here")
    g.add_argument("--output-deepspeed-json", default=None, help="write the best layout as a DeepSpeed config")
    g.add_argument("--top", type=int, default=15, help="rows of the table")
    g.add_argument("--no-offload", action="store_true", help="leave optimizer offload out of the search")
    g.add_argument("--micro-batch-sizes", type=int, nargs="+", default=None,
                   help="micro batch sizes to consider (default: divisors of the global batch up to 8)")
    return parser


def strip_flags(argv: list[str], flags: dict[str, int]) -> list[str]:
    """``argv`` without ``flags`` (name -> number of values, -1 for any), as ``--f v`` or ``--f=v``."""
    out, i = [], 0
    while i < len(argv):
        name = argv[i].split("=", 1)[0]
        if name in flags:
            i += 1
            if "=" not in argv[i - 1]:
                count = flags[name]
                while count != 0 and i < len(argv) and not argv[i].startswith("--"):
                    i, count = i + 1, count - 1  # -1: every value up to the next flag
            continue
        out.append(argv[i])
        i += 1
    return out


def layout_flags(spec: ModelSpec, layout: Layout) -> list[str]:
    """pretrain_gpt.py's flags for ``layout``; KeyError for a stage without a flag (see ``launch_blocker``)."""
    flags = ["--tensor-model-parallel-size", str(layout.tp), "--pipeline-model-parallel-size", str(layout.pp),
             "--micro-batch-size", str(layout.micro_batch_size), *ZERO_STAGE_FLAGS[layout.zero_stage]]
    if layout.vpp:
        flags += ["--num-layers-per-virtual-pipeline-stage", str(spec.config.num_layers // (layout.pp * layout.vpp))]
    if layout.sequence_parallel:
        flags.append("--sequence-parallel")
    if layout.offload:
        flags.append("--optimizer-cpu-offload")
    if layout.recompute == "selective":
        flags += ["--recompute-granularity", "selective"]
    elif layout.recompute == "full":
        flags += ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"]
    return flags


def torchrun_command(spec: ModelSpec, layout: Layout, user_flags: list[str]) -> list[str]:
    """A torchrun launch of pretrain_gpt.py on this machine with ``layout``."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(layout.world_size),
            os.path.join(REPO, "pretrain_gpt.py"), *user_flags, *layout_flags(spec, layout)]


def bucket_settings(args: argparse.Namespace) -> BucketSettings:
    """The run's bucket sizes in elements: ``--ddp-bucket-size`` (default DistributedDataParallelConfig's 40M),
    ``--stage3-prefetch-bucket-size`` (DeepSpeed's default 5e7) and ``--stage3-param-persistence-threshold``
    (this framework's default 0), which the ZeRO-3 gather window and the collectives' buffers depend on, and
    which the written DeepSpeed JSON carries."""
    size = args.ddp_bucket_size if args.ddp_bucket_size is not None else DistributedDataParallelConfig().bucket_size
    return BucketSettings(bucket_size=size, stage3_prefetch_bucket_size=args.stage3_prefetch_bucket_size,
                          stage3_param_persistence_threshold=args.stage3_param_persistence_threshold)


def deepspeed_config(spec: ModelSpec, layout: Layout, args: argparse.Namespace) -> dict:
    """The layout in DeepSpeed's JSON keys (https://www.deepspeed.ai/docs/config-json/), as
    ``pretrain_gpt.py --deepspeed-config`` and ``megatron_core.initialize`` read them: batch, ZeRO, offload,
    precision, clipping, optimizer, AutoTP. Pipeline stages, sequence parallelism and recompute stay on the
    torchrun line: DeepSpeed sets stages in code (``PipelineModule``), and the activation_checkpointing keys
    that would carry the others are refused by this framework's parser (it does not implement them)."""
    # The buckets the memory prediction counts (the run's: bucket_settings); left out, the file would get
    # DeepSpeed's 5e8 reduce_bucket_size and, under ZeRO-3, its 1e5 persistence threshold, and the file's values
    # replace the flags' (a --ddp-bucket-size on the launch line that disagrees with the file is an error).
    buckets = bucket_settings(args)
    zero: dict = {"stage": layout.zero_stage, "reduce_bucket_size": buckets.bucket_size}
    if layout.zero_stage == 3:
        zero["stage3_prefetch_bucket_size"] = buckets.stage3_prefetch_bucket_size
        zero["stage3_param_persistence_threshold"] = buckets.stage3_param_persistence_threshold
    if layout.offload:
        zero["offload_optimizer"] = {"device": "cpu"}
    config = {"train_batch_size": spec.global_batch_size, "train_micro_batch_size_per_gpu": layout.micro_batch_size,
              "gradient_accumulation_steps": spec.num_microbatches(layout), "zero_optimization": zero,
              "gradient_clipping": args.clip_grad, "bf16": {"enabled": bool(args.bf16)},
              "fp16": {"enabled": bool(args.fp16)}, "tensor_parallel": {"autotp_size": layout.tp}}
    if args.optimizer == "adam":
        config["optimizer"] = {"type": "AdamW", "params": {"lr": args.lr, "betas": [args.adam_beta1, args.adam_beta2],
                                                           "eps": args.adam_eps, "weight_decay": args.weight_decay}}
    return config


def model_spec(args: argparse.Namespace) -> ModelSpec:
    """The model pretrain_gpt.py would build from ``args`` (vocabulary from its tokenizer)."""
    from megatron_core.tokenizer.build import build_tokenizer
    from megatron_core.training.arguments.to_config import config_from_args
    from megatron_core.training.arguments.validate import validate_args
    from megatron_core.training.data_loading import model_vocab_size

    for flag in ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "global_batch_size"):
        if getattr(args, flag) is None:
            raise ConfigError(f"--{flag.replace('_', '-')} is required: the search needs the model and batch size")
    # pretrain_gpt.py's own checks and derived values (query groups, ffn size, positions), on one rank;
    # the layout fields are the search's to choose.
    args.tensor_model_parallel_size = args.pipeline_model_parallel_size = 1
    args.num_layers_per_virtual_pipeline_stage = None
    args.micro_batch_size = args.micro_batch_size or 1
    args.recompute_activations, args.sequence_parallel, args.use_distributed_optimizer = False, False, False
    args.recompute_granularity = args.recompute_method = args.recompute_num_layers = None
    # the ZeRO stage and offload too (config_from_args refuses offload or ZeRO-3 options without their stage)
    args.zero_stage = args.data_parallel_sharding_strategy = args.nvme_offload_path = None
    args.optimizer_cpu_offload = args.overlap_param_gather = args.offload_param = False
    validate_args(args, 1)
    config = config_from_args(args)
    kind = args.tokenizer_type or "NullTokenizer"
    if kind == "NullTokenizer" and args.vocab_size is None:
        raise ConfigError("--tokenizer-type or --vocab-size is required to size the embedding")
    try:
        tokenizer = build_tokenizer(kind, tokenizer_model=args.tokenizer_model, vocab_file=args.vocab_file,
                                    merge_file=args.merge_file, vocab_size=args.vocab_size)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    # pretrain_gpt.py's check (a tokenizer larger than --vocab-size), before the search rather than in every trial
    vocab = model_vocab_size(kind, tokenizer, args.vocab_size, args.tokenizer_model or args.vocab_file)
    return from_run_config(config, vocab)[0]


def _machine_memory_gib() -> float:
    with open("/proc/meminfo") as f:
        return int(re.search(r"MemTotal:\s+(\d+)", f.read()).group(1)) / 1024 ** 2  # type: ignore[union-attr]


def print_table(cands: list[Candidate], top: int) -> None:
    """The ``top`` valid layouts (predicted and, after trials, measured) and the pruned ones by reason."""
    ok = [c for c in cands if c.reason is None]
    print(f"{'layout':34} {'mem/rank':>10} {'step s':>9} {'tokens/s':>10} {'MFU':>6} {'measured tok/s':>15}  note")
    for c in ok[:top]:
        note = "" if c.launchable else "not launchable today"
        measured = f"{c.measured_tokens_per_s:15.1f}" if c.measured_tokens_per_s else " " * 15
        print(f"{c.layout.describe():34} {format_bytes(c.memory_bytes):>10} {c.step_time_s or 0:9.4f} "
              f"{c.tokens_per_s or 0:10.1f} {100 * (c.mfu or 0):5.1f}% {measured}  {note}")
    pruned = [c for c in cands if c.reason is not None]
    reasons: dict[str, int] = {}
    for c in pruned:
        key = "out of memory" if c.reason and c.reason.startswith("out of memory") else c.reason or ""
        reasons[key] = reasons.get(key, 0) + 1
    print(f"{len(ok)} layouts fit, {len(pruned)} pruned:")
    for reason, count in sorted(reasons.items(), key=lambda kv: -kv[1]):
        example = next(c for c in pruned if (c.reason or "").startswith(reason))
        print(f"  {count:5d} x {reason}" + (f" (e.g. {example.layout.describe()}: {example.reason})"
                                            if reason == "out of memory" else ""))


def failure_line(stderr: str) -> str:
    """The line of a failed launch's stderr that says why: the ``error: ...`` line of the rank that failed
    first (torchrun's "Root Cause" report), else pretrain_gpt.py's last ``error: ...`` line, else the last
    line that is not blank or a row of ``=``/``-`` (a rank killed by a signal: torchrun's "Signal 9 ..." line)."""
    # The other ranks print their own lines after the root one, in any order (a peer was lost, or "global
    # rank N raised ...; this rank stopped on ..."), so the last error line of all may be one of theirs.
    lines = [line.strip() for line in stderr.rsplit("Root Cause (first observed failure):", 1)[-1].splitlines()]
    errors = [line[line.index("error: "):] for line in lines if "error: " in line]
    rest = [line for line in lines if line.strip("=-")]
    return errors[-1] if errors else (rest[-1] if rest else "no output")


def run_trial(spec: ModelSpec, cand: Candidate, user_flags: list[str], iters: int) -> float | str:
    """tokens/s of ``iters`` real iterations (median after the first), or the line saying why the run failed."""
    # A trial measures speed from scratch: it writes no checkpoint and resumes none (a --load checkpoint
    # is usually past --trial-iters, and a legacy one loads under its own layout only).
    flags = strip_flags(user_flags, {"--train-iters": 1, "--log-interval": 1, "--eval-iters": 1, "--eval-interval": 1,
                                     "--save": 1, "--save-interval": 1, "--async-save": 0, "--load": 1,
                                     "--ckpt-step": 1, "--use-checkpoint-args": 0, "--exit-on-missing-checkpoint": 0,
                                     "--finetune": 0})
    cmd = torchrun_command(spec, cand.layout, flags + ["--train-iters", str(iters), "--log-interval", "1",
                                                       "--eval-iters", "0"])
    # in the caller's directory, as the emitted launch line runs: relative --data-path, --tokenizer-model ...
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    times = re.findall(r"elapsed time per iteration \(ms\): ([\d.]+)", proc.stdout)
    if proc.returncode != 0 or not times:
        why = failure_line(proc.stderr)
        print(f"  trial {cand.layout.describe()} failed: {why}", flush=True)
        return why
    steady = [float(t) for t in times[1:]] or [float(times[0])]  # the first iteration warms up
    return spec.global_batch_size * spec.seq_length / (statistics.median(steady) / 1000)


def write_launch_script(path: str, command: str, layout: str) -> None:
    """Write ``command`` to ``path`` as an executable bash script that passes on its own arguments
    (``bash run.sh --save ckpt --log-interval 1``): without ``"$@"`` those were silently dropped."""
    with open(path, "w") as f:
        f.write(f"#!/bin/bash\n# {layout}: the best layout of tools/autotune.py; flags given to this script "
                f"are added to the run's\n{command} \"$@\"\n")
    os.chmod(path, os.stat(path).st_mode | 0o111)


def main(argv: Sequence[str] | None = None) -> int:
    """Search, print, write; returns the process exit code (2 with a one-line error on bad flags)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _main(argv)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _check_autotune_args(args: argparse.Namespace) -> None:
    """ConfigError naming the first autotune flag out of range, and an output file that cannot be written,
    before the search spends minutes (``--trials -1`` would run every layout but the last)."""
    for flag, value, least in (("--world-size", args.world_size, 1), ("--trials", args.trials, 0),
                               ("--trial-iters", args.trial_iters, 1), ("--top", args.top, 1),
                               *(("--micro-batch-sizes", m, 1) for m in args.micro_batch_sizes or ())):
        if value is not None and value < least:
            raise ConfigError(f"{flag} must be >= {least}, got {value}")
    memory = args.memory_per_device
    if memory is not None and not (memory > 0 and math.isfinite(memory)):
        raise ConfigError(f"--memory-per-device takes GiB per rank, a finite number > 0; got {memory}")
    for flag, path in (("--output", args.output), ("--output-deepspeed-json", args.output_deepspeed_json)):
        if path is not None and os.path.isdir(path):
            raise ConfigError(f"{flag} {path} is a directory; give a file name in it")
        if path is not None and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise ConfigError(f"{flag} {path}: directory {os.path.dirname(os.path.abspath(path))} does not exist")
    if args.deepspeed_config is not None:
        # Its ZeRO, offload and batch sections would fix what each candidate layout sets by flags.
        raise ConfigError("--deepspeed-config is what the search chooses (ZeRO stage, offload, micro batch); drop "
                          "it, and --output-deepspeed-json FILE writes the best layout as a DeepSpeed config")


def _main(argv: list[str]) -> int:
    from tqdm import tqdm

    from megatron_core.autotune.cost import profile, step_time
    from megatron_core.device import usable_cores
    from megatron_core.training.flops import flops_per_iteration

    args = build_parser().parse_args(argv)
    _check_autotune_args(args)
    given = [flag for flag in LAYOUT_FLAGS if any(a.split("=", 1)[0] == flag for a in argv)]
    given.sort(key=lambda flag: next(i for i, a in enumerate(argv) if a.split("=", 1)[0] == flag))
    if given:  # a launch script's flags handed over whole: say which ones the search overrides
        print(f"note: {', '.join(given)} {'are' if len(given) > 1 else 'is'} what the search chooses: the "
              f"value{'s' if len(given) > 1 else ''} given {'are' if len(given) > 1 else 'is'} replaced by the best "
              f"layout's", file=sys.stderr)
    world = args.world_size if args.world_size is not None else usable_cores()
    memory = (args.memory_per_device if args.memory_per_device is not None else _machine_memory_gib() / world) * GIB
    spec = model_spec(args)
    layouts = enumerate_layouts(spec, world, args.micro_batch_sizes, with_offload=not args.no_offload)
    c = spec.config
    flops = flops_per_iteration(spec.global_batch_size, spec.seq_length, c.num_layers, c.hidden_size,
                                spec.ffn_hidden_size, c.num_attention_heads, spec.kv_channels, spec.num_query_groups,
                                c.gated_linear_unit, spec.padded_vocab(1))
    buckets = bucket_settings(args)
    valid = [c.layout for c in search(spec, layouts, memory, buckets=buckets) if c.reason is None]
    if not valid:
        pruned = search(spec, layouts, memory, buckets=buckets)
        print_table(pruned, args.top)
        if not any((c.reason or "").startswith("out of memory") for c in pruned):
            raise ConfigError(f"no layout of --world-size {world} ranks suits this model (memory aside): every one "
                              f"is pruned for the reasons above; pick a world size that the heads, layers and "
                              f"--global-batch-size divide")
        least = min((c for c in pruned if (c.reason or "").startswith("out of memory")), key=lambda c: c.memory_bytes)
        raise ConfigError(f"no layout of {world} ranks fits in {format_bytes(memory)} per rank; the smallest, "
                          f"{least.layout.describe()}, needs {format_bytes(least.memory_bytes)} (raise "
                          f"--memory-per-device, or give more ranks with --world-size)")
    # disable=None: bars on a terminal only (in a job log every update would be another \r-joined line)
    prof = profile(spec, valid, world,
                   progress=lambda keys: tqdm(keys, desc="profiling layers", file=sys.stderr, disable=None))
    cands = search(spec, layouts, memory, predict_time=lambda lay: step_time(spec, lay, prof, flops),
                   progress=lambda it: tqdm(it, desc="predicting", file=sys.stderr, disable=None), buckets=buckets)
    user_flags = strip_flags(strip_flags(argv, AUTOTUNE_FLAGS), LAYOUT_FLAGS)
    best = next((c for c in cands if c.reason is None and c.launchable), None)
    if args.trials and best is not None:
        tried = [c for c in cands if c.reason is None and c.launchable][:args.trials]
        failures = []
        for cand in tqdm(tried, desc="trials", file=sys.stderr, disable=None):
            start = time.perf_counter()
            result = run_trial(spec, cand, user_flags, args.trial_iters)
            cand.measured_tokens_per_s = result if isinstance(result, float) else None
            failures += [] if isinstance(result, float) else [result]
            print(f"  trial {cand.layout.describe()}: predicted {cand.tokens_per_s:.1f} tokens/s, measured "
                  f"{cand.measured_tokens_per_s or float('nan'):.1f} ({time.perf_counter() - start:.0f} s)", flush=True)
        measured = [c for c in tried if c.measured_tokens_per_s]
        if not measured:  # the flags themselves fail: a launch line that fails would be no answer
            raise ConfigError(f"every trial failed, so no layout is written; the first: {failures[0]}")
        best = max(measured, key=lambda c: c.measured_tokens_per_s or 0.0)
    print_table(cands, args.top)
    if best is None:
        raise ConfigError("no launchable layout fits; see the table for the layouts that need ZeRO-3 or offload")
    print(f"best: {best.layout.describe()}")
    command = shlex.join(torchrun_command(spec, best.layout, user_flags))
    print(command)
    if args.output:
        write_launch_script(args.output, command, best.layout.describe())
    if args.output_deepspeed_json:
        with open(args.output_deepspeed_json, "w") as f:
            json.dump(deepspeed_config(spec, best.layout, args), f, indent=2)
    return 0
