"""SiDA's parts: the fake score's discriminator logits, the loss terms against float64 formulas, the schedule."""

from __future__ import annotations

import math

import pytest
import torch

from sid_fast.losses import (
    bce_mean_rows,
    edm_weight,
    sida_discriminator_loss,
    sida_generator_gan_loss,
    sida_schedule,
)
from sid_fast.networks import build_network, official_config

TINY = dict(img_resolution=16, img_channels=3, label_dim=0, model_channels=16, channel_mult=[1, 2], num_blocks=1,
            attn_resolutions=[8], augment_dim=9, dropout=0.0)


@pytest.mark.parametrize("stem, last, channels", [
    ("edm-cifar10-32x32-uncond-vp", "8x8_block3", 256),
    ("edm-ffhq-64x64-uncond-vp", "8x8_block3", 256),
    ("edm-imagenet-64x64-cond-adm", "8x8_block2", 768),
])
def test_logits_of_the_published_configurations_are_8x8(stem, last, channels):
    """Official sida branch: the logits are taken after the encoder's last module, an 8 x 8 map in every published
    configuration (meta device: shapes only)."""
    with torch.device("meta"):
        net = build_network("EDMPrecond", dict(official_config(stem), use_fp16=False))
        assert list(net.model.enc)[-1] == last and net.model.enc[last].out_channels == channels
        r = net.img_resolution
        labels = torch.zeros(2, net.label_dim) if net.label_dim else None
        logits = net(torch.zeros(2, 3, r, r), torch.ones(2), labels, return_flag="encoder")
    assert logits.shape == (2, 1, 8, 8) and logits.dtype == torch.float32


@pytest.mark.parametrize("model_type", ["SongUNet", "DhariwalUNet"])
def test_encoder_call_runs_no_decoder_and_encoder_decoder_matches_two_calls(model_type):
    torch.manual_seed(0)
    kw = dict(TINY, model_type=model_type)
    if model_type == "DhariwalUNet":
        kw.update(channel_mult=[1, 2, 2])  # 16 -> 8 -> 4: the last encoder map is 4 x 4 here
    net = build_network("EDMPrecond", kw).eval()
    calls, last_enc = [], {}
    for name, m in net.model.dec.items():
        m.register_forward_hook(lambda m, a, o, name=name: calls.append(name))
    last_name = list(net.model.enc)[-1]
    net.model.enc[last_name].register_forward_hook(lambda m, a, o: last_enc.__setitem__("x", o))
    x, sigma = torch.randn(3, 3, 16, 16), torch.tensor([0.3, 2.0, 20.0])
    aug = torch.zeros(3, 9)

    logits = net(x, sigma, None, augment_labels=aug, return_flag="encoder")
    assert calls == []  # the real branch stops after the encoder
    torch.testing.assert_close(logits, last_enc["x"].mean(dim=1, keepdim=True), rtol=0, atol=0)
    side = 8 if model_type == "SongUNet" else 4
    assert logits.shape == (3, 1, side, side)

    D, logits2 = net(x, sigma, None, augment_labels=aug, return_flag="encoder_decoder")
    assert len(calls) == len(net.model.dec)
    torch.testing.assert_close(D, net(x, sigma, None, augment_labels=aug), rtol=0, atol=0)
    torch.testing.assert_close(logits2, logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="return_flag 'both'"):
        net(x, sigma, None, return_flag="both")


# ----------------------------------------------------------------------------------------------------------------
# Loss terms against float64 formulas (official sida branch, sida_training/sida_loss.py), written here from the
# formulas with the NaN samples dropped, as upstream does, rather than masked.


def _bce64(logits, target):
    """Mean over all logits of -[t log s(l) + (1 - t) log(1 - s(l))], in float64 through log-sigmoid."""
    x = logits.double()
    return -(target * torch.nn.functional.logsigmoid(x) + (1 - target) * torch.nn.functional.logsigmoid(-x)).mean()


def _drop(ok, *ts):
    return [t[ok] for t in ts]


def _inputs(n=6, nan_rows=()):
    g = torch.Generator().manual_seed(1)
    lr = torch.randn(n, 1, 8, 8, generator=g) * 4
    lf = torch.randn(n, 1, 8, 8, generator=g) * 4 + 1
    sigma = (torch.randn(n, generator=g) * 1.2 - 1.2).exp().reshape(n, 1, 1, 1)
    w = torch.rand(n, 1, 1, 1, generator=g) + 0.05
    ok = torch.ones(n, dtype=torch.bool)
    for r in nan_rows:
        lf[r, 0, 3, 3] = float("nan")
        ok[r] = False
    return lr, lf, sigma, w, ok


@pytest.mark.parametrize("nan_rows", [(), (1, 4)], ids=["finite", "two NaN samples"])
def test_discriminator_loss_against_float64(nan_rows):
    lr, lf, sigma, w, ok = _inputs(nan_rows=nan_rows)
    lr.requires_grad_(True)
    lf.requires_grad_(True)
    got = sida_discriminator_loss(lr, lf, sigma, ok)
    assert got.shape == (6, 1, 1, 1)
    kr, kf, ks = _drop(ok, lr, lf, sigma)
    bce = (_bce64(kr, 1.0) + _bce64(kf, 0.0)) / 2
    lam = (ks.double() ** 2 + 0.25) / (ks.double() * 0.5) ** 2  # (sigma^2 + sigma_d^2) / (sigma sigma_d)^2
    want = lam * bce
    # fp32 against float64: a few ulps of the largest term (lambda reaches ~1e3 here)
    torch.testing.assert_close(got[ok].double(), want, rtol=1e-5, atol=0)
    assert (got[~ok] == 0).all()
    # gradients: every kept logit is weighted by the sum of lambda over the kept samples; dropped logits get none.
    # d/dl = scale * (sigmoid(l) - t) with scale = sum(lambda) / (2 * count): fp32 computes sigmoid(l) - t with an
    # absolute error of a few ulps of 1, so the bound is 4 * eps32 * scale.
    got.sum().backward()
    kr64, kf64 = (t.detach().double().requires_grad_(True) for t in (kr, kf))
    ((_bce64(kr64, 1.0) + _bce64(kf64, 0.0)) / 2 * lam.detach()).sum().backward()
    atol = 4 * torch.finfo(torch.float32).eps * float(lam.sum()) / (2 * kr.numel())
    torch.testing.assert_close(lr.grad[ok].double(), kr64.grad, rtol=1e-5, atol=atol)
    torch.testing.assert_close(lf.grad[ok].double(), kf64.grad, rtol=1e-5, atol=atol)
    assert (lr.grad[~ok] == 0).all() and (lf.grad[~ok] == 0).all()


@pytest.mark.parametrize("nan_rows", [(), (0, 5)], ids=["finite", "two NaN samples"])
def test_generator_gan_loss_against_float64(nan_rows):
    _, logits, _, w, ok = _inputs(nan_rows=nan_rows)
    logits = logits * 4  # many beyond the +-10 clamp
    logits.requires_grad_(True)
    got = sida_generator_gan_loss(logits, w, ok)
    (kl, kw) = _drop(ok, logits, w)
    kl64 = kl.detach().double().requires_grad_(True)
    want = _bce64(kl64.clamp(-10, 10), 1.0) / kw.double()
    torch.testing.assert_close(got[ok].double(), want.detach(), rtol=1e-5, atol=0)
    assert (got[~ok] == 0).all()
    got.sum().backward()
    want.sum().backward()
    atol = 4 * torch.finfo(torch.float32).eps * float((1 / kw.double()).sum()) / kl.numel()  # as for the discriminator
    torch.testing.assert_close(logits.grad[ok].double(), kl64.grad, rtol=1e-5, atol=atol)
    assert (logits.grad[ok].abs() > 0).sum() < logits.grad[ok].numel()  # clamped logits get no gradient
    assert (logits.grad[ok][kl.detach().abs() > 10] == 0).all()


def test_bce_mean_rows_is_torchs_mean_reduction_without_nan():
    lr, _, _, _, ok = _inputs()
    want = torch.nn.functional.binary_cross_entropy_with_logits(lr, torch.ones_like(lr))
    torch.testing.assert_close(bce_mean_rows(lr, 1.0, ok), want, rtol=0, atol=0)
    assert bce_mean_rows(lr, 1.0, torch.zeros(6, dtype=torch.bool)) == 0  # no finite sample: no loss, no NaN


def test_lambda_of_the_discriminator_is_edms_weight():
    s = torch.tensor([0.002, 0.5, 80.0])
    torch.testing.assert_close(edm_weight(s), 4 + 1 / s**2)
    assert math.isclose(float(edm_weight(torch.tensor(0.002))), 250004.0, rel_tol=1e-6)


def test_schedule_thresholds_at_the_exact_image_counts():
    """Official loop: thresholds compare the images seen before the iteration with > 100k and > 200k."""
    assert sida_schedule(0) == (False, 1.0, 0.0)
    assert sida_schedule(100_000) == (False, 1.0, 0.0)
    assert sida_schedule(100_001) == (True, 1.0, 0.0)
    assert sida_schedule(200_000) == (True, 1.0, 0.0)
    assert sida_schedule(200_001) == (True, 0.5, 0.5)
