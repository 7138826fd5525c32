"""The one dispatcher between sid_fast's fused Triton kernels (sid_fast/kernels/) and their pure-torch references.

Five ops: the SiD generator loss, the fake-score (EDM) loss, GroupNorm+SiLU, attention over EDM's interleaved qkv
channels, and a DiT block's adaLN modulation (LayerNorm, scale, shift). The networks and the trainer call only these
functions; which implementation runs is chosen by one scoped switch, and outside every scope the references run (the
official numerics):

    with ops.kernels("all"):                  # every kernel
    with ops.kernels("sid_loss,attention"):   # a subset; "attention" is the Triton flash kernel
    with ops.kernels("sdpa"):                 # attention through torch's scaled_dot_product_attention
    with ops.kernels("none"):                 # the references, also inside an outer scope

The selection is restored when a scope exits, also when it raises, so nothing leaks between runs. The kernels run
on CUDA tensors, or on CPU under the Triton interpreter (TRITON_INTERPRET=1); elsewhere each falls back to its
reference by itself. Triton is imported when a kernel is first called, never by importing this module: without the
triton package (macOS, Windows) the references run and selecting a kernel is refused in one sentence.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sid_fast.casts import cast
from sid_fast.kernels import triton_installed
from sid_fast.kernels.references import attention_edm, attention_sdpa, group_norm_silu_ref
from sid_fast.losses import edm2_loss_from_output, edm_loss_from_output, edm_weight, sid_generator_loss_elements

KERNELS = frozenset({"sid_loss", "edm_loss", "group_norm_silu", "attention", "ada_norm"})
NAMES = KERNELS | {"sdpa"}  # "sdpa": attention through PyTorch's SDPA instead of EDM's op (no Triton)


@dataclass(frozen=True)
class Selection:
    kernels: frozenset = frozenset()  # names from KERNELS
    attention: str = "edm"  # "edm" (reference), "sdpa" or "triton"


_selection = Selection()


def parse(spec) -> Selection:
    """'none', 'all', a comma list of NAMES, an iterable of names, or a Selection -> Selection."""
    if isinstance(spec, Selection):
        return spec
    if spec is None or spec == "none":
        names = frozenset()
    elif spec == "all":
        names = KERNELS
    else:
        names = frozenset(n.strip() for n in spec.split(",")) if isinstance(spec, str) else frozenset(spec)
    unknown = names - NAMES
    if unknown:
        raise ValueError(
            f"unknown kernels {sorted(unknown)}: 'none', 'all' or a comma list of {', '.join(sorted(NAMES))}."
        )
    if {"attention", "sdpa"} <= names:
        raise ValueError("'attention' (the Triton kernel) and 'sdpa' are two attention implementations; pick one.")
    if names & KERNELS and not triton_installed():
        raise ValueError(
            f"--kernels {','.join(sorted(names))} needs the triton package, which is not installed (Triton ships Linux "
            "wheels only): pip install triton, or run with --kernels none (or sdpa)."
        )
    attention = "triton" if "attention" in names else "sdpa" if "sdpa" in names else "edm"
    return Selection(names & KERNELS, attention)


@contextlib.contextmanager
def kernels(spec):
    """Run the body with the kernels named by `spec` (see `parse`); the previous selection is restored on exit."""
    global _selection
    selection = parse(spec)
    previous = _selection
    _selection = selection
    try:
        yield selection
    finally:
        _selection = previous


def current() -> Selection:
    return _selection


# ----------------------------------------------------------------------------------------------------------------
# The five ops.


def sid_generator_loss_sum(
    x_g: torch.Tensor, y_real: torch.Tensor, y_fake: torch.Tensor, alpha: float, u=None, keep=None
):
    """(sum over samples and pixels of the SiD loss, [N] bool of the rows kept); other rows contribute 0.
    u: the fake score's log-variance on EDM2 networks [N, 1, 1, 1]; each sample's loss is divided by e^u.
    keep: [N] bool, rows to drop besides those with a NaN in x_g, y_real, y_fake or u (EDM2 SiDA: NaN logits)."""
    if "sid_loss" in _selection.kernels:
        from sid_fast.kernels.sid_loss import sid_loss_rows  # Triton loads when a kernel first runs

        row, _, ok = sid_loss_rows(x_g, y_real, y_fake, alpha)
        if keep is not None:
            ok = ok & keep
        if u is not None:  # the kernel's per-sample sums, each divided by its e^u
            u = u.reshape(-1).float()
            ok = ok & ~torch.isnan(u)
            row = torch.where(ok, row / torch.where(ok, u, 0).exp(), 0)
        elif keep is not None:
            row = torch.where(ok, row, 0)
        return row.sum(), ok
    loss, ok = sid_generator_loss_elements(x_g, y_real, y_fake, alpha, u=u, keep=keep)
    return loss.sum(), ok


def fake_score_loss_sum(D: torch.Tensor, y: torch.Tensor, sigma: torch.Tensor, u=None):
    """(sum of lambda(sigma) (D - y)^2 over samples and pixels, [N] bool of rows without NaN) for SiD's fake score;
    with EDM2's log-variance u [N, 1, 1, 1]: lambda / e^u (D - y)^2 + u per element."""
    if "edm_loss" in _selection.kernels:
        from sid_fast.kernels.edm_loss import edm_loss_rows  # Triton loads when a kernel first runs

        weight = edm_weight(sigma).reshape(-1).float()
        if u is None:
            row, ok = edm_loss_rows(D, y, weight)
            return row.sum(), ok
        u = u.reshape(-1).float()
        u_ok = ~torch.isnan(u)
        u0 = torch.where(u_ok, u, 0)
        row, ok = edm_loss_rows(D, y, weight)
        ok = ok & u_ok
        # Each row's sum is linear in its weight: e^-u multiplies it outside the kernel, so u (the fake score's
        # log-variance head, trained by this loss) gets its gradient -row e^-u + C*H*W through autograd.
        row = torch.where(ok, row * torch.exp(-u0) + u0 * D[0].numel(), 0)
        return row.sum(), ok
    if u is not None:
        loss, ok = edm2_loss_from_output(D, y, sigma, u)
    else:
        loss, ok = edm_loss_from_output(D, y, sigma)
    return loss.sum(), ok


def group_norm_silu(x, weight, bias, num_groups: int, eps: float, scale=None, shift=None, silu: bool = True):
    """EDM's GroupNorm (fp32 parameters cast to x.dtype), optional x * (scale + 1) + shift, optional SiLU."""
    if "group_norm_silu" in _selection.kernels and silu:
        from sid_fast.kernels.group_norm_silu import group_norm_silu as fused  # Triton loads when a kernel first runs

        return fused(x, cast(weight, x.dtype), cast(bias, x.dtype), num_groups, eps, scale, shift)
    return group_norm_silu_ref(
        x, cast(weight, x.dtype), cast(bias, x.dtype), num_groups, eps, scale, shift, silu=silu, upcast=False
    )


def attention_from_conv(conv, x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """attention(conv(x), num_heads) for EDM's UNetBlock, whose qkv convolution `conv` (1x1, sid_fast's Conv2d) writes
    the interleaved channels head*3d + 3c + j. With the Triton kernel the convolution's weight rows and bias are
    gathered into the blocked order head*3d + j*d + c first (the same products, in another channel order), so the
    kernel reads q, k and v as contiguous runs per head: vector loads and cp.async in channels_last as in NCHW."""
    if _selection.attention == "triton":
        from sid_fast.kernels.attention import blocked_order, flash_attention  # Triton loads when a kernel first runs

        order = blocked_order(num_heads, conv.out_channels // (3 * num_heads), x.device)
        bias = cast(conv.bias, x.dtype)[order] if conv.bias is not None else None
        if conv.bias_in_conv:
            return flash_attention(F.conv2d(x, cast(conv.weight, x.dtype)[order], bias), num_heads, blocked=True)
        qkv = F.conv2d(x, cast(conv.weight, x.dtype)[order])
        if bias is not None:  # added apart, as sid_fast.networks.layers.Conv2d does
            qkv = qkv + bias.reshape(1, -1, 1, 1)
        return flash_attention(qkv, num_heads, blocked=True)
    return attention(conv(x), num_heads)


def attention(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Multi-head self-attention over EDM's qkv conv output [N, heads*3*d, H, W] -> [N, heads*d, H, W]."""
    if _selection.attention == "triton":
        from sid_fast.kernels.attention import flash_attention  # Triton loads when a kernel first runs

        return flash_attention(qkv, num_heads)
    if _selection.attention == "sdpa":
        return attention_sdpa(qkv, num_heads)
    return attention_edm(qkv, num_heads)


def ada_layer_norm(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float) -> torch.Tensor:
    """layer_norm(x) * (1 + scale[:, None]) + shift[:, None] for x [N, L, D], scale and shift [N, D]: the adaLN
    modulation of diffusers' DiT blocks (a LayerNorm without affine parameters), written as they write it. The kernel
    takes 1 + scale made here in scale's dtype (as the unfused expression rounds it). Under autocast it writes the
    autocast dtype: every consumer of the output (the attention's q, k, v and the MLP's linear layers, proj_out) casts
    it to that dtype, so the float32 tensor CUDA autocast's layer_norm makes and the three casts of q, k and v are
    never made (the values are the fp32 result rounded once); elsewhere the inputs' promotion, as the expression."""
    if "ada_norm" in _selection.kernels:
        from sid_fast.kernels.ada_layer_norm import ada_layer_norm as fused  # Triton loads when a kernel first runs

        device = x.device.type
        if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):  # not on meta
            out = torch.get_autocast_dtype(device)
        else:
            out = torch.promote_types(torch.promote_types(x.dtype, scale.dtype), shift.dtype)
        return fused(x, 1 + scale, shift, eps, out)
    return F.layer_norm(x, (x.shape[-1],), eps=eps) * (1 + scale[:, None]) + shift[:, None]
