"""Latent/caption pairs for the data-aided variant of SiD on flow matching (SiDA-style, "Score Distillation of Flow
Matching Models", arXiv 2509.25127; official ml-sid-dit `--train_diffusiongan 1 --text_image_pair_path`): real images
encoded once by the teacher's VAE, each with its caption.

A pairs folder (`python -m sid_fast.t2i.pairs build`):
- `latents.npy`: [N, 2C, h, w] the VAE posterior's mean and std (an `AutoencoderKL`: SD3, FLUX) or [N, C, h, w] its
  deterministic latent (an `AutoencoderDC`: SANA), float32 or float16, memory-mapped read-only by every rank (one copy
  in the page cache per node);
- `captions.txt`: caption i on line i (newlines inside a caption become spaces; an empty caption is refused);
- `meta.json`: the format, count, shapes and the VAE's class, scaling_factor and shift_factor, checked against the
  teacher's when a run opens the folder.
A training sample is drawn afresh at every use: x0 = (mean + eps std - shift_factor) scaling_factor, eps from the
micro-batch's generator (the official loop encodes each real image on the fly with `latent_dist.sample()` and the same
affine map; SANA's DC-AE has no posterior spread).

Sources: a folder of images with a `metadata.jsonl` of {"file_name", "text"} lines (the layout of Hugging Face's
`imagefolder` loader), center-cropped and resized with LANCZOS to the teacher's pixel size; or `digits`, the bundled
8x8 digits with the captions of the digits-flow teacher's prompts (image j: template j mod 6 of its digit). A build
writes into DEST.part and marks each chunk of 256 images done once flushed: a killed build resumes where it stopped
when run again with the same arguments (with any number of processes; under torchrun every rank encodes a share of
the chunks into the one array), and DEST appears only when complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import click
import numpy as np
import torch

from sid_fast import dist
from sid_fast.data.prompts import PromptError, read_prompts
from sid_fast.progress import Timer, bar, summary
from sid_fast.storage import atomic_write_text

FORMAT = "sid_fast.pairs"
VERSION = 1
LATENTS, CAPTIONS, META, PROGRESS = "latents.npy", "captions.txt", "meta.json", "progress.json"
CHUNK = 256  # images per unit of work and of progress (a rank's chunk, marked done when flushed)


class PairsError(ValueError):
    """A pairs folder or source that cannot be used; the message names the file or flag."""


# ----------------------------------------------------------------------------------------------------------------
# The VAE side.


def vae_kind(vae) -> str:
    """The posterior kind: "gaussian" (AutoencoderKL) or "deterministic" (AutoencoderDC, SANA's DC-AE)."""
    return "deterministic" if type(vae).__name__ == "AutoencoderDC" else "gaussian"


def vae_downscale(vae) -> int:
    """Pixels per latent side of a diffusers VAE (AutoencoderKL: 2^(levels - 1); AutoencoderDC: the same of its
    encoder's levels)."""
    cfg = vae.config
    levels = cfg.get("encoder_block_out_channels") or cfg.get("block_out_channels")
    return 2 ** (len(levels) - 1)


def vae_meta(vae) -> dict:
    cfg = vae.config
    return dict(
        vae=type(vae).__name__,
        posterior=vae_kind(vae),
        latent_channels=int(cfg.latent_channels),
        scaling_factor=float(cfg.scaling_factor),
        shift_factor=float(cfg.get("shift_factor") or 0.0),
        image_channels=int(cfg.in_channels),
    )


@torch.no_grad()
def encode_raw(vae, images: torch.Tensor) -> torch.Tensor:
    """Raw latents of images in [-1, 1]: [N, 2C, h, w] (posterior mean, std) or [N, C, h, w] (DC-AE)."""
    x = images.to(next(vae.parameters()).device, next(vae.parameters()).dtype)
    if vae_kind(vae) == "deterministic":
        return vae.encode(x).latent.float()
    post = vae.encode(x).latent_dist
    return torch.cat([post.mean, post.std], dim=1).float()


def draw_latents(raw: torch.Tensor, meta: dict, generator=None) -> torch.Tensor:
    """Training latents of raw ones: (mean + eps std - shift_factor) scaling_factor, eps drawn from `generator`
    (none for a deterministic autoencoder), in float32 (float64 where that is torch's default dtype)."""
    raw = raw.to(torch.promote_types(torch.float32, torch.get_default_dtype()))
    c = int(meta["latent_channels"])
    x = raw[:, :c]
    if meta["posterior"] == "gaussian":
        eps = torch.randn(x.shape, device=raw.device, generator=generator)
        x = x + eps * raw[:, c:]
    return (x - float(meta["shift_factor"])) * float(meta["scaling_factor"])


# ----------------------------------------------------------------------------------------------------------------
# Reading.


class PairDataset(torch.utils.data.Dataset):
    """A pairs folder: item i -> (raw latents [2C or C, h, w] float32, i); `captions` (a PromptFile, line i the
    caption of pair i) and `labels_int` (arange: each pair's own index, the caption the real stream hands over)."""

    def __init__(self, path=None, *, arrays=None, captions=None, meta=None):
        """From a folder, or (tests, the bundled digits) from an array, a list of captions and their meta."""
        self.path = None if path is None else Path(path)
        if self.path is not None:
            meta_path = self.path / META
            try:
                meta = json.loads(meta_path.read_text())
            except (OSError, ValueError):
                raise PairsError(
                    f"{self.path}: not a pairs folder (no readable {META}); make one with "
                    "`python -m sid_fast.t2i.pairs build`."
                ) from None
            if meta.get("format") != FORMAT:
                raise PairsError(f"{meta_path}: format {meta.get('format')!r}, not {FORMAT!r}.")
            try:
                captions = read_prompts(self.path / CAPTIONS)
            except PromptError as e:
                raise PairsError(str(e)) from None
        self.meta, self.captions, self._array = meta, captions, arrays
        arr = self.array()
        n = int(meta["count"])
        want = [2 * meta["latent_channels"] if meta["posterior"] == "gaussian" else meta["latent_channels"]]
        if arr.shape[0] != n or list(arr.shape[1:2]) != want:
            raise PairsError(f"{self._where(LATENTS)}: holds {list(arr.shape)}, not [{n}, {want[0]}, h, w].")
        if len(captions) != n:
            raise PairsError(f"{self._where(CAPTIONS)}: {len(captions)} captions for {n} latents (one per line).")
        self.shape = list(arr.shape[1:])
        self.labels_int = np.arange(n)
        if self.path is not None:
            self._array = None  # reopened lazily in each process (DataLoader workers)

    def _where(self, name: str) -> str:
        return str(self.path / name) if self.path is not None else name

    def array(self):
        if self._array is None:
            self._array = np.load(self.path / LATENTS, mmap_mode="r")
        return self._array

    def __getstate__(self):
        return dict(self.__dict__, _array=None) if self.path is not None else self.__dict__

    def __len__(self) -> int:
        return int(self.meta["count"])

    @property
    def latent_shape(self) -> list[int]:
        return [int(self.meta["latent_channels"]), *self.shape[1:]]

    def __getitem__(self, i: int):
        return np.array(self.array()[i], dtype=np.float32), i

    def check_vae(self, vae, where: str) -> None:
        """Refuse pairs encoded by another VAE than the teacher's (`where`: the flag that named the folder)."""
        mine, theirs = {k: self.meta.get(k) for k in vae_meta(vae)}, vae_meta(vae)
        bad = [k for k in theirs if mine[k] != theirs[k]]
        if bad:
            k = bad[0]
            raise PairsError(f"{where}: encoded with {k} {mine[k]}, the teacher's VAE has {theirs[k]}.")


def open_pairs(spec: str, vae) -> PairDataset:
    """--data of a data-aided flow run: a pairs folder, or `digits` (the bundled digits through `vae`)."""
    if spec == "digits":
        return digits_pairs(vae)
    ds = PairDataset(spec)
    ds.check_vae(vae, f"--data {spec}")
    return ds


# ----------------------------------------------------------------------------------------------------------------
# Sources.


def digits_captions(labels) -> list[str]:
    """Caption j: template j mod 6 of digit labels[j] (the digits-flow teacher's prompts)."""
    from sid_fast.t2i import digits  # the digits prompts; a source of pairs among others

    return [digits.prompt_text(j % len(digits.TEMPLATES), int(d)) for j, d in enumerate(labels)]


def digits_pairs(vae) -> PairDataset:
    """The 1,797 bundled digits encoded by `vae` (8x8 grey images; the digits-flow teacher's VAE) with their captions,
    in memory."""
    from sid_fast.data.digits import digits_tensor  # the bundled digits

    images, labels = digits_tensor()
    meta = vae_meta(vae)
    if meta["image_channels"] != 1 or 8 % vae_downscale(vae):
        raise PairsError("--data digits: the teacher's VAE does not take 1x8x8 images (the digits-flow teacher's).")
    raw = torch.cat([encode_raw(vae, images[i : i + 512]).cpu() for i in range(0, len(images), 512)]).numpy()
    meta.update(format=FORMAT, version=VERSION, count=len(images), source="digits", image_size=8)
    return PairDataset(arrays=raw, captions=digits_captions(labels.tolist()), meta=meta)


def read_imagefolder(source) -> list[tuple[Path, str]]:
    """(image path, caption) of each line of SOURCE/metadata.jsonl, in file order."""
    src = Path(source)
    meta = src / "metadata.jsonl"
    if not meta.is_file():
        raise PairsError(f'--source {src}: no metadata.jsonl (lines of {{"file_name": ..., "text": ...}}).')
    items = []
    with open(meta, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                name, text = row["file_name"], row["text"]
            except (ValueError, KeyError, TypeError):
                raise PairsError(f"{meta}:{n}: not a JSON object with file_name and text.") from None
            text = " ".join(str(text).split())
            if not text:
                raise PairsError(f"{meta}:{n}: the caption of {name} is empty.")
            if not (src / name).is_file():
                raise PairsError(f"{meta}:{n}: no image {src / name}.")
            items.append((src / name, text))
    if not items:
        raise PairsError(f"{meta}: holds no pair.")
    return items


def load_image(path: Path, size: int, channels: int) -> torch.Tensor:
    """[channels, size, size] in [-1, 1]: center-cropped, LANCZOS-resized (sid_fast.data.dataset.center_crop_resize)."""
    import PIL.Image  # start-up time: PIL is paid where images are read

    from sid_fast.data.dataset import center_crop_resize  # EDM's crop and resize

    with PIL.Image.open(path) as im:
        img = center_crop_resize(im.convert("L" if channels == 1 else "RGB"), size)
        a = np.asarray(img, dtype=np.uint8).reshape(size, size, -1)
    return torch.from_numpy(a.copy()).permute(2, 0, 1).float() / 127.5 - 1


def teacher_vae(teacher, device="cpu"):
    """The VAE of a diffusers pipeline folder (its vae/ subfolder, the class model_index.json names)."""
    import diffusers  # optional dependency of the text-to-image path

    folder = Path(teacher)
    try:
        index = json.loads((folder / "model_index.json").read_text())
        cls = getattr(diffusers, index["vae"][1])
        return cls.from_pretrained(str(folder), subfolder="vae").to(device).eval().requires_grad_(False)
    except Exception as e:  # a folder without model_index.json or vae/, a corrupt file
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise PairsError(f"--teacher {teacher}: no loadable VAE ({reason}).") from None


def build(source, dest, vae, size: int, dtype: str = "float16", batch: int = 16, log=print) -> int:
    """Encode SOURCE (an imagefolder with metadata.jsonl) into the pairs folder DEST; returns the pair count. Under
    torchrun every rank encodes its share of the chunks (chunk c on rank c mod world) into the one memory-mapped
    array. A chunk is marked done (an empty file DEST.part/done/c) after its latents are flushed, so a build killed at
    any point resumes, with any number of processes, where it stopped; DEST appears only when every chunk is done."""
    if dtype not in ("float32", "float16"):
        raise PairsError(f"--dtype {dtype!r}: choose float16 or float32.")
    rank, world = dist.rank(), dist.world_size()
    dest = Path(dest)
    if dest.exists():
        raise PairsError(f"--dest {dest}: exists; choose a new folder.")
    items = read_imagefolder(source)
    n, meta = len(items), vae_meta(vae)
    down = vae_downscale(vae)
    if size % down:
        raise PairsError(f"--resolution {size}: not a multiple of the VAE's {down} pixels per latent.")
    h = size // down
    c = 2 * meta["latent_channels"] if meta["posterior"] == "gaussian" else meta["latent_channels"]
    meta.update(format=FORMAT, version=VERSION, count=n, source=str(source), image_size=size, dtype=dtype)
    tmp = dest.with_name(dest.name + ".part")
    chunks = range((n + CHUNK - 1) // CHUNK)
    if rank == 0:  # a partial build of other settings is started again; one of these settings resumes
        resume = (tmp / PROGRESS).is_file() and json.loads((tmp / PROGRESS).read_text()).get("meta") == meta
        if not resume and tmp.exists():
            shutil.rmtree(tmp)
        (tmp / "done").mkdir(parents=True, exist_ok=True)
        if not resume:
            np.lib.format.open_memmap(tmp / LATENTS, mode="w+", dtype=np.dtype(dtype), shape=(n, c, h, h)).flush()
            atomic_write_text(tmp / PROGRESS, json.dumps(dict(meta=meta)))
        done = sum((tmp / "done" / str(k)).exists() for k in chunks)
        if resume and log:
            log(f"resuming {tmp}: {done} of {len(chunks)} chunks encoded")
    dist.barrier()
    arr = np.load(tmp / LATENTS, mmap_mode="r+")
    mine = [k for k in chunks if k % world == rank and not (tmp / "done" / str(k)).exists()]
    with bar(sum(min(CHUNK, n - k * CHUNK) for k in mine), "encoding", "img") as progress:
        for k in mine:
            lo, hi = k * CHUNK, min((k + 1) * CHUNK, n)
            for i in range(lo, hi, batch):
                j = min(i + batch, hi)
                imgs = torch.stack([load_image(p, size, meta["image_channels"]) for p, _ in items[i:j]])
                arr[i:j] = encode_raw(vae, imgs).cpu().numpy().astype(dtype)
                progress.update(j - i)
            arr.flush()
            atomic_write_text(tmp / "done" / str(k), "")
    del arr
    dist.barrier()
    if rank == 0:
        missing = [k for k in chunks if not (tmp / "done" / str(k)).exists()]
        if missing:
            raise PairsError(f"{tmp}: chunks {missing[:5]} were not encoded; run the same command again to finish.")
        atomic_write_text(tmp / CAPTIONS, "".join(text + "\n" for _, text in items))
        atomic_write_text(tmp / META, json.dumps(meta, indent=2) + "\n")
        (tmp / PROGRESS).unlink()
        shutil.rmtree(tmp / "done")
        os.replace(tmp, dest)
    dist.barrier()
    return n


@click.group(context_settings=dict(help_option_names=["-h", "--help"]))
def main():
    """Latent/caption pairs for data-aided SiD on flow-matching teachers (train.py --method sida --data PAIRS)."""


@main.command("build")
@click.option("--teacher", required=True, metavar="DIR", help="The teacher's diffusers folder (its vae/ encodes)")
@click.option("--source", required=True, metavar="DIR", help="Images with metadata.jsonl ({file_name, text} lines)")
@click.option("--dest", required=True, metavar="DIR", help="The pairs folder to write (must not exist)")
@click.option("--resolution", required=True, type=click.IntRange(min=8), metavar="PX", help="Pixel side (SANA 512)")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True)
@click.option("--batch", type=click.IntRange(min=1), default=16, show_default=True, help="Images per VAE call")
@click.option("--device", default="cuda" if torch.cuda.is_available() else "cpu", show_default=True)
def build_cmd(teacher, source, dest, resolution, dtype, batch, device):
    """Encode an image folder with captions into a pairs folder (resumable; under torchrun, shared by the ranks)."""

    timer = Timer()
    on = dist.init()
    device = device if dist.world_size() == 1 or on.type != "cuda" else str(on)  # each rank its own GPU
    try:
        n = build(source, dest, teacher_vae(teacher, device), resolution, dtype, batch, log=dist.print0)
    except PairsError as e:
        raise click.ClickException(str(e)) from None
    finally:
        dist.finish()
    dist.print0(summary(f"Wrote pairs to {dest}", n, "pairs", timer.seconds))


if __name__ == "__main__":
    main()
