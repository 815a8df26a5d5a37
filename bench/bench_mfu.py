"""Model FLOPs utilisation of a training step against this machine's measured matrix-product peak.

Model FLOPs per token (PaLM, Chowdhery et al. 2022, appendix B): 6N + 12·L·h·s, N the parameters
that take part in matrix products (every parameter except the learned position table: the word
embedding counts once, as the tied output layer's product), L layers, h hidden, s sequence. For
the GPT-2 bench shape (4 layers, hidden 256, vocabulary 4096, sequence 256) that is about 28.7
MFLOP per token; causal masking is not subtracted (the convention), although the explicit causal
attention path skips the score blocks above the diagonal: the bench also prints the ratio with
attention counted as computed.

Peak: the step's own matrix products, timed alone at the same thread count: for every linear
layer the forward x·Wᵀ, the input gradient g·W and the weight gradient gᵀ·x with the layer's
(per-TP-rank) shapes and the operand layouts autograd uses, each by the faster of torch.mm (MKL)
and oneDNN's linear op (the step uses oneDNN for the first two, ``fusions/onednn_linear.py``), and
the attention batched products and their gradients per causal block of query rows. Peak = their
FLOPs / their summed time (fp32 on CPU). MFU = model FLOPs per second of the measured steps / that
peak. Step and peak are measured in alternating
rounds so machine noise hits both; the medians are compared.

The profiler breakdown (``torch.profiler``, CPU, self time per operator over the timed steps)
shows where the rest of the step goes.

Run: ``python bench/bench_mfu.py [--threads 2] [--steps 8] [--tp 1]``; ``--tp 2`` runs two gloo
ranks (one thread each unless ``--threads``) and profiles rank 0, which shows the collectives
and the copies around them per layer.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
os.environ.setdefault("MCORE_FORCE_CPU", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from harness import run_distributed  # noqa: E402

from megatron_core import device, parallel_state  # noqa: E402
from megatron_core.fusions.onednn_linear import onednn_linear_available, onednn_product  # noqa: E402
from megatron_core.optimizer import OptimizerConfig  # noqa: E402
from megatron_core.optimizer.optimizer import build_torch_optimizer  # noqa: E402
from megatron_core.tensor_parallel import ColumnParallelLinear, RowParallelLinear  # noqa: E402
from megatron_core.transformer.dot_product_attention import causal_blocks  # noqa: E402

BATCH, SEQ, LAYERS, HIDDEN, HEADS, VOCAB = 8, 256, 4, 256, 4, 4096
PRODUCT_OPS = ("mkldnn::_linear_pointwise", "aten::mm", "aten::bmm", "aten::baddbmm", "aten::addmm")
"""The profiler's names of the step's matrix-product kernels (oneDNN linear, MKL mm and batched mm)."""


def model_flops_per_token(model: torch.nn.Module, layers: int, hidden: int, seq: int, tp: int) -> float:
    """6N + 12·L·h·s (PaLM), N the global parameters that enter matrix products."""
    n = 0
    for name, p in model.named_parameters():
        if "position_embeddings" in name:
            continue
        n += p.numel() * (tp if getattr(p, "tensor_model_parallel", False) else 1)
    return 6 * n + 12 * layers * hidden * seq


def _linear_shapes(model: torch.nn.Module, ids: torch.Tensor) -> list[tuple[int, int, int]]:
    """(tokens, in, out) of every parallel linear call in one forward (this rank's shard)."""
    shapes: list[tuple[int, int, int]] = []

    def hook(module, args, output):
        out = output[0]
        shapes.append((out.numel() // out.shape[-1], module.weight.shape[1] if module.weight is not None
                       else module.input_size, out.shape[-1]))
    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (ColumnParallelLinear, RowParallelLinear))]
    with torch.no_grad():
        model(ids, labels=ids)
    for h in handles:
        h.remove()
    return shapes


def _products(linears, batch_heads: int, seq: int, head_dim: int, layers: int):
    """(alternative implementations, FLOPs) of each matrix product of one step: a linear product
    runs through torch.mm and, where this PyTorch has it, oneDNN; the faster counts."""
    onednn = onednn_linear_available()
    work = []
    for m, k, n in linears:
        x, w, g = torch.randn(m, k), torch.randn(n, k), torch.randn(m, n)
        flops = 2 * m * k * n
        forward = [lambda x=x, w=w: torch.mm(x, w.t())] + ([lambda x=x, w=w: onednn_product(x, w)] if onednn else [])
        dgrad = [lambda g=g, w=w: torch.mm(g, w)] + ([lambda g=g, w=w: onednn_product(g, w.t())] if onednn else [])
        wgrad = [lambda g=g, x=x: torch.mm(g.t(), x)] + (
            [lambda g=g, x=x: onednn_product(g.t(), x.t())] if onednn else [])
        work += [(forward, flops), (dgrad, flops), (wgrad, flops)]
    for start, end in causal_blocks(seq):  # the explicit causal path's blocks (dot_product_attention.py)
        rows = end - start
        q, k, p = torch.randn(batch_heads, rows, head_dim), torch.randn(batch_heads, end, head_dim), \
            torch.randn(batch_heads, rows, end)
        att = 2 * batch_heads * rows * end * head_dim
        for _ in range(layers):
            work += [([lambda q=q, k=k: torch.bmm(q, k.transpose(1, 2))], att),  # QKᵀ
                     ([lambda p=p, k=k: torch.bmm(p, k)], att),  # PV (and dQ = dS·K)
                     ([lambda p=p, k=k: torch.bmm(p, k)], att),
                     ([lambda p=p, q=q: torch.bmm(p.transpose(1, 2), q)], att),  # dK = dSᵀ·Q (and dV)
                     ([lambda q=q, k=k: torch.bmm(q, k.transpose(1, 2))], att),  # dP = dO·Vᵀ
                     ([lambda p=p, q=q: torch.bmm(p.transpose(1, 2), q)], att)]
    return work


def computed_attention_fraction(seq: int) -> float:
    """Share of the s x s causal scores the explicit path computes ((C+1)/2C for C equal blocks)."""
    return sum((end - start) * end for start, end in causal_blocks(seq)) / seq ** 2


def _time_products(work) -> float:
    """Seconds to run every product once by its fastest implementation (the sum of the times)."""
    total = 0.0
    for alternatives, _ in work:
        times = []
        for fn in alternatives:
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        total += min(times)
    return total


def _build(tp: int):
    from megatron_core.models.gpt import GPTModel
    from megatron_core.models.presets import gpt2_config
    device.set_local_device(dist.get_rank())  # as pretrain_gpt's initialize does (tunes the CPU allocator)
    ps = parallel_state.initialize_model_parallel(tp, 1)
    ps.manual_seed(1234)
    config = gpt2_config(LAYERS, HIDDEN, HEADS)
    config.validate_parallel(tp)
    model = GPTModel(config, VOCAB, SEQ, parallel_state=ps).train()
    return ps, model


def _run(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    ps, model = _build(dist.get_world_size())
    ids = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(0))
    inputs, labels = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
    # The training loop's Adam (torch's fused AdamW here) over the parameters as main parameters.
    opt = build_torch_optimizer(OptimizerConfig(lr=1e-4), [(p, p) for p in model.parameters()])

    def step() -> None:
        model(inputs, labels=labels).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    work = _products(_linear_shapes(model, inputs), BATCH * HEADS // ps.tp_size, SEQ, HIDDEN // HEADS, LAYERS)
    step_s, peak_s = [], []
    for i in range(args.steps + 2):  # alternate: step, products, step, ...; two warm-up rounds
        dist.barrier()
        start = time.perf_counter()
        step()
        dist.barrier()
        elapsed = time.perf_counter() - start
        products = _time_products(work)
        if i >= 2:
            step_s.append(elapsed)
            peak_s.append(products)
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.profile_steps):
            step()
    averages = prof.key_averages()
    table = averages.table(sort_by="self_cpu_time_total", row_limit=args.rows)
    # Self time (us) of the matrix-product kernels against everything else the profiler saw.
    in_products = sum(e.self_cpu_time_total for e in averages if e.key in PRODUCT_OPS) / 1e6 / args.profile_steps
    profiled = sum(e.self_cpu_time_total for e in averages) / 1e6 / args.profile_steps
    flops = model_flops_per_token(model, LAYERS, HIDDEN, SEQ, ps.tp_size) * BATCH * SEQ
    out = dict(step_s=statistics.median(step_s), products_s=statistics.median(peak_s),
               product_flops=sum(f for _, f in work), model_flops=flops, table=table,
               threads=torch.get_num_threads(), in_products_s=in_products, profiled_s=profiled)
    parallel_state.destroy_model_parallel()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch threads per rank (default: torch's)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--profile-steps", type=int, default=2)
    parser.add_argument("--rows", type=int, default=25, help="operators in the profiler table")
    args = parser.parse_args()
    if args.tp > 1 and args.threads is None:
        args.threads = 1
    results = run_distributed(_run, args.tp, args, timeout=1800)
    r0 = results[0]
    tokens = BATCH * SEQ
    peak = sum(r["product_flops"] / r["products_s"] for r in results)  # all ranks' products, measured concurrently
    achieved = r0["model_flops"] / r0["step_s"]
    print(f"GPT-2 shape: batch {BATCH} x seq {SEQ}, {LAYERS} layers, hidden {HIDDEN}, vocab {VOCAB}, fp32; "
          f"TP {args.tp}, {r0['threads']} thread(s) per rank")
    print(f"model FLOPs per token (6N + 12·L·h·s): {r0['model_flops'] / tokens / 1e6:.2f} MFLOP")
    print(f"step: {r0['step_s'] * 1e3:.1f} ms median, {tokens / r0['step_s']:.0f} tokens/s, "
          f"{achieved / 1e9:.1f} model GFLOP/s")
    print(f"measured peak of the step's matrix products: {peak / 1e9:.1f} GFLOP/s "
          f"({sum(r['products_s'] for r in results) / len(results) * 1e3:.1f} ms of products per rank per step)")
    print(f"MFU vs measured peak: {achieved / peak:.1%} (target >= 85% in one process)")
    frac = computed_attention_fraction(SEQ)
    attention = 12 * LAYERS * HIDDEN * SEQ * tokens
    computed = r0["model_flops"] - attention * (1 - frac)
    print(f"the causal path computes {frac:.1%} of the s x s attention scores; with attention counted as "
          f"computed: {computed / r0['step_s'] / peak:.1%} of the peak")
    rest = r0["profiled_s"] - r0["in_products_s"]
    print(f"rank 0 in the profiled steps: products {r0['in_products_s'] * 1e3:.1f} ms per step "
          f"({r0['products_s'] / r0['in_products_s']:.0%} of their speed alone), everything else "
          f"{rest * 1e3:.1f} ms ({rest / r0['profiled_s']:.0%} of the profiled time); with that at zero the "
          f"MFU would be {r0['model_flops'] / r0['in_products_s'] / peak:.1%}")
    print(f"\nrank 0 profile over {args.profile_steps} steps (self CPU time):\n{r0['table']}")


if __name__ == "__main__":
    main()
