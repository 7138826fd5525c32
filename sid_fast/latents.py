"""EDM2's latent space: the Stability VAE (`stabilityai/sd-vae-ft-mse`) with EDM2's conventions, and latent datasets
stored as one memory-mapped array.

Conventions of the official edm2 training/encoders.py (StabilityVAEEncoder), which SiD's EDM2 code copies:
- the VAE encoder is fed pixels x / 255 in [0, 1] (not [-1, 1]);
- a dataset stores the posterior's mean and std, 8 channels ("raw latents");
- a latent for training is mean + eps * std, drawn afresh at every use, then scaled per channel to mean 0 and std
  0.5 with raw_mean = [5.81, 3.25, 0.12, -2.15], raw_std = [4.17, 4.62, 3.71, 3.28] (scale = 0.5 / raw_std,
  bias = -raw_mean * scale, float32);
- decoding undoes the scaling, runs the VAE decoder, clamps to [0, 1], multiplies by 255 and casts to uint8
  (truncation, no rounding).

The VAE is diffusers' AutoencoderKL (`pip install diffusers`), loaded from a local folder in diffusers' format
(config.json + weights) that the user names; nothing is downloaded unless a hub id is given explicitly.

Latent datasets (`python -m sid_fast.latents encode`): `latents.npy` [N, 8, h, w] (float32, or float16 with --dtype),
`labels.npy` [N] int64 (-1: none) and `meta.json`, written atomically. `LatentDataset` maps `latents.npy` read-only:
DataLoader workers share the operating system's page cache instead of each holding a copy (the official loader's
per-worker cache of the 168 GB ImageNet latents exhausted 500 GB of RAM, mingyuanzhou/SiD#7).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import click
import numpy as np
import torch

from sid_fast.data.dataset import ImageDataset
from sid_fast.progress import Timer, bar, summary

RAW_MEAN = (5.81, 3.25, 0.12, -2.15)
RAW_STD = (4.17, 4.62, 3.71, 3.28)
FINAL_MEAN, FINAL_STD = 0.0, 0.5
SCALE = np.float32(FINAL_STD) / np.float32(RAW_STD)
BIAS = np.float32(FINAL_MEAN) - np.float32(RAW_MEAN) * SCALE
SD_VAE_FT_MSE = "stabilityai/sd-vae-ft-mse"
# The AutoencoderKL configuration of sd-vae-ft-mse (its config.json), for tests and for building the network offline.
SD_VAE_FT_MSE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=256,
)


class LatentError(ValueError):
    """A VAE or latent dataset that cannot be used; the message names the file or flag."""


def _autoencoder_kl():
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise LatentError("the Stability VAE needs diffusers: pip install diffusers") from None
    return AutoencoderKL


def load_vae(path_or_id: str, device="cpu"):
    """diffusers AutoencoderKL from a local folder in diffusers' format; a hub id (e.g. stabilityai/sd-vae-ft-mse) is
    fetched only when given (and only if the machine can reach the hub)."""
    AutoencoderKL = _autoencoder_kl()
    p = Path(path_or_id)
    local = p.exists()
    if local and not (p.is_dir() and (p / "config.json").exists()):
        raise LatentError(
            f"--vae {p}: expected a folder in diffusers' format (config.json and the weights), e.g. a "
            f"download of {SD_VAE_FT_MSE}."
        )
    if not local and not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", str(path_or_id)):
        raise LatentError(f"--vae {path_or_id}: no such folder (and not a hub id such as {SD_VAE_FT_MSE}).")
    try:
        vae = AutoencoderKL.from_pretrained(str(path_or_id), local_files_only=local, torch_dtype=torch.float32)
    except Exception as e:  # diffusers/hub errors: one sentence naming the source
        raise LatentError(
            f"--vae {path_or_id}: cannot load an AutoencoderKL ({type(e).__name__}: {' '.join(str(e).split())[:200]})."
        ) from None
    return vae.to(device).eval().requires_grad_(False)


class StabilityVAE:
    """EDM2's StabilityVAEEncoder formulas around a diffusers AutoencoderKL (fp32, eval)."""

    def __init__(self, vae, batch_size: int = 8):
        self.vae = vae.eval().requires_grad_(False)
        self.batch_size = batch_size
        self.device = next(vae.parameters()).device

    @classmethod
    def load(cls, path_or_id: str, device="cpu", batch_size: int = 8) -> StabilityVAE:
        return cls(load_vae(path_or_id, device), batch_size)

    def _consts(self, x):
        scale = torch.as_tensor(SCALE, device=x.device).reshape(1, -1, 1, 1)
        bias = torch.as_tensor(BIAS, device=x.device).reshape(1, -1, 1, 1)
        return scale, bias

    @torch.no_grad()
    def encode_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 images [N, 3, H, W] -> raw latents [N, 8, H/8, W/8] float32 (the posterior's mean and std)."""
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3:
            raise LatentError(f"encode_pixels: expected uint8 RGB images [N, 3, H, W], got {x.dtype} {list(x.shape)}.")
        out = []
        for i in range(0, len(x), self.batch_size):
            xb = x[i : i + self.batch_size].to(self.device, torch.float32) / 255  # EDM2: pixels in [0, 1]
            d = self.vae.encode(xb).latent_dist
            out.append(torch.cat([d.mean, d.std], dim=1).float())
        return torch.cat(out)

    def encode_latents(self, raw: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """raw latents [N, 8, h, w] -> training latents [N, 4, h, w]: mean + eps * std, then scale and bias."""
        return encode_latents(raw, generator)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [N, 4, h, w] -> uint8 images [N, 3, 8h, 8w] (clamp to [0, 1], x 255, truncated)."""
        scale, bias = self._consts(latents)
        z = (latents.to(torch.float32) - bias) / scale
        out = []
        for i in range(0, len(z), self.batch_size):
            img = self.vae.decode(z[i : i + self.batch_size].to(self.device)).sample
            out.append((img.clamp(0, 1) * 255).to(torch.uint8))
        return torch.cat(out)


def encode_latents(raw: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """EDM2's encode_latents: raw latents [N, 8, h, w] (posterior mean and std) -> [N, 4, h, w], a fresh draw
    mean + eps * std scaled per channel (no VAE needed: SiDA reads real latents this way)."""
    raw = raw.to(torch.float32)
    mean, std = raw[:, :4], raw[:, 4:]
    eps = torch.randn(mean.shape, device=raw.device, generator=generator)
    scale = torch.as_tensor(SCALE, device=raw.device).reshape(1, -1, 1, 1)
    bias = torch.as_tensor(BIAS, device=raw.device).reshape(1, -1, 1, 1)
    return (mean + eps * std) * scale + bias


# ----------------------------------------------------------------------------
# Latent datasets.


class LatentDataset(torch.utils.data.Dataset):
    """A latent dataset written by `encode`: item i -> (raw latents [8, h, w] float32, one-hot label or None).
    The array is opened read-only with mmap on first use in each process, never copied."""

    def __init__(self, path):
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        if not meta_path.exists():
            raise LatentError(
                f"{self.path}: not a latent dataset (no meta.json); make one with `python -m sid_fast.latents encode`."
            )
        self.meta = json.loads(meta_path.read_text())
        self.labels_int = np.load(self.path / "labels.npy")
        if (self.labels_int < 0).all():
            self.labels_int = None
        self._latents = None
        arr = self._array()
        self.shape = list(arr.shape[1:])
        self._n = arr.shape[0]
        self._latents = None  # reopened lazily in each worker

    def _array(self):
        if self._latents is None:
            self._latents = np.load(self.path / "latents.npy", mmap_mode="r")
        return self._latents

    def __getstate__(self):
        return dict(self.__dict__, _latents=None)

    @property
    def image_shape(self) -> list[int]:
        return list(self.shape)

    def __len__(self):
        return self._n

    @property
    def label_dim(self) -> int:
        return 0 if self.labels_int is None else int(self.meta.get("label_dim", int(self.labels_int.max()) + 1))

    def __getitem__(self, i: int):
        x = torch.from_numpy(np.array(self._array()[i], dtype=np.float32))
        if self.labels_int is None:
            return x, None
        onehot = torch.zeros(self.label_dim)
        onehot[int(self.labels_int[i])] = 1
        return x, onehot


def encode_dataset(source, dest, vae: StabilityVAE, dtype: str = "float32", batch: int = 8, log=print) -> int:
    """Encode an EDM image dataset (zip or folder, RGB) into a latent dataset folder; returns the image count."""
    if dtype not in ("float32", "float16"):
        raise LatentError(f"--dtype {dtype!r}: choose float32 (as EDM2 stores them) or float16 (half the size).")
    ds = ImageDataset(source)
    c, h, w = ds.image_shape
    if c != 3 or h % 8 or w % 8:
        raise LatentError(
            f"--source {source}: images are {c}x{h}x{w}; the VAE takes RGB images with sides divisible by 8."
        )
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise LatentError(f"--dest {dest}: exists and is not empty.")
    tmp = dest.with_name(dest.name + ".part")
    tmp.mkdir(parents=True, exist_ok=True)
    n = len(ds)
    arr = np.lib.format.open_memmap(tmp / "latents.npy", mode="w+", dtype=np.dtype(dtype), shape=(n, 8, h // 8, w // 8))
    with bar(n, "encoding", "img") as progress:
        for i in range(0, n, batch):
            imgs = torch.from_numpy(np.stack([ds[j][0] for j in range(i, min(i + batch, n))]))
            arr[i : i + len(imgs)] = vae.encode_pixels(imgs).cpu().numpy().astype(dtype)
            progress.update(len(imgs))
            if log and (i // batch) % 100 == 0:
                log(f"encoded {i + len(imgs)} / {n}")
    arr.flush()
    del arr
    labels = ds.labels_int if ds.labels_int is not None else np.full(n, -1)
    np.save(tmp / "labels.npy", np.asarray(labels, dtype=np.int64))
    meta = dict(
        format="sid_fast.latents",
        version=1,
        source=str(source),
        count=n,
        dtype=dtype,
        shape=[8, h // 8, w // 8],
        image_shape=[c, h, w],
        label_dim=ds.label_dim,
        raw_mean=list(RAW_MEAN),
        raw_std=list(RAW_STD),
        final_mean=FINAL_MEAN,
        final_std=FINAL_STD,
    )
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    if dest.exists():
        dest.rmdir()
    os.replace(tmp, dest)
    return n


@click.group(context_settings=dict(help_option_names=["-h", "--help"]))
def main():
    """EDM2 latents with the Stability VAE."""


@main.command()
@click.option(
    "--source",
    required=True,
    metavar="ZIP|DIR",
    help="EDM dataset of RGB images, e.g. img512.zip (sid_fast.data.dataset_tool --transform center-crop-dhariwal "
    "--resolution 512)",
)
@click.option("--dest", required=True, metavar="DIR", help="Output folder (latents.npy, labels.npy, meta.json)")
@click.option("--vae", required=True, metavar="DIR", help=f"Local diffusers folder of {SD_VAE_FT_MSE} (or that hub id)")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True)
@click.option("--batch", type=click.IntRange(min=1), default=8, show_default=True, help="Images per VAE call")
@click.option("--device", default="cuda" if torch.cuda.is_available() else "cpu", show_default=True)
def encode(source, dest, vae, dtype, batch, device):
    """Encode an EDM image dataset (zip or folder) into a memory-mapped latent dataset."""
    timer = Timer()
    try:
        model = StabilityVAE.load(vae, device, batch)
        n = encode_dataset(source, dest, model, dtype, batch)
    except (LatentError, ValueError) as err:
        raise click.ClickException(str(err)) from None
    print(summary(f"Wrote latents to {dest}", n, "images", timer.seconds))


if __name__ == "__main__":
    main()
