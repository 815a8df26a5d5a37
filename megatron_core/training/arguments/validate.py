"""Check a parsed command line and fill in derived values, as Megatron-LM's ``validate_args``.

Everything here is a pure function of the flags and the world size, so every rank reaches the
same verdict before any process group or model exists, and a bad combination costs one line.
"""
from __future__ import annotations

import argparse
import sys

from megatron_core import device
from megatron_core.datasets.splits import parse_split
from megatron_core.fusions.fused_dropout import cpu_rounds_to_one
from megatron_core.microbatches import MicrobatchCalculator
from megatron_core.training.arguments import compat, data, model, training
from megatron_core.training.config import DataConfig
from megatron_core.training.errors import ConfigError
from megatron_core.training.initialize import rank_from_env

_DEMO_HINT = " (or try python pretrain_gpt.py --demo)"


def validate_args(args: argparse.Namespace, world_size: int) -> argparse.Namespace:
    """Validate ``args`` in place and add derived fields; raises :class:`ConfigError`."""
    compat.apply(args)
    if args.use_checkpoint_args:
        from megatron_core.training.arguments import build_parser
        from megatron_core.training.arguments.checkpoint_args import apply_checkpoint_args

        apply_checkpoint_args(args, vars(build_parser().parse_args([])))
    compat.apply_no_position_embedding(args)
    _parallel(args, world_size)
    if getattr(args, "deepspeed", False) and args.deepspeed_config is None:
        raise ConfigError("--deepspeed needs --deepspeed_config FILE (the DeepSpeed JSON whose ZeRO, precision, "
                          "clipping and batch settings the run takes); give one or drop --deepspeed")
    if args.deepspeed_config is not None:
        from megatron_core.training.arguments import build_parser
        from megatron_core.training.arguments.deepspeed_config import apply_deepspeed_config

        apply_deepspeed_config(args, vars(build_parser().parse_args([])))
    _model(args)
    _batch_and_iterations(args)
    _learning_rate(args)
    _optimizer_values(args)
    _precision_and_recompute(args)
    _data(args)
    _checkpoint_and_logging(args)
    return args


def _require(args: argparse.Namespace, name: str, example: str) -> None:
    if getattr(args, name) is None:
        flag = "--" + name.replace("_", "-")
        raise ConfigError(f"{flag} is required, e.g. {flag} {example}{_DEMO_HINT}")


def _positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {value}")


def _parallel(args: argparse.Namespace, world_size: int) -> None:
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    _positive(args, "tensor_model_parallel_size", "pipeline_model_parallel_size")
    if world_size % (tp * pp) != 0:
        # Sizes the user may never have typed: --use-checkpoint-args takes a legacy checkpoint's.
        source = (" (with --use-checkpoint-args, a legacy checkpoint's own sizes: it loads under them only; re-shard "
                  "it with tools/checkpoint/convert.py --target-tensor-parallel-size / --target-pipeline-parallel-size"
                  " to change them)") if getattr(args, "layout_from_checkpoint", False) else ""
        raise ConfigError(
            f"world size {world_size} is not divisible by --tensor-model-parallel-size {tp} x "
            f"--pipeline-model-parallel-size {pp} = {tp * pp}; launch a multiple of {tp * pp} processes "
            f"(torchrun --nproc_per_node) or change the parallel sizes{source}")
    args.world_size = world_size
    args.data_parallel_size = world_size // (tp * pp)
    args.virtual_pipeline_model_parallel_size = None
    if args.num_layers_per_virtual_pipeline_stage is not None:
        per_stage = args.num_layers_per_virtual_pipeline_stage
        if pp < 2:
            raise ConfigError("--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size >= 2")
        if args.num_layers is None or per_stage <= 0 or args.num_layers % (pp * per_stage) != 0:
            raise ConfigError(
                f"--num-layers {args.num_layers} must be a multiple of --pipeline-model-parallel-size {pp} x "
                f"--num-layers-per-virtual-pipeline-stage {per_stage}")
        vpp = args.num_layers // (pp * per_stage)
        args.virtual_pipeline_model_parallel_size = vpp if vpp > 1 else None
    if tp == 1:
        if args.sequence_parallel and rank_from_env() == 0:
            # Megatron-LM's validate_args warns with this sentence; turning it off silently hid a flag the
            # user asked for (its activation-memory saving does not happen).
            print("warning: Disabling sequence parallelism because tensor model parallelism is disabled "
                  "(--sequence-parallel with --tensor-model-parallel-size 1); drop --sequence-parallel or use "
                  "--tensor-model-parallel-size 2 or more",
                  file=sys.stderr, flush=True)
        args.sequence_parallel = False  # as Megatron-LM: nothing to split
    if args.distributed_backend is None:
        args.distributed_backend = device.default_backend()
    if args.distributed_backend == "nccl" and not device.cuda_available():
        raise ConfigError("--distributed-backend nccl needs CUDA, which is not available; use "
                          "--distributed-backend gloo (the default without CUDA)")


def _model(args: argparse.Namespace) -> None:
    _require(args, "num_layers", "2")
    _require(args, "hidden_size", "64")
    _require(args, "num_attention_heads", "4")
    _require(args, "seq_length", "128")
    _positive(args, "num_layers", "hidden_size", "num_attention_heads", "seq_length", "ffn_hidden_size",
              "kv_channels", "max_position_embeddings", "make_vocab_size_divisible_by")
    # Megatron-LM ignores the factor alone
    if args.rope_scaling_factor != model.ROPE_SCALING_FACTOR and not args.use_rope_scaling:
        raise ConfigError(f"--rope-scaling-factor {args.rope_scaling_factor:g} scales RoPE only with "
                          f"--use-rope-scaling (Llama 3.x); add --use-rope-scaling or drop --rope-scaling-factor")
    tp, pp, heads = args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.num_attention_heads
    if heads % tp != 0:
        raise ConfigError(
            f"--num-attention-heads {heads} is not divisible by --tensor-model-parallel-size {tp}: each TP rank "
            f"needs whole heads; use a TP size that divides {heads} or change the number of heads")
    if args.group_query_attention:
        groups = args.num_query_groups
        if groups <= 0 or heads % groups != 0:
            raise ConfigError(f"--num-query-groups {groups} must divide --num-attention-heads {heads}")
        if groups % tp != 0:
            raise ConfigError(f"--num-query-groups {groups} is not divisible by --tensor-model-parallel-size {tp}; "
                              f"each TP rank needs whole key/value groups")
    else:
        args.num_query_groups = heads
    if args.kv_channels is None:
        if args.hidden_size % heads != 0:
            raise ConfigError(f"--hidden-size {args.hidden_size} is not divisible by --num-attention-heads {heads}; "
                              f"change one of them or give --kv-channels")
        args.kv_channels = args.hidden_size // heads
    if args.ffn_hidden_size is None:
        # Megatron-LM's SwiGLU size keeps the parameter count of a 4h GeLU MLP (rounded to 64).
        if args.swiglu:
            args.ffn_hidden_size = int(8 * args.hidden_size / 3 / 64) * 64 or -(-8 * args.hidden_size // 3)
        else:
            args.ffn_hidden_size = 4 * args.hidden_size
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    if args.position_embedding_type == "learned_absolute" and args.max_position_embeddings < args.seq_length:
        raise ConfigError(f"--max-position-embeddings {args.max_position_embeddings} is smaller than --seq-length "
                          f"{args.seq_length}; raise it to at least {args.seq_length}")
    if args.virtual_pipeline_model_parallel_size is None and args.num_layers % pp != 0:
        raise ConfigError(f"--num-layers {args.num_layers} is not divisible by --pipeline-model-parallel-size {pp}; "
                          f"use a multiple of {pp} layers")
    if args.sequence_parallel and args.seq_length % tp != 0:
        raise ConfigError(f"--sequence-parallel needs --seq-length {args.seq_length} divisible by "
                          f"--tensor-model-parallel-size {tp}")
    for name in ("hidden_dropout", "attention_dropout"):
        flag, p = f"--{name.replace('_', '-')}", getattr(args, name)
        if not 0.0 <= p < 1.0:
            raise ConfigError(f"{flag} must be in [0, 1), got {p}")
        if cpu_rounds_to_one(p):  # the CPU mask's and the Triton bias-dropout-add's resolution
            raise ConfigError(f"{flag} {p} rounds to 1 at the dropout mask's resolution of 2**-16 (every "
                              f"value dropped); use at most 0.99999")


def _batch_and_iterations(args: argparse.Namespace) -> None:
    _require(args, "micro_batch_size", "4")
    _positive(args, "micro_batch_size", "global_batch_size", "train_iters", "train_samples", "exit_interval",
              "exit_duration_in_mins")
    if args.global_batch_size is None:
        args.global_batch_size = args.micro_batch_size * args.data_parallel_size
    try:
        calculator = MicrobatchCalculator(args.global_batch_size, args.micro_batch_size, args.data_parallel_size,
                                          args.rampup_batch_size, args.pipeline_model_parallel_size,
                                          args.virtual_pipeline_model_parallel_size)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if args.eval_only:
        args.skip_train = True
    if args.train_iters is not None and args.train_samples is not None:
        raise ConfigError("give only one of --train-iters and --train-samples")
    if args.train_iters is None and args.train_samples is None:
        if not args.skip_train:
            raise ConfigError(f"give the length of training: --train-iters N or --train-samples N{_DEMO_HINT}")
        args.train_iters = 0
    if args.train_samples is not None:
        args.train_iters = _iterations_for_samples(calculator, args.train_samples, args.rampup_batch_size)


def _iterations_for_samples(calculator: MicrobatchCalculator, train_samples: int, rampup) -> int:
    """Iterations that consume ``train_samples``, counting the smaller ramp-up batches."""
    iterations, consumed = 0, 0
    rampup_samples = rampup[2] if rampup is not None else 0
    while consumed < rampup_samples and consumed < train_samples:
        consumed += calculator.batch_size_at(consumed)
        iterations += 1
    return iterations + max(train_samples - consumed, 0) // calculator.global_batch_size


def _optimizer_values(args: argparse.Namespace) -> None:
    """Adam's betas in [0, 1), eps, weight decay and momentum >= 0 (torch's optimizers refuse the rest,
    naming no flag)."""
    for name in ("adam_beta1", "adam_beta2"):
        value = getattr(args, name)
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"--{name.replace('_', '-')} must be in [0, 1), got {value}")
    for name in ("adam_eps", "weight_decay", "start_weight_decay", "end_weight_decay", "sgd_momentum"):
        value = getattr(args, name)
        if value is not None and not value >= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {value}")


def _decoupled_lr(args: argparse.Namespace) -> None:
    """--decoupled-lr's bounds: Megatron-LM ignores --decoupled-min-lr alone; here that is an error."""
    if args.decoupled_lr is None:
        if args.decoupled_min_lr is not None:
            raise ConfigError("--decoupled-min-lr is the floor of the --decoupled-lr group; add --decoupled-lr or "
                              "drop it")
        return
    if args.decoupled_lr < 0.0:
        raise ConfigError(f"--decoupled-lr (the embedding and output layer's peak learning rate) must be 0 or "
                          f"more, got {args.decoupled_lr}")
    floor = args.min_lr if args.decoupled_min_lr is None else args.decoupled_min_lr
    if not 0.0 <= floor <= args.decoupled_lr:
        which = "--min-lr" if args.decoupled_min_lr is None else "--decoupled-min-lr"
        default = " (it defaults to --min-lr)" if args.decoupled_min_lr is None else ""
        raise ConfigError(f"need 0 <= {which} {floor} <= --decoupled-lr {args.decoupled_lr}; give a "
                          f"--decoupled-min-lr from 0 to {args.decoupled_lr}{default}")


def _learning_rate_bounds(args: argparse.Namespace) -> None:
    """Megatron-LM's ``OptimizerParamScheduler`` bounds, 0 <= --min-lr <= --lr and --lr-warmup-init <= --lr,
    each sign checked before the comparison so the message names the flag that is wrong."""
    for name in ("lr", "min_lr"):
        value = getattr(args, name)
        if value is not None and not value >= 0.0:  # also NaN
            raise ConfigError(f"--{name.replace('_', '-')} is a learning rate and must be >= 0, got {value}")
    if args.lr is None:
        return
    if args.min_lr > args.lr:
        raise ConfigError(f"--min-lr {args.min_lr} is larger than --lr {args.lr}; the decay ends at --min-lr, so "
                          f"give a --min-lr from 0 to {args.lr}")
    if args.lr_warmup_init > args.lr:
        raise ConfigError(f"--lr-warmup-init {args.lr_warmup_init} is larger than --lr {args.lr}; the warmup rises "
                          f"from --lr-warmup-init to --lr, so give one from 0 to {args.lr}")


def _learning_rate(args: argparse.Namespace) -> None:
    if not args.skip_train:
        _require(args, "lr", "3e-4")
    _learning_rate_bounds(args)
    _decoupled_lr(args)
    if args.lr_warmup_fraction is not None:
        if args.lr_warmup_iters or args.lr_warmup_samples:
            raise ConfigError("give only one of --lr-warmup-fraction, --lr-warmup-iters and --lr-warmup-samples")
        if not 0.0 <= args.lr_warmup_fraction <= 1.0:
            raise ConfigError(f"--lr-warmup-fraction must be in [0, 1], got {args.lr_warmup_fraction}")
    by_samples = args.train_samples is not None
    if by_samples and (args.lr_decay_iters is not None or args.lr_warmup_iters or args.lr_wsd_decay_iters is not None):
        raise ConfigError("with --train-samples give the schedule in samples: --lr-decay-samples, --lr-warmup-samples, "
                          "--lr-wsd-decay-samples")
    if not by_samples and (args.lr_decay_samples is not None or args.lr_warmup_samples
                           or args.lr_wsd_decay_samples is not None):
        raise ConfigError("with --train-iters give the schedule in iterations: --lr-decay-iters, --lr-warmup-iters, "
                          "--lr-wsd-decay-iters")
    if args.start_weight_decay is None:
        args.start_weight_decay = args.weight_decay
    if args.end_weight_decay is None:
        args.end_weight_decay = args.weight_decay
    if args.weight_decay_incr_style == "constant" and args.start_weight_decay != args.end_weight_decay:
        raise ConfigError("--weight-decay-incr-style constant needs --start-weight-decay == --end-weight-decay")
    if args.override_opt_param_scheduler and args.use_checkpoint_opt_param_scheduler:
        raise ConfigError("give only one of --override-opt-param-scheduler and --use-checkpoint-opt-param-scheduler")
    if not args.skip_train:
        _schedule_lengths(args, by_samples)


def _schedule_lengths(args: argparse.Namespace, by_samples: bool) -> None:
    """Megatron-LM's schedule rules: iteration-based training has no batch ramp-up (the decay, counted in
    samples of full batches, would not end at the last iteration), and the warmup ends before the decay
    (when the run lasts past the warmup)."""
    if not by_samples and args.rampup_batch_size is not None:
        raise ConfigError("--rampup-batch-size needs sample-based training (as in Megatron-LM): give --train-samples "
                          "with --lr-decay-samples / --lr-warmup-samples instead of --train-iters, so the decay ends "
                          "at --min-lr at the last iteration")
    unit, flag = ("samples", "samples") if by_samples else ("iterations", "iters")
    total = args.train_samples if by_samples else args.train_iters
    decay = args.lr_decay_samples if by_samples else args.lr_decay_iters
    decay = total if decay is None else decay
    warmup = args.lr_warmup_samples if by_samples else args.lr_warmup_iters
    if args.lr_warmup_fraction is not None:
        warmup = args.lr_warmup_fraction * decay
    if decay is not None and decay <= 0 and args.lr_decay_style != "constant":
        raise ConfigError(f"--lr-decay-{flag} must be positive, got {decay}")
    if args.lr_decay_style == "WSD":
        wsd = args.lr_wsd_decay_samples if by_samples else args.lr_wsd_decay_iters
        if wsd is None:
            raise ConfigError(f"--lr-decay-style WSD needs --lr-wsd-decay-{flag} N: the {unit} at the end of the "
                              f"decay over which the rate anneals from --lr to --min-lr")
        if not 0 < wsd <= decay:
            raise ConfigError(f"--lr-wsd-decay-{flag} {wsd} is longer than the decay ({decay} {unit}) or not "
                              f"positive; give 1 to {decay}")
    # Megatron-LM asserts warmup < decay outright; here a run that ends inside its warmup (a smoke test)
    # never reaches the jump and is only warned about (pretrain), so refuse when the jump is inside the run.
    if args.lr_decay_style != "constant" and 0 < warmup and decay is not None and warmup >= decay and total > warmup:
        raise ConfigError(f"the learning-rate warmup ({warmup:g} {unit}) is not shorter than the decay ({decay} "
                          f"{unit}): the rate would jump from the peak --lr straight to --min-lr; make "
                          f"--lr-decay-{flag} longer than the warmup or shorten the warmup")


def _precision_and_recompute(args: argparse.Namespace) -> None:
    if args.fp16 and args.bf16:
        raise ConfigError("give only one of --fp16 and --bf16")
    if args.grad_reduce_in_bf16 and not args.bf16:
        raise ConfigError("--grad-reduce-in-bf16 reduces the gradients of --bf16 training; add --bf16 or drop the flag")
    if args.grad_reduce_in_bf16 and args.accumulate_allreduce_grads_in_fp32:
        raise ConfigError("--grad-reduce-in-bf16 and --accumulate-allreduce-grads-in-fp32 contradict each other; "
                          "give one of them")
    if args.fp32_residual_connection and not (args.fp16 or args.bf16):  # Megatron-LM's check
        raise ConfigError("--fp32-residual-connection keeps the residual stream in fp32 under low precision; "
                          "add --bf16 or --fp16, or drop the flag (fp32 training's stream is fp32 already)")
    if args.loss_scale is not None and args.loss_scale <= 0:
        raise ConfigError(f"--loss-scale must be positive (leave it out for dynamic scaling), got {args.loss_scale}")
    if args.recompute_activations:
        args.recompute_granularity = "selective"
    if args.recompute_granularity == "full":
        if args.recompute_method is None:
            raise ConfigError("--recompute-granularity full needs --recompute-method uniform or block")
        if args.recompute_num_layers is not None and args.recompute_num_layers <= 0:
            raise ConfigError(f"--recompute-num-layers must be 1 or more, got {args.recompute_num_layers}")
        if args.recompute_num_layers is None:
            raise ConfigError("--recompute-granularity full needs --recompute-num-layers N (layers per recompute "
                              "group with uniform, recomputed layers per stage with block)")
    elif args.recompute_method is not None or args.recompute_num_layers is not None:
        raise ConfigError("--recompute-method and --recompute-num-layers go with --recompute-granularity full")


def _data(args: argparse.Namespace) -> None:
    needs_data = not args.skip_train or args.eval_iters > 0
    try:  # up front: the datasets that read it are built after the model
        parse_split(args.split)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    data.read_data_args_files(args)
    flags = {"--data-path": "data_path", "--train-data-path": "train_data_path",
             "--valid-data-path": "valid_data_path", "--test-data-path": "test_data_path"}
    for name in flags.values():
        if getattr(args, name, None) == []:
            setattr(args, name, None)
    given = [flag for flag, name in flags.items() if getattr(args, name, None) is not None]
    per_split = [flag for flag in given if flag != "--data-path"]
    if per_split and "--data-path" in given:
        raise ConfigError(f"give --data-path (split by --split) or {'/'.join(per_split)} (each split its own "
                          f"data), not both")
    if given and args.mock_data:
        raise ConfigError(f"give only one of {_origin(args, given[0])} and --mock-data")
    if needs_data and not given and not args.mock_data:
        raise ConfigError(f"no training data: give --data-path PREFIX (made by tools/preprocess_data.py) or "
                          f"--mock-data{_DEMO_HINT}")
    if per_split and args.split != DataConfig.split:
        # --split only cuts --data-path; ignored, the splits would silently not be the ones asked for.
        raise ConfigError(f"--split {args.split} does not apply to {'/'.join(per_split)} (each split is every "
                          f"document of its own prefixes); drop --split, or give --data-path instead")
    if per_split and not args.skip_train and args.train_data_path is None:
        raise ConfigError(f"{', '.join(per_split)} without --train-data-path: give --train-data-path PREFIX for "
                          f"training")
    for flag in given:
        entries = getattr(args, flags[flag])
        for entry in entries:
            if entry.endswith((".jsonl", ".json")):
                raise ConfigError(
                    f"{flag} {entry!r} is raw JSON; tokenize it first: python tools/preprocess_data.py --input "
                    f"{entry} --output-prefix PREFIX --tokenizer-type ... --append-eod, then pass {flag} "
                    f"PREFIX_text_document")
        from megatron_core.datasets import parse_data_path

        try:
            parse_data_path(entries, check_files=True, flag=flag)
        except ValueError as exc:
            source = "" if _origin(args, flag) == flag else f" (read from {_origin(args, flag)})"
            raise ConfigError(f"{exc}{source}") from None
    if args.tokenizer_type is None:
        if args.vocab_size is None:
            raise ConfigError("--tokenizer-type is required (SentencePieceTokenizer, GPT2BPETokenizer, "
                              "HuggingFaceTokenizer, or NullTokenizer with --vocab-size N)")
        args.tokenizer_type = "NullTokenizer"
    if args.num_workers < 0:
        raise ConfigError(f"--num-workers must be >= 0, got {args.num_workers}")


def _origin(args: argparse.Namespace, flag: str) -> str:
    """What gave ``flag``'s paths: the flag itself, or the --data-args-path / --per-split-data-args-path file
    read into it (an error naming only the flag would name one the user never typed)."""
    file_flag = "--data-args-path" if flag == "--data-path" else "--per-split-data-args-path"
    path = getattr(args, file_flag[2:].replace("-", "_"))
    return f"{file_flag} {path}" if path is not None else flag


def _checkpoint_and_logging(args: argparse.Namespace) -> None:
    _positive(args, "save_interval", "log_interval", "eval_interval", "tensorboard_log_interval",
              "tensorboard_queue_size")
    _gc_and_profile(args)
    if args.finetune and args.load is None:
        raise ConfigError("--finetune needs --load DIR (the checkpoint to start from)")
    if args.eval_iters < 0:
        raise ConfigError(f"--eval-iters must be >= 0, got {args.eval_iters}")


def _gc_and_profile(args: argparse.Namespace) -> None:
    """--manual-gc-interval and the --profile window (Megatron-LM's flags)."""
    if args.manual_gc_interval < 0:
        raise ConfigError(f"--manual-gc-interval must be 0 (collect only around evaluations) or more, got "
                          f"{args.manual_gc_interval}")
    _without_switch(args)
    if not args.profile:
        return
    if not any(0 <= rank < args.world_size for rank in args.profile_ranks):
        raise ConfigError(f"--profile-ranks {' '.join(map(str, args.profile_ranks))} names no rank of this run "
                          f"(ranks 0 to {args.world_size - 1}); name one or more of them")
    if args.profile_step_start < 0 or args.profile_step_end <= args.profile_step_start:
        raise ConfigError(f"--profile records iterations --profile-step-start to --profile-step-end: need 0 <= "
                          f"start < end, got {args.profile_step_start} and {args.profile_step_end}")
    if args.train_iters is not None and args.profile_step_start >= args.train_iters and rank_from_env() == 0:
        print(f"warning: --profile-step-start {args.profile_step_start} is not below --train-iters "
              f"{args.train_iters}: nothing is profiled; lower --profile-step-start "
              f"(default {training.PROFILE_STEP_START})",
              file=sys.stderr, flush=True)
    if args.use_pytorch_profiler and args.tensorboard_dir is None:
        raise ConfigError("--use-pytorch-profiler writes its traces to --tensorboard-dir; add --tensorboard-dir DIR")


def _without_switch(args: argparse.Namespace) -> None:
    """Options of --manual-gc / --profile / --save given without it: Megatron-LM ignores them silently; here one
    warning line names them (not an error, so a script that toggles only the switch keeps running)."""
    given = {"--manual-gc-interval": ("--manual-gc", args.manual_gc_interval != training.MANUAL_GC_INTERVAL),
             "--no-manual-gc-eval": ("--manual-gc", not args.manual_gc_eval),
             "--use-pytorch-profiler": ("--profile", args.use_pytorch_profiler),
             "--profile-step-start": ("--profile", args.profile_step_start != training.PROFILE_STEP_START),
             "--profile-step-end": ("--profile", args.profile_step_end != training.PROFILE_STEP_END),
             "--profile-ranks": ("--profile", args.profile_ranks != list(training.PROFILE_RANKS)),
             "--save-interval": ("--save DIR", args.save_interval is not None)}
    switched_on = {"--manual-gc": args.manual_gc, "--profile": args.profile, "--save DIR": args.save is not None}
    unused = [flag for flag, (switch, on) in given.items() if on and not switched_on[switch]]
    if unused and rank_from_env() == 0:
        switches = " and ".join(dict.fromkeys(given[flag][0] for flag in unused))
        print(f"warning: {', '.join(unused)}: no effect without {switches}; add {switches} or drop "
              f"{', '.join(unused)}",
              file=sys.stderr, flush=True)
