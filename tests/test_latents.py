"""EDM2's latent path: the Stability VAE's conventions and constants with a randomly initialised AutoencoderKL of the
sd-vae-ft-mse configuration (no weights can be downloaded here), the latent dataset tool and memory-mapped reading."""

import json
import pickle

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from sid_fast.latents import (  # noqa: E402
    BIAS,
    SCALE,
    SD_VAE_FT_MSE_CONFIG,
    LatentDataset,
    LatentError,
    StabilityVAE,
    encode_dataset,
    load_vae,
)


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return StabilityVAE(diffusers.AutoencoderKL(**SD_VAE_FT_MSE_CONFIG), batch_size=2)


def test_constants_are_edm2s():
    # edm2 training/encoders.py: scale = 0.5 / raw_std, bias = -raw_mean * scale, in float32; the values as printed
    # there to 7-8 significant digits (5e-7 relative covers the printing).
    assert SCALE.dtype == BIAS.dtype == np.float32
    np.testing.assert_allclose(SCALE, [0.11990407, 0.10822511, 0.13477089, 0.15243903], rtol=5e-7, atol=0)
    np.testing.assert_allclose(BIAS, [-0.69664264, -0.3517316, -0.01617251, 0.32774392], rtol=5e-7, atol=0)


def test_parameter_count_of_the_configuration(vae):
    assert sum(p.numel() for p in vae.vae.parameters()) == 83_653_863  # sd-vae-ft-mse


def test_encode_scale_decode(vae):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (3, 3, 32, 32), generator=g, dtype=torch.uint8)
    raw = vae.encode_pixels(x)
    assert raw.shape == (3, 8, 4, 4) and raw.dtype == torch.float32
    with torch.no_grad():  # EDM2's pixel convention: the encoder sees x / 255 in [0, 1]
        d = vae.vae.encode(x.float() / 255).latent_dist
    torch.testing.assert_close(raw, torch.cat([d.mean, d.std], 1), rtol=1e-5, atol=1e-5)
    assert (raw[:, 4:] > 0).all()
    lat = vae.encode_latents(raw, torch.Generator().manual_seed(2))
    eps = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    s, b = torch.tensor(SCALE).reshape(1, 4, 1, 1), torch.tensor(BIAS).reshape(1, 4, 1, 1)
    torch.testing.assert_close(lat, (raw[:, :4] + eps * raw[:, 4:]) * s + b, rtol=0, atol=1e-6)
    img = vae.decode(lat)
    assert img.shape == (3, 3, 32, 32) and img.dtype == torch.uint8
    with torch.no_grad():
        y = vae.vae.decode((lat - b) / s).sample
    expect = torch.floor(y.clamp(0, 1) * 255).to(torch.uint8)  # truncation, not rounding
    assert (img.int() - expect.int()).abs().max() <= 1  # the decoder's own fp32 rounding at a .0 boundary at most
    assert (img == expect).float().mean() > 0.99


def test_load_vae_refuses_clearly(tmp_path):
    with pytest.raises(LatentError, match="no such folder"):
        load_vae(str(tmp_path / "missing"))
    (tmp_path / "notvae").mkdir()
    with pytest.raises(LatentError, match="config.json"):
        load_vae(str(tmp_path / "notvae"))


def test_load_vae_from_a_local_folder(tmp_path):
    torch.manual_seed(3)
    small = diffusers.AutoencoderKL(**dict(SD_VAE_FT_MSE_CONFIG, block_out_channels=[32, 32, 32, 32]))
    small.save_pretrained(tmp_path / "vae")
    loaded = load_vae(str(tmp_path / "vae"))
    for a, b in zip(loaded.state_dict().values(), small.state_dict().values()):
        assert torch.equal(a, b)


def _write_images(folder, n=5, res=32, labels=True):
    import PIL.Image

    folder.mkdir()
    rng = np.random.default_rng(0)
    names = []
    for i in range(n):
        name = f"img{i:08d}.png"
        PIL.Image.fromarray(rng.integers(0, 256, (res, res, 3), dtype=np.uint8)).save(folder / name)
        names.append(name)
    if labels:
        (folder / "dataset.json").write_text(json.dumps({"labels": [[nm, i % 3] for i, nm in enumerate(names)]}))
    return rng


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_latent_dataset_tool_and_memmap(tmp_path, vae, dtype):
    from sid_fast.data.dataset import ImageDataset

    _write_images(tmp_path / "imgs")
    n = encode_dataset(tmp_path / "imgs", tmp_path / "lat", vae, dtype=dtype, batch=2, log=None)
    assert n == 5 and not (tmp_path / "lat.part").exists()
    ds = LatentDataset(tmp_path / "lat")
    assert len(ds) == 5 and ds.shape == [8, 4, 4] and ds.label_dim == 3
    assert isinstance(ds._array(), np.memmap) and ds._array().dtype == np.dtype(dtype)
    images = torch.from_numpy(np.stack([ImageDataset(tmp_path / "imgs")[i][0] for i in range(5)]))
    raw = vae.encode_pixels(images)
    for i in range(5):
        x, label = ds[i]
        assert x.dtype == torch.float32 and label.tolist() == [float(j == i % 3) for j in range(3)]
        tol = 0 if dtype == "float32" else 2**-10 * raw[i].abs().max().item()  # float16 keeps 11 significant bits
        assert (x - raw[i]).abs().max() <= tol
    assert ds._latents is not None and pickle.loads(pickle.dumps(ds))._latents is None  # workers map it themselves
    loader = torch.utils.data.DataLoader(ds, batch_size=5, num_workers=2)
    xb, lb = next(iter(loader))
    assert torch.equal(xb, torch.stack([ds[i][0] for i in range(5)]))
    with pytest.raises(LatentError, match="exists and is not empty"):
        encode_dataset(tmp_path / "imgs", tmp_path / "lat", vae)


def test_latent_dataset_without_labels_and_bad_source(tmp_path, vae):
    import PIL.Image

    _write_images(tmp_path / "imgs", n=2, labels=False)
    encode_dataset(tmp_path / "imgs", tmp_path / "lat", vae, log=None)
    ds = LatentDataset(tmp_path / "lat")
    assert ds.label_dim == 0 and ds[1][1] is None
    (tmp_path / "grey").mkdir()
    PIL.Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "grey" / "a.png")
    with pytest.raises(LatentError, match="1x16x16"):
        encode_dataset(tmp_path / "grey", tmp_path / "lat2", vae)
    with pytest.raises(LatentError, match="not a latent dataset"):
        LatentDataset(tmp_path / "imgs")


def test_center_crop_dhariwal():
    import PIL.Image

    from sid_fast.data.dataset_tool import center_crop_dhariwal

    rng = np.random.default_rng(0)
    same = PIL.Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    assert np.array_equal(np.asarray(center_crop_dhariwal(same, 64)), np.asarray(same))
    # 300x140 (w x h) at 32: halved twice by the box filter (75x35), short side to 32 (69x32), centre crop from x=18.
    a = np.zeros((140, 300, 3), np.uint8)
    a[:, 150:] = 255  # a vertical edge at the centre stays at the centre of the crop
    out = np.asarray(center_crop_dhariwal(PIL.Image.fromarray(a), 32))
    assert out.shape == (32, 32, 3)
    assert (out[:, :14] == 0).all() and (out[:, 18:] == 255).all()


def test_edm2_reference_pickle(tmp_path):
    """EDM2's dataset-refs/img512.pkl: a plain pickle of {'fid': {'mu', 'sigma'}, 'fd_dinov2': ...} with numpy arrays,
    read by the restricted unpickler."""
    from sid_fast.metrics import load_ref_stats

    rng = np.random.default_rng(0)
    mu, a = rng.standard_normal(6), rng.standard_normal((6, 6))
    ref = dict(fid=dict(mu=mu.astype(np.float64), sigma=a @ a.T), fd_dinov2=dict(mu=np.zeros(3), sigma=np.eye(3)))
    with open(tmp_path / "img512.pkl", "wb") as f:
        pickle.dump(ref, f)
    got_mu, got_sigma = load_ref_stats(tmp_path / "img512.pkl", dim=6)
    assert np.array_equal(got_mu, mu) and np.array_equal(got_sigma, a @ a.T)
    with open(tmp_path / "bad.pkl", "wb") as f:
        pickle.dump(dict(fid=dict(mu=np.zeros(2), sigma=np.zeros(2, dtype=object))), f)
    with pytest.raises(ValueError, match="bad.pkl: refused to load"):
        load_ref_stats(tmp_path / "bad.pkl")
