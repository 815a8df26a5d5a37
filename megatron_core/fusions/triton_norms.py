"""Triton LayerNorm / RMSNorm and scaled masked softmax, forward and backward.

Imported only when Triton is installed (``megatron_core.fusions.kernels`` selects them on CUDA);
the same kernels run on CPU tensors in Triton's interpreter (``TRITON_INTERPRET=1``), which is how
the tests check them against the torch versions. One program normalises one row of the last
dimension (``BLOCK`` = next power of two >= the row length), statistics in fp32, the output in
the input's dtype. The norm backward follows the Triton tutorial's layer-norm backward (per-row
dx, per-program partial weight/bias gradients summed afterwards).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from megatron_core import device

# torch.finfo(torch.float32).min, the torch path's masked fill. A constexpr: a kernel compiled for a
# GPU reads no other kind of global (the interpreter does, so only tests/test_triton_compile.py sees it).
_FP32_MIN = tl.constexpr(-3.4028234663852886e38)


@triton.jit
def _norm_fwd(X, Y, W, B, Mean, Rstd, N, eps, HAS_BIAS: tl.constexpr, RMS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    m = cols < N
    x = tl.load(X + row * N + cols, mask=m, other=0.0).to(tl.float32)
    if RMS:
        xc = x
    else:
        mean = tl.sum(x, axis=0) / N
        xc = tl.where(m, x - mean, 0.0)
        tl.store(Mean + row, mean)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / N + eps)
    tl.store(Rstd + row, rstd)
    y = xc * rstd * tl.load(W + cols, mask=m, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(B + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(Y + row * N + cols, y.to(Y.dtype.element_ty), mask=m)


@triton.jit
def _norm_bwd(X, DY, DX, W, Mean, Rstd, DW, DB, M, N, ROWS, HAS_BIAS: tl.constexpr, RMS: tl.constexpr,
              BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    m = cols < N
    w = tl.load(W + cols, mask=m, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    db = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, ROWS):
        row = (pid * ROWS + i).to(tl.int64)
        rm = m & (tl.full([BLOCK], 0, tl.int64) + row < M)
        x = tl.load(X + row * N + cols, mask=rm, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * N + cols, mask=rm, other=0.0).to(tl.float32)
        rstd = tl.load(Rstd + row, mask=row < M, other=0.0)
        if RMS:
            xhat = x * rstd
        else:
            xhat = tl.where(rm, (x - tl.load(Mean + row, mask=row < M, other=0.0)) * rstd, 0.0)
        wdy = w * dy
        c1 = tl.sum(xhat * wdy, axis=0) / N
        if RMS:
            dx = (wdy - xhat * c1) * rstd
        else:
            dx = (wdy - (xhat * c1 + tl.sum(wdy, axis=0) / N)) * rstd
        tl.store(DX + row * N + cols, dx.to(DX.dtype.element_ty), mask=rm)
        dw += dy * xhat
        db += dy
    tl.store(DW + pid * N + cols, dw, mask=m)
    if HAS_BIAS:
        tl.store(DB + pid * N + cols, db, mask=m)


def num_warps(block: int, most: int = 8) -> int:
    """Warps per row program: block // 256 clamped to [1, most] (the Triton layer-norm tutorial's
    rule with most = 8). The norm backward takes most = 16: on an H200, [8192, 4096] bf16, 16 warps
    took 0.09-0.12 ms against 0.11-0.15 with 8 or 4 (bench/bench_gpu.py's sweep). Rows longer than
    8192 (up to kernels.py's 16384) get 16 warps, 32 fp32 elements a thread: with 8 warps a row of
    16384 took 117-178 registers a thread, with 16 58-128 (ptxas -v, sm_90; nothing spills either
    way, which tests/test_triton_compile.py checks). Unmeasured on a device."""
    warps = min(max(block // 256, 1), most)
    return max(warps, min(block // 1024, 16)) if block > 8192 else warps


def softmax_num_warps(block: int) -> int:
    """Warps per softmax row: 4 for rows of up to 2048 keys (on an H200, [4, 16, 2048, 2048] bf16:
    forward 0.27 ms against 0.32 with 8, backward 0.37 with either; bench_gpu.py's sweep, two
    runs), longer rows as the norms."""
    return num_warps(block, most=4) if block <= 2048 else num_warps(block)


BWD_PROGRAMS_PER_SM = 4
"""Norm backward programs per multiprocessor: each loops over rows and keeps partial weight/bias
gradients ([programs, n] fp32, summed afterwards), so more programs mean more parallel rows and
more partials to sum. See bench/bench_gpu.py's sweep for the measurement behind the value."""


class _Norm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, rms, bwd_programs):
        n = x.shape[-1]
        x2 = x.reshape(-1, n).contiguous()
        rows = x2.shape[0]
        y = torch.empty_like(x2)
        mean = torch.empty(rows, dtype=torch.float32, device=x.device)
        rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
        block = triton.next_power_of_2(n)
        _norm_fwd[(rows,)](x2, y, weight, weight if bias is None else bias, mean, rstd, n, eps,
                           HAS_BIAS=bias is not None, RMS=rms, BLOCK=block, num_warps=num_warps(block))
        ctx.save_for_backward(x2, weight, mean, rstd)
        ctx.has_bias, ctx.rms, ctx.block = bias is not None, rms, block
        ctx.bwd_programs, ctx.shape = bwd_programs, x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, mean, rstd = ctx.saved_tensors
        rows, n = x2.shape
        programs = ctx.bwd_programs or BWD_PROGRAMS_PER_SM * device.multiprocessor_count()
        programs = max(1, min(rows, programs))
        per_program = triton.cdiv(rows, programs)
        dx = torch.empty_like(x2)
        dw = torch.empty(programs, n, dtype=torch.float32, device=x2.device)
        db = torch.empty(programs, n, dtype=torch.float32, device=x2.device) if ctx.has_bias else dw
        _norm_bwd[(programs,)](x2, dy.reshape(rows, n).contiguous(), dx, weight, mean, rstd, dw, db, rows, n,
                               per_program, HAS_BIAS=ctx.has_bias, RMS=ctx.rms, BLOCK=ctx.block,
                               num_warps=num_warps(ctx.block, most=16))
        grad_bias = db.sum(0).to(weight.dtype) if ctx.has_bias else None
        return dx.view(ctx.shape), dw.sum(0).to(weight.dtype), grad_bias, None, None, None


def _check_programs(bwd_programs: int | None) -> int | None:
    # 0 would read as "the default" in backward and a negative count as one program: refuse both.
    if bwd_programs is not None and bwd_programs < 1:
        raise ValueError(f"bwd_programs must be None (the default) or >= 1, got {bwd_programs}")
    return bwd_programs


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float,
               bwd_programs: int | None = None) -> torch.Tensor:
    """LayerNorm over the last dimension of ``x`` [..., n]; ``weight``/``bias`` [n] (bias may be None).

    ``bwd_programs``: programs of the backward kernel (None: :data:`BWD_PROGRAMS_PER_SM` per
    multiprocessor), at most one per row; ValueError unless None or >= 1."""
    return _Norm.apply(x, weight, bias, eps, False, _check_programs(bwd_programs))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, bwd_programs: int | None = None) -> torch.Tensor:
    """RMSNorm over the last dimension of ``x`` [..., n] with ``weight`` [n]; ``bwd_programs`` as
    :func:`layer_norm`'s."""
    return _Norm.apply(x, weight, None, eps, True, _check_programs(bwd_programs))


@triton.jit
def _is_masked(MASK, row, cols, m, H, SQ, SK, msb, msh, msq, msk, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr):
    """Which keys of score row ``row`` (over b, heads, sq) are masked: the given mask, or causal."""
    q = row % SQ
    masked = cols < 0
    if HAS_MASK:
        h = (row // SQ) % H
        b = row // (SQ * H)
        masked = tl.load(MASK + b * msb + h * msh + q * msq + cols * msk, mask=m, other=0) != 0
    if CAUSAL:
        masked = cols > q + SK - SQ
    return masked


@triton.jit
def _softmax_fwd(X, Y, MASK, H, SQ, SK, msb, msh, msq, msk, scale, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr,
                 BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    m = cols < SK
    x = tl.load(X + row * SK + cols, mask=m, other=0.0).to(tl.float32) * scale
    masked = _is_masked(MASK, row, cols, m, H, SQ, SK, msb, msh, msq, msk, HAS_MASK, CAUSAL)
    x = tl.where(masked, _FP32_MIN, x)
    x = tl.where(m, x, float("-inf"))
    e = tl.exp(x - tl.max(x, axis=0))
    y = e / tl.sum(e, axis=0)
    tl.store(Y + row * SK + cols, y.to(Y.dtype.element_ty), mask=m)


@triton.jit
def _softmax_bwd(DY, Y, DX, MASK, H, SQ, SK, msb, msh, msq, msk, scale, HAS_MASK: tl.constexpr,
                 CAUSAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    m = cols < SK
    y = tl.load(Y + row * SK + cols, mask=m, other=0.0).to(tl.float32)
    dy = tl.load(DY + row * SK + cols, mask=m, other=0.0).to(tl.float32)
    dx = scale * y * (dy - tl.sum(dy * y, axis=0))
    # The fill gives masked scores no gradient (also in a fully masked row, where y is uniform).
    masked = _is_masked(MASK, row, cols, m, H, SQ, SK, msb, msh, msq, msk, HAS_MASK, CAUSAL)
    tl.store(DX + row * SK + cols, tl.where(masked, 0.0, dx).to(DX.dtype.element_ty), mask=m)


class _ScaledMaskedSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores, mask, scale):
        b, h, sq, sk = scores.shape
        x = scores.contiguous()
        y = torch.empty_like(x)
        if mask is None:
            mask_arg, strides = x, (0, 0, 0, 0)
        else:
            mask_arg = mask.to(torch.uint8).expand(b, h, sq, sk)
            strides = tuple(mask_arg.stride())
        ctx.mask_args = (mask_arg, h, sq, sk, *strides, scale)
        block = triton.next_power_of_2(sk)
        ctx.flags = dict(HAS_MASK=mask is not None, CAUSAL=mask is None, BLOCK=block,
                         num_warps=softmax_num_warps(block))
        _softmax_fwd[(b * h * sq,)](x, y, *ctx.mask_args, **ctx.flags)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, dy):
        y, = ctx.saved_tensors
        dx = torch.empty_like(y)
        _softmax_bwd[(y.numel() // y.shape[-1],)](dy.contiguous(), y, dx, *ctx.mask_args, **ctx.flags)
        return dx, None, None


def scaled_masked_softmax(scores: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """softmax(scale * scores, masked) over the last dimension of ``scores`` [b, heads, sq, sk].

    ``mask``: bool broadcastable to ``scores``, True = not allowed (filled with fp32's min, as the
    torch path does, so a fully masked row is uniform); None = causal (key j > query i + sk - sq).
    """
    return _ScaledMaskedSoftmax.apply(scores, mask, scale)
