"""Checkpoint save/load time and bytes on disk: legacy ``torch.save`` layout vs torch_dist vs async torch_dist.

A GPT-2-shaped model (default hidden 768, 12 layers, 12 heads, vocabulary 32768, 1024 positions:
about 110M parameters) with fp32 Adam state after one step, in one process. For each format: the time
the caller (training) is blocked by the save, the time until the checkpoint is published, the load
time, and the bytes of the iteration directory. The legacy layout is
``megatron_core.training.checkpointing`` (one ``model_optim_rng.pt`` per rank); torch_dist is
``megatron_core.dist_checkpointing``. Ratios are against the legacy save in the same run.

Run: ``python bench/bench_checkpoint.py --dir /tmp/ckpt_bench`` (a few GB of memory and disk at the
default size; ``--hidden-size 256 --num-attention-heads 4 --num-layers 4 --vocab-size 8192`` for a quick run).
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("MCORE_FORCE_CPU", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megatron_core import parallel_state  # noqa: E402
from megatron_core.dist_checkpointing import load_dist_checkpoint, save_dist_checkpoint  # noqa: E402
from megatron_core.models.gpt import GPTModel  # noqa: E402
from megatron_core.models.presets import gpt2_config  # noqa: E402
from megatron_core.optimizer import OptimizerConfig, get_megatron_optimizer  # noqa: E402
from megatron_core.training.checkpointing import load_checkpoint, save_checkpoint  # noqa: E402
from megatron_core.training.config import CheckpointConfig, ModelInfo  # noqa: E402


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def build(args, ps):
    config = gpt2_config(args.num_layers, args.hidden_size, args.num_attention_heads)
    model = GPTModel(config, args.vocab_size, args.seq_length, parallel_state=ps)
    optimizer = get_megatron_optimizer(OptimizerConfig(lr=1e-4), [model], ps)
    tokens = torch.randint(0, args.vocab_size, (1, 64))
    model(tokens, labels=tokens).mean().backward()
    optimizer.step()  # Adam state exists, as in a real checkpoint
    return config, model, optimizer


def bench_legacy(args, ps, config, model, optimizer, where):
    info = ModelInfo(args.vocab_size, model.padded_vocab_size, args.seq_length, args.seq_length,
                     config.position_embedding_type, config.share_embeddings_and_output_weights, 1, 1, None)
    start = time.perf_counter()
    save_checkpoint(CheckpointConfig(save=where), 1, 0, [model], optimizer, None, ps, config, info,
                    printer=lambda _: None)
    saved = time.perf_counter() - start
    start = time.perf_counter()
    load_checkpoint(CheckpointConfig(load=where), [model], optimizer, None, ps, config, info, printer=lambda _: None)
    return saved, saved, time.perf_counter() - start


def bench_dist(ps, model, optimizer, where, async_save):
    start = time.perf_counter()
    request = save_dist_checkpoint(where, 1, [model], optimizer, None, ps, async_save=async_save)
    blocked = time.perf_counter() - start
    request.wait()
    published = time.perf_counter() - start
    start = time.perf_counter()
    load_dist_checkpoint(where, [model], optimizer, None, ps, printer=lambda _: None)
    return blocked, published, time.perf_counter() - start


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", default="/tmp/ckpt_bench", help="scratch directory (emptied)")
    p.add_argument("--hidden-size", type=int, default=768)
    p.add_argument("--num-layers", type=int, default=12)
    p.add_argument("--num-attention-heads", type=int, default=12)
    p.add_argument("--vocab-size", type=int, default=32768)
    p.add_argument("--seq-length", type=int, default=1024)
    args = p.parse_args()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    ps = parallel_state.initialize_model_parallel(1)
    ps.manual_seed(1234)
    config, model, optimizer = build(args, ps)
    params = sum(t.numel() for t in model.parameters())
    print(f"{params / 1e6:.1f}M parameters, fp32 + Adam state; {torch.get_num_threads()} threads")
    rows = []
    for name in ("legacy", "torch_dist", "torch_dist async"):
        where = os.path.join(args.dir, name.replace(" ", "_"))
        shutil.rmtree(where, ignore_errors=True)
        if name == "legacy":
            timing = bench_legacy(args, ps, config, model, optimizer, where)
        else:
            timing = bench_dist(ps, model, optimizer, where, async_save=name.endswith("async"))
        rows.append((name, *timing, dir_bytes(os.path.join(where, "iter_0000001"))))
    base = rows[0][1]
    print(f"  {'format':18s} {'blocked s':>10s} {'published s':>12s} {'load s':>8s} {'MB':>8s}  blocked vs legacy")
    for name, blocked, published, load, size in rows:
        print(f"  {name:18s} {blocked:10.2f} {published:12.2f} {load:8.2f} {size / 2**20:8.1f}  x{blocked / base:.2f}")
    print(f"  peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    shutil.rmtree(args.dir, ignore_errors=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
