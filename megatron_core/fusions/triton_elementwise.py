"""Triton rotary embedding, SwiGLU and bias-dropout-add, forward and backward.

Imported only when Triton is installed; selected on CUDA by ``megatron_core.fusions.kernels``, and
run on CPU in Triton's interpreter (``TRITON_INTERPRET=1``) by the tests. Arithmetic in fp32, results
in the input's dtype. Bias-dropout-add keeps no mask: backward regenerates it from the saved seed
and the same Philox counters (``tl.randint4x`` is a counter-based generator, four 32-bit words
per counter, each two 16-bit draws), so it stores 4 bytes instead of one byte per element.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from megatron_core.fusions.fused_dropout import keep_threshold

NUM_WARPS = 4
"""Warps per program of RoPE and bias-dropout-add (Triton's default; bench/bench_gpu.py's sweep
varies it)."""
ROPE_TILE = 2048
"""Most elements of a RoPE program's [heads, rot / 2] tile. The tile measured on an H200 (32 heads x
64, 88% of the copy bandwidth) compiles to 72 registers a thread at 4 warps; a whole position's heads
in one tile grows with them, up to 255 registers (ptxas's limit, a quarter of that occupancy) at
128 heads x 64 (ptxas -v, sm_90)."""


@triton.jit
def _rope(X, Y, COS, SIN, HEADS, D, ROT, BACKWARD: tl.constexpr, HEADS_BLOCK: tl.constexpr,
          HALF_BLOCK: tl.constexpr, REST_BLOCK: tl.constexpr):
    # One program per (s, b) position and block of heads, a [heads, rot / 2] tile: cos and sin are
    # read once per tile, and a program moves up to HEADS_BLOCK * d elements (one program per head
    # and position moved too little to cover its own cost: 19% of the copy bandwidth on an H200).
    sb = tl.program_id(0).to(tl.int64)
    half = ROT // 2
    h = tl.program_id(1) * HEADS_BLOCK + tl.arange(0, HEADS_BLOCK)[:, None]
    c = tl.arange(0, HALF_BLOCK)[None, :]
    mc = c < half
    m = (h < HEADS) & mc
    base = (sb * HEADS + h) * D
    x1 = tl.load(X + base + c, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(X + base + half + c, mask=m, other=0.0).to(tl.float32)
    cos1 = tl.load(COS + sb * ROT + c, mask=mc, other=0.0)
    cos2 = tl.load(COS + sb * ROT + half + c, mask=mc, other=0.0)
    sin1 = tl.load(SIN + sb * ROT + c, mask=mc, other=0.0)
    sin2 = tl.load(SIN + sb * ROT + half + c, mask=mc, other=0.0)
    if BACKWARD:  # the transpose of [[cos1, -sin1], [sin2, cos2]]
        y1 = x1 * cos1 + x2 * sin2
        y2 = x2 * cos2 - x1 * sin1
    else:  # x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1]
        y1 = x1 * cos1 - x2 * sin1
        y2 = x2 * cos2 + x1 * sin2
    tl.store(Y + base + c, y1.to(Y.dtype.element_ty), mask=m)
    tl.store(Y + base + half + c, y2.to(Y.dtype.element_ty), mask=m)
    r = tl.arange(0, REST_BLOCK)[None, :]
    mr = (h < HEADS) & (r < D - ROT)
    tl.store(Y + base + ROT + r, tl.load(X + base + ROT + r, mask=mr, other=0.0), mask=mr)


def _rope_launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    s, b, heads, d = x.shape
    rot = cos.shape[-1]
    x = x.contiguous()
    y = torch.empty_like(x)
    half_block = triton.next_power_of_2(max(rot // 2, 1))
    heads_block = min(triton.next_power_of_2(heads), max(ROPE_TILE // half_block, 1))
    grid = (s * b, triton.cdiv(heads, heads_block))
    _rope[grid](x, y, cos, sin, heads, d, rot, BACKWARD=backward, HEADS_BLOCK=heads_block, HALF_BLOCK=half_block,
                REST_BLOCK=triton.next_power_of_2(max(d - rot, 1)), num_warps=NUM_WARPS)
    return y


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        s, b = x.shape[:2]
        rot = cos.shape[-1]
        cos = cos.float().expand(s, b, 1, rot).reshape(s * b, rot).contiguous()
        sin = sin.float().expand(s, b, 1, rot).reshape(s * b, rot).contiguous()
        ctx.save_for_backward(cos, sin)
        return _rope_launch(x, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return _rope_launch(dy, cos, sin, backward=True), None, None


def apply_rotary_pos_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE of the first ``rot`` channels of ``x`` [s, b, heads, d]; ``cos``/``sin``
    broadcastable to [s, b, 1, rot] (``megatron_core.transformer.rope``'s convention)."""
    return _Rope.apply(x, cos, sin)


@triton.jit
def _swiglu_fwd(X, Y, F, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = c < F
    g = tl.load(X + row * 2 * F + c, mask=m, other=0.0).to(tl.float32)
    u = tl.load(X + row * 2 * F + F + c, mask=m, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * u
    tl.store(Y + row * F + c, y.to(Y.dtype.element_ty), mask=m)


@triton.jit
def _swiglu_bwd(X, DY, DX, F, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = c < F
    g = tl.load(X + row * 2 * F + c, mask=m, other=0.0).to(tl.float32)
    u = tl.load(X + row * 2 * F + F + c, mask=m, other=0.0).to(tl.float32)
    dy = tl.load(DY + row * F + c, mask=m, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    dg = dy * u * sig * (1.0 + g * (1.0 - sig))
    tl.store(DX + row * 2 * F + c, dg.to(DX.dtype.element_ty), mask=m)
    tl.store(DX + row * 2 * F + F + c, (dy * g * sig).to(DX.dtype.element_ty), mask=m)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, block):
        f = x.shape[-1] // 2
        x2 = x.reshape(-1, 2 * f).contiguous()
        y = torch.empty(x2.shape[0], f, dtype=x.dtype, device=x.device)
        block = block or min(1024, triton.next_power_of_2(f))
        _swiglu_fwd[(x2.shape[0], triton.cdiv(f, block))](x2, y, f, BLOCK=block)
        ctx.save_for_backward(x2)
        ctx.block, ctx.shape = block, x.shape
        return y.view(*x.shape[:-1], f)

    @staticmethod
    def backward(ctx, dy):
        x2, = ctx.saved_tensors
        f = x2.shape[1] // 2
        dx = torch.empty_like(x2)
        _swiglu_bwd[(x2.shape[0], triton.cdiv(f, ctx.block))](x2, dy.reshape(-1, f).contiguous(), dx, f,
                                                              BLOCK=ctx.block)
        return dx.view(ctx.shape), None


def swiglu(x: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """silu(gate) * up for ``x`` = [gate; up] along the last dimension [..., 2f] -> [..., f]."""
    return _SwiGLU.apply(x, block)


@triton.jit
def _bda_part(X, BIAS, RES, DY, OUT, offs, keep, N, H, scale, HAS_BIAS: tl.constexpr, BACKWARD: tl.constexpr):
    m = offs < N
    if BACKWARD:
        dy = tl.load(DY + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(OUT + offs, tl.where(keep, dy * scale, 0.0).to(OUT.dtype.element_ty), mask=m)
    else:
        x = tl.load(X + offs, mask=m, other=0.0).to(tl.float32)
        if HAS_BIAS:
            x += tl.load(BIAS + offs % H, mask=m, other=0.0).to(tl.float32)
        y = tl.load(RES + offs, mask=m, other=0.0).to(tl.float32) + tl.where(keep, x * scale, 0.0)
        tl.store(OUT + offs, y.to(OUT.dtype.element_ty), mask=m)


@triton.jit
def _bda_word(X, BIAS, RES, DY, OUT, word, offs, step, keep_from, N, H, scale, HAS_BIAS: tl.constexpr,
              BACKWARD: tl.constexpr):
    # A 32-bit Philox word is two uniform 16-bit draws: its low half decides offs, its high half
    # offs + step. Kept when the draw >= keep_from (fused_dropout.keep_threshold).
    lo = (word & 0xFFFF).to(tl.int32)
    hi = (word >> 16).to(tl.int32)
    _bda_part(X, BIAS, RES, DY, OUT, offs, lo >= keep_from, N, H, scale, HAS_BIAS, BACKWARD)
    _bda_part(X, BIAS, RES, DY, OUT, offs + step, hi >= keep_from, N, H, scale, HAS_BIAS, BACKWARD)


@triton.jit
def _bda(X, BIAS, RES, DY, OUT, SEED, N, H, keep_from, scale, HAS_BIAS: tl.constexpr, BACKWARD: tl.constexpr,
         BLOCK: tl.constexpr):
    # One Philox call gives four 32-bit words (randint4x), eight 16-bit draws: counter
    # pid * BLOCK/8 + i decides elements start + i + k * BLOCK/8 (k = 0..7) of the program's block,
    # at the CPU mask's 2**-16 resolution. Measured on an H200 (33.5M elements): one call per
    # element made this kernel compute-bound (fp32 and bf16 took the same 0.12 ms); one per four
    # still left bf16 at 54% of the copy bandwidth against fp32's 88%.
    pid = tl.program_id(0).to(tl.int64)
    step = BLOCK // 8
    offs = pid * BLOCK + tl.arange(0, BLOCK // 8)
    w0, w1, w2, w3 = tl.randint4x(tl.load(SEED), pid * step + tl.arange(0, BLOCK // 8))
    _bda_word(X, BIAS, RES, DY, OUT, w0, offs, step, keep_from, N, H, scale, HAS_BIAS, BACKWARD)
    _bda_word(X, BIAS, RES, DY, OUT, w1, offs + 2 * step, step, keep_from, N, H, scale, HAS_BIAS, BACKWARD)
    _bda_word(X, BIAS, RES, DY, OUT, w2, offs + 4 * step, step, keep_from, N, H, scale, HAS_BIAS, BACKWARD)
    _bda_word(X, BIAS, RES, DY, OUT, w3, offs + 6 * step, step, keep_from, N, H, scale, HAS_BIAS, BACKWARD)


class _BiasDropoutAdd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, residual, p, block):
        # The seed comes from the device's default generator, so the RNG tracker's fork() and
        # recompute's RNG replay give the same mask, as for torch dropout.
        seed = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device=x.device).to(torch.int32)
        x = x.contiguous()
        out = torch.empty_like(x)
        n, h = x.numel(), x.shape[-1]
        keep_from, scale = keep_threshold(p)
        _bda[(triton.cdiv(n, block),)](x, x if bias is None else bias, residual.contiguous(), x, out, seed, n, h,
                                       keep_from, scale, HAS_BIAS=bias is not None, BACKWARD=False, BLOCK=block,
                                       num_warps=NUM_WARPS)
        ctx.save_for_backward(seed)
        ctx.keep_from, ctx.scale, ctx.block, ctx.has_bias = keep_from, scale, block, bias is not None
        return out

    @staticmethod
    def backward(ctx, dy):
        seed, = ctx.saved_tensors
        dy = dy.contiguous()
        dx = torch.empty_like(dy)
        n = dy.numel()
        _bda[(triton.cdiv(n, ctx.block),)](dy, dy, dy, dy, dx, seed, n, dy.shape[-1], ctx.keep_from, ctx.scale,
                                           HAS_BIAS=False, BACKWARD=True, BLOCK=ctx.block,
                                           num_warps=NUM_WARPS)
        dbias = dx.reshape(-1, dx.shape[-1]).sum(0) if ctx.has_bias else None
        return dx, dbias, dy, None, None


def bias_dropout_add(x: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor, p: float,
                     block: int = 1024) -> torch.Tensor:
    """residual + dropout(x + bias, p) for ``x``/``residual`` [..., h] and ``bias`` [h] (or None).

    As the CPU dropout mask (``fused_dropout.keep_threshold``): an element is dropped when a uniform
    16-bit draw falls below ``round(p * 2**16)``, and kept values are scaled by the exact inverse keep
    rate. The mask is drawn from a seed taken from the default generator of ``x``'s device, and
    depends on the seed and ``block`` (elements per program, a power of two >= 8: each Philox
    counter decides eight elements an eighth of a block apart).
    Raises ValueError for p outside (0, 1), p that rounds to 1 at 2**-16, or another block.
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"bias_dropout_add needs a dropout probability in (0, 1), got {p}")
    if block < 8 or block & (block - 1):
        raise ValueError(f"bias_dropout_add's block must be a power of two >= 8, got {block}")
    return _BiasDropoutAdd.apply(x, bias, residual, p, block)
