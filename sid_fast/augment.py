"""EDM's geometric augmentation for the fake-score loss (shared/reference/sid.md 1b, edm.md 1.4).

The settings are EDM's `AugmentPipe(p, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)`:
each transform is applied with probability (multiplier * p), and the 9 augment labels that condition the network are,
in EDM's order:
    0 xflip (0/1)   1 yflip (0/1)   2 scale exponent w   3 cos(rot) - 1   4 sin(rot)
    5 w_aniso cos(r)   6 w_aniso sin(r)   7 translate x (units of 0.125 W)   8 translate y (units of 0.125 H)
with scale s = 2^(0.2 w), rotation uniform in (-pi, pi), anisotropic scale 2^(0.2 w) along a random angle r,
translation N(0, 1) * 0.125 * size. All labels are zero for the identity.

Resampling: EDM upsamples 2x with a sym6 wavelet filter, warps, and downsamples; we warp with bilinear grid_sample
with reflection padding. The transforms and their labels are EDM's; the interpolation filter is simpler.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

AUGMENT_DIM = 9


def _mat(rows, n, device):
    return torch.stack([torch.stack([torch.as_tensor(v, dtype=torch.float32, device=device).expand(n) for v in r], -1) for r in rows], -2)


def _scale(sx, sy):
    n, dev = sx.shape[0], sx.device
    return _mat([[sx, 0, 0], [0, sy, 0], [0, 0, 1]], n, dev)


def _rotate(a):
    n, dev = a.shape[0], a.device
    return _mat([[a.cos(), -a.sin(), 0], [a.sin(), a.cos(), 0], [0, 0, 1]], n, dev)


def _translate(tx, ty):
    n, dev = tx.shape[0], tx.device
    return _mat([[1, 0, tx], [0, 1, ty], [0, 0, 1]], n, dev)


class AugmentPipe:
    def __init__(self, p: float = 0.12, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1,
                 scale_std=0.2, rotate_frac_max=1, aniso_std=0.2, translate_frac_std=0.125):
        if not 0 <= p <= 1:
            raise ValueError(f"augment probability must be in [0, 1], got {p}.")
        self.p = float(p)
        self.xflip, self.yflip, self.scale, self.rotate_frac = xflip, yflip, scale, rotate_frac
        self.aniso, self.translate_frac = aniso, translate_frac
        self.scale_std, self.rotate_frac_max = scale_std, rotate_frac_max
        self.aniso_std, self.translate_frac_std = aniso_std, translate_frac_std

    def _gate(self, w, mult, shape, gen):
        keep = torch.rand(shape, device=w.device, generator=gen) < mult * self.p
        return torch.where(keep, w, torch.zeros_like(w))

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None):
        """images [N, C, H, W] -> (augmented images, labels [N, 9] fp32)."""
        n, c, h, w_ = images.shape
        dev = images.device
        g = generator
        labels = []

        xf = self._gate(torch.randint(2, [n, 1, 1, 1], device=dev, generator=g), self.xflip, [n, 1, 1, 1], g)
        images = torch.where(xf == 1, images.flip(3), images)
        yf = self._gate(torch.randint(2, [n, 1, 1, 1], device=dev, generator=g), self.yflip, [n, 1, 1, 1], g)
        images = torch.where(yf == 1, images.flip(2), images)
        labels += [xf, yf]

        # Inverse geometric transform (output pixel coords -> input pixel coords), centred at the image centre.
        G_inv = torch.eye(3, device=dev).expand(n, 3, 3)
        ws = self._gate(torch.randn([n], device=dev, generator=g), self.scale, [n], g)
        s = ws.mul(self.scale_std).exp2()
        G_inv = G_inv @ _scale(1 / s, 1 / s)
        labels += [ws]

        wr = (torch.rand([n], device=dev, generator=g) * 2 - 1) * (math.pi * self.rotate_frac_max)
        wr = self._gate(wr, self.rotate_frac, [n], g)
        G_inv = G_inv @ _rotate(wr)
        labels += [wr.cos() - 1, wr.sin()]

        wa = torch.randn([n], device=dev, generator=g)
        r = (torch.rand([n], device=dev, generator=g) * 2 - 1) * math.pi
        wa = self._gate(wa, self.aniso, [n], g)
        sa = wa.mul(self.aniso_std).exp2()
        G_inv = G_inv @ _rotate(-r) @ _scale(1 / sa, sa) @ _rotate(r)
        labels += [wa * r.cos(), wa * r.sin()]

        wt = torch.randn([2, n], device=dev, generator=g)
        wt = self._gate(wt, self.translate_frac, [1, n], g)
        G_inv = G_inv @ _translate(-wt[0] * (w_ * self.translate_frac_std), -wt[1] * (h * self.translate_frac_std))
        labels += [wt[0], wt[1]]

        # Pixel coordinates -> grid_sample's normalised coordinates (align_corners=False: x_n = x_c * 2 / W).
        S = torch.diag(torch.tensor([2 / w_, 2 / h, 1.0], device=dev))
        S_inv = torch.diag(torch.tensor([w_ / 2, h / 2, 1.0], device=dev))
        theta = (S @ G_inv @ S_inv)[:, :2, :]
        grid = F.affine_grid(theta.to(images.dtype), [n, c, h, w_], align_corners=False)
        out = F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        labels = torch.cat([x.to(torch.float32).reshape(n, -1) for x in labels], dim=1)
        return out, labels
