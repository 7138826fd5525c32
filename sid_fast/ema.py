"""EDM's EMA with half-life and ramp-up (official training/sid_training_loop.py; EDM training/training_loop.py)."""

from __future__ import annotations

import math

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


class DeviceBeta:
    """The EMA's beta for a replayed step (sid_fast.training.graphs): beta and 1 - beta as 0-d float32 tensors on the
    device, each filled from the host's float64 value, so that they round as a Python float argument does and a
    replay computes the eager step's EMA bit for bit (lerp with a tensor weight equals lerp with the float)."""

    def __init__(self, device):
        self.beta = torch.zeros((), dtype=torch.float32, device=device)
        self.one_minus = torch.zeros((), dtype=torch.float32, device=device)

    def fill(self, beta: float) -> None:
        self.beta.fill_(beta)
        self.one_minus.fill_(1.0 - beta)


@torch.no_grad()
def update_ema(ema: torch.nn.Module, net: torch.nn.Module, beta) -> None:
    """p_ema <- lerp(p, p_ema, beta), parameter by parameter, as the official loop. Buffers are copied. `beta`: a
    float, or a DeviceBeta."""
    if isinstance(beta, DeviceBeta):
        beta = beta.beta
    for p_ema, p in zip(ema.parameters(), net.parameters()):
        p_ema.copy_(p.detach().lerp(p_ema, beta))
    for b_ema, b in zip(ema.buffers(), net.buffers()):
        b_ema.copy_(b)


@torch.no_grad()
def update_ema_sharded(ema: torch.nn.Module, net: torch.nn.Module, beta: float | None,
                       bucket_bytes: int = 128 << 20) -> None:  # fmt: skip
    """update_ema for a network sharded with FSDP2 (`--fsdp`) into a whole EMA copy on every rank: the parameters are
    all-gathered a bucket of up to `bucket_bytes` at a time (one collective per bucket, every rank calls it, instead
    of one per parameter), then the same lerp as the official loop, parameter by parameter. `beta` None: the EMA off
    (`copy_weights`)."""
    bucket, size = [], 0
    for p_ema, p in zip(ema.parameters(), net.parameters()):
        bucket.append((p_ema, p))
        size += p.numel() * p.element_size() * (p.device_mesh.size() if _sharded(p) else 1)
        if size >= bucket_bytes:
            _update_bucket(bucket, beta)
            bucket, size = [], 0
    if bucket:
        _update_bucket(bucket, beta)
    for b_ema, b in zip(ema.buffers(), net.buffers()):
        b_ema.copy_(b.full_tensor() if hasattr(b, "full_tensor") else b)


def copy_weights(ema: torch.nn.Module, net: torch.nn.Module) -> None:
    """ema <- net, parameters and buffers, wherever ema lives (the host included; sharded parameters of `net`
    gathered as update_ema_sharded does, a collective every rank calls): the EMA off (--ema 0)."""
    update_ema_sharded(ema, net, None)


def _sharded(p) -> bool:
    """A DTensor sharded on dim 0 over a 1-D mesh (FSDP2's layout), whose shards `gather_full` can put together."""
    from torch.distributed.tensor import DTensor, Shard  # start-up: ~0.5 s (sympy), sharded runs only

    return isinstance(p, DTensor) and p.device_mesh.ndim == 1 and tuple(p.placements) == (Shard(0),)


def _update_bucket(bucket: list, beta: float | None) -> None:
    """p_ema <- lerp(p, p_ema, beta) for each pair, p gathered whole; beta None: p_ema <- p (across devices)."""
    sharded = [p for _, p in bucket if _sharded(p)]
    full = dict(zip(map(id, sharded), gather_full(sharded))) if sharded else {}
    for p_ema, p in bucket:
        f = full.get(id(p))
        if f is None:
            f = p.full_tensor() if hasattr(p, "full_tensor") else p
        p_ema.copy_(f.detach() if beta is None else f.detach().lerp(p_ema, beta))


def gather_full(params: list) -> list:
    """The whole tensors of dim-0-sharded DTensors on one mesh, with one all_gather_into_tensor: each rank's shards
    (torch.chunk's split of dim 0: rank r holds rows [r c, (r + 1) c), c = ceil(rows / world), the last ranks fewer
    or none) padded to c rows, concatenated, gathered, then cut back."""
    import torch.distributed as dist  # start-up: ~0.5 s (sympy), sharded runs only

    mesh = params[0].device_mesh
    world, group = mesh.size(), mesh.get_group()
    local, spans = [], []
    for p in params:
        rows = p.shape[0]
        chunk = -(-rows // world)
        row_numel = math.prod(p.shape[1:])
        shard = p.to_local().reshape(-1)
        padded = torch.zeros(chunk * row_numel, dtype=shard.dtype, device=shard.device)
        padded[: shard.numel()] = shard
        local.append(padded)
        spans.append((rows, chunk, row_numel))
    flat = torch.cat(local)
    out = torch.empty(world * flat.numel(), dtype=flat.dtype, device=flat.device)
    dist.all_gather_into_tensor(out, flat, group=group)
    out = out.view(world, -1)
    result, off = [], 0
    for p, (rows, chunk, row_numel) in zip(params, spans):
        n = chunk * row_numel
        whole = out[:, off : off + n].reshape(world * chunk, *p.shape[1:])[:rows]
        result.append(whole)
        off += n
    return result


@torch.no_grad()
def update_ema_foreach(ema: torch.nn.Module, net: torch.nn.Module, beta) -> None:
    """p_ema <- p_ema + (1 - beta) (p - p_ema): the official lerp(p, p_ema, beta) in one foreach call per list.
    `beta`: a float, or a DeviceBeta (its 1 - beta as the weight of every pair)."""
    pe, pn = list(ema.parameters()), [p.detach() for p in net.parameters()]
    if isinstance(beta, DeviceBeta):
        torch._foreach_lerp_(pe, pn, [beta.one_minus] * len(pe))
    else:
        torch._foreach_lerp_(pe, pn, 1.0 - beta)
    for b_ema, b in zip(ema.buffers(), net.buffers()):
        b_ema.copy_(b)
