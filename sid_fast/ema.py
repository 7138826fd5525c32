"""EDM's EMA with half-life and ramp-up (official training/sid_training_loop.py; EDM training/training_loop.py)."""

from __future__ import annotations

import torch


def ema_beta(batch_size: int, cur_nimg: int, ema_halflife_kimg: float, ema_rampup_ratio: float | None = 0.05) -> float:
    """beta = 0.5 ** (batch / halflife_nimg), halflife_nimg = min(halflife, rampup * cur_nimg) during ramp-up."""
    halflife_nimg = ema_halflife_kimg * 1000
    if ema_rampup_ratio is not None:
        halflife_nimg = min(halflife_nimg, cur_nimg * ema_rampup_ratio)
    return 0.5 ** (batch_size / max(halflife_nimg, 1e-8))


def ema_halflife_kimg(ema_mimg: float) -> int:
    """The half-life in kimg from --ema in Mimg, truncated to an integer as the official sid_train.py does."""
    return int(ema_mimg * 1000)


@torch.no_grad()
def update_ema(ema: torch.nn.Module, net: torch.nn.Module, beta: float) -> None:
    """p_ema <- lerp(p, p_ema, beta), parameter by parameter, as the official loop. Buffers are copied."""
    for p_ema, p in zip(ema.parameters(), net.parameters()):
        p_ema.copy_(p.detach().lerp(p_ema, beta))
    for b_ema, b in zip(ema.buffers(), net.buffers()):
        b_ema.copy_(b)


@torch.no_grad()
def update_ema_sharded(ema: torch.nn.Module, net: torch.nn.Module, beta: float) -> None:
    """update_ema for a network sharded with FSDP2 (`--fsdp`) into a whole EMA copy on every rank: each parameter is
    all-gathered in turn (a collective: every rank calls it), then the same lerp as the official loop."""
    for p_ema, p in zip(ema.parameters(), net.parameters()):
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        p_ema.copy_(full.detach().lerp(p_ema, beta))
    for b_ema, b in zip(ema.buffers(), net.buffers()):
        b_ema.copy_(b.full_tensor() if hasattr(b, "full_tensor") else b)


@torch.no_grad()
def update_ema_foreach(ema: torch.nn.Module, net: torch.nn.Module, beta: float) -> None:
    """p_ema <- p_ema + (1 - beta) (p - p_ema): the official lerp(p, p_ema, beta) in one foreach call per list."""
    pe, pn = list(ema.parameters()), [p.detach() for p in net.parameters()]
    torch._foreach_lerp_(pe, pn, 1.0 - beta)
    for b_ema, b in zip(ema.buffers(), net.buffers()):
        b_ema.copy_(b)
