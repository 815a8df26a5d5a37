"""Activation bytes per transformer layer for TP, TP+SP, selective and full recompute, against the paper.

Korthikanti et al., "Reducing Activation Recomputation in Large Transformer Models" (2022), count
the bytes a layer keeps for backward, with s sequence, b micro-batch, h hidden, a heads, t TP size:

=====================  =======================================  ==========================================
layout                 paper (fp16 activations, 1-byte masks)   this bench (fp32 activations, bool masks)
=====================  =======================================  ==========================================
no parallelism         sbh (34 + 5as/h)                         sbh (66 + 9as/h)
TP                     sbh (10 + 24/t + 5as/(ht))               sbh (18 + 48/t + 9as/(ht))
TP + SP                sbh/t (34 + 5as/h)                       sbh/t (66 + 9as/h)
TP + SP + selective    34 sbh/t                                 66 sbh/t
TP + SP + full         2 sbh/t (the layer input)                4 sbh/t
=====================  =======================================  ==========================================

The fp32 adjustment: every 2-byte activation of the paper becomes 4 bytes and the three dropout
masks stay 1 byte (torch bool), so 34 = 32 (16 two-byte tensors' worth) + 2 (masks) becomes
64 + 2 = 66, 5as/h = 2 + 2 (softmax output, dropout output) + 1 (mask) becomes 4 + 4 + 1 = 9, and
the replicated part under TP, 10 = 8 + 2, becomes 16 + 2 = 18. Not in the paper: LayerNorm keeps
its mean and 1/std (2 x 4 bytes per token per norm, 16 sb per layer, /t under SP); the bench prints
that term separately.

How it is measured: a GPT-2-shaped model (LayerNorm, GeLU, biases, dropout 0.1 on attention
probabilities and hidden states, the explicit attention path that materialises the s x s scores)
runs one training forward under ``torch.autograd.graph.saved_tensors_hooks``; the storages saved
for backward while the decoder runs are summed once each (views of one storage count once;
parameters are excluded). Running with L = 2 and L = 1 layers and taking the difference removes
the final norm and anything shared, leaving exactly one layer's bytes, per TP rank.

Row ``TP + SP, gathered input kept`` re-runs TP + SP with ColumnParallelLinear's previous forward
(all-gather through an autograd mapping, so F.linear keeps the gathered [s, b, h] input): the bytes
that keeping only the local shard saves.

Run: ``python bench/bench_activation_memory.py [--tp 2] [--seq 64] [--batch 2] [--hidden 64]
[--heads 4]`` (a few seconds).
"""
from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
os.environ.setdefault("MCORE_FORCE_CPU", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from harness import run_distributed  # noqa: E402

from megatron_core import parallel_state  # noqa: E402
from megatron_core.tensor_parallel import ColumnParallelLinear  # noqa: E402
from megatron_core.tensor_parallel.mappings import (  # noqa: E402
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)

VOCAB = 256
LAYOUTS = {  # name: (tp > 1, sequence_parallel, recompute overrides, keep gathered input)
    "no parallelism": (False, False, {}, False),
    "TP": (True, False, {}, False),
    "TP + SP": (True, True, {}, False),
    "TP + SP, gathered input kept": (True, True, {}, True),
    "TP + selective": (True, False, {"recompute_granularity": "selective"}, False),
    "TP + SP + selective": (True, True, {"recompute_granularity": "selective"}, False),
    "TP + SP + full": (True, True, {"recompute_granularity": "full", "recompute_method": "uniform",
                                    "recompute_num_layers": 1}, False),
}


def paper_fp32(name: str, s: int, b: int, h: int, a: int, t: int) -> float:
    """The fp32 form of Korthikanti et al.'s bytes per layer for ``name`` (see the module docstring)."""
    sbh, attn = s * b * h, 9 * a * s / h
    return {"no parallelism": sbh * (66 + attn),
            "TP": sbh * (18 + 48 / t + attn / t),
            "TP + SP": sbh / t * (66 + attn),
            "TP + SP, gathered input kept": sbh / t * (66 + attn),
            "TP + selective": sbh * (18 + 48 / t),
            "TP + SP + selective": 66 * sbh / t,
            "TP + SP + full": 4 * sbh / t}[name]


def _old_column_forward(self, x, weight=None):
    """ColumnParallelLinear.forward before this change: F.linear saves the gathered input."""
    weight = self.weight if weight is None else weight
    if self.sequence_parallel:
        x = gather_from_sequence_parallel_region(x, self.tp_group, tensor_parallel_output_grad=True)
    else:
        x = copy_to_tensor_model_parallel_region(x, self.tp_group)
    return F.linear(x, weight, None if self.skip_bias_add else self.bias), (self.bias if self.skip_bias_add
                                                                            else None)


def _saved_bytes(model, ids) -> int:
    """Bytes of the distinct non-parameter storages saved for backward while the decoder runs."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}
    active = [False]

    def pack(t):
        if active[0]:
            storage = t.untyped_storage()
            if storage.data_ptr() not in param_ptrs:
                seen[storage.data_ptr()] = storage.nbytes()
        return t

    pre = model.decoder.register_forward_pre_hook(lambda *_: active.__setitem__(0, True))
    post = model.decoder.register_forward_hook(lambda *_: active.__setitem__(0, False))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids, labels=ids).sum()
    pre.remove()
    post.remove()
    del loss
    return sum(seen.values())


def _measure(args) -> dict:
    from megatron_core.models.gpt import GPTModel
    from megatron_core.models.presets import gpt2_config
    ids = torch.randint(0, VOCAB, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    out = {}
    world = dist.get_world_size()
    for name, (use_tp, sp, recompute, keep_gathered) in LAYOUTS.items():
        ps = parallel_state.initialize_model_parallel(world if use_tp else 1, 1)
        original = ColumnParallelLinear.forward
        if keep_gathered:
            ColumnParallelLinear.forward = _old_column_forward
        try:
            per_l = []
            for layers in (1, 2):
                ps.manual_seed(0)
                config = gpt2_config(layers, args.hidden, args.heads, sequence_parallel=sp,
                                     **recompute)
                config.validate_parallel(ps.tp_size)
                model = GPTModel(config, VOCAB, args.seq, parallel_state=ps).train()
                per_l.append(_saved_bytes(model, ids))
        finally:
            ColumnParallelLinear.forward = original
        out[name] = per_l[1] - per_l[0]
        parallel_state.destroy_model_parallel()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = run_distributed(_measure, args.tp, args, timeout=300)
    s, b, h, a, t = args.seq, args.batch, args.hidden, args.heads, args.tp
    print(f"activation bytes per layer per rank, fp32: s={s} b={b} h={h} a={a} t={t}")
    print(f"{'layout':30s} {'measured':>10s} {'paper fp32':>11s} {'ratio':>6s} {'LN stats':>9s} {'rest':>6s}")
    for name in LAYOUTS:
        measured = results[0][name]
        if any(r[name] != measured for r in results[1:]):
            print(f"  (ranks differ for {name}: {[r[name] for r in results]})")
        use_tp, sp = LAYOUTS[name][0], LAYOUTS[name][1]
        tt = t if use_tp else 1
        expected = paper_fp32(name, s, b, h, a, tt)
        full = LAYOUTS[name][2].get("recompute_granularity") == "full"
        ln_stats = 0 if full else 16 * s * b / (tt if sp else 1)
        print(f"{name:30s} {measured:10d} {expected:11.0f} {measured / expected:6.3f} {ln_stats:9.0f} "
              f"{measured - expected - ln_stats:6.0f}")
    saved = results[0]["TP + SP, gathered input kept"] - results[0]["TP + SP"]
    print(f"keeping only the local shard in ColumnParallelLinear saves {saved} bytes per layer "
          f"(2 inputs x 4sbh (t-1)/t = {2 * 4 * s * b * h * (t - 1) // t})")


if __name__ == "__main__":
    main()
