"""EDM's geometric augmentation for the fake-score loss, exactly as EDM's `training/augment.py` computes it.

SiD's fake-score loss augments the generator's samples with EDM's `AugmentPipe(p, xflip=1e8, yflip=1, scale=1,
rotate_frac=1, aniso=1, translate_frac=1)` (official `sid_train.py`), so the fake score learns under the same
conditioning as the teacher was trained with. Each transform is applied with probability (multiplier * p); the 9
augment labels that condition the network are, in EDM's order:
    0 xflip (0/1)   1 yflip (0/1)   2 scale exponent w   3 cos(rot) - 1   4 sin(rot)
    5 w_aniso cos(r)   6 w_aniso sin(r)   7 translate x (units of 0.125 W)   8 translate y (units of 0.125 H)
with scale 2^(0.2 w), rotation uniform in (-pi, pi), anisotropic scale 2^(0.2 w) along an angle r that is random
with probability aniso_rotate_prob (0.5) and 0 otherwise, translation N(0, 1) * 0.125 * size.

Random draws: the same calls, shapes and order as EDM's pipe (for every enabled transform: its parameter, then its
gate; aniso draws w, r, then the two gates), from `generator`, or from torch's global RNG when it is None, as EDM.

Resampling (EDM's, which matters for the numbers): reflect-pad by a margin that covers the warped corners, upsample
2x with the sym6 wavelet low-pass filter (zero insertion + separable 12-tap filter), warp with bilinear sampling and
zero padding at 2x, filter with sym6 and decimate by 2, crop. The geometric stage runs for every batch, also when no
sample drew a transform, as in EDM (the filters are then close to, not exactly, the identity).
Matrices and filters are float32, as EDM builds them.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F

AUGMENT_DIM = 9

# Low-pass decomposition filter of the Symlet-6 wavelet (PyWavelets' `sym6` dec_lo), the filter EDM resamples with.
SYM6 = (
    0.015404109327027373,
    0.0034907120842174702,
    -0.11799011114819057,
    -0.048311742585633,
    0.4910559419267466,
    0.787641141030194,
    0.3379294217276218,
    -0.07263752278646252,
    -0.021060292512300564,
    0.04472490177066578,
    0.0017677118642428036,
    -0.007800708325034148,
)


# Constants live on the device once, made at their first use (official EDM: misc.constant caches them per value, shape,
# dtype and device), so that a step copies nothing from the host (sid_fast.guard).
@functools.lru_cache(maxsize=4096)
def constant(value, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A tensor of `value` (a number or a tuple, nested) resident on `device`; never written to."""
    return torch.as_tensor(value, dtype=dtype, device=device)


# 3x3 homogeneous 2-D transforms, batched: every argument is a [N] tensor or a Python number.
def _matrix(rows, like: torch.Tensor) -> torch.Tensor:
    """Stack a 3x3 array of numbers/[N] tensors into [N, 3, 3] float32 (numbers broadcast over the batch)."""
    n = like.shape[0]
    cols = [
        (v.to(torch.float32) if isinstance(v, torch.Tensor) else constant(float(v), torch.float32, like.device)).expand(
            n
        )
        for r in rows
        for v in r
    ]
    return torch.stack(cols, dim=-1).reshape(n, 3, 3)


def translate2d(tx, ty, like):
    return _matrix([[1, 0, tx], [0, 1, ty], [0, 0, 1]], like)


def scale2d(sx, sy, like):
    return _matrix([[sx, 0, 0], [0, sy, 0], [0, 0, 1]], like)


def rotate2d(theta, like):
    return _matrix([[theta.cos(), -theta.sin(), 0], [theta.sin(), theta.cos(), 0], [0, 0, 1]], like)


class AugmentPipe:
    def __init__(
        self,
        p: float = 0.12,
        xflip=1e8,
        yflip=1,
        scale=1,
        rotate_frac=1,
        aniso=1,
        translate_frac=1,
        scale_std=0.2,
        rotate_frac_max=1,
        aniso_std=0.2,
        aniso_rotate_prob=0.5,
        translate_frac_std=0.125,
        fixed_margin: bool = False,
    ):
        if not 0 <= p <= 1:
            raise ValueError(f"augment probability must be in [0, 1], got {p}.")
        self.p = float(p)
        self.xflip, self.yflip, self.scale = float(xflip), float(yflip), float(scale)
        self.rotate_frac, self.aniso, self.translate_frac = float(rotate_frac), float(aniso), float(translate_frac)
        self.scale_std, self.rotate_frac_max = float(scale_std), float(rotate_frac_max)
        self.aniso_std, self.aniso_rotate_prob = float(aniso_std), float(aniso_rotate_prob)
        self.translate_frac_std = float(translate_frac_std)
        self.fixed_margin = fixed_margin  # see `warp`: no host sync, the same warp up to rounding (the bf16 fast path)

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None):
        """images [N, C, H, W] -> (augmented images [N, C, H, W], labels [N, 9] float32)."""
        N, C, H, W = images.shape
        dev, g = images.device, generator

        def rand(*shape):
            return torch.rand(shape, device=dev, generator=g)

        def randn(*shape):
            return torch.randn(shape, device=dev, generator=g)

        def gate(w, mult, *shape):
            return torch.where(rand(*shape) < mult * self.p, w, torch.zeros_like(w))

        labels = []
        # Pixel blitting: flips.
        if self.xflip > 0:
            w = gate(torch.randint(2, [N, 1, 1, 1], device=dev, generator=g), self.xflip, N, 1, 1, 1)
            images = torch.where(w == 1, images.flip(3), images)
            labels.append(w)
        if self.yflip > 0:
            w = gate(torch.randint(2, [N, 1, 1, 1], device=dev, generator=g), self.yflip, N, 1, 1, 1)
            images = torch.where(w == 1, images.flip(2), images)
            labels.append(w)

        # General geometric transforms, composed as the inverse map (output pixel -> input pixel), image-centred.
        ref = torch.empty(N, device=dev)
        G_inv = None
        if self.scale > 0:
            w = gate(randn(N), self.scale, N)
            s = w.mul(self.scale_std).exp2()
            G_inv = _compose(G_inv, scale2d(1 / s, 1 / s, ref))
            labels.append(w)
        if self.rotate_frac > 0:
            w = gate((rand(N) * 2 - 1) * (math.pi * self.rotate_frac_max), self.rotate_frac, N)
            G_inv = _compose(G_inv, rotate2d(w, ref))
            labels += [w.cos() - 1, w.sin()]
        if self.aniso > 0:
            w = randn(N)
            r = (rand(N) * 2 - 1) * math.pi
            w = torch.where(rand(N) < self.aniso * self.p, w, torch.zeros_like(w))
            r = torch.where(rand(N) < self.aniso_rotate_prob, r, torch.zeros_like(r))
            s = w.mul(self.aniso_std).exp2()
            G_inv = _compose(G_inv, rotate2d(-r, ref) @ scale2d(1 / s, s, ref) @ rotate2d(r, ref))
            labels += [w * r.cos(), w * r.sin()]
        if self.translate_frac > 0:
            w = gate(randn(2, N), self.translate_frac, 1, N)
            G_inv = _compose(
                G_inv, translate2d(-w[0] * (W * self.translate_frac_std), -w[1] * (H * self.translate_frac_std), ref)
            )
            labels += [w[0], w[1]]
        if G_inv is not None:
            images = warp(images, G_inv, self.fixed_margin)

        labels = torch.cat([x.to(torch.float32).reshape(N, -1) for x in labels], dim=1)
        return images, labels


def _compose(G_inv, M):
    return M if G_inv is None else G_inv @ M


def _sym6(dtype, device, flip: bool) -> torch.Tensor:
    h = tuple(float(v) for v in np.asarray(SYM6, dtype=np.float32))  # float32 values, as the taps always were
    return constant(h[::-1] if flip else h, dtype, device)


def warp(images: torch.Tensor, G_inv: torch.Tensor, fixed_margin: bool = False) -> torch.Tensor:
    """EDM's resampling of `images` [N, C, H, W] by the inverse maps G_inv [N, 3, 3] (pixel units, image-centred).

    EDM pads the batch by the margin its warped corners reach (read on the host: a sync per call). With
    `fixed_margin` it pads by the most that margin can be (size - 1 on every side, what EDM's clamp allows): every
    sample reads the same reflected pixels, only the sampling grid's coordinates are rounded differently (fp32, about
    1e-7 of the image size), and nothing waits for the device."""
    N, C, H, W = images.shape
    dev = images.device
    taps = len(SYM6)
    pad = taps // 4  # 3: the border the 2x filters need
    one = torch.empty(1, device=dev)

    # Margin: how far the warped corners reach outside the image, plus the filters' border, clamped to [0, size-1]
    # (reflect padding cannot exceed the image). One margin for the whole batch, as EDM.
    cx, cy = (W - 1) / 2, (H - 1) / 2
    corners = constant(((-cx, -cy, 1.0), (cx, -cy, 1.0), (cx, cy, 1.0), (-cx, cy, 1.0)), torch.float32, dev)
    cp = G_inv @ corners.t()  # [N, xyz, corner]
    xy = cp[:, :2, :].permute(1, 0, 2).flatten(1)  # [xy, N * corner]
    margin = torch.cat([-xy, xy]).max(dim=1).values  # [x0, y0, x1, y1]
    margin = margin + constant((pad * 2 - cx, pad * 2 - cy) * 2, torch.float32, dev)
    margin = margin.maximum(torch.zeros(4, device=dev))
    margin = margin.minimum(constant((W - 1.0, H - 1.0) * 2, torch.float32, dev))
    if fixed_margin:
        mx0, my0, mx1, my1 = W - 1, H - 1, W - 1, H - 1
    else:
        mx0, my0, mx1, my1 = (int(v) for v in margin.ceil().to(torch.int32).tolist())  # host sync, as EDM

    images = F.pad(images, [mx0, mx1, my0, my1], mode="reflect")
    G_inv = translate2d((mx0 - mx1) / 2, (my0 - my1) / 2, one) @ G_inv  # the padded image's centre moved

    # Upsample 2x: insert zeros between samples, convolve with sym6 (flipped for conv2d's correlation), each axis.
    h_up = _sym6(images.dtype, dev, flip=True).tile([C, 1, 1])
    up_pad = (taps + 1) // 2
    images = torch.stack([images, torch.zeros_like(images)], dim=4).reshape(N, C, images.shape[2], -1)[:, :, :, :-1]
    images = F.conv2d(images, h_up.unsqueeze(2), groups=C, padding=[0, up_pad])
    images = torch.stack([images, torch.zeros_like(images)], dim=3).reshape(N, C, -1, images.shape[3])[:, :, :-1, :]
    images = F.conv2d(images, h_up.unsqueeze(3), groups=C, padding=[up_pad, 0])
    # The same map in the 2x grid, whose pixel centres sit at half-pixel offsets of the original.
    G_inv = scale2d(2, 2, one) @ G_inv @ scale2d(0.5, 0.5, one)
    G_inv = translate2d(-0.5, -0.5, one) @ G_inv @ translate2d(0.5, 0.5, one)

    # Warp into a 2x grid of the original size plus the filter border; grid_sample's normalised coordinates.
    out_h, out_w = (H + pad * 2) * 2, (W + pad * 2) * 2
    in_h, in_w = images.shape[2], images.shape[3]
    G_inv = scale2d(2 / in_w, 2 / in_h, one) @ G_inv @ scale2d(out_w / 2, out_h / 2, one)
    grid = F.affine_grid(G_inv[:, :2, :].to(images.dtype), [N, C, out_h, out_w], align_corners=False)
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    # Downsample 2x: sym6 low-pass with stride 2 along each axis, then crop the border.
    h_down = _sym6(images.dtype, dev, flip=False).tile([C, 1, 1])
    down_pad = (taps - 1) // 2
    images = F.conv2d(images, h_down.unsqueeze(2), groups=C, stride=[1, 2], padding=[0, down_pad])[:, :, :, pad:-pad]
    images = F.conv2d(images, h_down.unsqueeze(3), groups=C, stride=[2, 1], padding=[down_pad, 0])[:, :, pad:-pad, :]
    return images
