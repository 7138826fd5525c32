# Fused EDM denoising loss, as SiD's fake-score loss uses it, forward and backward.
#
# Per sample (one row of D elements): loss_row = lambda_n * sum (D_x - y)^2, with lambda_n = (sigma^2 + sd^2) /
# (sigma sd)^2 precomputed per row by the caller, and 0 for rows where D_x or y holds a NaN (the official code drops
# such rows). The forward reads D_x and y once and writes one fp32 number per row; the backward reads them once more
# and writes dL/dD_x = 2 lambda g (D_x - y) (zero on NaN rows). y is the generator's (detached) sample in SiD; when it
# does require a gradient, dL/dy = -dL/dD_x is formed from the same tensor. Arithmetic is fp32.
#
# Registered as torch.library.triton_op "sid_fast_kernels::edm_loss_rows" with autograd; the pure-torch reference is
# `edm_loss_rows_ref` (sid_fast/kernels/references.py, re-exported here).
# Without CUDA and without the Triton interpreter the reference runs instead.

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ._common import block_size, triton_available, warp_configs
from .references import edm_loss_rows_ref


def _blk(n: int) -> int:
    return block_size(n, 2048)


@triton.autotune(configs=warp_configs(), key=["D", "BLOCK"])
@triton.jit
def _edm_loss_fwd_kernel(
    d_ptr,  # D_x, network output, [N, D] contiguous
    y_ptr,  # y, clean target, [N, D]
    lam_ptr,  # per-row weight lambda(sigma), [N] fp32
    row_ptr,  # out: per-row loss, [N] fp32
    ok_ptr,  # out: 1 where the row has no NaN, [N] int8
    D,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = row * D
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    nan = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(0, D, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < D
        a = tl.load(d_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
        b = tl.load(y_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
        nan += ((a != a) | (b != b)).to(tl.int32)
        acc += (a - b) * (a - b)
    bad = tl.sum(nan, axis=0) > 0
    loss = tl.load(lam_ptr + row) * tl.sum(acc, axis=0)
    tl.store(row_ptr + row, tl.where(bad, 0.0, loss))
    tl.store(ok_ptr + row, tl.where(bad, 0, 1).to(tl.int8))


@triton.autotune(configs=warp_configs(), key=["D", "BLOCK"])
@triton.jit
def _edm_loss_bwd_kernel(
    d_ptr,  # D_x, [N, D]
    y_ptr,  # y, [N, D]
    lam_ptr,  # lambda, [N] fp32
    g_ptr,  # incoming gradient of each row's loss, [N] fp32
    ok_ptr,  # saved row mask, [N] int8
    dd_ptr,  # out: dL/dD_x, [N, D] in D_x's dtype
    D,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = offs < D
    base = row * D
    ok = tl.load(ok_ptr + row) != 0
    k = 2.0 * tl.load(lam_ptr + row) * tl.load(g_ptr + row)
    a = tl.load(d_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
    b = tl.load(y_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(dd_ptr + base + offs, tl.where(ok, k * (a - b), 0.0).to(dd_ptr.dtype.element_ty), mask=m)


@triton_op("sid_fast_kernels::edm_loss_rows", mutates_args=())
def edm_loss_rows_op(D_x: torch.Tensor, y: torch.Tensor, lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = D_x.shape[0]
    D = D_x.numel() // n
    d, t = D_x.contiguous(), y.contiguous()
    row = torch.empty(n, device=d.device, dtype=torch.float32)
    ok = torch.empty(n, device=d.device, dtype=torch.int8)
    wrap_triton(_edm_loss_fwd_kernel)[(n,)](d, t, lam.reshape(n).float().contiguous(), row, ok, D, BLOCK=_blk(D))
    return row, ok


@triton_op("sid_fast_kernels::edm_loss_rows_bwd", mutates_args=())
def edm_loss_rows_bwd_op(
    D_x: torch.Tensor, y: torch.Tensor, lam: torch.Tensor, grad_row: torch.Tensor, ok: torch.Tensor
) -> torch.Tensor:
    n = D_x.shape[0]
    D = D_x.numel() // n
    d, t = D_x.contiguous(), y.contiguous()
    dd = torch.empty_like(d)
    block = _blk(D)
    wrap_triton(_edm_loss_bwd_kernel)[(n, triton.cdiv(D, block))](
        d, t, lam.reshape(n).float().contiguous(), grad_row.float().contiguous(), ok, dd, D, BLOCK=block
    )
    return dd


def _setup_context(ctx, inputs, output):
    D_x, y, lam = inputs
    ctx.save_for_backward(D_x, y, lam, output[1])
    ctx.shape = D_x.shape


def _backward(ctx, grad_row, grad_ok):
    D_x, y, lam, ok = ctx.saved_tensors
    dd = edm_loss_rows_bwd_op(D_x, y, lam, grad_row, ok).view(ctx.shape)
    dy = -dd if ctx.needs_input_grad[1] else None
    return dd, dy, None


torch.library.register_autograd("sid_fast_kernels::edm_loss_rows", _backward, setup_context=_setup_context)


def edm_loss_rows(D_x: torch.Tensor, y: torch.Tensor, lam: torch.Tensor):
    """Per-row weighted denoising loss with fused backward: (row_loss [N] fp32, ok [N] bool)."""
    if D_x.shape != y.shape or D_x.dim() < 2 or D_x.shape[0] == 0:
        raise ValueError(f"edm_loss: D_x {tuple(D_x.shape)} and y {tuple(y.shape)} must share one [N, ...] shape.")
    if D_x.dtype != y.dtype or D_x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"edm_loss: D_x and y must share one dtype among fp32/fp16/bf16, got {D_x.dtype}, {y.dtype}.")
    if lam.numel() != D_x.shape[0]:
        raise ValueError(f"edm_loss: lam has {lam.numel()} values for {D_x.shape[0]} rows.")
    if not (D_x.device == y.device == lam.device):
        raise ValueError(f"edm_loss: inputs are on different devices ({D_x.device}, {y.device}, {lam.device}).")
    if not triton_available(D_x):
        return edm_loss_rows_ref(D_x, y, lam)
    row, ok = edm_loss_rows_op(D_x, y, lam)
    return row, ok.bool()
