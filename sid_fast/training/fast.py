"""The fast path's options, each of which leaves the SiD algorithm unchanged (shared/design.md, the two paths).

- precision: `fp32` is the reference (TF32 off for matmuls and cuDNN, as SiD's loop sets it); `tf32` allows TF32;
  `bf16` runs the UNet bodies of all three networks in bfloat16 the way EDM runs fp16 (fp32 master weights cast per
  layer, fp32 mapping network, preconditioning, softmax, losses, w, optimizer state), and stores the frozen teacher's
  weights in bf16. G_ema samples (snapshots, metrics) stay fp32.
- channels_last: networks and their image inputs in NHWC memory format (the kernels read both layouts).
- checkpointing (generator phase only): `nets` recomputes the teacher's and the fake score's forwards during
  backward (only their inputs are kept); `blocks` does it per UNet block, which keeps the block outputs.
- optimizer: `adam` is the official torch.optim.Adam (PyTorch picks foreach on CUDA by itself); `foreach` and `fused`
  force those implementations and also update the EMA with one foreach lerp.
- compile / cuda_graphs: torch.compile of each network call site (mode "reduce-overhead" captures CUDA graphs).
- kernels: sets sid_fast.ops' process-wide switch.
"""

from __future__ import annotations

import contextlib

import torch

from sid_fast.networks.layers import UNetBlock


def set_matmul_precision(precision: str) -> None:
    tf32 = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


def prepare_networks(cfg, teacher, trained, G_ema) -> None:
    """Dtype and memory format of the networks (in place)."""
    if cfg.precision == "bf16":
        for p in teacher.parameters():  # frozen: its weights are only read in bf16 (the mapping MLP casts them to fp32)
            p.data = p.data.to(torch.bfloat16)  # buffers (resampling filters, Fourier frequencies) stay fp32
        for net in (teacher, *trained):
            net.compute_dtype = torch.bfloat16
        G_ema.compute_dtype = None
    if cfg.channels_last:
        for net in (teacher, *trained, G_ema):
            net.to(memory_format=torch.channels_last)


def image_format(cfg, x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if cfg.channels_last else x


@contextlib.contextmanager
def block_checkpointing(mode: str, *nets):
    """With mode 'blocks', every UNetBlock of `nets` recomputes its activations in backward while inside."""
    blocks = [m for net in nets for m in net.modules() if isinstance(m, UNetBlock)] if mode == "blocks" else []
    for b in blocks:
        b.checkpoint_activations = True
    try:
        yield
    finally:
        for b in blocks:
            b.checkpoint_activations = False


def call_checkpointed(mode: str, fn, *args, **kwargs):
    """fn(*args, **kwargs), recomputed during backward when mode == 'nets'."""
    if mode == "nets" and torch.is_grad_enabled():
        from torch.utils.checkpoint import checkpoint

        return checkpoint(fn, *args, use_reentrant=False, **kwargs)
    return fn(*args, **kwargs)


def make_adam(params, lr, betas, eps, kind: str):
    extra = {"foreach": dict(foreach=True), "fused": dict(fused=True)}.get(kind, {})
    return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, **extra)


@torch.no_grad()
def update_ema_foreach(ema: torch.nn.Module, net: torch.nn.Module, beta: float) -> None:
    """p_ema <- p_ema + (1 - beta) (p - p_ema): the official lerp(p, p_ema, beta) in one foreach call per list."""
    pe, pn = list(ema.parameters()), [p.detach() for p in net.parameters()]
    torch._foreach_lerp_(pe, pn, 1.0 - beta)
    for b_ema, b in zip(ema.buffers(), net.buffers()):
        b_ema.copy_(b)


def maybe_compile(fn, cfg):
    if not (cfg.compile or cfg.cuda_graphs):
        return fn
    if cfg.cuda_graphs:
        return torch.compile(fn, mode="reduce-overhead", dynamic=False)
    return torch.compile(fn, backend=cfg.compile_backend, dynamic=False)


def kernel_names(cfg):
    from sid_fast.ops import KERNELS

    if cfg.kernels == "all":
        return KERNELS
    if cfg.kernels == "none":
        return None
    return frozenset(cfg.kernels.split(","))
