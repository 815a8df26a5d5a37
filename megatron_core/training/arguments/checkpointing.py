"""Checkpoint save/load flags."""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Where and how often to save, what to load back."""
    g = parser.add_argument_group("checkpointing", "Megatron-LM's legacy checkpoint layout")
    g.add_argument("--save", default=None, help="directory to save checkpoints to")
    g.add_argument("--save-interval", type=int, default=None, help="iterations between checkpoints")
    g.add_argument("--no-save-optim", action="store_true", help="save without optimizer state (nor the learning-rate "
                   "schedule, which goes with it, as in Megatron-LM)")
    g.add_argument("--no-save-rng", action="store_true", help="save without RNG state")
    g.add_argument("--load", default=None, help="directory to load a checkpoint from")
    g.add_argument("--no-load-optim", action="store_true", help="do not load optimizer state")
    g.add_argument("--no-load-rng", action="store_true", help="do not load RNG state")
    g.add_argument("--finetune", action="store_true",
                   help="load only the model: iteration 0, fresh optimizer and schedule, no RNG")
    g.add_argument("--ckpt-step", type=int, default=None, help="load this iteration instead of the latest")
    g.add_argument("--exit-on-missing-checkpoint", action="store_true",
                   help="error out when --load holds no checkpoint (default: start from scratch)")
