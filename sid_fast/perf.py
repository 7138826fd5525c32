"""The fast path, applied once when the trainer is built; every option leaves the SiD algorithm unchanged.

`CallSites` hands the trainer one callable per way it uses a network (G in train and eval mode, the fake score in
train and eval mode, the teacher), with the memory format, checkpointing, torch.compile and NVTX range already
applied, so that the trainer's phases contain the algorithm only. The options:

- precision: `fp32` is the reference (TF32 off for matmuls and cuDNN, as SiD's loop sets it); `tf32` allows TF32;
  `bf16` runs the UNet bodies of all three networks in bfloat16 the way EDM runs fp16 (fp32 master weights cast per
  layer, fp32 mapping network, preconditioning, softmax, losses, w, optimizer state), and stores the frozen teacher's
  weights in bf16. G_ema samples (snapshots, metrics) stay fp32. Its launches are cut without changing the
  algorithm: convolutions take their bias, UNet blocks cast their weights as one group and their gradients land in
  a few buffers per network (sid_fast.casts), all blocks' embedding affines run as one matmul (eager only;
  docs/overhead.md).
- channels_last: networks and their image inputs in NHWC memory format (the kernels read both layouts).
- checkpointing: `nets` recomputes the teacher's and the fake score's forwards during the generator phase's backward
  (only their inputs are kept); `blocks` does it per UNet block, which keeps the block outputs; `selective` runs every
  network that records gradients (G, teacher and fake score in the generator phase, the fake score in its own phase)
  with per-block selective checkpointing: the outputs of dense convolutions, matmuls and attention are kept, the
  memory-bound rest (GroupNorm, SiLU, dropout, adds, weight casts) is recomputed (no tensor-core FLOPs added).
- optimizer: `adam` is the official torch.optim.Adam (PyTorch picks foreach on CUDA by itself); `foreach` and `fused`
  force those implementations, and their runs update the EMA with one foreach lerp (same arithmetic, fewer launches).
- compile / cuda_graphs: torch.compile of each network call site (`--cuda-graphs sites`: mode "reduce-overhead",
  CUDA graphs per call site); `--cuda-graphs step` captures the whole iteration instead (sid_fast.training.graphs)
  and needs capturable Adam (`make_adam`).
- kernels: the trainer enters `sid_fast.ops.kernels(cfg.kernels)` around each step and snapshot; with `ada_norm`
  selected, the adaLN modules of diffusers' DiTs get a forward through its op (sid_fast.networks.dit).
The reference path (fp32, no option) reproduces the official implementation's numerics.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from sid_fast import casts, ops
from sid_fast.ema import update_ema, update_ema_foreach
from sid_fast.networks import dit, edm2
from sid_fast.networks.layers import Conv2d, UNetBlock


class annotate:
    """A named range in torch.profiler traces and, on CUDA, in Nsight Systems (NVTX)."""

    def __init__(self, name: str):
        self.name = name
        self.nvtx = torch.cuda.is_available()

    def __enter__(self):
        self.rf = torch.profiler.record_function(self.name)
        self.rf.__enter__()
        if self.nvtx:
            torch.cuda.nvtx.range_push(self.name)

    def __exit__(self, *exc):
        if self.nvtx:
            torch.cuda.nvtx.range_pop()
        self.rf.__exit__(*exc)
        return False


def set_matmul_precision(precision: str) -> None:
    """TF32 only with --precision tf32 (SiD's loop turns it off); cuDNN picks its convolution algorithms by timing
    them once per shape (official EDM/SiD loops: cudnn.benchmark = True), on every path."""
    tf32 = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = True


def is_diffusers(net: torch.nn.Module) -> bool:
    """A diffusers model (Stable Diffusion's UNet): its own per-block gradient checkpointing, bf16 by autocast."""
    return hasattr(net, "enable_gradient_checkpointing")


def prepare_networks(cfg, teacher, trained, G_ema) -> None:
    """How the networks run, set once on the modules (in place), for every family: dtype of the UNet bodies, memory
    format, and the per-block activation checkpointing of --checkpointing blocks (the teacher and the fake score while
    frozen, i.e. in the generator phase) or selective (every network that records gradients: the teacher, G and the
    fake score). EDM's and EDM2's UNets read `compute_dtype` and their blocks' switches; diffusers models run bf16
    under the family's autocast and checkpoint whole blocks with diffusers' own gradient checkpointing (blocks and
    selective alike)."""
    G, fake = trained
    if "ada_norm" in ops.parse(cfg.kernels).kernels:  # DiT adaLN modulation through the op (the kernel in its scope)
        for net in (teacher, *trained, G_ema):
            if is_diffusers(net):
                dit.fuse_adaln(net)
    if cfg.precision == "bf16":
        for p in teacher.parameters():  # frozen: its weights are only read in bf16 (the mapping MLP casts them to fp32)
            p.data = p.data.to(torch.bfloat16)  # buffers (resampling filters, Fourier frequencies) stay fp32
        for net in (teacher, *trained):
            if is_diffusers(net):
                continue
            net.compute_dtype = torch.bfloat16
            # One matmul for all blocks' embedding affine layers: eager only, not with per-block checkpointing (a
            # recomputed block would run its own affine layer, which the first forward did not), and not under FSDP2
            # (each block is sharded apart: its weights are gathered by its own forward, after the batched matmul).
            batched = not grouped_casts_off(cfg) and cfg.checkpointing not in ("blocks", "selective") and not cfg.fsdp
            if isinstance(getattr(net, "model", None), torch.nn.Module):  # EDM's UNets (EDM2's have no affine layers)
                net.model.batched_affine = batched
            for m in net.modules():
                if isinstance(m, Conv2d):
                    m.bias_in_conv = True
                if isinstance(m, UNetBlock):  # compiled call sites fuse the casts themselves
                    m.group_casts = not grouped_casts_off(cfg)
                    m.batched_affine = batched
        if not is_diffusers(G_ema):
            G_ema.compute_dtype = None
        # EDM2's frozen teacher: each magnitude-preserving layer called with gain 1 folds its normalised weight once
        # (networks/edm2.py MPConv; not compiled, where Inductor fuses it, and not under FSDP2, whose gathered weights
        # are transient).
        if not (cfg.compile or cfg.fsdp):
            for m in teacher.modules():
                if isinstance(m, edm2.MPConv):
                    m.fold_when_frozen = True
    if cfg.channels_last:
        for net in (teacher, *trained, G_ema):
            net.to(memory_format=torch.channels_last)
    block_mode, nets, while_trained = {
        "blocks": ("full", (teacher, fake), False),
        "selective": ("selective", (teacher, G, fake), True),
    }.get(cfg.checkpointing, (None, (), True))
    for net in nets:
        if is_diffusers(net):
            net.enable_gradient_checkpointing()
            continue
        for b in net.modules():
            if isinstance(b, (UNetBlock, edm2.Block)):
                b.checkpoint_activations, b.checkpoint_while_trained = block_mode, while_trained


def grouped_casts_off(cfg) -> bool:
    """Grouped weight casts (sid_fast.casts) serve the eager bf16 path; compiled call sites fuse casts."""
    return cfg.precision != "bf16" or bool(cfg.compile or cfg.cuda_graphs == "sites")


def gradient_arena(cfg, net: torch.nn.Module):
    """The phase that trains `net`: on the bf16 path its gradients live in 8 flat buffers (one NaN-cleaning pass per
    buffer instead of seven ops per parameter). Eager, the grouped casts' backward writes each first gradient into
    it; compiled (and EDM2's, without grouped casts), each parameter is handed its zeroed slot as its gradient when
    backward first reaches it (`preassign_gradients`: autograd then accumulates into it in place, one add per
    parameter; the chunks appear as backward goes, not at the phase's start). The reference path
    keeps the official per-parameter gradients."""
    if cfg.precision != "bf16":
        return contextlib.nullcontext()
    return casts.gradient_arena(net.parameters())


def preassign_gradients(cfg, net: torch.nn.Module) -> None:
    """The open gradient arena's buffer becomes the trained parameters' gradients (zeros) where no grouped cast writes
    into it: compiled bf16 rungs, and eager bf16 networks without grouped casts (EDM2's: its gradients, cleaned per
    parameter otherwise, are then cleaned as a few buffers; FSDP2's sharded gradients keep their own storage)."""
    if cfg.precision != "bf16" or cfg.fsdp:
        return
    grouped = any(getattr(m, "group_casts", False) for m in net.modules())
    if cfg.compile or cfg.cuda_graphs == "sites" or not grouped:
        casts.preassign_arena()


def image_format(cfg, x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if cfg.channels_last and x.dim() == 4 else x


def _site(cfg, fn, name: str, checkpoint_whole: bool = False, backend=None) -> Callable:
    """fn(x, sigma, labels, **kw) with x in the run's memory format, compiled if asked, inside an NVTX range; with
    `checkpoint_whole` and --checkpointing nets the whole forward is recomputed in backward (per-block checkpointing
    is the blocks' own, set by `prepare_networks`)."""
    compiled = maybe_compile(fn, cfg, backend)
    whole = checkpoint_whole and cfg.checkpointing == "nets"

    def call(x, sigma, labels, **kw):
        x = image_format(cfg, x)
        with annotate(name):
            if whole and torch.is_grad_enabled():
                return checkpoint(compiled, x, sigma, labels, use_reentrant=False, **kw)
            return compiled(x, sigma, labels, **kw)

    return call


@dataclass
class CallSites:
    """The trainer's uses of its networks, each prepared once (see the module docstring)."""

    G_train: Callable  # generator phase: G (DDP-wrapped or FSDP2-sharded when distributed) with gradient
    G_eval: Callable  # fake-score phase: samples of G without gradient
    fake_train: Callable  # fake-score phase: the fake score (DDP-wrapped or FSDP2-sharded) being trained
    fake_eval: Callable  # generator phase: the fake score as a frozen function of its input (checkpointable)
    teacher: Callable  # generator phase: the frozen teacher (checkpointable)
    update_ema: Callable  # (G_ema, G, beta): per-parameter lerp as the official loop, or one foreach lerp


def call_sites(cfg, teacher, G, fake, G_dist, fake_dist, backends=None) -> CallSites:
    """G_dist, fake_dist: the networks as the processes train them (DDP-wrapped, FSDP2-sharded or bare); `backends`:
    {call site: torch.compile backend} instead of --compile-backend (bench.overhead counts graphs per site)."""
    b = backends or {}
    return CallSites(
        G_train=_site(cfg, G_dist, "sid/generator", backend=b.get("G_train")),
        G_eval=_site(cfg, G, "sid/generator", backend=b.get("G_eval")),
        fake_train=_site(cfg, fake_dist, "sid/fake_score", backend=b.get("fake_train")),
        fake_eval=_site(cfg, fake, "sid/fake_score", checkpoint_whole=True, backend=b.get("fake_eval")),
        teacher=_site(cfg, teacher, "sid/teacher", checkpoint_whole=True, backend=b.get("teacher")),
        update_ema=update_ema if cfg.optimizer == "adam" else update_ema_foreach,
    )


def make_adam(params, lr, betas, eps, kind: str, capturable: bool = False):
    """torch.optim.Adam as --optimizer asks; `capturable` (whole-step CUDA graphs): the step count and the bias
    corrections on the device, so that an optimizer step replays from a graph (CUDA only)."""
    extra = {"foreach": dict(foreach=True), "fused": dict(fused=True)}.get(kind, {})
    if capturable:
        extra["capturable"] = True
    return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, **extra)


def maybe_compile(fn, cfg, backend=None):
    if not (cfg.compile or cfg.cuda_graphs == "sites"):
        return fn
    if backend is not None:
        return torch.compile(fn, backend=backend, dynamic=False)
    if cfg.cuda_graphs == "sites":
        return torch.compile(fn, mode="reduce-overhead", dynamic=False)
    return torch.compile(fn, backend=cfg.compile_backend, dynamic=False)
