"""EDM's building blocks (Karras et al., "Elucidating the Design Space of Diffusion-Based Generative Models", 2022).

Written for sid_fast from EDM's `training/networks.py` (its formulas, not its code). Parameter and buffer names
match it, so an EDM state_dict loads into these modules with `strict=True`.

GroupNorm+SiLU and attention go through `sid_fast.ops`, whose scoped switch picks EDM's formulation (the reference)
or a fused Triton kernel (sid_fast/kernels/), all reading EDM's layouts (attention: the interleaved qkv channels).
"""

from __future__ import annotations

import contextlib
import threading

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from sid_fast import ops
from sid_fast.casts import cast, cast_group

# ----------------------------------------------------------------------------
# Weight initialisation (only matters when training from scratch, never when loading).


def weight_init(shape, mode: str, fan_in: int, fan_out: int) -> torch.Tensor:
    if mode == "xavier_uniform":
        return np.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1)
    if mode == "xavier_normal":
        return np.sqrt(2 / (fan_in + fan_out)) * torch.randn(*shape)
    if mode == "kaiming_uniform":
        return np.sqrt(3 / fan_in) * (torch.rand(*shape) * 2 - 1)
    if mode == "kaiming_normal":
        return np.sqrt(1 / fan_in) * torch.randn(*shape)
    raise ValueError(f'Invalid init mode "{mode}"')


# ----------------------------------------------------------------------------
# Fully connected layer. Parameters stay fp32; they are cast to the activation dtype on every call (EDM's use_fp16).


class Linear(torch.nn.Module):
    def __init__(self, in_features, out_features, bias=True, init_mode="kaiming_normal", init_weight=1, init_bias=0):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        init_kwargs = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = torch.nn.Parameter(weight_init([out_features, in_features], **init_kwargs) * init_weight)
        self.bias = torch.nn.Parameter(weight_init([out_features], **init_kwargs) * init_bias) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        done = getattr(_affines, "out", None)
        if done is not None and id(self) in done and done[id(self)][0] is x:  # computed by `batched_affines`
            return done[id(self)][1]
        return F.linear(x, cast(self.weight, x.dtype), cast(self.bias, x.dtype))


_affines = threading.local()  # .out: {id(Linear): (input, output)} of the `batched_affines` context


@contextlib.contextmanager
def batched_affines(net: torch.nn.Module, emb: torch.Tensor):
    """Every UNet block's embedding affine layer of `net` applied to `emb` as one matmul (weights and biases
    concatenated; the blocks read their slices): 3 launches per network call instead of two per block, and 3 in
    backward instead of about three per block. Each output is the same dot product as the block's own layer, summed
    in the GEMM's order. Set by sid_fast.perf on the eager bf16 path (`UNetBlock`s not checkpointed)."""
    layers = [m.affine for m in net.modules() if isinstance(m, UNetBlock)]
    if not layers or any(m.bias is None for m in layers):
        yield
        return
    w, b = torch.cat([m.weight for m in layers]), torch.cat([m.bias for m in layers])
    out = F.linear(emb, w.to(emb.dtype), b.to(emb.dtype))  # the frozen bf16 teacher's: one cast each
    parts = out.split([m.out_features for m in layers], dim=1)
    prev = getattr(_affines, "out", None)
    _affines.out = {**(prev or {}), **{id(m): (emb, o) for m, o in zip(layers, parts)}}
    try:
        yield
    finally:
        _affines.out = prev


# ----------------------------------------------------------------------------
# Convolution with EDM's optional up/down resampling by a separable FIR filter.
# With resample_filter=[1,1]: nearest-neighbour x2 upsampling and 2x2 average pooling.


class Conv2d(torch.nn.Module):
    # sid_fast: set by sid_fast.perf on the bf16 fast path. EDM adds the bias after the convolution (a second kernel
    # and, in backward, a reduction for its gradient); with bias_in_conv a convolution without resampling takes the
    # bias itself (added in the convolution's fp32 epilogue before the one rounding to bf16). The reference keeps
    # EDM's add.
    bias_in_conv: bool = False

    def __init__(
        self,
        in_channels,
        out_channels,
        kernel,
        bias=True,
        up=False,
        down=False,
        resample_filter=(1, 1),
        fused_resample=False,
        init_mode="kaiming_normal",
        init_weight=1,
        init_bias=0,
    ):
        assert not (up and down)
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        self.fused_resample = fused_resample
        init_kwargs = dict(mode=init_mode, fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel * kernel)
        self.weight = (
            torch.nn.Parameter(weight_init([out_channels, in_channels, kernel, kernel], **init_kwargs) * init_weight)
            if kernel
            else None
        )
        self.bias = (
            torch.nn.Parameter(weight_init([out_channels], **init_kwargs) * init_bias) if kernel and bias else None
        )
        f = torch.as_tensor(list(resample_filter), dtype=torch.float32)
        f = f.ger(f).unsqueeze(0).unsqueeze(1) / f.sum().square()
        # Registered only when resampling: EDM's state_dict has no filter for plain convolutions.
        self.register_buffer("resample_filter", f if up or down else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b, f = cast(self.weight, x.dtype), cast(self.bias, x.dtype), cast(self.resample_filter, x.dtype)
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0
        c_in = self.in_channels

        if self.fused_resample and self.up and w is not None:
            x = F.conv_transpose2d(
                x, f.mul(4).tile([c_in, 1, 1, 1]), groups=c_in, stride=2, padding=max(f_pad - w_pad, 0)
            )
            x = F.conv2d(x, w, padding=max(w_pad - f_pad, 0))
        elif self.fused_resample and self.down and w is not None:
            x = F.conv2d(x, w, padding=w_pad + f_pad)
            x = F.conv2d(x, f.tile([self.out_channels, 1, 1, 1]), groups=self.out_channels, stride=2)
        else:
            if self.up:
                x = F.conv_transpose2d(x, f.mul(4).tile([c_in, 1, 1, 1]), groups=c_in, stride=2, padding=f_pad)
            if self.down:
                x = F.conv2d(x, f.tile([c_in, 1, 1, 1]), groups=c_in, stride=2, padding=f_pad)
            if w is not None:
                if self.bias_in_conv and not (self.up or self.down):
                    return F.conv2d(x, w, b, padding=w_pad)
                x = F.conv2d(x, w, padding=w_pad)
        if b is not None:
            x = x + b.reshape(1, -1, 1, 1)
        return x


# ----------------------------------------------------------------------------
# Group normalisation with EDM's group rule: min(32, C // 4) groups.


class GroupNorm(torch.nn.Module):
    def __init__(self, num_channels, num_groups=32, min_channels_per_group=4, eps=1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(num_channels))
        self.bias = torch.nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(
            x,
            num_groups=self.num_groups,
            weight=cast(self.weight, x.dtype),
            bias=cast(self.bias, x.dtype),
            eps=self.eps,
        )

    def silu(
        self, x: torch.Tensor, scale: torch.Tensor | None = None, shift: torch.Tensor | None = None
    ) -> torch.Tensor:
        """silu(shift + self(x) * (scale + 1)) (scale, shift: [N, C] or None); fused where ops' switch says so."""
        return ops.group_norm_silu(x, self.weight, self.bias, self.num_groups, self.eps, scale, shift)


# ----------------------------------------------------------------------------
# The UNet block of both DDPM++/NCSN++ (adaptive_scale=False) and ADM (adaptive_scale=True), with optional
# self-attention. The qkv convolution's output keeps EDM's interleaved per-channel layout:
# channel = head * 3d + c * 3 + j, j in {q, k, v} (EDM training/networks.py, UNetBlock).


class UNetBlock(torch.nn.Module):
    def __init__(
        self,
        in_channels,
        out_channels,
        emb_channels,
        up=False,
        down=False,
        attention=False,
        num_heads=None,
        channels_per_head=64,
        dropout=0,
        skip_scale=1,
        eps=1e-5,
        resample_filter=(1, 1),
        resample_proj=False,
        adaptive_scale=True,
        init=None,
        init_zero=None,
        init_attn=None,
    ):
        super().__init__()
        init = dict(init or {})
        init_zero = dict(init_weight=0) if init_zero is None else dict(init_zero)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.emb_channels = emb_channels
        self.num_heads = (
            0 if not attention else num_heads if num_heads is not None else out_channels // channels_per_head
        )
        self.dropout = dropout
        self.skip_scale = float(skip_scale)
        self.adaptive_scale = adaptive_scale

        self.norm0 = GroupNorm(num_channels=in_channels, eps=eps)
        self.conv0 = Conv2d(
            in_channels, out_channels, kernel=3, up=up, down=down, resample_filter=resample_filter, **init
        )
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(num_channels=out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, kernel=3, **init_zero)

        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(
                in_channels, out_channels, kernel=kernel, up=up, down=down, resample_filter=resample_filter, **init
            )

        if self.num_heads:
            self.norm2 = GroupNorm(num_channels=out_channels, eps=eps)
            self.qkv = Conv2d(
                out_channels, out_channels * 3, kernel=1, **(init_attn if init_attn is not None else init)
            )
            self.proj = Conv2d(out_channels, out_channels, kernel=1, **init_zero)

    # sid_fast: set once by sid_fast.perf when a run is built (--checkpointing). While autograd records, "full" keeps
    # only the block's inputs and recomputes all of its activations in backward; "selective" keeps the outputs of its
    # dense convolutions, matmuls and attention and recomputes the rest (GroupNorm, SiLU, dropout with the same RNG
    # draws, adds, dtype casts, resampling filters), see `selective_checkpoint_policy`. With checkpoint_while_trained
    # False a block checkpoints only while its parameters are frozen (a network called as a function of its input).
    checkpoint_activations: str | None = None
    checkpoint_while_trained: bool = True
    # sid_fast: set by sid_fast.perf on the eager bf16 fast path: the block casts its parameters as one group
    # (sid_fast.casts), inside the checkpointed function when it is checkpointed (recomputed the same way).
    # With batched_affine (the network's `batched_affines`) the embedding's affine layer is not in the group.
    group_casts: bool = False
    batched_affine: bool = False

    def cast_targets(self, x_dtype: torch.dtype, emb_dtype: torch.dtype) -> list:
        """(tensor, dtype it is used in) of the block's parameters and resampling filters: the embedding's affine
        layer runs in the embedding's dtype, the rest of the block in the activations'."""
        affine = {id(p) for p in self.affine.parameters()}
        targets = [(p, emb_dtype if id(p) in affine else x_dtype) for p in self.parameters()]
        if self.batched_affine:
            targets = [(p, d) for p, d in targets if id(p) not in affine]
        return targets + [(b, x_dtype) for name, b in self.named_buffers() if name.endswith("resample_filter")]

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return call_block(self, x, emb, self.conv0.weight)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        orig = x
        x = self.conv0(self.norm0.silu(x))

        params = self.affine(emb).to(x.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(chunks=2, dim=1)  # EDM: scale is the first half.
            x = self.norm1.silu(x, scale, shift)
        else:
            x = self.norm1.silu(x + params[:, :, None, None])

        x = self.conv1(F.dropout(x, p=self.dropout, training=self.training))
        x = x + (self.skip(orig) if self.skip is not None else orig)
        x = x * self.skip_scale

        if self.num_heads:
            a = ops.attention_from_conv(self.qkv, self.norm2(x), self.num_heads)
            x = (self.proj(a) + x) * self.skip_scale
        return x


def call_block(block, x: torch.Tensor, emb: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """block._forward(x, emb), checkpointed as block.checkpoint_activations says ("full" or "selective") while autograd
    records something of it (its inputs or `weight`, one of its parameters; with block.checkpoint_while_trained False
    only while `weight` is frozen); shared by EDM's and EDM2's blocks."""
    mode = block.checkpoint_activations
    if weight.requires_grad and not block.checkpoint_while_trained:
        mode = None
    if mode and torch.is_grad_enabled() and (x.requires_grad or emb.requires_grad or weight.requires_grad):
        extra = dict(context_fn=_selective_context) if mode == "selective" else {}
        return checkpoint(_grouped_forward, block, x, emb, use_reentrant=False, **extra)
    return _grouped_forward(block, x, emb)


def _grouped_forward(block, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    if getattr(block, "group_casts", False) and not torch.compiler.is_compiling():
        with cast_group(block.cast_targets(x.dtype, emb.dtype)):
            return block._forward(x, emb)
    return block._forward(x, emb)


def selective_checkpoint_policy(ctx, op, *args, **kwargs):
    """What a block checkpointed with "selective" keeps: the outputs of dense convolutions (groups == 1), matmuls and
    attention, whose recomputation would cost tensor-core FLOPs; everything else is memory-bound and recomputed in
    backward (GroupNorm+SiLU, dropout masks, adds, per-layer weight casts, depthwise resampling filters)."""
    aten = torch.ops.aten
    if op is aten.convolution.default:
        keep = args[8] == 1  # groups
    elif getattr(op, "namespace", None) == "sid_fast_kernels":
        keep = op.name() == _KERNEL_ATTENTION
    else:
        keep = op in _SAVED_OPS
    return CheckpointPolicy.MUST_SAVE if keep else CheckpointPolicy.PREFER_RECOMPUTE


_SAVED_OPS = frozenset(
    {
        torch.ops.aten.mm.default,
        torch.ops.aten.addmm.default,
        torch.ops.aten.bmm.default,
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
        torch.ops.aten._scaled_dot_product_efficient_attention.default,
        torch.ops.aten._scaled_dot_product_flash_attention.default,
        torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    }
)
_KERNEL_ATTENTION = "sid_fast_kernels::edm_flash_attention"  # registered by sid_fast/kernels/attention.py when imported


def _selective_context():
    return create_selective_checkpoint_contexts(selective_checkpoint_policy)


# ----------------------------------------------------------------------------
# Timestep embeddings. DDPM++ and ADM use the positional one; NCSN++ the random Fourier one, whose `freqs`
# buffer is data (it was drawn at random when the teacher was built) and must be loaded.


class PositionalEmbedding(torch.nn.Module):
    def __init__(self, num_channels, max_positions=10000, endpoint=False):
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.num_channels // 2
        freqs = torch.arange(start=0, end=half, dtype=torch.float32, device=x.device)
        freqs = freqs / (half - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** freqs
        x = x.ger(freqs.to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


class FourierEmbedding(torch.nn.Module):
    def __init__(self, num_channels, scale=16):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.ger((2 * np.pi * self.freqs).to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)
