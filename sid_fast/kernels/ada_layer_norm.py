# Fused adaLN modulation of a DiT block: y = layer_norm(x) * s1_n + shift_n, forward and backward.
#
# What is fused. The SD3, SD3.5 and FLUX transformers (diffusers' AdaLayerNormZero, AdaLayerNormZeroSingle,
# AdaLayerNormContinuous) compute norm(x) * (1 + scale[:, None]) + shift[:, None] with a LayerNorm without affine
# parameters (eps 1e-6): PyTorch runs layer_norm (fp32 under autocast), a multiply and an add, each reading and
# writing the whole [N, L, D] activation, and autograd keeps the normalised x for the multiply's backward besides
# the LayerNorm's own x. Here one program per token row (on the GPU; tiles of 256 rows under the interpreter) reads x
# and writes y, keeping only mean and rstd ([N L] fp32);
#     a = (x - mean) * rstd,   y = a * s1_n + shift_n        (s1 = 1 + scale, made by the caller in its dtype).
# The backward recomputes a from x and dy:
#     ds1_n = sum_l dy a,   dshift_n = sum_l dy,   da = dy s1_n,   dx = rstd (da - mean_d(da) - a mean_d(da a)),
# one program per (sample, chunk of ROWS rows) so that ds1 and dshift are accumulated in registers over the chunk and
# written once per chunk ([N, chunks, D] fp32, summed by torch). Arithmetic is fp32; the statistics are the mean and
# then the variance of the centred row (two passes over registers: the whole row is loaded, D <= MAX_D).
#
# Layout: x and y are [N, L, D] with D contiguous (other strides are copied first). s1 and shift are [N, D].
# Registered as torch.library.triton_op "sid_fast_kernels::ada_layer_norm" with autograd; the reference is
# `ada_layer_norm_ref` (sid_fast/kernels/references.py, re-exported here). Without CUDA and without the Triton
# interpreter the reference runs instead.

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ._common import interpreted, triton_available, warp_configs
from .references import ada_layer_norm_ref

MAX_D = 8192  # the widest row held in registers (SD3.5-Large 2,432, FLUX 3,072, SANA 2,240 channels)
WARPS = (4, 8, 16)
_KEY = ["D", "BLOCK_D", "BLOCK_R", "ROWS"]


def _block_d(d: int) -> int:
    return triton.next_power_of_2(max(d, 16))


def block_rows(gpu: bool = False) -> int:
    """Rows of one tile: one on the GPU (a row of up to MAX_D fp32 values is what a program's registers hold); 256
    under the interpreter, which runs programs one after another and each op of a program once per tile, so a tile
    of many rows is what keeps a CPU test's step fast."""
    return 256 if interpreted() and not gpu else 1


def rows_per_program(length: int, gpu: bool = False) -> int:
    """Rows (tokens of one sample) each backward program walks, in tiles of block_rows: 64 on the GPU (the ds1/dshift
    partials are then 1/64 of an activation); under the interpreter 4 tiles of 256 (a CPU test with a longer
    sequence sees several chunks)."""
    return min(block_rows(gpu) * (4 if interpreted() and not gpu else 64), max(length, 1))


@triton.autotune(configs=warp_configs(warps=WARPS), key=_KEY)
@triton.jit
def _fwd_kernel(
    x_ptr,
    y_ptr,  # [N L, D], rows contiguous
    s1_ptr,
    shift_ptr,  # [N, D] contiguous
    mean_ptr,
    rstd_ptr,  # out: [N L] fp32
    L,
    D,
    eps,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    ROWS: tl.constexpr,
):
    # One program per tile of BLOCK_R rows of one sample (a sample's L rows in cdiv(L, BLOCK_R) tiles).
    tiles = tl.cdiv(L, BLOCK_R)
    n = tl.program_id(0) // tiles
    l_idx = (tl.program_id(0) % tiles) * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.arange(0, BLOCK_D)
    r_ok = l_idx < L
    ok = r_ok[:, None] & (d < D)[None, :]
    rows = (n * L + l_idx).to(tl.int64)
    ptr = rows[:, None] * D + d[None, :]
    v = tl.load(x_ptr + ptr, mask=ok, other=0.0).to(tl.float32)
    mean = tl.sum(v, axis=1) / D
    c = tl.where(ok, v - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(c * c, axis=1) / D + eps)
    s1 = tl.load(s1_ptr + n * D + d, mask=d < D, other=0.0).to(tl.float32)
    sh = tl.load(shift_ptr + n * D + d, mask=d < D, other=0.0).to(tl.float32)
    y = c * rstd[:, None] * s1[None, :] + sh[None, :]
    tl.store(y_ptr + ptr, y.to(y_ptr.dtype.element_ty), mask=ok)
    tl.store(mean_ptr + rows, mean, mask=r_ok)
    tl.store(rstd_ptr + rows, rstd, mask=r_ok)


@triton.autotune(configs=warp_configs(warps=WARPS), key=_KEY)
@triton.jit
def _bwd_kernel(
    x_ptr,
    dy_ptr,
    dx_ptr,  # [N L, D], rows contiguous
    s1_ptr,  # [N, D]
    mean_ptr,
    rstd_ptr,  # [N L] fp32
    ds1_ptr,
    dshift_ptr,  # out: [N, chunks, D] fp32 partial sums
    L,
    D,
    chunks,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    ROWS: tl.constexpr,
):
    # One program per (sample, chunk of ROWS rows), walking the chunk in tiles of BLOCK_R rows.
    pid = tl.program_id(0)
    n = pid // chunks
    chunk = pid % chunks
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    s1 = tl.load(s1_ptr + n * D + d, mask=d_ok, other=0.0).to(tl.float32)
    acc_s1 = tl.zeros([BLOCK_D], tl.float32)
    acc_sh = tl.zeros([BLOCK_D], tl.float32)
    for i in range(0, ROWS, BLOCK_R):
        l_idx = chunk * ROWS + i + tl.arange(0, BLOCK_R)
        r_ok = l_idx < L
        ok = r_ok[:, None] & d_ok[None, :]
        rows = (n * L + l_idx).to(tl.int64)
        ptr = rows[:, None] * D + d[None, :]
        v = tl.load(x_ptr + ptr, mask=ok, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + ptr, mask=ok, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + rows, mask=r_ok, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=r_ok, other=0.0)
        a = tl.where(ok, (v - mean[:, None]) * rstd[:, None], 0.0)
        acc_s1 += tl.sum(dy * a, axis=0)
        acc_sh += tl.sum(dy, axis=0)
        da = dy * s1[None, :]
        m_da = tl.sum(da, axis=1) / D
        m_daa = tl.sum(da * a, axis=1) / D
        dx = rstd[:, None] * (da - m_da[:, None] - a * m_daa[:, None])
        tl.store(dx_ptr + ptr, dx.to(dx_ptr.dtype.element_ty), mask=ok)
    out = (n * chunks + chunk).to(tl.int64) * D + d
    tl.store(ds1_ptr + out, acc_s1, mask=d_ok)
    tl.store(dshift_ptr + out, acc_sh, mask=d_ok)


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.is_contiguous() else x.contiguous()


@triton_op("sid_fast_kernels::ada_layer_norm", mutates_args=())
def ada_layer_norm_op(
    x: torch.Tensor, s1: torch.Tensor, shift: torch.Tensor, eps: float, out_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = _rows(x)
    n, length, d = x.shape
    y = torch.empty(x.shape, device=x.device, dtype=out_dtype)
    mean = torch.empty(n * length, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    br = block_rows()
    wrap_triton(_fwd_kernel)[(n * triton.cdiv(length, br),)](
        x, y, s1.contiguous(), shift.contiguous(), mean, rstd, length, d, eps, BLOCK_D=_block_d(d), BLOCK_R=br, ROWS=1
    )
    return y, mean, rstd


@triton_op("sid_fast_kernels::ada_layer_norm_bwd", mutates_args=())
def ada_layer_norm_bwd_op(
    dy: torch.Tensor, x: torch.Tensor, s1: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x, dy = _rows(x), _rows(dy)
    n, length, d = x.shape
    rows = rows_per_program(length)
    chunks = triton.cdiv(length, rows)
    dx = torch.empty_like(x)
    ds1 = torch.empty(n, chunks, d, device=x.device, dtype=torch.float32)
    dshift = torch.empty_like(ds1)
    wrap_triton(_bwd_kernel)[(n * chunks,)](
        x,
        dy,
        dx,
        s1.contiguous(),
        mean,
        rstd,
        ds1,
        dshift,
        length,
        d,
        chunks,
        BLOCK_D=_block_d(d),
        BLOCK_R=block_rows(),
        ROWS=rows,
    )
    return dx, ds1.sum(1), dshift.sum(1)


# Shape functions for the meta device and FakeTensors (bench.memory, torch.compile's tracing): the outputs' shapes and
# dtypes without running the kernel body (which the interpreter would try to run on storage-less tensors).
@ada_layer_norm_op.register_fake
def _(x, s1, shift, eps, out_dtype):
    rows = x.shape[0] * x.shape[1]
    mean = x.new_empty(rows, dtype=torch.float32)
    return x.new_empty(x.shape, dtype=out_dtype), mean, torch.empty_like(mean)


@ada_layer_norm_bwd_op.register_fake
def _(dy, x, s1, mean, rstd):
    f32 = dict(dtype=torch.float32, device=x.device)
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        torch.empty(s1.shape, **f32),
        torch.empty(s1.shape, **f32),
    )


def _setup_context(ctx, inputs, output):
    x, s1, shift, eps, out_dtype = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, s1, mean, rstd)
    ctx.set_materialize_grads(False)
    ctx.dtypes = (s1.dtype, shift.dtype)


def _backward(ctx, dy, dmean, drstd):
    if dy is None:
        return (None,) * 5
    x, s1, mean, rstd = ctx.saved_tensors
    dx, ds1, dshift = ada_layer_norm_bwd_op(dy, x, s1, mean, rstd)
    return dx, ds1.to(ctx.dtypes[0]), dshift.to(ctx.dtypes[1]), None, None


torch.library.register_autograd("sid_fast_kernels::ada_layer_norm", _backward, setup_context=_setup_context)


def ada_layer_norm(
    x: torch.Tensor, s1: torch.Tensor, shift: torch.Tensor, eps: float = 1e-6, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """y = layer_norm(x, eps) * s1[:, None] + shift[:, None] for x [N, L, D], s1 = 1 + scale and shift [N, D], in
    `out_dtype` (default: the promotion of the three dtypes, as the unfused expression gives)."""
    if x.dim() != 3:
        raise ValueError(f"ada_layer_norm: expected x of shape [N, L, D], got {tuple(x.shape)}.")
    n, _, d = x.shape
    if s1.shape != (n, d) or shift.shape != (n, d):
        raise ValueError(f"ada_layer_norm: s1 {tuple(s1.shape)} and shift {tuple(shift.shape)} must be [{n}, {d}].")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"ada_layer_norm: x must be fp32, fp16 or bf16, got {x.dtype}.")
    if d > MAX_D:
        raise ValueError(f"ada_layer_norm: rows of {d} channels exceed the kernel's {MAX_D}.")
    if out_dtype is None:
        out_dtype = torch.promote_types(torch.promote_types(x.dtype, s1.dtype), shift.dtype)
    if not triton_available(x):
        return ada_layer_norm_ref(x, s1, shift, eps).to(out_dtype)
    return ada_layer_norm_op(x, s1, shift, float(eps), out_dtype)[0]
