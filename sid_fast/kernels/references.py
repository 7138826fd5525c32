"""The pure-torch references of the five kernels in sid_fast.kernels: the official numerics, and what runs wherever a
kernel cannot (no CUDA, no Triton interpreter, or no Triton at all: macOS and Windows have no Triton wheels).

This module imports only torch, so `sid_fast` samples and trains on the reference path without Triton installed;
each kernel file (sid_loss.py, edm_loss.py, group_norm_silu.py, attention.py, ada_layer_norm.py) re-exports its
reference, and the kernel tests compare the two at real and awkward shapes, forward and backward.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------------------------
# The SiD generator loss (sid_fast/kernels/sid_loss.py).


def sid_loss_rows_ref(x_g: torch.Tensor, y_real: torch.Tensor, y_fake: torch.Tensor, alpha: float, upcast: bool = True):
    """Reference: (row_loss [N] fp32, w [N] fp32, ok [N] bool). upcast=False computes in the input dtype."""
    n = x_g.shape[0]
    x, r, f = (t.reshape(n, -1) for t in (x_g, y_real, y_fake))
    if upcast:
        dt = torch.float64 if x.dtype == torch.float64 else torch.float32
        x, r, f = x.to(dt), r.to(dt), f.to(dt)
    ok = ~(torch.isnan(x).any(1) | torch.isnan(r).any(1) | torch.isnan(f).any(1))
    x, r, f = (torch.where(ok[:, None], t, torch.zeros_like(t)) for t in (x, r, f))
    w = (x - r).abs().mean(1).clamp(min=1e-5).detach()
    d = r - f
    row = (d * ((r - x) - alpha * d)).sum(1) / w
    row = torch.where(ok, row, torch.zeros_like(row))
    return row.float() if upcast and row.dtype != torch.float64 else row, w.float(), ok


# ----------------------------------------------------------------------------------------------------------------
# The fake-score (EDM) loss (sid_fast/kernels/edm_loss.py).


def edm_loss_rows_ref(D_x: torch.Tensor, y: torch.Tensor, lam: torch.Tensor, upcast: bool = True):
    """Reference: (row_loss [N], ok [N] bool). lam: [N] (or broadcastable to [N, 1, ...]) per-row weights."""
    n = D_x.shape[0]
    d, t = D_x.reshape(n, -1), y.reshape(n, -1)
    if upcast:
        dt = torch.float64 if d.dtype == torch.float64 else torch.float32
        d, t = d.to(dt), t.to(dt)
    ok = ~(torch.isnan(d).any(1) | torch.isnan(t).any(1))
    d, t = (torch.where(ok[:, None], v, torch.zeros_like(v)) for v in (d, t))
    row = lam.reshape(n).to(d.dtype) * (d - t).square().sum(1)
    return torch.where(ok, row, torch.zeros_like(row)), ok


# ----------------------------------------------------------------------------------------------------------------
# GroupNorm (+ scale/shift) (+ SiLU) (sid_fast/kernels/group_norm_silu.py).


def group_norm_silu_ref(
    x, weight, bias, num_groups: int, eps: float, scale=None, shift=None, silu: bool = True, upcast: bool = True
):
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


# ----------------------------------------------------------------------------------------------------------------
# The adaLN modulation of DiT blocks (sid_fast/kernels/ada_layer_norm.py).


def ada_layer_norm_ref(x: torch.Tensor, s1: torch.Tensor, shift: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """layer_norm(x, eps) * s1[:, None] + shift[:, None] for x [N, L, D], s1 (= 1 + scale) and shift [N, D]: diffusers'
    AdaLayerNormZero/Continuous modulation with a LayerNorm without affine parameters."""
    return F.layer_norm(x, (x.shape[-1],), eps=eps) * s1[:, None] + shift[:, None]


# ----------------------------------------------------------------------------------------------------------------
# Attention over EDM's interleaved qkv channels (sid_fast/kernels/attention.py).


class _EDMAttentionWeights(torch.autograd.Function):
    """softmax_k(q^T k / sqrt(d)) in fp32, as EDM's AttentionOp (EDM training/networks.py): k is scaled in its own
    dtype, the weights are materialised in fp32 and stored in q.dtype for backward, whose softmax gradient runs in
    fp32. q, k: [B, d, L]; returns [B, L, L] in q.dtype."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        scale = 1.0 / math.sqrt(k.shape[1])
        w = torch.einsum("ncq,nck->nqk", q.float(), (k * scale).float()).softmax(dim=2).to(q.dtype)
        ctx.save_for_backward(q, k, w)
        return w

    @staticmethod
    def backward(ctx, dw: torch.Tensor):
        q, k, w = ctx.saved_tensors
        w32 = w.float()
        dw32 = dw.float()
        # Softmax backward in fp32: ds = w * (dw - sum_k(dw * w)).
        ds = w32 * (dw32 - (dw32 * w32).sum(dim=2, keepdim=True))
        scale = 1.0 / math.sqrt(k.shape[1])
        dq = torch.einsum("nck,nqk->ncq", k.float(), ds).mul(scale).to(q.dtype)
        dk = torch.einsum("ncq,nqk->nck", q.float(), ds).mul(scale).to(k.dtype)
        return dq, dk


def split_qkv(qkv: torch.Tensor, num_heads: int):
    """[N, heads*3*d, H, W] -> q, k, v, each [N*heads, d, L] (views into EDM's interleaved layout)."""
    n, c3, h, w = qkv.shape
    if c3 % (3 * num_heads):
        raise ValueError(f"qkv has {c3} channels, not divisible by 3 * num_heads = {3 * num_heads}.")
    d = c3 // (3 * num_heads)
    return qkv.reshape(n * num_heads, d, 3, h * w).unbind(2)


_ORDER_CACHE: dict = {}


def blocked_order(num_heads: int, d: int, device) -> torch.Tensor:
    """Index into EDM's interleaved qkv channels (head*3d + 3c + j) that lists them in the blocked order
    (head*3d + j*d + c): qkv[:, order] is the blocked tensor, and a convolution whose weight rows and bias are gathered
    by it computes the blocked tensor directly."""
    if torch.compiler.is_compiling():  # traced as an iota: a cache read would become a guard that fails once filled
        return _order(num_heads, d, device)
    key = (num_heads, d, str(device))
    if key not in _ORDER_CACHE:
        _ORDER_CACHE[key] = _order(num_heads, d, device)
    return _ORDER_CACHE[key]


def _order(num_heads: int, d: int, device) -> torch.Tensor:
    return torch.arange(3 * num_heads * d, device=device).view(num_heads, d, 3).transpose(1, 2).reshape(-1)


def blocked_to_interleaved(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[N, heads*3*d, H, W] from the blocked channel order back to EDM's interleaved one (differentiable)."""
    n, c3, h, w = qkv.shape
    d = c3 // (3 * num_heads)
    return qkv.reshape(n, num_heads, 3, d, h, w).transpose(2, 3).reshape(n, c3, h, w)


def attention_edm(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """EDM's attention: fp32 softmax weights materialised (L x L), applied to v in the activation dtype."""
    n, c3, h, w = qkv.shape
    q, k, v = split_qkv(qkv, num_heads)
    weights = _EDMAttentionWeights.apply(q, k)
    a = torch.einsum("nqk,nck->ncq", weights, v)
    return a.reshape(n, c3 // 3, h, w)


def attention_sdpa(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """torch.nn.functional.scaled_dot_product_attention on [N, heads, L, d] views; PyTorch picks the backend."""
    n, c3, h, w = qkv.shape
    q, k, v = split_qkv(qkv, num_heads)
    d = q.shape[1]
    q, k, v = (t.reshape(n, num_heads, d, h * w).transpose(2, 3) for t in (q, k, v))
    a = torch.nn.functional.scaled_dot_product_attention(q, k, v)  # default scale is 1/sqrt(d), as EDM
    return a.transpose(2, 3).reshape(n, c3 // 3, h, w)
