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
# The group rule (EDM: min(32, C // 4)) belongs to the caller; C must be divisible by the number of groups.
# Registered as torch.library.triton_op "sid_fast_kernels::group_norm_silu" with autograd; the reference is
# `group_norm_silu_ref`. Without CUDA and without the Triton interpreter the reference runs instead.

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from kernels._common import block_size, nchw_strides, triton_available, warp_configs


def _blk(n: int) -> int:
    return block_size(n, 1024)


def group_norm_silu_ref(x, weight, bias, num_groups: int, eps: float, scale=None, shift=None, silu: bool = True,
                        upcast: bool = True):
    """Reference: silu(shift + group_norm(x) * (1 + scale)) with scale/shift [N, C] optional."""
    dt = x.dtype
    if upcast:
        up = torch.float64 if dt == torch.float64 else torch.float32
        x, weight, bias = x.to(up), weight.to(up), bias.to(up)
        scale = None if scale is None else scale.to(up)
        shift = None if shift is None else shift.to(up)
    u = F.group_norm(x, num_groups, weight, bias, eps)
    if scale is not None:
        u = torch.addcmul(shift[:, :, None, None], u, scale[:, :, None, None] + 1)
    y = F.silu(u) if silu else u
    return y.to(dt) if upcast and dt != torch.float64 else y


@triton.jit
def _channel_params(w_ptr, b_ptr, scale_ptr, shift_ptr, n, C, c, MODULATE: tl.constexpr):
    """gamma_c, beta_c, (1 + scale_nc), shift_nc as fp32 (1 and 0 without modulation)."""
    gamma = tl.load(w_ptr + c).to(tl.float32)
    beta = tl.load(b_ptr + c).to(tl.float32)
    s1 = 1.0
    sh = 0.0
    if MODULATE:
        s1 = 1.0 + tl.load(scale_ptr + n * C + c).to(tl.float32)
        sh = tl.load(shift_ptr + n * C + c).to(tl.float32)
    return gamma, beta, s1, sh


@triton.jit
def _recompute(v, dy, mean, rstd, gamma, beta, s1, sh, MODULATE: tl.constexpr, SILU: tl.constexpr):
    """From x and dy: a = normalised x, t = affine(a), du = dy * d(output)/du at u = modulate(t)."""
    a = (v - mean) * rstd
    t = a * gamma + beta
    u = t
    if MODULATE:
        u = sh + t * s1
    du = dy
    if SILU:
        sg = tl.sigmoid(u)
        du = dy * sg * (1.0 + u * (1.0 - sg))
    return a, t, du


@triton.autotune(configs=warp_configs(), key=["C", "HW", "G", "BLOCK"])
@triton.jit
def _gn_fwd_kernel(
    x_ptr, y_ptr,  # input / output [N, C, H, W] in NCHW or channels_last
    w_ptr, b_ptr,  # gamma, beta [C]
    scale_ptr, shift_ptr,  # per-sample modulation [N, C] (contiguous); unused unless MODULATE
    mean_ptr, rstd_ptr,  # out: [N, G] fp32
    C, HW, G,
    stride_n, stride_c, stride_hw,  # of x and y (same layout)
    eps,
    MODULATE: tl.constexpr, SILU: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    n = pid // G
    g = pid % G
    cpg = C // G
    c0 = g * cpg
    base = n.to(tl.int64) * stride_n
    count = cpg * HW
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for c in range(c0, c0 + cpg):
        for start in range(0, HW, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            m = offs < HW
            acc += tl.load(x_ptr + base + c * stride_c + offs * stride_hw, mask=m, other=0.0).to(tl.float32)
    mean = tl.sum(acc, axis=0) / count
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for c in range(c0, c0 + cpg):
        for start in range(0, HW, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            m = offs < HW
            v = tl.load(x_ptr + base + c * stride_c + offs * stride_hw, mask=m, other=0.0).to(tl.float32)
            v = tl.where(m, v - mean, 0.0)
            acc += v * v
    rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / count + eps)
    tl.store(mean_ptr + pid, mean)
    tl.store(rstd_ptr + pid, rstd)
    for c in range(c0, c0 + cpg):
        gamma, beta, s1, sh = _channel_params(w_ptr, b_ptr, scale_ptr, shift_ptr, n, C, c, MODULATE)
        for start in range(0, HW, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            m = offs < HW
            ptr = base + c * stride_c + offs * stride_hw
            v = tl.load(x_ptr + ptr, mask=m, other=0.0).to(tl.float32)
            u = (v - mean) * rstd * gamma + beta
            if MODULATE:
                u = sh + u * s1
            if SILU:
                u = u * tl.sigmoid(u)
            tl.store(y_ptr + ptr, u.to(y_ptr.dtype.element_ty), mask=m)


@triton.autotune(configs=warp_configs(), key=["C", "HW", "G", "BLOCK"])
@triton.jit
def _gn_bwd_kernel(
    x_ptr, dy_ptr, dx_ptr,  # [N, C, H, W], all in one layout
    w_ptr, b_ptr, scale_ptr, shift_ptr,
    mean_ptr, rstd_ptr,  # [N, G]
    dw_part_ptr, db_part_ptr,  # out: per-sample partial dgamma, dbeta [N, C] fp32
    dscale_ptr, dshift_ptr,  # out: [N, C] fp32 (written only if MODULATE)
    C, HW, G,
    stride_n, stride_c, stride_hw,
    MODULATE: tl.constexpr, SILU: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    n = pid // G
    g = pid % G
    cpg = C // G
    c0 = g * cpg
    base = n.to(tl.int64) * stride_n
    count = cpg * HW
    mean = tl.load(mean_ptr + pid)
    rstd = tl.load(rstd_ptr + pid)
    s_da = 0.0
    s_daa = 0.0
    for c in range(c0, c0 + cpg):
        gamma, beta, s1, sh = _channel_params(w_ptr, b_ptr, scale_ptr, shift_ptr, n, C, c, MODULATE)
        acc_du = tl.zeros([BLOCK], dtype=tl.float32)
        acc_dut = tl.zeros([BLOCK], dtype=tl.float32)
        acc_dta = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, HW, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            m = offs < HW
            ptr = base + c * stride_c + offs * stride_hw
            v = tl.load(x_ptr + ptr, mask=m, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + ptr, mask=m, other=0.0).to(tl.float32)
            a, t, du = _recompute(v, dy, mean, rstd, gamma, beta, s1, sh, MODULATE, SILU)
            du = tl.where(m, du, 0.0)
            acc_du += du
            acc_dut += du * t
            acc_dta += du * a
        sum_du = tl.sum(acc_du, axis=0)
        # dt = du * s1, so dbeta_c = s1 * sum du and dgamma_c = s1 * sum du a; da = dt * gamma.
        tl.store(db_part_ptr + n * C + c, sum_du * s1)
        tl.store(dw_part_ptr + n * C + c, tl.sum(acc_dta, axis=0) * s1)
        if MODULATE:
            tl.store(dshift_ptr + n * C + c, sum_du)
            tl.store(dscale_ptr + n * C + c, tl.sum(acc_dut, axis=0))
        s_da += sum_du * s1 * gamma
        s_daa += tl.sum(acc_dta, axis=0) * s1 * gamma
    m_da = s_da / count
    m_daa = s_daa / count
    for c in range(c0, c0 + cpg):
        gamma, beta, s1, sh = _channel_params(w_ptr, b_ptr, scale_ptr, shift_ptr, n, C, c, MODULATE)
        for start in range(0, HW, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            m = offs < HW
            ptr = base + c * stride_c + offs * stride_hw
            v = tl.load(x_ptr + ptr, mask=m, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + ptr, mask=m, other=0.0).to(tl.float32)
            a, _, du = _recompute(v, dy, mean, rstd, gamma, beta, s1, sh, MODULATE, SILU)
            da = du * s1 * gamma
            dx = rstd * (da - m_da - a * m_daa)
            tl.store(dx_ptr + ptr, dx.to(dx_ptr.dtype.element_ty), mask=m)


@triton_op("sid_fast_kernels::group_norm_silu", mutates_args=())
def group_norm_silu_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, scale: torch.Tensor | None,
                       shift: torch.Tensor | None, num_groups: int, eps: float, silu: bool
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
        x, y, weight, bias, sc_t, sh_t, mean, rstd, c, h * w, num_groups, sn, sc, shw, eps,
        MODULATE=mod, SILU=silu, BLOCK=_blk(h * w),
    )
    return y, mean, rstd


@triton_op("sid_fast_kernels::group_norm_silu_bwd", mutates_args=())
def group_norm_silu_bwd_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                           scale: torch.Tensor | None, shift: torch.Tensor | None, mean: torch.Tensor,
                           rstd: torch.Tensor, num_groups: int, silu: bool
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    x, (sn, sc, shw) = nchw_strides(x)
    # dy must share x's layout so that one set of strides addresses both.
    dy = dy.contiguous(memory_format=torch.channels_last if sc == 1 and x.shape[1] > 1 else torch.contiguous_format)
    n, c, h, w = x.shape
    dx = torch.empty_like(x)
    f32 = dict(device=x.device, dtype=torch.float32)
    dw_part, db_part = torch.empty(n, c, **f32), torch.empty(n, c, **f32)
    dscale, dshift = torch.zeros(n, c, **f32), torch.zeros(n, c, **f32)
    mod = scale is not None
    sc_t = scale.contiguous() if mod else weight
    sh_t = shift.contiguous() if mod else weight
    wrap_triton(_gn_bwd_kernel)[(n * num_groups,)](
        x, dy, dx, weight, bias, sc_t, sh_t, mean, rstd, dw_part, db_part, dscale, dshift,
        c, h * w, num_groups, sn, sc, shw, MODULATE=mod, SILU=silu, BLOCK=_blk(h * w),
    )
    return dx, dw_part.sum(0), db_part.sum(0), dscale, dshift


def _setup_context(ctx, inputs, output):
    x, weight, bias, scale, shift, num_groups, eps, silu = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, scale, shift, mean, rstd)
    ctx.num_groups, ctx.silu = num_groups, silu


def _backward(ctx, dy, dmean, drstd):
    x, weight, bias, scale, shift, mean, rstd = ctx.saved_tensors
    dx, dw, db, dscale, dshift = group_norm_silu_bwd_op(dy, x, weight, bias, scale, shift, mean, rstd,
                                                        ctx.num_groups, ctx.silu)
    mod = scale is not None
    return (dx, dw.to(weight.dtype), db.to(bias.dtype), dscale.to(scale.dtype) if mod else None,
            dshift.to(shift.dtype) if mod else None, None, None, None)


torch.library.register_autograd("sid_fast_kernels::group_norm_silu", _backward, setup_context=_setup_context)


def group_norm_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, num_groups: int, eps: float = 1e-5,
                    scale: torch.Tensor | None = None, shift: torch.Tensor | None = None, silu: bool = True):
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
        raise ValueError(f"group_norm_silu: scale {tuple(scale.shape)} and shift {tuple(shift.shape)} must be [{n}, {c}].")
    if not triton_available(x):
        return group_norm_silu_ref(x, weight, bias, num_groups, eps, scale, shift, silu, upcast=False)
    return group_norm_silu_op(x, weight, bias, scale, shift, num_groups, float(eps), bool(silu))[0]
