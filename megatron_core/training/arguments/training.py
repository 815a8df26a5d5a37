"""Batch, iteration, optimizer, learning-rate, mixed-precision and recompute flags."""
from __future__ import annotations

import argparse

# Defaults that validate_args also reads, to tell an option given without its switch from its default.
MANUAL_GC_INTERVAL = 0
PROFILE_STEP_START, PROFILE_STEP_END, PROFILE_RANKS = 10, 12, (0,)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Megatron-LM's training, learning-rate, regularization and mixed-precision groups."""
    _batch(parser)
    _optimizer(parser)
    _learning_rate(parser)
    _mixed_precision(parser)
    _recompute(parser)


def _batch(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("training", "batch sizes, length of training and when to stop")
    g.add_argument("--micro-batch-size", type=int, default=None, help="samples per microbatch per DP rank")
    g.add_argument("--global-batch-size", type=int, default=None,
                   help="samples per iteration over all DP ranks (default micro batch x DP size)")
    g.add_argument("--rampup-batch-size", nargs=3, type=int, default=None, metavar=("START", "INCREMENT", "SAMPLES"),
                   help="grow the global batch from START by INCREMENT over SAMPLES samples")
    g.add_argument("--train-iters", type=int, default=None, help="iterations to train (or use --train-samples)")
    g.add_argument("--train-samples", type=int, default=None, help="samples to train (or use --train-iters)")
    g.add_argument("--exit-interval", type=int, default=None, help="exit after an iteration divisible by this")
    g.add_argument("--exit-duration-in-mins", type=float, default=None, help="exit after this many minutes")
    g.add_argument("--exit-signal-handler", action="store_true", default=True,
                   help="on SIGTERM, save a checkpoint and exit at the next iteration (on by default)")
    g.add_argument("--no-exit-signal-handler", action="store_false", dest="exit_signal_handler")
    g.add_argument("--skip-train", action="store_true", help="no training; evaluate (with --eval-iters) and exit")
    g.add_argument("--eval-only", action="store_true", help="same as --skip-train")
    g.add_argument("--seed", type=int, default=1234, help="seed for weights, dropout and data order")
    g.add_argument("--deterministic-mode", action="store_true", help="torch.use_deterministic_algorithms(True)")
    g.add_argument("--autotune", action="store_true",
                   help="search the parallel layout for these flags instead of training (tools/autotune.py: "
                        "--world-size, --memory-per-device, --trials, --output)")
    g.add_argument("--check-for-nan-in-loss-and-grad", action="store_true", default=True,
                   help="stop with an error, before the step is applied, when a loss or gradient is inf/nan")
    g.add_argument("--no-check-for-nan-in-loss-and-grad", action="store_false", dest="check_for_nan_in_loss_and_grad")
    g.add_argument("--max-skipped-iters-at-min-loss-scale", type=int, default=10,
                   help="fp16: stop after this many iterations in a row skipped at the lowest loss scale (0: never)")
    g.add_argument("--calculate-per-token-loss", action="store_true",
                   help="average the loss over every unmasked token of the global batch (per-token sums, "
                        "divided by the total count) instead of per microbatch, then over microbatches")
    g.add_argument("--manual-gc", action="store_true",
                   help="turn Python's automatic garbage collection off; collect every --manual-gc-interval "
                        "iterations instead, at the same moment on every rank")
    g.add_argument("--manual-gc-interval", type=int, default=MANUAL_GC_INTERVAL,
                   help="with --manual-gc: iterations between collections (0: only around evaluations)")
    g.add_argument("--no-manual-gc-eval", action="store_false", dest="manual_gc_eval",
                   help="with --manual-gc: no collection before and after each evaluation")
    g.add_argument("--empty-unused-memory-level", type=int, default=0, choices=[0, 1, 2],
                   help="release the accelerator allocator's cached blocks: 1 after each forward-backward and "
                        "evaluation step, 2 also after each optimizer step (no effect on the CPU)")
    g.add_argument("--profile", action="store_true",
                   help="profile iterations --profile-step-start to --profile-step-end on --profile-ranks: with "
                        "--use-pytorch-profiler into --tensorboard-dir, else as an Nsight Systems capture range "
                        "(CUDA only)")
    g.add_argument("--use-pytorch-profiler", action="store_true",
                   help="with --profile: torch.profiler traces written to --tensorboard-dir")
    g.add_argument("--profile-step-start", type=int, default=PROFILE_STEP_START,
                   help="first iteration --profile records")
    g.add_argument("--profile-step-end", type=int, default=PROFILE_STEP_END,
                   help="iteration at which --profile stops recording")
    g.add_argument("--profile-ranks", nargs="+", type=int, default=list(PROFILE_RANKS),
                   help="global ranks that --profile records")


def _optimizer(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("optimizer", "optimizer and regularization")
    g.add_argument("--optimizer", default="adam", choices=["adam", "sgd"])
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--start-weight-decay", type=float, default=None)
    g.add_argument("--end-weight-decay", type=float, default=None)
    g.add_argument("--weight-decay-incr-style", default="constant", choices=["constant", "linear", "cosine"])
    g.add_argument("--clip-grad", type=float, default=1.0,
                   help="global gradient L2 norm to clip to (0 or negative: no clipping, as Megatron-LM)")
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--sgd-momentum", type=float, default=0.9)


def _learning_rate(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("learning rate", "warmup then constant, linear, cosine or WSD decay to --min-lr")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate")
    g.add_argument("--min-lr", type=float, default=0.0, help="learning rate at the end of the decay")
    g.add_argument("--decoupled-lr", type=float, default=None,
                   help="peak learning rate of the input embedding and output layer (their own group, same "
                        "warmup and decay; Megatron-LM's flag). Default: --lr")
    g.add_argument("--decoupled-min-lr", type=float, default=None,
                   help="--decoupled-lr's floor at the end of the decay (default --min-lr)")
    g.add_argument("--lr-decay-style", default="linear",
                   choices=["constant", "linear", "cosine", "inverse-square-root", "WSD"],
                   help="WSD: warmup, --lr held, then annealed over the last --lr-wsd-decay-iters/-samples")
    g.add_argument("--lr-wsd-decay-style", default="exponential",
                   choices=["exponential", "linear", "cosine", "minus_sqrt"], help="WSD's anneal")
    g.add_argument("--lr-wsd-decay-iters", type=int, default=None, help="WSD: anneal over this many iterations")
    g.add_argument("--lr-wsd-decay-samples", type=int, default=None, help="WSD: anneal over this many samples")
    g.add_argument("--lr-decay-iters", type=int, default=None, help="decay over this many iterations (default all)")
    g.add_argument("--lr-decay-samples", type=int, default=None, help="decay over this many samples (default all)")
    g.add_argument("--lr-warmup-fraction", type=float, default=None, help="warmup as a fraction of the decay")
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-warmup-samples", type=int, default=0)
    g.add_argument("--lr-warmup-init", type=float, default=0.0, help="learning rate at the start of warmup")
    # Megatron-LM spells these two "--override-opt_param-scheduler" and "--use-checkpoint-opt_param-scheduler".
    g.add_argument("--override-opt-param-scheduler", "--override-opt_param-scheduler", action="store_true",
                   help="take the schedule from the flags, not from the loaded checkpoint")
    g.add_argument("--use-checkpoint-opt-param-scheduler", "--use-checkpoint-opt_param-scheduler", action="store_true",
                   help="take the schedule from the loaded checkpoint")


def _mixed_precision(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("mixed precision", "fp16/bf16 training and loss scaling")
    g.add_argument("--fp16", action="store_true", help="fp16 weights and activations, fp32 master weights")
    g.add_argument("--bf16", action="store_true", help="bf16 weights and activations, fp32 master weights")
    g.add_argument("--fp32-residual-connection", action="store_true",
                   help="with --fp16/--bf16: keep the residual stream (and the tensors sent between pipeline "
                        "stages) in fp32; the norms return the compute dtype")
    g.add_argument("--loss-scale", type=float, default=None, help="static loss scale (default: dynamic)")
    g.add_argument("--initial-loss-scale", type=float, default=2.0 ** 32)
    g.add_argument("--min-loss-scale", type=float, default=1.0)
    g.add_argument("--loss-scale-window", type=int, default=1000)
    g.add_argument("--hysteresis", type=int, default=2)
    g.add_argument("--consecutive-hysteresis", action="store_true",
                   help="a step without overflow restores the hysteresis (DeepSpeed's fp16.consecutive_hysteresis)")
    g.add_argument("--accumulate-allreduce-grads-in-fp32", action="store_true")
    g.add_argument("--grad-reduce-in-bf16", action="store_true",
                   help="with --bf16: accumulate and reduce gradients in bf16 (default: fp32, Megatron-LM's rule); "
                        "half the gradient memory and traffic, at bf16's rounding")


def _recompute(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("activation recompute")
    g.add_argument("--recompute-activations", action="store_true", help="same as --recompute-granularity selective")
    g.add_argument("--recompute-granularity", default=None, choices=["full", "selective"])
    g.add_argument("--recompute-method", default=None, choices=["uniform", "block"])
    g.add_argument("--recompute-num-layers", type=int, default=None)
