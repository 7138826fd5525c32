# Fused SiD generator loss (Zhou et al., ICML 2024), forward and backward.
#
# What is fused. Per sample (one row of D = C*H*W elements) the reference does ~12 elementwise passes over x_g,
# y_real and y_fake (NaN checks, |x_g - y_real| and its mean, d = y_real - y_fake, the product, the masks) and autograd
# keeps several temporaries for backward. Here the forward reads each input once and keeps three fp32 running sums
# per row:  S1 = sum |x - r|,  S2 = sum d (r - x),  S3 = sum d^2,  with d = r - f, and a NaN flag, giving
#     w = max(S1 / D, 1e-5),   loss_row = (S2 - alpha S3) / w   (0 for rows with a NaN, as the official code drops
# them).
# The backward reads the three inputs once more and writes the three gradients in one pass:
#     dL/dx = -d k,   dL/dr = ((r - x) + (1 - 2 alpha) d) k,   dL/df = (-(r - x) + 2 alpha d) k,   k = g_row / w,
# with w a constant (stop-gradient, as in SiD) and k = 0 for NaN rows. Arithmetic is fp32 for fp32/bf16/fp16 inputs.
#
# Shapes: any [N, ...] with D = prod(...) elements per row; inputs of one shape, dtype and device. Non-contiguous
# inputs are made contiguous first (a copy). One program per row loops over the row in BLOCK chunks; at SiD's
# micro-batches (16-64 rows) that is fewer programs than an H100 has SMs: splitting rows across programs is the next
# step once GPU measurements say so.
#
# Registered as torch.library.triton_op "sid_fast_kernels::sid_loss_rows" (with autograd), so torch.compile traces it.
# Without CUDA and without the Triton interpreter (TRITON_INTERPRET=1) the pure-torch reference runs instead.

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ._common import block_size, triton_available, warp_configs
from .references import sid_loss_rows_ref

GPU_BLOCK_CAP = 2048


def _blk(n: int) -> int:
    return block_size(n, GPU_BLOCK_CAP)


def gpu_block(n: int) -> int:
    """The block a GPU launch uses for rows of n elements."""
    return min(GPU_BLOCK_CAP, triton.next_power_of_2(max(n, 16)))


@triton.autotune(configs=warp_configs(), key=["D", "BLOCK"])
@triton.jit
def _sid_loss_fwd_kernel(
    x_ptr,  # x_g, [N, D] contiguous
    r_ptr,  # y_real = teacher output, [N, D]
    f_ptr,  # y_fake = fake-score output, [N, D]
    row_ptr,  # out: per-row loss, [N] fp32
    w_ptr,  # out: per-row weight w, [N] fp32
    ok_ptr,  # out: 1 where the row has no NaN, [N] int8
    D,  # elements per row
    alpha,  # SiD alpha
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = row * D
    s1 = tl.zeros([BLOCK], dtype=tl.float32)
    s2 = tl.zeros([BLOCK], dtype=tl.float32)
    s3 = tl.zeros([BLOCK], dtype=tl.float32)
    nan = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(0, D, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < D
        x = tl.load(x_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
        r = tl.load(r_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
        f = tl.load(f_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
        nan += ((x != x) | (r != r) | (f != f)).to(tl.int32)
        d = r - f
        e = r - x
        s1 += tl.abs(e)
        s2 += d * e
        s3 += d * d
    bad = tl.sum(nan, axis=0) > 0
    w = tl.maximum(tl.sum(s1, axis=0) / D, 1e-5)
    loss = (tl.sum(s2, axis=0) - alpha * tl.sum(s3, axis=0)) / w
    tl.store(row_ptr + row, tl.where(bad, 0.0, loss))
    tl.store(w_ptr + row, tl.where(bad, 1e-5, w))
    tl.store(ok_ptr + row, tl.where(bad, 0, 1).to(tl.int8))


@triton.autotune(configs=warp_configs(), key=["D", "BLOCK"])
@triton.jit
def _sid_loss_bwd_kernel(
    x_ptr,  # x_g, [N, D]
    r_ptr,  # y_real, [N, D]
    f_ptr,  # y_fake, [N, D]
    g_ptr,  # incoming gradient of each row's loss, [N] fp32
    w_ptr,  # saved w, [N] fp32
    ok_ptr,  # saved row mask, [N] int8
    dx_ptr,  # out: dL/dx_g, [N, D] in the input dtype
    dr_ptr,  # out: dL/dy_real
    df_ptr,  # out: dL/dy_fake
    D,
    alpha,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    m = offs < D
    base = row * D
    ok = tl.load(ok_ptr + row) != 0
    k = tl.load(g_ptr + row) / tl.load(w_ptr + row)
    x = tl.load(x_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
    r = tl.load(r_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
    f = tl.load(f_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
    d = r - f
    e = r - x
    dx = tl.where(ok, -d * k, 0.0)
    dr = tl.where(ok, (e + (1 - 2 * alpha) * d) * k, 0.0)
    df = tl.where(ok, (-e + 2 * alpha * d) * k, 0.0)
    tl.store(dx_ptr + base + offs, dx.to(dx_ptr.dtype.element_ty), mask=m)
    tl.store(dr_ptr + base + offs, dr.to(dr_ptr.dtype.element_ty), mask=m)
    tl.store(df_ptr + base + offs, df.to(df_ptr.dtype.element_ty), mask=m)


_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check(x_g, y_real, y_fake):
    if not (x_g.shape == y_real.shape == y_fake.shape):
        raise ValueError(
            f"sid_loss: x_g {tuple(x_g.shape)}, y_real {tuple(y_real.shape)} and y_fake "
            f"{tuple(y_fake.shape)} must have one shape."
        )
    if x_g.dim() < 2 or x_g.shape[0] == 0:
        raise ValueError(f"sid_loss: expected [N, ...] with N >= 1, got shape {tuple(x_g.shape)}.")
    if not (x_g.dtype == y_real.dtype == y_fake.dtype) or x_g.dtype not in _DTYPES:
        raise ValueError(
            f"sid_loss: inputs must share one dtype among fp32/fp16/bf16, got {x_g.dtype}, "
            f"{y_real.dtype}, {y_fake.dtype}."
        )
    if not (x_g.device == y_real.device == y_fake.device):
        raise ValueError(f"sid_loss: inputs are on different devices ({x_g.device}, {y_real.device}, {y_fake.device}).")


@triton_op("sid_fast_kernels::sid_loss_rows", mutates_args=())
def sid_loss_rows_op(
    x_g: torch.Tensor, y_real: torch.Tensor, y_fake: torch.Tensor, alpha: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = x_g.shape[0]
    D = x_g.numel() // n
    x, r, f = (t.contiguous() for t in (x_g, y_real, y_fake))
    row = torch.empty(n, device=x.device, dtype=torch.float32)
    w = torch.empty(n, device=x.device, dtype=torch.float32)
    ok = torch.empty(n, device=x.device, dtype=torch.int8)
    wrap_triton(_sid_loss_fwd_kernel)[(n,)](x, r, f, row, w, ok, D, alpha, BLOCK=_blk(D))
    return row, w, ok


@triton_op("sid_fast_kernels::sid_loss_rows_bwd", mutates_args=())
def sid_loss_rows_bwd_op(
    x_g: torch.Tensor,
    y_real: torch.Tensor,
    y_fake: torch.Tensor,
    grad_row: torch.Tensor,
    w: torch.Tensor,
    ok: torch.Tensor,
    alpha: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = x_g.shape[0]
    D = x_g.numel() // n
    x, r, f = (t.contiguous() for t in (x_g, y_real, y_fake))
    dx, dr, df = torch.empty_like(x), torch.empty_like(r), torch.empty_like(f)
    block = _blk(D)
    wrap_triton(_sid_loss_bwd_kernel)[(n, triton.cdiv(D, block))](
        x, r, f, grad_row.float().contiguous(), w, ok, dx, dr, df, D, alpha, BLOCK=block
    )
    return dx, dr, df


def _setup_context(ctx, inputs, output):
    x_g, y_real, y_fake, alpha = inputs
    _, w, ok = output
    ctx.save_for_backward(x_g, y_real, y_fake, w, ok)
    ctx.alpha = alpha
    ctx.shape = x_g.shape


def _backward(ctx, grad_row, grad_w, grad_ok):
    x_g, y_real, y_fake, w, ok = ctx.saved_tensors
    dx, dr, df = sid_loss_rows_bwd_op(x_g, y_real, y_fake, grad_row, w, ok, ctx.alpha)
    return dx.view(ctx.shape), dr.view(ctx.shape), df.view(ctx.shape), None


torch.library.register_autograd("sid_fast_kernels::sid_loss_rows", _backward, setup_context=_setup_context)


def sid_loss_rows(x_g: torch.Tensor, y_real: torch.Tensor, y_fake: torch.Tensor, alpha: float):
    """Per-row SiD loss with fused backward: (row_loss [N] fp32, w [N] fp32, ok [N] bool).

    The generator loss the official loop backpropagates is row_loss.sum() * loss_scale / batch_gpu_total.
    Gradients flow to all three inputs (w is a stop-gradient weight).
    """
    _check(x_g, y_real, y_fake)
    if not triton_available(x_g):
        return sid_loss_rows_ref(x_g, y_real, y_fake, alpha)
    row, w, ok = sid_loss_rows_op(x_g, y_real, y_fake, float(alpha))
    return row, w, ok.bool()
