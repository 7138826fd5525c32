"""Self-attention for EDM's UNet blocks, with interchangeable implementations.

Input is the output of the block's 1x1 qkv convolution, [N, heads * 3 * d, H, W], in EDM's interleaved per-channel
layout: channel = head * 3d + c * 3 + j with j in {q, k, v} (shared/reference/edm.md 1.1). The output is
[N, heads * d, H, W] with channel = head * d + c, which is what EDM's `proj` convolution consumes.

Implementations (choose with `set_attention_impl` or the `SID_FAST_ATTENTION` environment variable):
- "edm":  EDM's AttentionOp numerics: k scaled by 1/sqrt(d) in the input dtype, the softmax weights computed and
          materialised in fp32, stored in the input dtype for backward, whose softmax gradient runs in fp32;
          the weights are applied to v in the activation dtype. This is the reference path.
- "sdpa": torch.nn.functional.scaled_dot_product_attention on transposed views; PyTorch picks the backend.
- "triton": kernels/attention.py, a flash-attention Triton kernel that reads the interleaved qkv channels directly
          (online fp32 softmax, no L x L matrix, recomputing backward). It is also selected by sid_fast's kernel
          switch (`sid_fast.ops.set_use_kernels({"attention"})`); where Triton cannot run it falls back to "edm".
"""

from __future__ import annotations

import contextlib
import math
import os

import torch
import torch.nn.functional as F

_IMPLS = ("edm", "sdpa", "triton")
_current_impl = os.environ.get("SID_FAST_ATTENTION", "edm")
if _current_impl not in _IMPLS:
    raise ValueError(f"SID_FAST_ATTENTION={_current_impl!r} is not one of {_IMPLS}.")


def set_attention_impl(name: str) -> None:
    """Select the attention implementation used by every UNetBlock ("edm", "sdpa" or "triton")."""
    global _current_impl
    if name not in _IMPLS:
        raise ValueError(f"Unknown attention implementation {name!r}; expected one of {_IMPLS}.")
    _current_impl = name


def get_attention_impl() -> str:
    return _current_impl


@contextlib.contextmanager
def attention_impl(name: str):
    """Context manager that temporarily selects an attention implementation."""
    previous = get_attention_impl()
    set_attention_impl(name)
    try:
        yield
    finally:
        set_attention_impl(previous)


class _EDMAttentionWeights(torch.autograd.Function):
    """softmax_k(q^T k / sqrt(d)) in fp32, as EDM's AttentionOp. q, k: [B, d, L]; returns [B, L, L] in q.dtype."""

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


def attention_edm(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    n, c3, h, w = qkv.shape
    q, k, v = split_qkv(qkv, num_heads)
    weights = _EDMAttentionWeights.apply(q, k)
    a = torch.einsum("nqk,nck->ncq", weights, v)
    return a.reshape(n, c3 // 3, h, w)


def attention_sdpa(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    n, c3, h, w = qkv.shape
    q, k, v = split_qkv(qkv, num_heads)
    d = q.shape[1]
    # [N*heads, d, L] -> [N, heads, L, d]
    q, k, v = (t.reshape(n, num_heads, d, h * w).transpose(2, 3) for t in (q, k, v))
    a = F.scaled_dot_product_attention(q, k, v)  # default scale is 1/sqrt(d), as EDM
    return a.transpose(2, 3).reshape(n, c3 // 3, h, w)


def attention(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Multi-head self-attention over EDM's qkv conv output; see the module docstring."""
    from sid_fast import ops

    if _current_impl == "triton" or ops.use_kernel("attention"):
        from kernels.attention import flash_attention

        return flash_attention(qkv, num_heads)
    if _current_impl == "sdpa":
        return attention_sdpa(qkv, num_heads)
    return attention_edm(qkv, num_heads)


def attention_reference_fp64(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Float64 reference used by the tests: plain math, no custom backward."""
    n, c3, h, w = qkv.shape
    q, k, v = (t.double() for t in split_qkv(qkv, num_heads))
    s = torch.einsum("ncq,nck->nqk", q, k) / math.sqrt(q.shape[1])
    a = torch.einsum("nqk,nck->ncq", s.softmax(dim=2), v)
    return a.reshape(n, c3 // 3, h, w)
