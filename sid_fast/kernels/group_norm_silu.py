# Fused GroupNorm (+ per-sample scale/shift) (+ SiLU), forward and backward, for EDM's UNet blocks.
#
# What is fused. EDM computes silu(norm0(x)) and, in ADM blocks, silu(addcmul(shift, norm1(x), scale + 1)): PyTorch
# runs group_norm, then the affine modulation, then silu, each reading and writing the whole activation, and autograd
# keeps the intermediates. Here
#     a = (x - mean_g) * rstd_g,   t = a * gamma_c + beta_c,   u = shift_nc + t * (1 + scale_nc)  (if modulated),
#     y = silu(u) (or u)
# is one kernel per (sample, group) that reads x and writes y, keeping only mean and rstd ([N, G] fp32) for backward.
# The backward reads x and dy, recomputes u, and produces dx plus per-(sample, channel) sums from which dgamma,
# dbeta, dscale and dshift follow:
#     du = dy * silu'(u),  dshift = sum_hw du,  dscale = sum_hw du t,  dt = du (1 + scale),
#     dbeta = sum_{n,hw} dt,  dgamma = sum_{n,hw} dt a,  da = dt gamma,
#     dx = rstd (da - mean_g(da) - a mean_g(da a)).
# Statistics: mean first, then the variance of the centred values (two passes, no cancellation), then the output
# pass; a single-pass Welford variant is the obvious next step once GPU measurements are in. Arithmetic is fp32 for
# fp32/bf16/fp16 inputs; the output has x's dtype and memory format.
#
# Layouts: NCHW-contiguous and channels_last, addressed through (n, c, hw) strides. Other strides are copied first.
# Each pass walks the group in tiles of [pixels, channels of the group], so both layouts read contiguous runs: pixels
# in NCHW, the group's channels of each pixel in channels_last (bench.static shows the vector loads).
# The group rule (EDM: min(32, C // 4)) belongs to the caller; C must be divisible by the number of groups.
# Registered as torch.library.triton_op "sid_fast_kernels::group_norm_silu" with autograd; the reference is
# `group_norm_silu_ref` (sid_fast/kernels/references.py, re-exported here).
# Without CUDA and without the Triton interpreter the reference runs instead.

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ._common import block_size, interpreted, nchw_strides, triton_available, warp_configs
from .references import group_norm_silu_ref

# Elements per tile on the GPU (a tile is [BLOCK_HW pixels, BLOCK_C channels] of one group). 2048 spilled at 2 warps
# for ADM's 18-channel groups (bench.static); 1024 compiles without spills for every official shape and warp count.
ELEMS_GPU = 1024


def _blocks(cpg: int, hw: int, gpu: bool = False) -> dict:
    """Tile of one group: BLOCK_C >= cpg channels (power of two, masked), BLOCK_HW pixels; under the interpreter
    BLOCK_HW is at most 64 so CPU tests still loop over several tiles."""
    block_c = triton.next_power_of_2(max(cpg, 1))
    if gpu or not interpreted():
        block_hw = min(max(ELEMS_GPU // block_c, 16), triton.next_power_of_2(max(hw, 16)))
    else:
        block_hw = block_size(hw, 64)
    return dict(CPG=cpg, BLOCK_C=block_c, BLOCK_HW=block_hw)


def gpu_blocks(cpg: int, hw: int) -> dict:
    """The block constexprs of a GPU launch for cpg channels per group and hw pixels."""
    return _blocks(cpg, hw, gpu=True)


@triton.jit
def _channel_params(w_ptr, b_ptr, scale_ptr, shift_ptr, n, C, c, c_ok, MODULATE: tl.constexpr):
    """gamma, beta, (1 + scale_n), shift_n for the channel vector c (fp32; 1 and 0 without modulation)."""
    gamma = tl.load(w_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
    beta = tl.load(b_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
    s1 = tl.full(gamma.shape, 1.0, tl.float32)
    sh = tl.zeros(gamma.shape, tl.float32)
    if MODULATE:
        s1 = 1.0 + tl.load(scale_ptr + n * C + c, mask=c_ok, other=0.0).to(tl.float32)
        sh = tl.load(shift_ptr + n * C + c, mask=c_ok, other=0.0).to(tl.float32)
    return gamma, beta, s1, sh


@triton.jit
def _recompute(v, dy, mean, rstd, gamma, beta, s1, sh, MODULATE: tl.constexpr, SILU: tl.constexpr):
    """From x and dy tiles ([BLOCK_HW, BLOCK_C]; channel vectors broadcast along pixels): a = normalised x,
    t = affine(a), du = dy * d(output)/du at u = modulate(t)."""
    a = (v - mean) * rstd
    t = a * gamma[None, :] + beta[None, :]
    u = t
    if MODULATE:
        u = sh[None, :] + t * s1[None, :]
    du = dy
    if SILU:
        sg = tl.sigmoid(u)
        du = dy * sg * (1.0 + u * (1.0 - sg))
    return a, t, du


# Autotuned over warps only: the tile is fixed by the shape, and num_stages 1 and 2 compile to the same code for these
# loops (bench.static). Not 2 warps: the fp32 forward of ADM's 64x64 modulated blocks spills there (12 bytes).
# The key holds everything that changes the compiled code or the best warp count: the shape, the modulation and SiLU
# flags, and the layout (stride_c is 1 for channels_last, HW for NCHW).
WARPS = (4, 8, 16)
_KEY = ["C", "HW", "G", "CPG", "BLOCK_HW", "MODULATE", "SILU", "stride_c"]


@triton.autotune(configs=warp_configs(warps=WARPS), key=_KEY)
@triton.jit
def _gn_fwd_kernel(
    x_ptr,
    y_ptr,  # input / output [N, C, H, W] in NCHW or channels_last
    w_ptr,
    b_ptr,  # gamma, beta [C]
    scale_ptr,
    shift_ptr,  # per-sample modulation [N, C] (contiguous); unused unless MODULATE
    mean_ptr,
    rstd_ptr,  # out: [N, G] fp32
    C,
    HW,
    G,
    stride_n,
    stride_c,
    stride_hw,  # of x and y (same layout)
    eps,
    MODULATE: tl.constexpr,
    SILU: tl.constexpr,
    CPG: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
):
    # One program per (sample, group); tiles of [BLOCK_HW pixels, BLOCK_C channels] with the channel offsets a
    # vector, so channels_last (stride_c = 1) reads each pixel's channels of the group as one contiguous run and NCHW
    # (stride_hw = 1) reads contiguous pixel runs.
    pid = tl.program_id(0)
    n = pid // G
    g = pid % G
    c = g * CPG + tl.arange(0, BLOCK_C)
    c_ok = tl.arange(0, BLOCK_C) < CPG
    base = n.to(tl.int64) * stride_n
    col = c.to(tl.int64)[None, :] * stride_c
    count = CPG * HW
    acc = tl.zeros([BLOCK_HW, BLOCK_C], dtype=tl.float32)
    for start in range(0, HW, BLOCK_HW):
        hw = start + tl.arange(0, BLOCK_HW)
        m = (hw < HW)[:, None] & c_ok[None, :]
        acc += tl.load(x_ptr + base + hw[:, None] * stride_hw + col, mask=m, other=0.0).to(tl.float32)
    mean = tl.sum(tl.sum(acc, axis=1), axis=0) / count
    acc = tl.zeros([BLOCK_HW, BLOCK_C], dtype=tl.float32)
    for start in range(0, HW, BLOCK_HW):
        hw = start + tl.arange(0, BLOCK_HW)
        m = (hw < HW)[:, None] & c_ok[None, :]
        v = tl.load(x_ptr + base + hw[:, None] * stride_hw + col, mask=m, other=0.0).to(tl.float32)
        v = tl.where(m, v - mean, 0.0)
        acc += v * v
    rstd = 1.0 / tl.sqrt(tl.sum(tl.sum(acc, axis=1), axis=0) / count + eps)
    tl.store(mean_ptr + pid, mean)
    tl.store(rstd_ptr + pid, rstd)
    gamma, beta, s1, sh = _channel_params(w_ptr, b_ptr, scale_ptr, shift_ptr, n, C, c, c_ok, MODULATE)
    for start in range(0, HW, BLOCK_HW):
        hw = start + tl.arange(0, BLOCK_HW)
        m = (hw < HW)[:, None] & c_ok[None, :]
        ptr = base + hw[:, None] * stride_hw + col
        v = tl.load(x_ptr + ptr, mask=m, other=0.0).to(tl.float32)
        u = (v - mean) * rstd * gamma[None, :] + beta[None, :]
        if MODULATE:
            u = sh[None, :] + u * s1[None, :]
        if SILU:
            u = u * tl.sigmoid(u)
        tl.store(y_ptr + ptr, u.to(y_ptr.dtype.element_ty), mask=m)


@triton.autotune(configs=warp_configs(warps=WARPS), key=_KEY)
@triton.jit
def _gn_bwd_kernel(
    x_ptr,
    dy_ptr,
    dx_ptr,  # [N, C, H, W], all in one layout
    w_ptr,
    b_ptr,
    scale_ptr,
    shift_ptr,
    mean_ptr,
    rstd_ptr,  # [N, G]
    dw_part_ptr,
    db_part_ptr,  # out: per-sample partial dgamma, dbeta [N, C] fp32
    dscale_ptr,
    dshift_ptr,  # out: [N, C] fp32 (written only if MODULATE)
    C,
    HW,
    G,
    stride_n,
    stride_c,
    stride_hw,
    MODULATE: tl.constexpr,
    SILU: tl.constexpr,
    CPG: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
):
    pid = tl.program_id(0)
    n = pid // G
    g = pid % G
    c = g * CPG + tl.arange(0, BLOCK_C)
    c_ok = tl.arange(0, BLOCK_C) < CPG
    base = n.to(tl.int64) * stride_n
    col = c.to(tl.int64)[None, :] * stride_c
    count = CPG * HW
    mean = tl.load(mean_ptr + pid)
    rstd = tl.load(rstd_ptr + pid)
    gamma, beta, s1, sh = _channel_params(w_ptr, b_ptr, scale_ptr, shift_ptr, n, C, c, c_ok, MODULATE)
    acc_du = tl.zeros([BLOCK_HW, BLOCK_C], dtype=tl.float32)
    acc_dut = tl.zeros([BLOCK_HW, BLOCK_C], dtype=tl.float32)
    acc_dta = tl.zeros([BLOCK_HW, BLOCK_C], dtype=tl.float32)
    for start in range(0, HW, BLOCK_HW):
        hw = start + tl.arange(0, BLOCK_HW)
        m = (hw < HW)[:, None] & c_ok[None, :]
        ptr = base + hw[:, None] * stride_hw + col
        v = tl.load(x_ptr + ptr, mask=m, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + ptr, mask=m, other=0.0).to(tl.float32)
        a, t, du = _recompute(v, dy, mean, rstd, gamma, beta, s1, sh, MODULATE, SILU)
        du = tl.where(m, du, 0.0)
        acc_du += du
        acc_dut += du * t
        acc_dta += du * a
    sum_du = tl.sum(acc_du, axis=0)  # per channel
    sum_dua = tl.sum(acc_dta, axis=0)
    # dt = du * s1, so dbeta_c = s1 * sum du and dgamma_c = s1 * sum du a; da = dt * gamma.
    tl.store(db_part_ptr + n * C + c, sum_du * s1, mask=c_ok)
    tl.store(dw_part_ptr + n * C + c, sum_dua * s1, mask=c_ok)
    if MODULATE:
        tl.store(dshift_ptr + n * C + c, sum_du, mask=c_ok)
        tl.store(dscale_ptr + n * C + c, tl.sum(acc_dut, axis=0), mask=c_ok)
    m_da = tl.sum(sum_du * s1 * gamma, axis=0) / count
    m_daa = tl.sum(sum_dua * s1 * gamma, axis=0) / count
    for start in range(0, HW, BLOCK_HW):
        hw = start + tl.arange(0, BLOCK_HW)
        m = (hw < HW)[:, None] & c_ok[None, :]
        ptr = base + hw[:, None] * stride_hw + col
        v = tl.load(x_ptr + ptr, mask=m, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + ptr, mask=m, other=0.0).to(tl.float32)
        a, _, du = _recompute(v, dy, mean, rstd, gamma, beta, s1, sh, MODULATE, SILU)
        da = du * (s1 * gamma)[None, :]
        dx = rstd * (da - m_da - a * m_daa)
        tl.store(dx_ptr + ptr, dx.to(dx_ptr.dtype.element_ty), mask=m)


@triton_op("sid_fast_kernels::group_norm_silu", mutates_args=())
def group_norm_silu_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    num_groups: int,
    eps: float,
    silu: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x, (sn, sc, shw) = nchw_strides(x)
    n, c, h, w = x.shape
    y = torch.empty_like(x)  # preserves the memory format
    mean = torch.empty(n * num_groups, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    mod = scale is not None
    sc_t = scale.contiguous() if mod else weight
    sh_t = shift.contiguous() if mod else weight
    wrap_triton(_gn_fwd_kernel)[(n * num_groups,)](
        x,
        y,
        weight,
        bias,
        sc_t,
        sh_t,
        mean,
        rstd,
        c,
        h * w,
        num_groups,
        sn,
        sc,
        shw,
        eps,
        MODULATE=mod,
        SILU=silu,
        **_blocks(c // num_groups, h * w),
    )
    return y, mean, rstd


@triton_op("sid_fast_kernels::group_norm_silu_bwd", mutates_args=())
def group_norm_silu_bwd_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    num_groups: int,
    silu: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    x, (sn, sc, shw) = nchw_strides(x)
    # dy must share x's layout so that one set of strides addresses both.
    dy = dy.contiguous(memory_format=torch.channels_last if sc == 1 and x.shape[1] > 1 else torch.contiguous_format)
    n, c, h, w = x.shape
    dx = torch.empty_like(x)
    f32 = dict(device=x.device, dtype=torch.float32)
    dw_part, db_part = torch.empty(n, c, **f32), torch.empty(n, c, **f32)
    # Written in full by the kernel when modulated (every (n, c) of each group's program); unread otherwise.
    dscale, dshift = torch.empty(n, c, **f32), torch.empty(n, c, **f32)
    mod = scale is not None
    sc_t = scale.contiguous() if mod else weight
    sh_t = shift.contiguous() if mod else weight
    wrap_triton(_gn_bwd_kernel)[(n * num_groups,)](
        x,
        dy,
        dx,
        weight,
        bias,
        sc_t,
        sh_t,
        mean,
        rstd,
        dw_part,
        db_part,
        dscale,
        dshift,
        c,
        h * w,
        num_groups,
        sn,
        sc,
        shw,
        MODULATE=mod,
        SILU=silu,
        **_blocks(c // num_groups, h * w),
    )
    return dx, dw_part.sum(0), db_part.sum(0), dscale, dshift


def _setup_context(ctx, inputs, output):
    x, weight, bias, scale, shift, num_groups, eps, silu = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, scale, shift, mean, rstd)
    ctx.set_materialize_grads(False)  # mean and rstd get no gradient: no zero tensors made for them in backward
    ctx.num_groups, ctx.silu = num_groups, silu


def _backward(ctx, dy, dmean, drstd):
    if dy is None:  # the output did not reach the loss (grads are not materialised)
        return (None,) * 8
    x, weight, bias, scale, shift, mean, rstd = ctx.saved_tensors
    dx, dw, db, dscale, dshift = group_norm_silu_bwd_op(
        dy, x, weight, bias, scale, shift, mean, rstd, ctx.num_groups, ctx.silu
    )
    mod = scale is not None
    return (
        dx,
        dw.to(weight.dtype),
        db.to(bias.dtype),
        dscale.to(scale.dtype) if mod else None,
        dshift.to(shift.dtype) if mod else None,
        None,
        None,
        None,
    )


torch.library.register_autograd("sid_fast_kernels::group_norm_silu", _backward, setup_context=_setup_context)


def group_norm_silu(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    num_groups: int,
    eps: float = 1e-5,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    silu: bool = True,
):
    """y = silu(shift + group_norm(x, num_groups, weight, bias, eps) * (1 + scale)); scale, shift: [N, C] or None."""
    if x.dim() != 4:
        raise ValueError(f"group_norm_silu: expected x of shape [N, C, H, W], got {tuple(x.shape)}.")
    n, c = x.shape[:2]
    if c % num_groups:
        raise ValueError(f"group_norm_silu: {c} channels are not divisible by {num_groups} groups.")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"group_norm_silu: x must be fp32, fp16 or bf16, got {x.dtype}.")
    if weight.shape != (c,) or bias.shape != (c,):
        raise ValueError(f"group_norm_silu: weight {tuple(weight.shape)} and bias {tuple(bias.shape)} must be [{c}].")
    if (scale is None) != (shift is None):
        raise ValueError("group_norm_silu: give both scale and shift, or neither.")
    if scale is not None and (scale.shape != (n, c) or shift.shape != (n, c)):
        raise ValueError(
            f"group_norm_silu: scale {tuple(scale.shape)} and shift {tuple(shift.shape)} must be [{n}, {c}]."
        )
    if not triton_available(x):
        return group_norm_silu_ref(x, weight, bias, num_groups, eps, scale, shift, silu, upcast=False)
    return group_norm_silu_op(x, weight, bias, scale, shift, num_groups, float(eps), bool(silu))[0]
