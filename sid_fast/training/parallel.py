"""How the trained networks are spread over the processes: DDP, FSDP2 or one process; their optimizers; the gradient
hand-over at the end of a phase.

- One process: the networks as they are.
- DDP (default with several processes): G and the fake score replicated, gradients all-reduced once per phase (DDP's
  no_sync on the other accumulation rounds), as the official loop's ddp_sync; the gradients are views into DDP's
  buckets (no copy back after the all-reduce), the bucket size is `ddp_bucket_mb`'s.
- FSDP2 (--fsdp): G and the fake score sharded with fully_shard per UNet block (`shard_units`) and then per network,
  before their optimizers exist, so that the Adam states are sharded too; the frozen teacher is sharded the same way
  (its blocks all-gathered in forward, and again in backward for the input gradients it passes to G); G_ema stays
  whole on every rank (snapshots and metrics read it there).
  FSDP2 shards no 0-d parameter (EDM2's scalar gains emb_gain and out_gain): those stay whole on every rank and their
  gradients are averaged here after each phase, as DDP would. Roots reshard after every forward, so between calls
  every parameter is its shard, which the optimizer and EDM2's forced weight normalisation update in place.
Gradients are cleaned with nan_to_num (nan -> 0, +-inf -> +-1e5) as the official loop does: parameter by parameter,
or in one pass over each buffer the gradients tile (the bf16 path's gradient arena, DDP's buckets), the same
elementwise result; with FSDP2 each rank cleans its shards and the "any non-finite" flag is agreed on by all ranks.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from sid_fast import casts, perf
from sid_fast.casts import dense
from sid_fast.networks import edm2
from sid_fast.networks.layers import UNetBlock


@dataclass
class Parallel:
    """G and the fake score as the processes train them (`G_dist`, `fake_dist`: DDP-wrapped, FSDP2-sharded modules
    or the modules themselves), their optimizers, and the gradient hand-over of a phase."""

    G_dist: torch.nn.Module
    fake_dist: torch.nn.Module
    opt_g: torch.optim.Optimizer
    opt_fake: torch.optim.Optimizer
    world: int
    rounds: int
    fsdp: bool
    replicated: dict = field(default_factory=dict)  # id(net) -> its parameters FSDP2 keeps whole

    def no_sync(self, net_dist, rnd: int):
        """Gradients are reduced once per phase, after the last round: DDP's no_sync, FSDP2's gradient-sync switch."""
        last = self.world == 1 or rnd == self.rounds - 1
        if self.fsdp:
            net_dist.set_requires_gradient_sync(last)
            return contextlib.nullcontext()
        return contextlib.nullcontext() if last else net_dist.no_sync()

    def reduce_replicated(self, net) -> None:
        """With FSDP2, the parameters it leaves whole: gradients averaged over the ranks (a collective)."""
        if not self.fsdp:
            return
        for p in self.replicated[id(net)]:
            if p.grad is not None:
                torch.distributed.all_reduce(p.grad)
                p.grad.div_(self.world)

    def clean_grads(self, params, device) -> torch.Tensor:
        """nan_to_num on every gradient (official cleaning); returns a device bool: were any non-finite? Gradients that
        tile a buffer (the bf16 fast path's gradient arena, sid_fast.casts) are cleaned as that buffer in
        one pass; the others one by one (the same elementwise result)."""
        bad = torch.zeros((), dtype=torch.bool, device=device)
        grads = [p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad for p in params if p.grad is not None]
        arena = casts.current_arena_buffers()
        if arena:  # zero-filled where no gradient landed: cleaned whole
            owned = {storage_key(a) for a in arena}
            grads = [*arena, *(g for g in grads if storage_key(g) not in owned)]
        for g in flat_buffers(grads):
            bad = bad | ~torch.isfinite(g).all()
            torch.nan_to_num(g, nan=0, posinf=1e5, neginf=-1e5, out=g)
        if self.fsdp:
            flag = bad.to(torch.int32)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            bad = flag.bool()
        return bad


def storage_key(t: torch.Tensor) -> int:
    """Which storage a tensor views: the storage object itself, not its address (on the meta device every address is
    0: by address, every gradient would look like the arena's)."""
    return t.untyped_storage()._cdata


def flat_buffers(tensors: list) -> list:
    """`tensors`, with every group of them that exactly tiles one storage (same dtype, dense, no overlap, covering it
    all) replaced by one flat view of that storage."""
    groups: dict = {}
    for t in tensors:
        groups.setdefault(storage_key(t), []).append(t)
    out = []
    for group in groups.values():
        t0 = group[0]
        n = t0.untyped_storage().nbytes() // t0.element_size()
        if len(group) > 1 and _tiles(group, n):
            out.append(t0.as_strided((n,), (1,), 0))
        else:
            out.extend(group)
    return out


def _tiles(group: list, n: int) -> bool:
    """Do these dense tensors of one dtype cover elements [0, n) of their storage, each once?"""
    if not all(t.dtype == group[0].dtype and dense(t) for t in group):
        return False
    end = 0
    for t in sorted(group, key=lambda t: t.storage_offset()):
        if t.storage_offset() != end:
            return False
        end += t.numel()
    return end == n


def shard_units(net: torch.nn.Module) -> list:
    """The modules sharded (and all-gathered in forward) one at a time: EDM's and EDM2's UNet blocks; for a diffusers
    UNet (Stable Diffusion), each resnet and each transformer of its down, mid and up blocks (SD 1.5: 38 units holding
    805 M of the 860 M parameters, the largest a 1280-channel transformer of 49 M; the rest, convolutions in and out,
    the time embedding and the resamplers, is the root's); for a diffusers DiT (SD3's MMDiT, FLUX), each of its
    transformer blocks (`transformer_blocks`, and FLUX's `single_transformer_blocks`)."""
    dit = [*(getattr(net, "transformer_blocks", None) or ()), *(getattr(net, "single_transformer_blocks", None) or ())]
    if dit and not hasattr(net, "down_blocks"):
        return dit
    if hasattr(net, "down_blocks") and hasattr(net, "up_blocks"):
        blocks = [*net.down_blocks, net.mid_block, *net.up_blocks]
        return [
            m
            for b in blocks
            if b is not None
            for name in ("resnets", "attentions")
            for m in getattr(b, name, None) or ()
        ]
    return [m for m in net.modules() if isinstance(m, (UNetBlock, edm2.Block))]


def _shard(net: torch.nn.Module) -> list:
    """fully_shard every UNet block of `net`, then `net`; returns the 0-d parameters FSDP2 leaves whole."""
    from torch.distributed.fsdp import fully_shard  # start-up: ~0.5 s (sympy), sharded runs only

    scalars = [p for p in net.parameters() if p.ndim == 0]
    ignored = set(scalars)
    for m in shard_units(net):
        fully_shard(m, ignored_params={p for p in m.parameters() if p in ignored})
    fully_shard(net, ignored_params=ignored, reshard_after_forward=True)
    return scalars


def ddp_bucket_mb(net: torch.nn.Module) -> float:
    """DDP's bucket size for `net`'s gradients, from what bench.collectives counts: a gradient bucket is all-reduced
    while backward runs once all of its gradients exist, so the last one (the first layers', ready last) is exposed
    after backward. At least 8 buckets per network keep that tail to 1/8 of the gradient bytes or less; at least
    4 MiB each keeps one all-reduce near NCCL's NVLink bandwidth plateau rather than its ~20 us latency; at most 64
    MiB keeps the exposed tail under ~0.3 ms at ~230 GB/s (8 GPUs, NVLink). CIFAR-10's 55.7 M parameters: 28 MiB
    buckets (DDP's default is 25 MiB); ImageNet-64's 296 M: 64 MiB; digits: 4 MiB."""
    mib = sum(p.numel() * p.element_size() for p in net.parameters()) / 2**20
    return float(min(max(mib / 8, 4.0), 64.0))


def parallelize(cfg, G, fake, device, world: int, rounds: int, adam_eps: float, teacher=None) -> Parallel:
    """Wrap or shard G and the fake score (and under FSDP2 the frozen teacher) for `world` processes, then build
    their Adam optimizers (official betas (0, 0.999) for the fake score, (g_beta1, 0.999) for G)."""
    fsdp = cfg.fsdp and world > 1
    replicated = {}
    if fsdp:
        for net in (G, fake):
            replicated[id(net)] = _shard(net)
        if teacher is not None:  # frozen: its 0-d parameters stay whole and need no gradient averaging
            _shard(teacher)
    capturable = cfg.cuda_graphs == "step" and device.type == "cuda"  # a whole-step graph replays the optimizer
    opt_fake = perf.make_adam(fake.parameters(), cfg.lr, (0.0, 0.999), adam_eps, cfg.optimizer, capturable)
    opt_g = perf.make_adam(G.parameters(), cfg.glr, (cfg.g_beta1, 0.999), adam_eps, cfg.optimizer, capturable)
    if world > 1 and not fsdp:
        ddp = dict(broadcast_buffers=False, find_unused_parameters=False, gradient_as_bucket_view=True)
        if device.type == "cuda":
            ddp["device_ids"] = [device]
        G_dist = torch.nn.parallel.DistributedDataParallel(G, bucket_cap_mb=ddp_bucket_mb(G), **ddp)
        fake_dist = torch.nn.parallel.DistributedDataParallel(fake, bucket_cap_mb=ddp_bucket_mb(fake), **ddp)
    else:
        G_dist, fake_dist = G, fake
    return Parallel(G_dist, fake_dist, opt_g, opt_fake, world, rounds, fsdp, replicated)
