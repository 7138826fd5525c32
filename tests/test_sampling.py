"""EDM's Heun sampler on a closed-form Gaussian denoiser; per-seed latents; the sample CLI."""

import subprocess
import sys

import pytest
import torch
from support.analytic import GaussianMixtureDenoiser

from sid_fast.checkpoints import save_network
from sid_fast.networks import build_network
from sid_fast.sampling import edm_sampler, karras_sigmas, latents_and_labels


def _gaussian():
    return GaussianMixtureDenoiser(torch.full((1, 1, 4, 4), 0.3), [0.5])


@pytest.mark.parametrize(
    "steps,churn,std_tol",
    [
        (200, None, 0.01),  # converged: std 0.5 within 1%
        (18, None, 0.08),  # EDM's CIFAR setting: measured +5.7% std (discretisation error for this narrow target)
        (40, (40, 0.05, 50, 1.003), 0.05),  # ImageNet-style stochastic sampler
    ],
)
def test_heun_sampler_reproduces_gaussian(steps, churn, std_tol):
    net = _gaussian()
    lat, _, rnd = latents_and_labels(net, range(4000))
    kw = {} if churn is None else dict(S_churn=churn[0], S_min=churn[1], S_max=churn[2], S_noise=churn[3])
    x = edm_sampler(net, lat, randn_like=rnd.randn_like, num_steps=steps, **kw)
    assert x.dtype == torch.float64
    assert abs(x.mean().item() - 0.3) < 0.01
    assert abs(x.std().item() / 0.5 - 1) < std_tol


def test_karras_schedule_endpoints():
    t = karras_sigmas(18)
    assert t.dtype == torch.float64 and len(t) == 19
    torch.testing.assert_close(t[[0, 17, 18]], torch.tensor([80.0, 0.002, 0.0], dtype=torch.float64))


def test_latents_are_per_seed():
    net = build_network(
        "EDMPrecond",
        dict(
            model_type="SongUNet",
            img_resolution=8,
            img_channels=3,
            label_dim=10,
            model_channels=16,
            channel_mult=[1, 1],
            num_blocks=1,
            attn_resolutions=[],
        ),
    )
    a, la, _ = latents_and_labels(net, [5, 6, 7])
    b, lb, _ = latents_and_labels(net, [6])
    assert torch.equal(a[1], b[0]) and torch.equal(la[1], lb[0])
    assert la.shape == (3, 10) and torch.all(la.sum(1) == 1)
    _, lc, _ = latents_and_labels(net, [5, 6], class_idx=4)
    assert torch.all(lc.argmax(1) == 4)


def _run(*args):
    return subprocess.run([sys.executable, "-m", "sid_fast.sample", *args], capture_output=True, text=True, timeout=300)


def test_sample_cli_onestep_generator(tmp_path):
    cfg = dict(
        model_type="SongUNet",
        img_resolution=8,
        img_channels=1,
        label_dim=3,
        model_channels=16,
        channel_mult=[1, 1],
        num_blocks=1,
        attn_resolutions=[],
    )
    path = tmp_path / "gen.pt"
    save_network(path, build_network("EDMPrecond", cfg), cfg, kind="generator", sigma_init=2.5)
    r = _run(
        "--network",
        str(path),
        "--seeds",
        "0-4,10",
        "--outdir",
        str(tmp_path / "out"),
        "--grid",
        str(tmp_path / "g.png"),
    )
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"{s:06d}.png" for s in (0, 1, 2, 3, 4, 10)]
    assert (tmp_path / "g.png").stat().st_size > 0
    r = _run("--network", str(path), "--class", "7", "--outdir", str(tmp_path / "o2"))
    assert r.returncode != 0 and "--class 7: the network has 3 classes" in r.stderr
    r = _run("--network", str(tmp_path / "missing.pt"), "--outdir", str(tmp_path / "o3"))
    assert r.returncode != 0 and "missing.pt: no such file" in r.stderr and "Traceback" not in r.stderr


def test_image_grid_separates_tiles_with_a_gap():
    from sid_fast.sampling import image_grid

    imgs = torch.full((5, 1, 8, 8), 255, dtype=torch.uint8)
    g = image_grid(imgs, cols=3, scale=2, gap=2, fill=128)
    assert g.shape == (2 + 2 * (16 + 2), 2 + 3 * (16 + 2))  # 2 rows x 3 columns of 16-pixel tiles, framed
    assert (g[:2] == 128).all() and (g[:, :2] == 128).all() and (g[-2:] == 128).all() and (g[:, -2:] == 128).all()
    assert (g[2:18, 2:18] == 255).all() and (g[2:18, 18:20] == 128).all()  # first tile, then the gap to the second
    assert (g[20:36, 38:54] == 128).all()  # the sixth cell holds no image: background
    rgb = image_grid(torch.zeros(4, 3, 4, 4, dtype=torch.uint8), gap=1)
    assert rgb.shape == (1 + 2 * 5, 1 + 2 * 5, 3)
    assert image_grid(imgs[:1], cols=1).shape == (8, 8)  # no gap: the image itself
