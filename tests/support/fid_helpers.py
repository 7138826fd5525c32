"""Test-made stand-ins for the real files: a TorchScript detector with NVIDIA's call signature and random weights."""

import json
import warnings

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F


class TinyDetector(torch.nn.Module):
    """detector(img_uint8_NCHW, return_features, use_fp16, no_output_bias): 2048-d features or 1008 probabilities.

    Like NVIDIA's file it takes uint8 RGB at any resolution and resizes internally (to 16, not 299). `dim` < 2048
    keeps the tests fast: scipy's sqrtm of a 2048 x 2048 covariance of a few images takes ~17 s on 2 cores.
    """

    def __init__(self, dim=2048):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 32, 3, padding=1)
        self.lin = torch.nn.Linear(32 * 16, dim)
        self.fc = torch.nn.Linear(dim, 1008)

    def forward(
        self, img: torch.Tensor, return_features: bool = False, use_fp16: bool = False, no_output_bias: bool = False
    ) -> torch.Tensor:
        x = (img.to(torch.float32) - 128) / 128
        x = F.interpolate(x, size=[16, 16], mode="bilinear", align_corners=False)
        x = F.avg_pool2d(torch.tanh(self.conv(x)), 4)
        f = torch.tanh(self.lin(x.flatten(1)))
        if return_features:
            return f
        logits = F.linear(f, self.fc.weight) if no_output_bias else self.fc(f)
        return F.softmax(logits, dim=1)


def save_torchscript_detector(path, seed=0, dim=2048):
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(TinyDetector(dim).eval()), str(path))
    return path


def write_png_folder(folder, n, size=8, channels=3, seed=0, labels=None):
    """n random structured PNGs (so that features vary) and optionally a dataset.json; returns the file names."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        yy, xx = np.mgrid[0:size, 0:size]
        base = 128 + 100 * np.sin(xx * rng.uniform(0.2, 1.5) + yy * rng.uniform(0.2, 1.5) + rng.uniform(0, 6))
        a = np.clip(base[..., None] + rng.normal(0, 20, (size, size, channels)), 0, 255).astype(np.uint8)
        name = f"im{i:03d}.png"
        PIL.Image.fromarray(a[..., 0] if channels == 1 else a).save(folder / name)
        names.append(name)
    if labels is not None:
        (folder / "dataset.json").write_text(
            json.dumps({"labels": [[nm, int(labels[i])] for i, nm in enumerate(names)]})
        )
    return names
