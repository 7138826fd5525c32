"""EDM's augmentation: draw order, labels, aniso_rotate_prob, and the resampling against a float64 construction.

The reference below is written independently of sid_fast/augment.py: numpy float64 matrices, np.convolve for the
sym6 up/down filters, and explicit bilinear interpolation with zero padding instead of affine_grid/grid_sample.
It implements the same specification (EDM's training/augment.py): its draws, its matrices (including the half-pixel
shifts around the 2x grid), its margin rule and its filters.
"""

import math

import numpy as np
import pytest
import torch

from sid_fast.augment import SYM6, AugmentPipe

ONLY = dict(xflip=0, yflip=0, scale=0, rotate_frac=0, aniso=0, translate_frac=0)
EDM_SETTINGS = dict(xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)


def _ref_warp(images, G):
    """float64 resampling of images [N, C, H, W] (numpy) by the inverse maps G [N, 3, 3], EDM's specification."""
    N, C, H, W = images.shape
    h = np.asarray(SYM6, dtype=np.float64)
    pad = len(h) // 4
    cx, cy = (W - 1) / 2, (H - 1) / 2
    corners = np.array([[-cx, -cy, 1], [cx, -cy, 1], [cx, cy, 1], [-cx, cy, 1]], dtype=np.float64).T
    pts = np.concatenate([G[i] @ corners for i in range(N)], axis=1)[:2]  # [xy, N*4]
    m = np.concatenate([-pts, pts]).max(axis=1) + np.array([pad * 2 - cx, pad * 2 - cy] * 2)
    mx0, my0, mx1, my1 = np.ceil(np.clip(m, 0, [W - 1, H - 1, W - 1, H - 1])).astype(int)
    x = np.pad(images, ((0, 0), (0, 0), (my0, my1), (mx0, mx1)), mode="reflect")

    def up(v):  # 1-D: zero insertion, full convolution with h, the 2n samples EDM keeps
        z = np.zeros(2 * len(v) - 1)
        z[::2] = v
        return np.convolve(z, h)[5 : 5 + 2 * len(v)]

    def down(v):  # 1-D: correlation with h at stride 2 with 5 samples of zero padding
        zp = np.concatenate([np.zeros(5), v, np.zeros(5)])
        return np.array([np.dot(h, zp[2 * k : 2 * k + len(h)]) for k in range((len(v) + 10 - len(h)) // 2 + 1)])

    x = np.apply_along_axis(up, 3, x)
    x = np.apply_along_axis(up, 2, x)
    Hi, Wi = x.shape[2], x.shape[3]
    Ho, Wo = (H + 2 * pad) * 2, (W + 2 * pad) * 2

    def T(tx, ty):
        return np.array([[1, 0, tx], [0, 1, ty], [0, 0, 1.0]])

    def S(sx, sy):
        return np.diag([sx, sy, 1.0])

    out = np.zeros((N, C, Ho, Wo))
    jj, ii = np.meshgrid(np.arange(Wo), np.arange(Ho))
    dst = np.stack([jj + 0.5 - Wo / 2, ii + 0.5 - Ho / 2, np.ones_like(jj, dtype=float)]).reshape(3, -1)
    for n in range(N):
        Gu = T(-0.5, -0.5) @ S(2, 2) @ T((mx0 - mx1) / 2, (my0 - my1) / 2) @ G[n] @ S(0.5, 0.5) @ T(0.5, 0.5)
        src = Gu @ dst
        xs, ys = src[0] + (Wi - 1) / 2, src[1] + (Hi - 1) / 2
        x0, y0 = np.floor(xs).astype(int), np.floor(ys).astype(int)
        fx, fy = xs - x0, ys - y0
        acc = np.zeros((C, xs.size))
        for dy, dx, wgt in ((0, 0, (1 - fx) * (1 - fy)), (0, 1, fx * (1 - fy)), (1, 0, (1 - fx) * fy), (1, 1, fx * fy)):
            yy, xx = y0 + dy, x0 + dx
            inside = (yy >= 0) & (yy < Hi) & (xx >= 0) & (xx < Wi)
            vals = np.zeros((C, xs.size))
            vals[:, inside] = x[n][:, yy[inside], xx[inside]]
            acc += vals * wgt
        out[n] = acc.reshape(C, Ho, Wo)
    out = np.apply_along_axis(down, 3, out)[:, :, :, pad:-pad]
    out = np.apply_along_axis(down, 2, out)[:, :, pad:-pad, :]
    return out


def _images(N=6, C=2, H=16, W=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand([N, C, H, W], generator=g) * 2 - 1


def test_labels_follow_edms_draws_in_order():
    x = _images(N=64)
    pipe = AugmentPipe(p=0.6)
    _, labels = pipe(x, generator=torch.Generator().manual_seed(11))
    want, _, _, _ = _edm_draws(torch.Generator().manual_seed(11), 64, 16, 16, 0.6, EDM_SETTINGS)
    assert labels.dtype == torch.float32 and labels.shape == (64, 9)
    np.testing.assert_allclose(labels.double().numpy(), want, atol=1e-5, rtol=0)
    assert (labels[:, 2] != 0).any() and (labels[:, 2] == 0).any()  # p = 0.6 gates some, not all


def test_global_rng_when_no_generator():
    x = _images()
    torch.manual_seed(5)
    a, la = AugmentPipe(p=0.5)(x)
    b, lb = AugmentPipe(p=0.5)(x, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and torch.equal(la, lb)


def test_aniso_rotate_prob_zeroes_the_angle_for_half():
    """With p = 1 every sample gets anisotropy; its angle r is zeroed with probability 1 - 0.5, which shows as
    label 6 = w sin(r) = 0 exactly. 4,000 samples: the fraction is 0.5 +- 0.008 (one sigma); asserted within 0.04."""
    x = torch.zeros([4000, 1, 4, 4])
    _, labels = AugmentPipe(p=1.0, **dict(ONLY, aniso=1))(x, generator=torch.Generator().manual_seed(0))
    frac = (labels[:, 1] == 0).double().mean().item()  # only the aniso labels: [w cos r, w sin r]
    assert abs(frac - 0.5) < 0.04, frac
    assert (labels[:, 0] != 0).all()


@pytest.mark.parametrize("which", ["scale", "rotate_frac", "aniso", "translate_frac", "all"])
def test_resampling_matches_float64_construction(which):
    """One transform at a time (and all together) with p = 1: images within 1e-4 of the float64 construction
    (float32 round-off through two 12-tap filters and a bilinear warp is ~1e-6 on images of size 1), labels 1e-5."""
    N, C, H, W = 5, 2, 16, 16
    x = _images(N, C, H, W, seed=1)
    mult = EDM_SETTINGS if which == "all" else dict(ONLY, **{which: 1})
    pipe = AugmentPipe(p=1.0, **mult)
    got, labels = pipe(x, generator=torch.Generator().manual_seed(3))
    # Replay: the pipe only draws for enabled transforms, so build the expected draws with the same enabled set.
    g = torch.Generator().manual_seed(3)
    lab, G, xf, yf = _edm_draws(g, N, W, H, 1.0, mult)
    np.testing.assert_allclose(labels.double().numpy(), lab, atol=1e-5, rtol=0)
    xin = x.double().numpy()
    xin = np.where(xf[:, None, None, None] == 1, xin[..., ::-1], xin)
    xin = np.where(yf[:, None, None, None] == 1, xin[..., ::-1, :], xin)
    want = _ref_warp(xin, G)
    err = np.abs(got.double().numpy() - want).max()
    assert err < 1e-4, err
    assert np.abs(want - xin).max() > 0.05  # the transform did something


def _edm_draws(g, N, W, H, p, mult):
    """Replay EDM's draws, in its order, for the enabled transforms (a disabled one draws nothing), in float64.
    Returns (labels [N, k], inverse maps [N, 3, 3] as EDM composes them, xflip [N], yflip [N])."""
    lab, mats = [], [np.eye(3) for _ in range(N)]
    f64 = lambda t: t.double().numpy()  # noqa: E731
    xf = yf = np.zeros(N, dtype=np.int64)

    def rot(t):
        return np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])

    if mult["xflip"] > 0:
        w = torch.randint(2, [N, 1, 1, 1], generator=g)
        xf = torch.where(torch.rand([N, 1, 1, 1], generator=g) < mult["xflip"] * p, w, 0).reshape(N).numpy()
        lab.append(xf.astype(float))
    if mult["yflip"] > 0:
        w = torch.randint(2, [N, 1, 1, 1], generator=g)
        yf = torch.where(torch.rand([N, 1, 1, 1], generator=g) < mult["yflip"] * p, w, 0).reshape(N).numpy()
        lab.append(yf.astype(float))
    if mult["scale"] > 0:
        w = torch.randn([N], generator=g)
        w = f64(torch.where(torch.rand([N], generator=g) < mult["scale"] * p, w, 0))
        mats = [M @ np.diag([2 ** (-0.2 * w[i]), 2 ** (-0.2 * w[i]), 1]) for i, M in enumerate(mats)]
        lab.append(w)
    if mult["rotate_frac"] > 0:
        w = (torch.rand([N], generator=g) * 2 - 1) * math.pi
        w = f64(torch.where(torch.rand([N], generator=g) < mult["rotate_frac"] * p, w, 0))
        mats = [M @ rot(w[i]) for i, M in enumerate(mats)]
        lab += [np.cos(w) - 1, np.sin(w)]
    if mult["aniso"] > 0:
        w = torch.randn([N], generator=g)
        r = (torch.rand([N], generator=g) * 2 - 1) * math.pi
        w = f64(torch.where(torch.rand([N], generator=g) < mult["aniso"] * p, w, 0))
        r = f64(torch.where(torch.rand([N], generator=g) < 0.5, r, 0))
        mats = [
            M @ rot(-r[i]) @ np.diag([2 ** (-0.2 * w[i]), 2 ** (0.2 * w[i]), 1]) @ rot(r[i]) for i, M in enumerate(mats)
        ]
        lab += [w * np.cos(r), w * np.sin(r)]
    if mult["translate_frac"] > 0:
        w = torch.randn([2, N], generator=g)
        w = f64(torch.where(torch.rand([1, N], generator=g) < mult["translate_frac"] * p, w, 0))
        mats = [
            M @ np.array([[1, 0, -w[0, i] * W * 0.125], [0, 1, -w[1, i] * H * 0.125], [0, 0, 1]])
            for i, M in enumerate(mats)
        ]
        lab += [w[0], w[1]]
    return np.stack(lab, 1), np.stack(mats), xf, yf


def test_identity_draws_still_resample_as_edm():
    """p = 0: labels all zero, yet the geometric stage runs (as EDM): the output is the float64 construction with
    identity maps, close to the input but not equal to it."""
    x = _images(N=3, seed=2)
    got, labels = AugmentPipe(p=0.0)(x, generator=torch.Generator().manual_seed(0))
    assert torch.equal(labels, torch.zeros(3, 9))
    want = _ref_warp(x.double().numpy(), np.stack([np.eye(3)] * 3))
    assert np.abs(got.double().numpy() - want).max() < 1e-4
    assert 0 < np.abs(want - x.double().numpy()).max() < 0.5
