"""SiD and EDM losses against their formulas in float64; masking vs the official row dropping; EMA; augmentation."""

import math

import pytest
import torch
from support.helpers import sid_generator_loss_rowdrop

from sid_fast.augment import AugmentPipe
from sid_fast.ema import ema_beta, update_ema
from sid_fast.losses import (
    edm_loss_elements,
    sid_generator_loss_ref,
    sigma_from_t,
)


def _triple(n=5, c=3, r=4, dtype=torch.float64):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(n, c, r, r, generator=g, dtype=dtype)
    yr = x + 0.3 * torch.randn(n, c, r, r, generator=g, dtype=dtype)
    yf = yr + 0.2 * torch.randn(n, c, r, r, generator=g, dtype=dtype)
    return x, yr, yf


@pytest.mark.parametrize("alpha", [1.0, 1.2, 0.5])
def test_sid_loss_value_and_gradients_match_formula(alpha):
    x, yr, yf = (t.requires_grad_(True) for t in _triple())
    scale, B = 100.0, 8
    loss, ok = sid_generator_loss_ref(x, yr, yf, alpha, scale, B)
    gx, gr, gf = torch.autograd.grad(loss, (x, yr, yf))
    with torch.no_grad():
        xd, rd, fd = x.double(), yr.double(), yf.double()
        w = (xd - rd).abs().mean(dim=(1, 2, 3), keepdim=True).clamp(min=1e-5)
        d = rd - fd
        expect = (d * ((rd - xd) - alpha * d) / w).sum() * scale / B
        k = scale / B / w
        # dL/dx = -d, dL/dr = (r - x) + (1 - 2 alpha) d, dL/df = -(r - x) + 2 alpha d; w is stop-gradient.
        ex, er, ef = -d * k, ((rd - xd) + (1 - 2 * alpha) * d) * k, (-(rd - xd) + 2 * alpha * d) * k
    assert ok.all()
    torch.testing.assert_close(loss.double(), expect, rtol=1e-6, atol=1e-6)
    for got, want in ((gx, ex), (gr, er), (gf, ef)):
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-7)


def test_sid_weight_is_clipped():
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    yf = x + 1.0
    loss, _ = sid_generator_loss_ref(x, x.clone(), yf, 1.2, 1.0, 1)
    # w = 1e-5: per-element d * (0 - 1.2 d) / 1e-5 = -1.2 / 1e-5 per element.
    torch.testing.assert_close(loss.double(), torch.tensor(-1.2 / 1e-5 * 32, dtype=torch.float64), rtol=1e-5, atol=0)


@pytest.mark.parametrize("nan_rows", [[1], [0, 3], [0, 1, 2, 3, 4]])
def test_masking_equals_official_row_dropping(nan_rows):
    x, yr, yf = _triple(dtype=torch.float32)
    x.requires_grad_(True)
    yr = yr.clone()
    for i, r in enumerate(nan_rows):
        (yr if i % 2 == 0 else yf)[r, 0, 1, 2] = float("nan")
    a, ok = sid_generator_loss_ref(x, yr, yf, 1.2, 100.0, 5)
    (ga,) = torch.autograd.grad(a, x)
    if len(nan_rows) == 5:
        assert a.item() == 0 and not ok.any() and torch.all(ga == 0)
        return
    b = sid_generator_loss_rowdrop(x, yr, yf, 1.2, 100.0, 5)
    (gb,) = torch.autograd.grad(b, x)
    assert ok.sum().item() == 5 - len(nan_rows)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(ga, gb, rtol=1e-6, atol=1e-6)
    assert torch.isfinite(ga).all()


def test_sigma_schedule():
    t = torch.tensor([0.0, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0], dtype=torch.float64)
    s = sigma_from_t(t)
    # official training/sid_loss.py's rho=7 map, computed: t=0 -> 0.002, 0.4 -> 0.965, 0.5 -> 2.515, 0.6 -> 5.84,
    # 0.7 -> 12.38, 0.8 -> 24.41, 1 -> 80.
    torch.testing.assert_close(
        s, torch.tensor([0.002, 0.965, 2.515, 5.84, 12.38, 24.41, 80.0], dtype=torch.float64), rtol=2e-3, atol=0
    )


def test_edm_loss_formula():
    y = torch.randn(4, 1, 4, 4, dtype=torch.float64)
    sigma = torch.tensor([0.1, 0.5, 2.0, 9.0], dtype=torch.float64).reshape(-1, 1, 1, 1)
    noise = torch.randn_like(y)

    def net(x, s, labels, augment_labels=None):  # a denoiser that returns a fixed fraction of its input
        return 0.7 * x

    loss, ok = edm_loss_elements(net, y, sigma, None, None, noise)
    lam = (sigma**2 + 0.25) / (0.5 * sigma) ** 2
    torch.testing.assert_close(loss.double(), lam * (0.7 * (y + sigma * noise) - y) ** 2)
    assert ok.all()


def test_ema_beta_formula():
    # Past the ramp-up: SiD's --ema 0.5 at batch 256 -> 0.99965; ImageNet --ema 2 at batch 8192 -> 0.99716.
    assert math.isclose(ema_beta(256, 10**8, 500), 0.5 ** (256 / 500_000))
    assert abs(ema_beta(256, 10**8, 500) - 0.99965) < 1e-5
    assert abs(ema_beta(8192, 10**9, 2000) - 0.99716) < 1e-5
    # During ramp-up the half-life is 0.05 * images seen.
    assert math.isclose(ema_beta(256, 1000 * 256, 500), 0.5 ** (256 / (0.05 * 256_000)))
    net, ema = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    before = ema.weight.detach().clone()
    update_ema(ema, net, 0.9)
    torch.testing.assert_close(ema.weight, 0.9 * before + 0.1 * net.weight.detach())


def test_augment_identity_and_flips():
    x = torch.randn(16, 3, 8, 8)
    flips = dict(xflip=1, yflip=1, scale=0, rotate_frac=0, aniso=0, translate_frac=0)
    out, labels = AugmentPipe(p=0.0, **flips)(x)  # no geometric transform enabled: no resampling at all
    assert labels.shape == (16, 2) and torch.all(labels == 0) and torch.equal(out, x)
    pipe = AugmentPipe(p=1.0, **flips)
    out, labels = pipe(x, generator=torch.Generator().manual_seed(1))
    expect = torch.where(labels[:, 0].bool()[:, None, None, None], x.flip(3), x)
    expect = torch.where(labels[:, 1].bool()[:, None, None, None], expect.flip(2), expect)
    torch.testing.assert_close(out, expect, atol=1e-5, rtol=0)
    assert 0 < labels[:, 0].sum() < 16 and labels.shape == (16, 2)


def test_augment_label_distributions():
    out, labels = AugmentPipe(p=1.0)(torch.zeros(4000, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    # EDM order: xflip, yflip, scale, cos-1, sin, aniso cos, aniso sin, tx, ty
    torch.testing.assert_close(((labels[:, 3] + 1) ** 2 + labels[:, 4] ** 2), torch.ones(4000), rtol=0, atol=1e-5)
    assert abs(labels[:, 2].std().item() - 1) < 0.05 and abs(labels[:, 7].std().item() - 1) < 0.05
    assert abs(labels[:, 0].mean().item() - 0.5) < 0.05
    _, l12 = AugmentPipe(p=0.12)(torch.zeros(4000, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    frac = (l12[:, 2] != 0).float().mean().item()  # scale applied with probability p
    assert abs(frac - 0.12) < 0.02
    assert abs((l12[:, 0] != 0).float().mean().item() - 0.5) < 0.05  # xflip multiplier 1e8: always eligible
