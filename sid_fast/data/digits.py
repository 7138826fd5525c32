"""The handwritten digits (1797 images, 8x8, 17 grey levels) at their native resolution, for the default.

The set is scikit-learn's `load_digits` (the test part of UCI's "Optical Recognition of Handwritten Digits", Alpaydin
and Kaynak 1998, CC BY 4.0), bundled as `sid_fast/assets/digits.npz` (45 kB: images uint8 0..16 [1797, 8, 8], labels
uint8) so that the default run needs no scikit-learn (a 40 MB install with scipy's weight behind it, for 115 kB of
data); tests/test_portable.py checks the file against scikit-learn's copy where scikit-learn is installed.

The 0..16 values are mapped to 0..255 and rounded to uint8 (as an EDM dataset stores them), then to [-1, 1] as EDM
does (x / 127.5 - 1). Native 8x8 rather than an upsampled 16x16: the upsampled images carry no more information and
cost four times the pixels in every network call of the CPU-sized default.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

ASSET = Path(__file__).resolve().parent.parent / "assets" / "digits.npz"
RESOLUTION = 8
NUM_CLASSES = 10


@functools.lru_cache(maxsize=1)
def digits_uint8() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [1797, 1, 8, 8], labels int64 [1797])."""
    with np.load(ASSET) as f:
        raw, labels = f["images"], f["labels"]
    imgs = np.clip(np.round(raw.astype(np.float64) * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return imgs[:, None], labels.astype(np.int64)


def digits_tensor() -> tuple[torch.Tensor, torch.Tensor]:
    """(images float32 in [-1, 1], [1797, 1, 8, 8]; labels int64 [1797])."""
    imgs, labels = digits_uint8()
    return torch.from_numpy(imgs).float() / 127.5 - 1, torch.from_numpy(labels)


class DigitsDataset:
    """The digits as an EDM-style dataset (`--data digits`): dataset[i] -> (uint8 [1, 8, 8], one-hot label)."""

    def __init__(self):
        self.images, self.labels_int = digits_uint8()
        self.image_shape = list(self.images.shape[1:])
        self.path = "digits"

    @property
    def label_dim(self) -> int:
        return NUM_CLASSES

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        onehot = np.zeros(NUM_CLASSES, np.float32)
        onehot[self.labels_int[i]] = 1
        return self.images[i], onehot
