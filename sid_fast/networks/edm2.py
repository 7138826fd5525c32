"""EDM2's magnitude-preserving networks (Karras et al., "Analyzing and Improving the Training Dynamics of Diffusion
Models", CVPR 2024), written for sid_fast from the formulas of the official edm2 training/networks_edm2.py.

The module tree, parameter names and shapes are EDM2's (`unet.enc.64x64_block0.conv_res0.weight`, ...), so an EDM2
snapshot's `ema` state_dict loads with strict=True; the numerics follow the official code: norms in fp32 with
eps 1e-4 added to the RMS, weight normalisation per output row over the fan-in, the interleaved qkv layout
(channel (head*C_h + c)*3 + {q,k,v}), activations clipped at +-256, gains initialised to zero.

One deliberate difference: *forced* weight normalisation. Upstream MPConv overwrites its weight with the normalised
weight inside every train-mode forward. That in-place write makes a network that is called twice in one autograd
graph fail in backward (SiDA calls the fake score on fake and on real images before one backward). Here the forward
only normalises functionally, and `force_weight_norm_(net)` rewrites the weights under no_grad, once per optimizer
step, before the step's first train-mode forward: for a single call per step the arithmetic is the upstream one
(normalize(normalize(w)) in the forward that follows), and the double call is safe. The trainer calls it.

Also sid_fast's: `return_flag` ("decoder", "encoder", "encoder_decoder") for SiDA's discriminator logits (the channel
mean of the last encoder block's output, official sida branch sida_training_edm2/sida_networks_edm2.py), `compute_dtype`
for the fast path (bf16) as on the EDM wrappers, `logvar_channels=0` for a generator without the log-variance head (the
official SiD-EDM2 generator class has none), and attention through `sid_fast.ops` when a fast implementation is
selected (q, k, v are pixel-normalised first, then EDM's attention op is the same formula).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from sid_fast import ops
from sid_fast.networks.common import prepare_inputs
from sid_fast.networks.layers import call_block

# ----------------------------------------------------------------------------
# Magnitude-preserving primitives (edm2 training/networks_edm2.py L20-67).


def normalize(x: torch.Tensor, dim=None, eps: float = 1e-4) -> torch.Tensor:
    """x / (eps + RMS(x)) over `dim` (default: all but the first), the norm taken in fp32."""
    if dim is None:
        dim = list(range(1, x.ndim))
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32)
    norm = torch.add(eps, norm, alpha=math.sqrt(norm.numel() / x.numel()))
    return x / norm.to(x.dtype)


@functools.lru_cache(maxsize=64)
def _resample_kernel(f: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The normalised outer product of f, [1, 1, k, k], made once per filter, dtype and device (official EDM2:
    misc.const_like caches it) and never written to."""
    f = np.asarray(f, dtype=np.float32)
    if f.ndim != 1 or len(f) % 2:
        raise ValueError(f"resample filter must be 1-D of even length, got {f.tolist()}")
    f = f / f.sum()
    return torch.as_tensor(np.outer(f, f)[None, None], dtype=dtype, device=device)


def resample(x: torch.Tensor, f=(1, 1), mode: str = "keep") -> torch.Tensor:
    """'keep', 'down' (depthwise stride-2 conv with the normalised outer product of f) or 'up' (transposed, x4)."""
    if mode == "keep":
        return x
    pad = (len(f) - 1) // 2
    k = _resample_kernel(tuple(f), x.dtype, x.device)
    c = x.shape[1]
    if mode == "down":
        return torch.nn.functional.conv2d(x, k.tile([c, 1, 1, 1]), groups=c, stride=2, padding=(pad,))
    if mode != "up":
        raise ValueError(f"resample mode must be 'keep', 'down' or 'up', got {mode!r}")
    return torch.nn.functional.conv_transpose2d(x, (k * 4).tile([c, 1, 1, 1]), groups=c, stride=2, padding=(pad,))


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(x) / 0.596


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t**2)


def mp_cat(a: torch.Tensor, b: torch.Tensor, dim: int = 1, t: float = 0.5) -> torch.Tensor:
    na, nb = a.shape[dim], b.shape[dim]
    c = math.sqrt((na + nb) / ((1 - t) ** 2 + t**2))
    return torch.cat([a * (c / math.sqrt(na) * (1 - t)), b * (c / math.sqrt(nb) * t)], dim=dim)


# ----------------------------------------------------------------------------
# Layers.


class MPFourier(torch.nn.Module):
    """cos(2 pi (x f + p)) * sqrt(2) with random frequencies f ~ N(0, bandwidth^2) and phases p ~ U(0, 1), stored as
    buffers `freqs` = 2 pi f and `phases` = 2 pi p; computed in fp32."""

    def __init__(self, num_channels: int, bandwidth: float = 1):
        super().__init__()
        self.register_buffer("freqs", 2 * np.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer("phases", 2 * np.pi * torch.rand(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.outer(x.to(torch.float32), self.freqs.to(torch.float32)) + self.phases.to(torch.float32)
        return (y.cos() * np.sqrt(2)).to(x.dtype)


class MPConv(torch.nn.Module):
    """Magnitude-preserving linear (kernel []) or 2-D convolution (kernel [k, k]) without bias: the weight is
    normalised per output row, scaled by gain / sqrt(fan_in) and cast to the input's dtype. Forced normalisation of
    the stored weight is `force_weight_norm_` (see the module docstring)."""

    # The fast path sets this on the frozen teacher (perf.prepare_networks): at its first call with gain 1 and inputs of
    # the stored weight's dtype, the weight is replaced by what every such call computes from it (normalised, scaled,
    # cast: the same ops once, so the same bits), and later calls use it as is (about six ops fewer per layer and call).
    fold_when_frozen = False
    _folded = False

    def __init__(self, in_channels: int, out_channels: int, kernel):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.weight = torch.nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    def effective_weight(self, dtype: torch.dtype, gain=1) -> torch.Tensor:
        """What a call uses: the weight normalised per output row, times gain / sqrt(fan_in), in `dtype`."""
        w = normalize(self.weight.to(torch.float32))
        return (w * (gain / np.sqrt(w[0].numel()))).to(dtype)

    def forward(self, x: torch.Tensor, gain=1) -> torch.Tensor:
        foldable = (self.fold_when_frozen and not self.weight.requires_grad and x.dtype == self.weight.dtype
                    and not isinstance(gain, torch.Tensor) and gain == 1)  # fmt: skip
        if foldable:
            if not self._folded:
                with torch.no_grad():
                    self.weight.copy_(self.effective_weight(x.dtype))
                self._folded = True
            w = self.weight
        elif self._folded:
            raise RuntimeError(
                "an MPConv whose weight was folded for gain 1 and its own dtype is called otherwise; clear "
                "fold_when_frozen before its first call"
            )
        else:
            w = self.effective_weight(x.dtype, gain)
        if w.ndim == 2:
            return x @ w.t()
        return torch.nn.functional.conv2d(x, w, padding=(w.shape[-1] // 2,))


@torch.no_grad()
def force_weight_norm_(net: torch.nn.Module) -> None:
    """EDM2's forced weight normalisation: every MPConv weight <- normalize(weight), in place, outside autograd.
    A weight sharded by FSDP2 (a DTensor split along its first dimension, the output rows) is normalised shard by
    shard: each row is whole on one rank and the norm is per row, so no communication is needed."""
    for m in net.modules():
        if isinstance(m, MPConv):
            w = m.weight.to_local() if hasattr(m.weight, "to_local") else m.weight
            if w.numel():  # an FSDP2 shard can be empty when a layer has fewer rows than ranks
                w.copy_(normalize(w.to(torch.float32)))


def has_forced_weight_norm(net: torch.nn.Module) -> bool:
    return any(isinstance(m, MPConv) for m in net.modules())


def _attention_reference(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """EDM2's attention as upstream writes it: pixel-normalised q, k, v per head, softmax in the activation dtype."""
    n, _, h, w = qkv.shape
    y = qkv.reshape(n, num_heads, -1, 3, h * w)
    q, k, v = normalize(y, dim=2).unbind(3)
    weights = torch.einsum("nhcq,nhck->nhqk", q, k / np.sqrt(q.shape[2])).softmax(dim=3)
    return torch.einsum("nhqk,nhck->nhcq", weights, v).reshape(n, -1, h, w)


def attention(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """EDM2 attention over the interleaved qkv [N, 3C, H, W] -> [N, C, H, W]. With a fast attention selected in
    `sid_fast.ops` (sdpa or the Triton kernel), q, k and v are pixel-normalised in their interleaved layout first and
    EDM's attention op (same layout, same 1/sqrt(C_h) scale, softmax over keys) does the rest: the same formula in
    another order of rounding. The reference keeps upstream's einsum."""
    if ops.current().attention == "edm":
        return _attention_reference(qkv, num_heads)
    n, c3, h, w = qkv.shape
    qkv = normalize(qkv.reshape(n, num_heads, c3 // (3 * num_heads), 3, h * w), dim=2).reshape(n, c3, h, w)
    return ops.attention(qkv, num_heads)


class Block(torch.nn.Module):
    """EDM2's residual block, flavor 'enc' or 'dec', optional resampling and self-attention."""

    def __init__(
        self,
        in_channels,
        out_channels,
        emb_channels,
        flavor="enc",
        resample_mode="keep",
        resample_filter=(1, 1),
        attention=False,
        channels_per_head=64,
        dropout=0,
        res_balance=0.3,
        attn_balance=0.3,
        clip_act=256,
    ):
        super().__init__()
        self.out_channels = out_channels
        self.flavor = flavor
        self.resample_filter = list(resample_filter)
        self.resample_mode = resample_mode
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.dropout = dropout
        self.res_balance = res_balance
        self.attn_balance = attn_balance
        self.clip_act = clip_act
        self.emb_gain = torch.nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels, kernel=[3, 3])
        self.emb_linear = MPConv(emb_channels, out_channels, kernel=[])
        self.conv_res1 = MPConv(out_channels, out_channels, kernel=[3, 3])
        self.conv_skip = MPConv(in_channels, out_channels, kernel=[1, 1]) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, kernel=[1, 1]) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, kernel=[1, 1]) if self.num_heads else None

    # sid_fast: activation checkpointing set once by sid_fast.perf (--checkpointing blocks / selective), as on EDM's
    # UNetBlock: "full" recomputes the whole block in backward, "selective" keeps convolution, matmul and attention
    # outputs (sid_fast.networks.layers.selective_checkpoint_policy and call_block).
    checkpoint_activations: str | None = None
    checkpoint_while_trained: bool = True

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return call_block(self, x, emb, self.conv_res0.weight)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = resample(x, f=self.resample_filter, mode=self.resample_mode)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)  # pixel norm
        y = self.conv_res0(mp_silu(x))
        c = self.emb_linear(emb, gain=self.emb_gain) + 1
        y = mp_silu(y * c[:, :, None, None].to(y.dtype))
        if self.training and self.dropout != 0:
            y = torch.nn.functional.dropout(y, p=self.dropout)
        y = self.conv_res1(y)
        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.res_balance)
        if self.num_heads:
            y = attention(self.attn_qkv(x), self.num_heads)
            x = mp_sum(x, self.attn_proj(y), t=self.attn_balance)
        if self.clip_act is not None:
            x = x.clamp(-self.clip_act, self.clip_act)  # upstream clips in place; same values
        return x


class UNet(torch.nn.Module):
    """EDM2's U-Net: encoder levels img_resolution >> level, decoder with in0/in1 at the lowest level, skips joined by
    mp_cat; a constant ones channel is appended to the input; the output convolution's gain starts at zero."""

    def __init__(
        self,
        img_resolution,
        img_channels,
        label_dim,
        model_channels=192,
        channel_mult=(1, 2, 3, 4),
        channel_mult_noise=None,
        channel_mult_emb=None,
        num_blocks=3,
        attn_resolutions=(16, 8),
        label_balance=0.5,
        concat_balance=0.5,
        **block_kwargs,
    ):
        super().__init__()
        cblock = [model_channels * m for m in channel_mult]
        cnoise = model_channels * channel_mult_noise if channel_mult_noise is not None else cblock[0]
        cemb = model_channels * channel_mult_emb if channel_mult_emb is not None else max(cblock)
        self.label_balance = label_balance
        self.concat_balance = concat_balance
        self.out_gain = torch.nn.Parameter(torch.zeros([]))
        self.emb_fourier = MPFourier(cnoise)
        self.emb_noise = MPConv(cnoise, cemb, kernel=[])
        self.emb_label = MPConv(label_dim, cemb, kernel=[]) if label_dim else None

        self.enc = torch.nn.ModuleDict()
        cout = img_channels + 1
        for level, channels in enumerate(cblock):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, channels
                self.enc[f"{res}x{res}_conv"] = MPConv(cin, cout, kernel=[3, 3])
            else:
                self.enc[f"{res}x{res}_down"] = Block(
                    cout, cout, cemb, flavor="enc", resample_mode="down", **block_kwargs
                )
            for idx in range(num_blocks):
                cin, cout = cout, channels
                self.enc[f"{res}x{res}_block{idx}"] = Block(
                    cin, cout, cemb, flavor="enc", attention=res in attn_resolutions, **block_kwargs
                )
        self.last_encoder_block = list(self.enc.keys())[-1]

        self.dec = torch.nn.ModuleDict()
        skips = [block.out_channels for block in self.enc.values()]
        for level, channels in reversed(list(enumerate(cblock))):
            res = img_resolution >> level
            if level == len(cblock) - 1:
                self.dec[f"{res}x{res}_in0"] = Block(cout, cout, cemb, flavor="dec", attention=True, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = Block(cout, cout, cemb, flavor="dec", **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = Block(cout, cout, cemb, flavor="dec", resample_mode="up", **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), channels
                self.dec[f"{res}x{res}_block{idx}"] = Block(
                    cin, cout, cemb, flavor="dec", attention=res in attn_resolutions, **block_kwargs
                )
        self.out_conv = MPConv(cout, img_channels, kernel=[3, 3])

    def forward(self, x, noise_labels, class_labels, return_flag: str = "decoder"):
        emb = self.emb_noise(self.emb_fourier(noise_labels))
        if self.emb_label is not None:
            emb = mp_sum(emb, self.emb_label(class_labels * np.sqrt(class_labels.shape[1])), t=self.label_balance)
        emb = mp_silu(emb)

        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for name, block in self.enc.items():
            x = block(x) if name.endswith("_conv") else block(x, emb)
            skips.append(x)
        if return_flag != "decoder":
            logits = x.mean(dim=1, keepdim=True)  # SiDA's discriminator: channel mean of the last encoder output
            if return_flag == "encoder":
                return logits
        for name, block in self.dec.items():
            if "block" in name:
                x = mp_cat(x, skips.pop(), t=self.concat_balance)
            x = block(x, emb)
        x = self.out_conv(x, gain=self.out_gain)
        return x if return_flag == "decoder" else (x, logits)


class Precond(torch.nn.Module):
    """EDM2's preconditioner: D(x, sigma) = c_skip x + c_out F(c_in x, ln(sigma)/4) in EDM's sigma parametrisation,
    and the learned log-variance u(sigma) (`return_logvar`) used by EDM2's loss and by SiD on EDM2."""

    def __init__(
        self, img_resolution, img_channels, label_dim, use_fp16=True, sigma_data=0.5, logvar_channels=128, **unet_kwargs
    ):
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.sigma_data = sigma_data
        self.compute_dtype: torch.dtype | None = None  # sid_fast: the UNet body's dtype on the fast path
        self.unet = UNet(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim, **unet_kwargs)
        if logvar_channels:
            self.logvar_fourier = MPFourier(logvar_channels)
            self.logvar_linear = MPConv(logvar_channels, 1, kernel=[])
        else:  # sid_fast: a generator (official EDM_2_Precond_Generator) has no log-variance head
            self.logvar_fourier = self.logvar_linear = None

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def forward(self, x, sigma, class_labels=None, force_fp32=False, return_logvar=False, return_flag="decoder"):
        """D(x, sigma); with return_logvar also u(sigma) [N, 1, 1, 1]; return_flag as on sid_fast's EDM wrappers
        ("encoder": logits only; "encoder_decoder": (D, logits)); u comes last when both are asked for."""
        x, sigma, class_labels, dtype = prepare_inputs(self, x, sigma, class_labels, force_fp32)
        sd = self.sigma_data
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sd**2 + sigma**2).sqrt()
        c_noise = sigma.flatten().log() / 4
        out = self.unet((c_in * x).to(dtype), c_noise, class_labels, return_flag=return_flag)
        if return_flag == "encoder":
            result = (out.to(torch.float32),)
        elif return_flag == "encoder_decoder":
            result = (c_skip * x + c_out * out[0].to(torch.float32), out[1].to(torch.float32))
        else:
            result = (c_skip * x + c_out * out.to(torch.float32),)
        if return_logvar:
            result = result + (self.logvar(c_noise),)
        return result[0] if len(result) == 1 else result

    def logvar(self, c_noise: torch.Tensor) -> torch.Tensor:
        if self.logvar_linear is None:
            raise ValueError("this EDM2 network was built without the log-variance head (logvar_channels=0)")
        return self.logvar_linear(self.logvar_fourier(c_noise)).reshape(-1, 1, 1, 1)


# ----------------------------------------------------------------------------
# The published ImageNet-512 configurations (edm2 train_edm2.py, presets edm2-img512-{xs..xxl}).

_IMG512 = dict(
    img_resolution=64,
    img_channels=4,
    label_dim=1000,
    channel_mult=[1, 2, 3, 4],
    num_blocks=3,
    attn_resolutions=[16, 8],
    use_fp16=True,
    sigma_data=0.5,
    logvar_channels=128,
)
EDM2_IMG512 = {
    size: dict(_IMG512, model_channels=ch, dropout=dropout)
    for size, ch, dropout in (
        ("xs", 128, 0.0),
        ("s", 192, 0.0),
        ("m", 256, 0.1),
        ("l", 320, 0.1),
        ("xl", 384, 0.1),
        ("xxl", 448, 0.1),
    )
}


def edm2_config(size: str) -> dict:
    """Init kwargs of the published EDM2 ImageNet-512 network of `size` (xs, s, m, l, xl, xxl)."""
    key = size.lower().removeprefix("edm2-img512-")
    if key not in EDM2_IMG512:
        raise ValueError(f"Unknown EDM2 size {size!r}; known: {list(EDM2_IMG512)}.")
    return dict(
        EDM2_IMG512[key],
        channel_mult=list(EDM2_IMG512[key]["channel_mult"]),
        attn_resolutions=list(EDM2_IMG512[key]["attn_resolutions"]),
    )


__all__ = [
    "normalize",
    "resample",
    "mp_silu",
    "mp_sum",
    "mp_cat",
    "MPFourier",
    "MPConv",
    "Block",
    "UNet",
    "Precond",
    "force_weight_norm_",
    "has_forced_weight_norm",
    "EDM2_IMG512",
    "edm2_config",
]
