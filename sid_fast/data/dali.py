"""Optional nvidia-dali ingestion of JPEG folders (for reference statistics of large image sets).

DALI decodes (nvJPEG on the GPU when there is one, its CPU decoder otherwise; both agree with PIL's libjpeg-turbo
decode) and center-crops to a square; the resize to the target side then runs in torch with PIL's own LANCZOS
coefficients (support 3 x scale, window clipped at the border and renormalised, 22-bit fixed point, horizontal pass
first with a rounded uint8 intermediate), as two small matrix products on the same device. So the DALI path gives the
PIL path's pixels to within 1 grey level (float vs fixed-point rounding at ties). DALI's own resize treats borders
differently and differs from PIL by 2 or more grey levels at the edges, which is why it is not used.

PIL remains the default loader; install DALI with `pip install nvidia-dali-cuda120` (CUDA 12) or
`pip install nvidia-dali-cuda130` (CUDA 13).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from sid_fast.data.dataset import DatasetError, ImageDataset

INSTALL_HINT = "pip install nvidia-dali-cuda120 (or nvidia-dali-cuda130 for CUDA 13)"
PRECISION_BITS = 32 - 8 - 2  # Pillow's fixed-point precision for 8-bit images


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def require_dali() -> None:
    if not dali_available():
        raise DatasetError(f"--loader dali needs nvidia-dali, which is not installed: {INSTALL_HINT}.")


def _lanczos3(x: float) -> float:
    if -3.0 <= x < 3.0:
        return _sinc(x) * _sinc(x / 3.0)
    return 0.0


def _sinc(x: float) -> float:
    if x == 0.0:
        return 1.0
    x *= math.pi
    return math.sin(x) / x


@functools.lru_cache(maxsize=64)
def pil_lanczos_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] resampling matrix with Pillow's LANCZOS coefficients, already in its 22-bit fixed point / 2^22."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 3.0 * filterscale
    m = np.zeros((out_size, in_size), np.float64)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size) - xmin
        w = np.array([_lanczos3((x + xmin - center + 0.5) / filterscale) for x in range(xmax)])
        total = w.sum()
        if total != 0:
            w = w / total
        fixed = np.where(w < 0, np.trunc(-0.5 + w * (1 << PRECISION_BITS)), np.trunc(0.5 + w * (1 << PRECISION_BITS)))
        m[xx, xmin : xmin + xmax] = fixed / (1 << PRECISION_BITS)
    return m


def pil_resize(img: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [C, H, W] (square) -> uint8 [C, size, size], PIL LANCZOS on img's device."""
    c, h, w = img.shape
    x = img.to(torch.float64 if img.device.type == "cpu" else torch.float32)

    def rnd(t):  # Pillow: (acc + 2^(P-1)) >> P, then clip to 0..255
        return torch.floor(t + 0.5).clamp_(0, 255)

    if w != size:
        mw = torch.as_tensor(pil_lanczos_matrix(w, size), dtype=x.dtype, device=x.device)
        x = rnd(x @ mw.T)
    if h != size:
        mh = torch.as_tensor(pil_lanczos_matrix(h, size), dtype=x.dtype, device=x.device)
        x = rnd(mh @ x)
    return x.to(torch.uint8)


def dali_batches(
    path, resolution: int, batch: int = 64, rank: int = 0, world: int = 1, device=None, num_threads: int = 2
):
    """Yield uint8 NCHW batches of this rank's share (rank::world) of an image folder, decoded by DALI.

    Files and order are those of ImageDataset(path) (sorted relative paths); images are center-cropped to a square
    and resized to `resolution` as the PIL path does.
    """
    require_dali()
    from nvidia.dali import fn, pipeline_def, types

    ds = ImageDataset(path, use_labels=False, resolution=resolution)
    if ds._type != "dir":
        raise DatasetError(f"{path}: --loader dali reads folders of JPEG files, not zip archives.")
    files = [str(ds.path / n) for n in ds.names][rank::world]
    if not files:
        return
    on_gpu = device is not None and torch.device(device).type == "cuda"
    dev_id = (torch.device(device).index or 0) if on_gpu else None

    @pipeline_def(batch_size=min(batch, len(files)), num_threads=num_threads, device_id=dev_id, seed=0)
    def pipe():
        jpegs, _ = fn.readers.file(files=files, random_shuffle=False, pad_last_batch=True, name="reader")
        shape = fn.peek_image_shape(jpegs)
        h, w = shape[0], shape[1]
        import nvidia.dali.math as dmath

        s = dmath.min(h, w)
        start = fn.cast(fn.stack((h - s) // 2, (w - s) // 2), dtype=types.INT32)
        size = fn.cast(fn.stack(s, s), dtype=types.INT32)
        img = fn.decoders.image(jpegs, device="mixed" if on_gpu else "cpu", output_type=types.RGB)
        return fn.slice(img, start=start, shape=size, axis_names="HW")

    p = pipe()
    p.build()
    remaining = len(files)
    while remaining > 0:
        (out,) = p.run()
        n = min(remaining, len(out))
        imgs = []
        for i in range(n):
            if on_gpu:
                from nvidia.dali.plugin.pytorch import feed_ndarray

                t = torch.empty(out[i].shape(), dtype=torch.uint8, device=device)
                feed_ndarray(out[i], t)
            else:
                t = torch.from_numpy(np.array(out.at(i)))
            imgs.append(pil_resize(t.permute(2, 0, 1), resolution))
        remaining -= n
        yield torch.stack(imgs)
