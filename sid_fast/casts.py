"""Weight casts of the bf16 fast path, one launch per UNet block instead of one per parameter.

EDM's layers cast their fp32 parameters to the activation dtype on every call (`weight.to(x.dtype)`); in bf16 that is
one kernel launch per parameter per network call, and one more per parameter in backward (the cast's gradient back to
fp32): about 2,300 of the ~15,000 ops an eager CIFAR-10 iteration dispatches. With grouped casts (set per block by
`sid_fast.perf.prepare_networks` on the eager bf16 path) a block casts all of its parameters with one foreach copy when
it starts and hands the gradients back with one foreach copy when its backward ends: the same values bit for bit (a
cast is a rounding of each element; its gradient an exact widening), the same autograd graph per parameter, gradients
ready block by block (DDP's buckets still fill during backward).

Gradient arena: while a trained network's phase runs (`gradient_arena`), the first gradient each of its parameters
receives is written into a few flat fp32 buffers of the network (8 chunks, allocated as backward reaches them), so
that the end-of-phase NaN cleaning (sid_fast.training.parallel.clean_grads) is a pass per buffer instead of seven
ops per parameter. Later micro-batches
accumulate into those views as autograd always does (in place).

Layers call `cast(tensor, dtype)`; outside a group (the reference path, compiled call sites, checkpoint recomputation
of an ungrouped block) it is `tensor.to(dtype)`.
"""

from __future__ import annotations

import contextlib
import threading
import weakref

import torch

_local = threading.local()  # .casts: {id(param): cast tensor} of the groups entered; .arena: the GradArena or None


def cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """`t.to(dtype)`, taken from the enclosing cast group when it holds `t` in `dtype`."""
    if t is None:
        return t
    casts = getattr(_local, "casts", None)
    if casts:
        c = casts.get(id(t))
        if c is not None and c.dtype == dtype:
            return c
    return t if t.dtype == dtype else t.to(dtype)


class GradArena:
    """Flat buffers for the gradients of `params` (a trained network), each parameter's slot strided like the
    parameter (channels_last weights get channels_last gradients). The slots are grouped into `CHUNKS` buffers of
    about equal size, each allocated zero-filled when its first slot is asked for: gradients appear during backward
    chunk by chunk, as activations are freed, rather than all at once (at a billion parameters the whole buffer is
    gigabytes); the cleaning makes one pass per chunk."""

    CHUNKS = 8

    def __init__(self, params):
        self.slots, off, self.lazy = {}, 0, False
        self.dtype = self.device = None
        for p in params:
            if not dense(p) or isinstance(p, _dtensor_type()):
                continue
            if self.dtype is None:
                self.dtype, self.device = p.dtype, p.device
            if p.dtype != self.dtype or p.device != self.device:
                continue
            self.slots[id(p)] = [p, off]
            off += p.numel()
        # Chunk boundaries at parameter boundaries, near multiples of total / CHUNKS.
        size, self.chunks, start = max(1, -(-off // self.CHUNKS)), [], 0
        for slot in self.slots.values():
            if slot[1] - start >= size:
                self.chunks.append([start, slot[1], None])
                start = slot[1]
            slot.append(len(self.chunks))
        self.chunks.append([start, off, None])

    def view(self, p: torch.Tensor) -> torch.Tensor | None:
        """p's slot, when p belongs to the arena and has no gradient yet (else None: autograd accumulates as usual)."""
        slot = self.slots.get(id(p))
        if slot is None or slot[0] is not p or p.grad is not None:
            return None
        chunk = self.chunks[slot[2]]
        if chunk[2] is None:
            chunk[2] = torch.zeros(chunk[1] - chunk[0], dtype=self.dtype, device=self.device)
        return chunk[2].as_strided(p.shape, p.stride(), slot[1] - chunk[0])

    def buffers(self) -> list:
        return [c[2] for c in self.chunks if c[2] is not None]


def preassign_arena() -> None:
    """Every parameter of the open arena gets its zeroed slot as its gradient when backward first reaches it (a hook
    on the parameter sets the slot just before autograd accumulates: it then adds into it in place). For compiled call
    sites, whose backward graphs hand autograd separate gradient tensors, and networks without grouped casts. The
    slots appear chunk by chunk as backward reaches them, not at the start of the phase: the phase's peak does not
    hold the whole gradient through its forward."""
    arena = getattr(_local, "arena", None)
    if arena is None:
        return
    for p, *_ in arena.slots.values():
        _LAZY[id(p)] = arena
        if not getattr(p, "_sid_arena_hook", False):
            p.register_hook(_slot_hook(p))
            p._sid_arena_hook = True
    arena.lazy = True


# id(parameter) -> the open arena that hands it its slot on its first gradient. Process-wide, not thread-local: on
# CUDA, autograd runs the hooks on its device threads.
_LAZY: dict = {}


def _slot_hook(p: torch.Tensor):
    ref = weakref.ref(p)

    def hook(grad):
        q = ref()
        arena = _LAZY.get(id(q)) if q is not None and q.grad is None else None
        if arena is not None:
            slot = arena.view(q)
            if slot is not None:
                q.grad = slot  # autograd now accumulates `grad` into the slot (in place)

    return hook


def current_arena_buffers() -> list:
    """The flat gradient buffers of the phase that runs that gradients have landed in."""
    arena = getattr(_local, "arena", None)
    return [] if arena is None else arena.buffers()


def dense(t: torch.Tensor) -> bool:
    """Does t cover a contiguous run of its storage (row-major or channels_last), each element once?"""
    return t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor  # start-up: ~0.5 s (sympy), sharded runs only
    except ImportError:  # pragma: no cover - torch builds without distributed
        return ()
    return DTensor


@contextlib.contextmanager
def gradient_arena(params):
    """The phase of a trained network: first gradients of `params` land in a few flat buffers (see GradArena)."""
    prev = getattr(_local, "arena", None)
    arena = _local.arena = GradArena(params)
    try:
        yield arena
    finally:
        _local.arena = prev
        if arena.lazy:
            for key in [k for k, a in _LAZY.items() if a is arena]:
                del _LAZY[key]


class _CastGroup(torch.autograd.Function):
    """Forward: copies of `params` in `dtypes` (one foreach copy per target dtype). Backward: their gradients back in
    the parameters' dtype, written into the gradient arena's slots where it has them (one foreach copy)."""

    @staticmethod
    def forward(ctx, dtypes, arena, *params):
        ctx.arena = arena
        outs = [torch.empty_like(p, dtype=d) for p, d in zip(params, dtypes)]
        _foreach_copy_by_dtype(outs, params)
        ctx.params = params  # the parameters (leaves), not saved activations: read for their slots in backward
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        arena, params = ctx.arena, ctx.params
        outs = [None] * len(grads)
        dst, src = [], []
        for i, (p, g) in enumerate(zip(params, grads)):
            if g is None or not p.requires_grad:
                continue
            slot = arena.view(p) if arena is not None else None
            outs[i] = slot if slot is not None else torch.empty_like(p)
            dst.append(outs[i])
            src.append(g)
        _foreach_copy_by_dtype(dst, src)
        return (None, None, *outs)


def _foreach_copy_by_dtype(dst, src) -> None:
    """dst[i].copy_(src[i]) for all i, one foreach launch per (dst dtype, src dtype) pair."""
    groups: dict = {}
    for d, s in zip(dst, src):
        groups.setdefault((d.dtype, s.dtype), ([], []))
        groups[(d.dtype, s.dtype)][0].append(d)
        groups[(d.dtype, s.dtype)][1].append(s)
    for d, s in groups.values():
        torch._foreach_copy_(d, s)


@contextlib.contextmanager
def cast_group(targets):
    """Inside: `cast(p, dtype)` returns the group's copy for every (p, dtype) in `targets` whose p is not already in
    dtype. The copies are made here, with one foreach copy per dtype pair (and an autograd node when p records
    gradients). While a gradient arena is open, trained parameters already in their dtype join the group too (an
    fp32 copy), so that their gradients land in the arena as well."""
    arena = getattr(_local, "arena", None) if torch.is_grad_enabled() else None
    todo = [
        (p, d)
        for p, d in targets
        if p is not None and (p.dtype != d or (arena is not None and p.requires_grad and id(p) in arena.slots))
    ]
    if not todo:
        yield
        return
    params = [p for p, _ in todo]
    dtypes = [d for _, d in todo]
    if torch.is_grad_enabled() and any(p.requires_grad for p in params):
        outs = _CastGroup.apply(dtypes, arena, *params)
    else:
        outs = [torch.empty_like(p, dtype=d) for p, d in todo]
        _foreach_copy_by_dtype(outs, params)
    prev = getattr(_local, "casts", None)
    _local.casts = {**(prev or {}), **{id(p): c for p, c in zip(params, outs)}}
    try:
        yield
    finally:
        _local.casts = prev
