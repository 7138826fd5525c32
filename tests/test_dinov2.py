"""FD-DINOv2 as EDM2 computes it: the ViT against a float64 computation of DINOv2's forward, EDM2's preprocessing,
the distance against an independent float64 formula, EDM2's reference pickles, the CLIs and the trainer's snapshots
with a small randomly initialised DINOv2 saved as Meta's checkpoint files are."""

from __future__ import annotations

import json
import math
import pickle

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from support.fid_helpers import write_png_folder

from sid_fast.metrics import load_ref_stats
from sid_fast.metrics.dinov2 import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DinoVisionTransformer,
    load_dinov2,
    preprocess,
)
from sid_fast.metrics.inception import DetectorError

TINY = dict(dim=64, depth=2, patch=14, hidden=256, grid=4)  # one head of 64, as every DINOv2 (width / 64 heads)


def tiny_dinov2(path, seed=0, **kw):
    """A randomly initialised DINOv2 saved as torch.save(state_dict), as dinov2_vitl14_pretrain.pth is."""
    torch.manual_seed(seed)
    net = DinoVisionTransformer(**dict(TINY, **kw))
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("gamma"):
                p.uniform_(0.5, 1.5)  # LayerScale: not the all-ones init, so that it is tested
            elif name.endswith("norm1.weight") or name.endswith("norm2.weight") or name == "norm.weight":
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.2 if p.ndim > 1 else 0.05)
    torch.save(net.state_dict(), path)
    return path


def _reference_features(state, x64):
    """DINOv2's forward in float64, written from the architecture (not from sid_fast's module): patch embedding as a
    matrix product over 14x14 patches, the position grid resized with the +0.1 scale factor, pre-norm blocks with
    LayerScale, one-head-per-64-channels softmax attention, erf GELU, the final LayerNorm's CLS token."""
    s = {k: v.double() for k, v in state.items()}
    n, _, h, w = x64.shape
    p = s["patch_embed.proj.weight"].shape[-1]
    patches = x64.unfold(2, p, p).unfold(3, p, p)  # [n, 3, rows, cols, p, p]
    rows, cols = patches.shape[2], patches.shape[3]
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(n, rows * cols, -1)
    t = patches @ s["patch_embed.proj.weight"].reshape(s["patch_embed.proj.weight"].shape[0], -1).T
    t = t + s["patch_embed.proj.bias"]
    dim = t.shape[-1]
    t = torch.cat([s["cls_token"].expand(n, 1, dim), t], dim=1)
    grid = math.isqrt(s["pos_embed"].shape[1] - 1)
    if rows * cols == grid * grid and h == w:  # DINOv2 uses the learned grid as is at its own size
        t = t + s["pos_embed"]
    else:
        g = s["pos_embed"][:, 1:].reshape(1, grid, grid, dim).permute(0, 3, 1, 2)
        g = torch.nn.functional.interpolate(
            g, scale_factor=((rows + 0.1) / grid, (cols + 0.1) / grid), mode="bicubic", antialias=False
        )
        t = t + torch.cat([s["pos_embed"][:, :1], g.permute(0, 2, 3, 1).reshape(1, rows * cols, dim)], dim=1)

    def ln(v, wgt, b):
        mu = v.mean(-1, keepdim=True)
        var = ((v - mu) ** 2).mean(-1, keepdim=True)
        return (v - mu) / torch.sqrt(var + 1e-6) * wgt + b

    heads = dim // 64
    for i in range(len({k.split(".")[1] for k in s if k.startswith("blocks.")})):
        b = {k[len(f"blocks.{i}.") :]: v for k, v in s.items() if k.startswith(f"blocks.{i}.")}
        u = ln(t, b["norm1.weight"], b["norm1.bias"])
        qkv = (u @ b["attn.qkv.weight"].T + b["attn.qkv.bias"]).reshape(n, -1, 3, heads, 64)
        q, k, v = (qkv[:, :, j].transpose(1, 2) for j in range(3))
        a = torch.softmax(q @ k.transpose(-1, -2) / 8.0, dim=-1) @ v
        a = a.transpose(1, 2).reshape(n, -1, dim) @ b["attn.proj.weight"].T + b["attn.proj.bias"]
        t = t + a * b["ls1.gamma"]
        u = ln(t, b["norm2.weight"], b["norm2.bias"])
        hdn = u @ b["mlp.fc1.weight"].T + b["mlp.fc1.bias"]
        hdn = 0.5 * hdn * (1 + torch.erf(hdn / math.sqrt(2)))
        t = t + (hdn @ b["mlp.fc2.weight"].T + b["mlp.fc2.bias"]) * b["ls2.gamma"]
    return ln(t, s["norm.weight"], s["norm.bias"])[:, 0]


def test_the_vit_matches_a_float64_dinov2_forward_and_keeps_metas_names(tmp_path):
    path = tiny_dinov2(tmp_path / "dinov2_tiny_pretrain.pth")
    state = torch.load(path, weights_only=True)
    per_block = {"norm1", "attn.qkv", "attn.proj", "ls1", "norm2", "mlp.fc1", "mlp.fc2", "ls2"}
    expected = {"cls_token", "pos_embed", "mask_token", "patch_embed.proj.weight", "patch_embed.proj.bias"}
    expected |= {"norm.weight", "norm.bias"}
    for i in range(2):
        for m in per_block:
            expected |= (
                {f"blocks.{i}.{m}.gamma"}
                if m.startswith("ls")
                else {f"blocks.{i}.{m}.{w}" for w in "weight bias".split()}
            )
    assert set(state) == expected  # the parameter names of Meta's dinov2_vit*14_pretrain.pth files
    det = load_dinov2(path)
    assert det.feature_dim == 64
    torch.manual_seed(1)
    for h in (224, 56, 70):  # EDM2's 224 x 224, and other grids (the position embedding resized each time)
        x = torch.randn(3, 3, h, h)
        with torch.no_grad():
            got = det.net(x).double()
        want = _reference_features(state, x.double())
        # fp32 against float64: two blocks of 64-wide sums over <= 257 tokens; rounding ~1e-6 relative per op.
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # At the training grid the embedding is used as is.
    assert torch.equal(det.net.position_embedding(56, 56), det.net.pos_embed.float())


def test_preprocessing_is_edm2s_torch_resize_mode():
    torch.manual_seed(0)
    imgs = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    x = preprocess(imgs)
    assert x.shape == (2, 3, 224, 224) and x.dtype == torch.float32
    r = torch.nn.functional.interpolate(imgs.double(), size=(224, 224), mode="bicubic", antialias=True) / 255
    r = (r - torch.tensor(IMAGENET_MEAN, dtype=torch.float64).reshape(1, 3, 1, 1)) / torch.tensor(
        IMAGENET_STD, dtype=torch.float64
    ).reshape(1, 3, 1, 1)
    torch.testing.assert_close(x.double(), r, rtol=0, atol=1e-4)  # |values| < 3: fp32 resampling error ~1e-6
    big = torch.randint(0, 256, (1, 3, 512, 512), dtype=torch.uint8)  # EDM2's 512 px: downsampled with antialiasing
    r = torch.nn.functional.interpolate(big.double(), size=(224, 224), mode="bicubic", antialias=True) / 255
    # fp32 resampling of 0..255 values with ~11 taps per axis, two passes: 1e-5 measured; 1e-4 is 1/40 of a grey level.
    assert (preprocess(big)[0, 0].double() * IMAGENET_STD[0] + IMAGENET_MEAN[0] - r[0, 0]).abs().max() < 1e-4
    grey = torch.randint(0, 256, (1, 1, 8, 8), dtype=torch.uint8)
    assert torch.equal(preprocess(grey), preprocess(grey.expand(-1, 3, -1, -1)))
    with pytest.raises(ValueError, match="uint8 images"):
        preprocess(torch.zeros(1, 3, 8, 8))


def test_fd_dinov2_through_the_clis_against_an_independent_float64_distance(tmp_path):
    from support.fid_helpers import save_torchscript_detector
    from test_fid import _fd_eigh

    from sid_fast import fid

    dino = tiny_dinov2(tmp_path / "dinov2.pth")
    inception = save_torchscript_detector(tmp_path / "inception.pt", dim=32)
    write_png_folder(tmp_path / "a", 30, size=16, seed=1)
    write_png_folder(tmp_path / "b", 30, size=16, seed=2)
    common = ["--detector", str(inception), "--dinov2", str(dino), "--workers", "0"]
    r = CliRunner().invoke(
        fid.main,
        ["ref", "--data", str(tmp_path / "a"), "--dest", str(tmp_path / "a.pkl"), "--metrics", "fid,fd_dinov2"]
        + common,
    )
    assert r.exit_code == 0, r.output
    with open(tmp_path / "a.pkl", "rb") as f:
        raw = pickle.load(f)  # EDM2's format: {metric: {'mu', 'sigma'}}
    assert set(raw) == {"fid", "fd_dinov2"} and raw["fd_dinov2"]["sigma"].shape == (64, 64)
    mu_a, sigma_a = load_ref_stats(tmp_path / "a.pkl", dim=64, metric="fd_dinov2")  # the restricted reader
    r = CliRunner().invoke(
        fid.main,
        ["calc", "--images", str(tmp_path / "b"), "--ref", str(tmp_path / "a.pkl"), "--num", "30"]
        + ["--metrics", "fid,fd_dinov2"]
        + common[:4],
    )
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout.strip().splitlines()[-1])
    det = load_dinov2(dino)
    from sid_fast.data.dataset import ImageDataset

    ds = ImageDataset(str(tmp_path / "b"), use_labels=False)
    imgs = torch.from_numpy(np.stack([ds[i][0] for i in range(len(ds))]))
    f = det.features(imgs).numpy()
    want = _fd_eigh(f.mean(0), np.cov(f, rowvar=False), mu_a, sigma_a)
    assert res["fd_dinov2"] == pytest.approx(want, rel=1e-6, abs=1e-8) and res["fid"] > 0
    # A reference without DINOv2 statistics, an npz for two metrics, a file that is not DINOv2: one sentence each.
    r = CliRunner().invoke(
        fid.main,
        ["ref", "--data", str(tmp_path / "a"), "--dest", str(tmp_path / "a.npz"), "--metrics", "fid,fd_dinov2"]
        + common,
    )
    assert r.exit_code != 0 and "several metrics are written to a .pkl" in r.output
    r = CliRunner().invoke(fid.main, ["ref", "--data", str(tmp_path / "a"), "--dest", str(tmp_path / "i.pkl")] + common)
    assert r.exit_code == 0
    r = CliRunner().invoke(
        fid.main,
        ["calc", "--images", str(tmp_path / "b"), "--ref", str(tmp_path / "i.pkl"), "--metrics", "fd_dinov2"]
        + common[2:4],
    )
    assert r.exit_code != 0 and "i.pkl: an EDM2 reference pickle needs 'fd_dinov2'" in r.output
    with pytest.raises(DetectorError, match="inception.pt: .*not a DINOv2|inception.pt: cannot be read"):
        load_dinov2(inception)
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(DetectorError, match=r"other.pth: not a DINOv2 ViT state dict: no cls_token\."):
        load_dinov2(tmp_path / "other.pth")
