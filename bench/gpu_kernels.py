"""The Triton kernels' checks on a CUDA device, for ``bench/bench_gpu.py kernels`` and ``sweep``.

``kernels``: each Triton kernel of ``megatron_core.fusions`` against its torch version, forward and
backward, bf16 and fp32, at training shapes. Error: max |a - ref| / max |ref| against the op in
fp64 from the same inputs; a kernel passes at most 2x torch's own error in that dtype + 2 eps (the
dropout kernel, whose mask torch cannot reproduce, against the mask read off its input gradient).
Speed: median time (``triton.testing.do_bench``; the forward without a graph, the backward through
the autograd Function's own ``backward``), the bytes the op must move (each input read once, each
output written once), their rate, and that rate against a device-to-device ``copy_`` of 1 GiB
(read + written); target 80%. The torch version's time beside it.

``sweep``: the launch configurations of :data:`SWEEP`, timed in bf16, after the current defaults.
"""
from __future__ import annotations

import os
import time
import traceback

import torch
import torch.nn.functional as F

VOCAB, DROPOUT = 50304, 0.1  # the bench model's vocabulary (the cross entropy's row) and dropout
# s: the softmax's and cross entropy's sequence; t: the other kernels' (4x: their kernels take tens of
# microseconds at s, where launch costs blur the timing)
KERNEL_SHAPE = dict(s=2048, t=8192, b=4, h=4096, heads=16, ffn=11008, rope_heads=32, head_dim=128)
if os.environ.get("BENCH_GPU_TINY") == "1":  # bench_gpu.py's CPU smoke run (TRITON_INTERPRET=1)
    VOCAB = 512
    KERNEL_SHAPE = dict(s=16, t=24, b=2, h=48, heads=2, ffn=40, rope_heads=2, head_dim=8)


def do_bench(fn) -> float:
    """Median milliseconds of fn() by CUDA events (Triton's do_bench: flushes L2 between runs)."""
    from megatron_core import device
    if not device.cuda_available():  # the CPU smoke run
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    from triton.testing import do_bench
    return do_bench(fn, warmup=10, rep=60, return_mode="median")


def copy_bandwidth(dev) -> float:
    """Bytes per second of a device-to-device copy of 1 GiB (read + written)."""
    src = torch.empty(2**29, dtype=torch.bfloat16, device=dev).normal_()
    dst = torch.empty_like(src)
    return 2 * src.numel() * 2 / (do_bench(lambda: dst.copy_(src)) / 1e3)


def _cases(dev):
    """(name, triton fn, torch fn, inputs(dtype), forward bytes, backward bytes) per kernel."""
    from megatron_core.fusions import triton_cross_entropy as tce
    from megatron_core.fusions import triton_elementwise as tel
    from megatron_core.fusions import triton_norms as tno
    from megatron_core.fusions.fused_softmax import causal_mask
    from megatron_core.fusions.fused_softmax import scaled_masked_softmax as torch_softmax
    from megatron_core.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy as torch_ce
    from megatron_core.transformer.mlp import ACTIVATIONS
    from megatron_core.transformer.rope import RotaryEmbedding, apply_rotary_pos_emb

    s, t, b, h, heads, ffn = (KERNEL_SHAPE[k] for k in ("s", "t", "b", "h", "heads", "ffn"))
    rope_heads, head_dim = KERNEL_SHAPE["rope_heads"], KERNEL_SHAPE["head_dim"]
    gen = torch.Generator(device=dev).manual_seed(0)

    def randn(*shape, dtype):
        return torch.randn(*shape, generator=gen, device=dev, dtype=torch.float32).to(dtype)

    cos, sin = RotaryEmbedding(head_dim)(torch.arange(t).expand(b, t))
    cos, sin = cos.to(dev), sin.to(dev)
    target = torch.randint(0, VOCAB, (s, b), generator=gen, device=dev)
    mask = causal_mask(s, s, dev)
    n = t * b * h
    return [
        ("layer_norm", lambda x, w, bias: tno.layer_norm(x, w, bias, 1e-5),
         lambda x, w, bias: F.layer_norm(x, (h,), w, bias, 1e-5),
         lambda dt: (randn(t, b, h, dtype=dt), randn(h, dtype=dt), randn(h, dtype=dt)), 2 * n, 3 * n),
        ("rms_norm", lambda x, w: tno.rms_norm(x, w, 1e-5), lambda x, w: F.rms_norm(x, (h,), w, 1e-5),
         lambda dt: (randn(t, b, h, dtype=dt), randn(h, dtype=dt)), 2 * n, 3 * n),
        ("causal softmax", lambda x: tno.scaled_masked_softmax(x, None, 0.088),
         lambda x: torch_softmax(x, mask, 0.088),
         lambda dt: (randn(b, heads, s, s, dtype=dt),), 2 * b * heads * s * s, 3 * b * heads * s * s),
        ("rope", lambda x: tel.apply_rotary_pos_emb(x, cos, sin), lambda x: apply_rotary_pos_emb(x, (cos, sin)),
         lambda dt: (randn(t, b, rope_heads, head_dim, dtype=dt),), 2 * n * rope_heads * head_dim // h,
         2 * n * rope_heads * head_dim // h),
        ("swiglu", tel.swiglu, ACTIVATIONS["swiglu"],
         lambda dt: (randn(t, b, 2 * ffn, dtype=dt),), 3 * t * b * ffn, 5 * t * b * ffn),
        ("bias_dropout_add", lambda x, bias, r: tel.bias_dropout_add(x, bias, r, DROPOUT), None,
         lambda dt: (randn(t, b, h, dtype=dt), randn(h, dtype=dt), randn(t, b, h, dtype=dt)), 3 * n, 2 * n),
        ("cross_entropy", lambda x: tce.vocab_parallel_cross_entropy(x, target), lambda x: torch_ce(x, target),
         lambda dt: (randn(s, b, VOCAB, dtype=dt),), s * b * VOCAB, 2 * s * b * VOCAB),
    ]


def _run(fn, inputs, grad_seed=1):
    """fn(*inputs) and the input gradients of sum(out * g), g a fixed random tensor."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    g = torch.randn(out.shape, generator=torch.Generator(device=out.device).manual_seed(grad_seed),
                    device=out.device).to(out.dtype)
    g = torch.where(g == 0, 1.0, g)  # no exact zeros: the dropout check reads its mask off g * mask
    grads = torch.autograd.grad(out, leaves, g)
    return out.detach(), grads, g


def _err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def _check(name, fused, reference, inputs) -> tuple[bool, str]:
    dt = inputs[0].dtype
    eps = torch.finfo(dt).eps
    out, grads, g = _run(fused, inputs)
    if reference is None:  # bias-dropout-add: the mask is random; read it off the input gradient
        x, bias, residual = (t.double() for t in inputs)
        kept = grads[0] != 0  # g * scale or exactly 0; forward and backward must agree on it
        scale = 1 / (1 - DROPOUT)
        ref_out = residual + torch.where(kept, (x + bias) * scale, 0.0)
        ref_dx = torch.where(kept, g.double() * scale, 0.0)
        errs = [_err(out, ref_out), _err(grads[0], ref_dx), _err(grads[1], ref_dx.sum((0, 1))),
                _err(grads[2], g.double())]
        dropped = 1 - kept.double().mean().item()
        ok = max(errs) <= 4 * eps and abs(dropped - DROPOUT) < (0.01 if out.numel() > 10**6 else 0.2)
        return ok, f"errors {', '.join(f'{e:.1e}' for e in errs)} (limit {4 * eps:.1e}); dropped {dropped:.4f}"
    ref_out, ref_grads, _ = _run(reference, [t.double() for t in inputs])
    torch_out, torch_grads, _ = _run(reference, inputs)
    ours = [_err(out, ref_out)] + [_err(a, r) for a, r in zip(grads, ref_grads, strict=True)]
    theirs = [_err(torch_out, ref_out)] + [_err(a, r) for a, r in zip(torch_grads, ref_grads, strict=True)]
    ok = all(o <= 2 * t + 2 * eps for o, t in zip(ours, theirs, strict=True))
    return ok, ("errors (out, grads) triton " + ", ".join(f"{e:.1e}" for e in ours)
                + " | torch " + ", ".join(f"{e:.1e}" for e in theirs))


def _times(fn, inputs, kernel_only: bool):
    """Median ms of fn's forward (without building a graph) and backward.

    ``kernel_only`` (our Triton ops, each one autograd Function): the backward is the Function's
    own ``backward`` called through its graph node, without autograd's engine, so the time is the
    kernels' and the few tensor ops around them. Otherwise (torch's composite versions) the
    backward is a whole forward + backward less the forward (their backward may overwrite what it
    saved, so it cannot be replayed).
    """
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    with torch.no_grad():
        fwd = do_bench(lambda: fn(*leaves))
    out = fn(*leaves)
    g = torch.randn_like(out)
    if kernel_only:
        bwd = do_bench(lambda: out.grad_fn.apply(g))
    else:
        bwd = do_bench(lambda: torch.autograd.grad(fn(*leaves), leaves, g)) - fwd
    return fwd, bwd


def _kernel_row(name, fused, reference, inputs, fwd_elems, bwd_elems, bandwidth, failed) -> str:
    dt = inputs[0].dtype
    ok, detail = _check(name, fused, reference, inputs)
    if not ok:
        failed.append(f"{name} {dt}")
    size = torch.finfo(dt).bits // 8
    fwd, bwd = _times(fused, inputs, kernel_only=True)
    fwd_rate, bwd_rate = fwd_elems * size / fwd * 1e3, bwd_elems * size / bwd * 1e3  # bytes/s
    line = (f"{name:17s} {str(dt)[6:]:8s} {'ok  ' if ok else 'FAIL'} "
            f"fwd {fwd:7.3f} ms {fwd_rate / 1e9:6.0f} GB/s ({fwd_rate / bandwidth:4.0%})  "
            f"bwd {bwd:7.3f} ms {bwd_rate / 1e9:6.0f} GB/s ({bwd_rate / bandwidth:4.0%})")
    if reference is not None:
        tf, tb = _times(reference, inputs, kernel_only=False)
        line += f"  torch fwd {tf:7.3f} bwd {tb:7.3f} ms"
    print(line + "\n    " + detail, flush=True)
    return line


# op -> (warps, norm-backward programs per multiprocessor, block) to try; None: not a knob of that op
SWEEP = {
    "layer_norm": ((4, 8, 16), (1, 2, 4, 8, 16), (None,)),
    "rms_norm": ((4, 8, 16), (1, 2, 4, 8, 16), (None,)),
    "causal softmax": ((4, 8, 16), (None,), (None,)),
    "cross_entropy": ((4, 8, 16), (None,), (1024, 2048, 4096)),
    "rope": ((2, 4, 8), (None,), (None,)),
    "bias_dropout_add": ((4, 8), (None,), (1024, 2048, 4096)),
}


def _defaults() -> str:
    """The launch configurations the ops use now, at the sweep's shapes."""
    from megatron_core.fusions import triton_elementwise as tel
    from megatron_core.fusions import triton_norms as tno
    norm_block = 1 << (KERNEL_SHAPE["h"] - 1).bit_length()
    softmax_block = 1 << (KERNEL_SHAPE["s"] - 1).bit_length()
    return (f"defaults: norms forward {tno.num_warps(norm_block)} warps, backward "
            f"{tno.num_warps(norm_block, most=16)} warps x {tno.BWD_PROGRAMS_PER_SM} programs/SM; softmax "
            f"{tno.softmax_num_warps(softmax_block)} warps; cross entropy block 1024, {tno.num_warps(1024)} warps; "
            f"RoPE and bias-dropout-add {tel.NUM_WARPS} warps, bias-dropout-add block 1024")


def _sweep_fn(name: str, fused, block, target):
    from megatron_core.fusions import triton_cross_entropy as tce
    from megatron_core.fusions import triton_elementwise as tel
    if name == "cross_entropy":
        return lambda x: tce.vocab_parallel_cross_entropy(x, target, block=block)
    if name == "bias_dropout_add":
        return lambda x, bias, r: tel.bias_dropout_add(x, bias, r, DROPOUT, block=block)
    return fused


def sweep(args) -> None:
    """Launch configurations (:data:`SWEEP`), timed forward and backward in bf16, after the
    current defaults."""
    from megatron_core import device
    from megatron_core.fusions import triton_cross_entropy as tce
    from megatron_core.fusions import triton_elementwise as tel
    from megatron_core.fusions import triton_norms as tno
    dev = device.current_device()
    cases = {c[0]: c for c in _cases(dev)}
    print(_defaults(), flush=True)
    saved = tno.num_warps, tno.BWD_PROGRAMS_PER_SM, tel.NUM_WARPS
    try:
        for name, (warp_options, per_sm_options, blocks) in SWEEP.items():
            _, fused, _, make, _, _ = cases[name]
            inputs = make(torch.bfloat16)
            target = torch.randint(0, VOCAB, inputs[0].shape[:-1], device=dev)
            for warps in warp_options:
                for per_sm in per_sm_options:
                    for block in blocks:
                        tno.num_warps = tce.num_warps = lambda _block, most=8, w=warps: w  # as num_warps(b, most)
                        tel.NUM_WARPS = warps
                        tno.BWD_PROGRAMS_PER_SM = per_sm or saved[1]
                        fwd, bwd = _times(_sweep_fn(name, fused, block, target), inputs, kernel_only=True)
                        print(f"sweep {name:16s} warps {warps:2d} programs/SM {per_sm or '-':>2} "
                              f"block {block or '-':>4}: fwd {fwd:7.3f} ms bwd {bwd:7.3f} ms", flush=True)
            del inputs
    finally:
        tno.num_warps, tno.BWD_PROGRAMS_PER_SM, tel.NUM_WARPS = saved
        tce.num_warps = saved[0]


def kernels(args) -> dict:
    from megatron_core import device
    dev = device.current_device()
    bandwidth = copy_bandwidth(dev)
    print(f"device-to-device copy: {bandwidth / 1e9:.0f} GB/s (read + written)", flush=True)
    rows, failed = [], []
    for name, fused, reference, make, fwd_elems, bwd_elems in _cases(dev):
        for dt in (torch.bfloat16, torch.float32):
            try:
                rows.append(_kernel_row(name, fused, reference, make(dt), fwd_elems, bwd_elems, bandwidth, failed))
            except Exception:  # noqa: BLE001 (report it and go on to the next kernel)
                failed.append(f"{name} {dt}")
                print(f"{name} {dt}: FAILED\n{traceback.format_exc()}", flush=True)
    return dict(bandwidth=bandwidth, failed=failed, rows=rows)
