"""Image datasets in EDM's format (EDM training/dataset.py, dataset_tool.py): an uncompressed zip or a folder of images.

Files are found recursively and sorted by their relative path; `dataset.json` (`{"labels": [[name, int], ...]}` or
`{"labels": null}`) gives integer labels, which become one-hot float32 rows with label_dim = max + 1. Images load as
uint8 CHW (grey images keep one channel) and must be square with a power-of-two side, all of one shape. With
`max_size`, a random subset is kept as EDM's ImageFolderDataset does: RandomState(seed) shuffle, first n, sorted.
`resolution` resizes on load (PIL LANCZOS, center-cropped to square first) for image folders that are not already
in EDM's format, e.g. a folder of JPEGs for reference statistics.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


class DatasetError(ValueError):
    """A dataset that cannot be read as EDM's format; the message names the file."""


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def center_crop_resize(img, resolution: int):
    """PIL image -> center-cropped square -> LANCZOS resize to resolution (EDM's dataset tool resizes with LANCZOS)."""
    import PIL.Image  # start-up time: PIL costs ~0.1 s, paid where images are read

    w, h = img.size
    s = min(w, h)
    if (w, h) != (s, s):
        img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    if s != resolution:
        img = img.resize((resolution, resolution), PIL.Image.LANCZOS)
    return img


class ImageDataset:
    """EDM dataset (zip or folder). `dataset[i]` -> (uint8 [C, H, W] numpy array, one-hot label or None)."""

    def __init__(
        self,
        path,
        max_size: int | None = None,
        random_seed: int = 0,
        use_labels: bool = True,
        resolution: int | None = None,
    ):
        self.path = Path(path)
        self.resolution = resolution
        self._zip = None
        if self.path.is_dir():
            self._type = "dir"
            names = [str(p.relative_to(self.path)).replace(os.sep, "/") for p in self.path.rglob("*") if p.is_file()]
        elif self.path.is_file() and zipfile.is_zipfile(self.path):
            self._type = "zip"
            names = self._get_zip().namelist()
        elif self.path.exists():
            raise DatasetError(f"{self.path}: not a folder or a zip archive of images.")
        else:
            raise DatasetError(f"{self.path}: no such dataset (expected a zip or a folder of images).")
        self.all_names = sorted(n for n in names if Path(n).suffix.lower() in IMAGE_EXTENSIONS)
        if not self.all_names:
            raise DatasetError(f"{self.path}: contains no images ({', '.join(sorted(IMAGE_EXTENSIONS))}).")
        self.indices = np.arange(len(self.all_names))
        if max_size is not None and max_size < len(self.indices):
            rng = np.random.RandomState(random_seed % (1 << 31))
            rng.shuffle(self.indices)
            self.indices = np.sort(self.indices[:max_size])
        self.names = [self.all_names[i] for i in self.indices]
        self.labels_int = self._load_labels() if use_labels else None
        first = self._load_raw(0)
        self.image_shape = list(first.shape)
        c, h, w = self.image_shape
        if h != w:
            raise DatasetError(
                f"{self.path}: {self.names[0]} is {w}x{h}; images must be square (resize with the dataset tool)."
            )
        if not _is_pow2(h):
            raise DatasetError(
                f"{self.path}: {self.names[0]} is {w}x{h}; the side must be a power of two (EDM's networks halve it)."
            )

    # -- files ---------------------------------------------------------------------------------------------------
    def _get_zip(self):
        if self._zip is None:
            self._zip = zipfile.ZipFile(self.path)
        return self._zip

    def _open(self, name):
        if self._type == "dir":
            return open(self.path / name, "rb")
        return self._get_zip().open(name, "r")

    def _has(self, name) -> bool:
        if self._type == "dir":
            return (self.path / name).is_file()
        return name in self._get_zip().namelist()

    def close(self):
        if self._zip is not None:
            self._zip.close()
            self._zip = None

    def __getstate__(self):  # DataLoader workers open their own zip handle
        return dict(self.__dict__, _zip=None)

    # -- labels --------------------------------------------------------------------------------------------------
    def _load_labels(self):
        if not self._has("dataset.json"):
            return None
        where = f"{self.path}/dataset.json"
        try:
            with self._open("dataset.json") as f:
                meta = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DatasetError(f"{where}: not valid JSON ({e}).") from None
        if not isinstance(meta, dict) or "labels" not in meta:
            raise DatasetError(f'{where}: expected {{"labels": [[name, label], ...]}} or {{"labels": null}}.')
        if meta["labels"] is None:
            return None
        try:
            table = {str(name).replace("\\", "/"): int(label) for name, label in meta["labels"]}
        except (TypeError, ValueError):
            raise DatasetError(f"{where}: every entry of 'labels' must be [file name, integer label].") from None
        missing = [n for n in self.names if n not in table]
        if missing:
            raise DatasetError(
                f"{where}: no label for {len(missing)} image(s), e.g. {missing[0]!r}; the label file disagrees "
                f"with the images."
            )
        known = set(self.all_names)
        extra = [n for n in table if n not in known]
        if extra:
            raise DatasetError(
                f"{where}: labels for {len(extra)} file(s) that are not in the dataset, e.g. {extra[0]!r}."
            )
        labels = np.array([table[n] for n in self.names], dtype=np.int64)
        if labels.min() < 0:
            raise DatasetError(f"{where}: labels must be non-negative integers, found {labels.min()}.")
        return labels

    @property
    def label_dim(self) -> int:
        return 0 if self.labels_int is None else int(self.labels_int.max()) + 1

    def label_onehot(self, i: int):
        if self.labels_int is None:
            return None
        out = np.zeros(self.label_dim, np.float32)
        out[self.labels_int[i]] = 1
        return out

    # -- images --------------------------------------------------------------------------------------------------
    def _load_raw(self, i: int) -> np.ndarray:
        import PIL.Image  # start-up time: PIL costs ~0.1 s, paid where images are read

        name = self.names[i]
        try:
            with self._open(name) as f:
                img = PIL.Image.open(io.BytesIO(f.read()))
                img.load()
        except (OSError, PIL.UnidentifiedImageError) as e:
            raise DatasetError(f"{self.path}: cannot read image {name} ({e}).") from None
        if img.mode not in ("L", "RGB"):
            img = img.convert("RGB")
        if self.resolution is not None:
            img = center_crop_resize(img, self.resolution)
        a = np.asarray(img)
        a = a[:, :, None] if a.ndim == 2 else a
        return a.transpose(2, 0, 1)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int):
        img = self._load_raw(i)
        if list(img.shape) != self.image_shape:
            raise DatasetError(
                f"{self.path}: {self.names[i]} has shape {list(img.shape)} (CHW) but the first image has "
                f"{self.image_shape}."
            )
        return np.ascontiguousarray(img), self.label_onehot(i)


class LabelsDataset:
    """Only the labels of a dataset: its `dataset.json` ({"labels": [[name, int], ...]}). Data-free SiD of a conditional
    teacher needs nothing else (the official EDM2 runs pass img512_labels/dataset.json: ImageNet's label
    frequencies)."""

    image_shape = None

    def __init__(self, path):
        self.path = Path(path)
        try:
            meta = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DatasetError(f"{self.path}: cannot be read as a dataset.json ({type(e).__name__}: {e}).") from None
        entries = meta.get("labels") if isinstance(meta, dict) else None
        if not isinstance(entries, list) or not entries:
            raise DatasetError(f'{self.path}: expected {{"labels": [[name, label], ...]}} with at least one entry.')
        try:
            self.labels_int = np.array([int(label) for _, label in entries], dtype=np.int64)
        except (TypeError, ValueError):
            raise DatasetError(f"{self.path}: every entry of 'labels' must be [file name, integer label].") from None
        if self.labels_int.min() < 0:
            raise DatasetError(f"{self.path}: labels must be non-negative integers, found {self.labels_int.min()}.")

    @property
    def label_dim(self) -> int:
        return int(self.labels_int.max()) + 1

    def __len__(self) -> int:
        return len(self.labels_int)


class _RankShare:
    """This rank's indices (rank::world) of a dataset, as uint8 torch tensors (module level, so workers can pickle
    it)."""

    def __init__(self, dataset: ImageDataset, rank: int, world: int):
        self.dataset, self.idx = dataset, list(range(rank, len(dataset), world))

    def __len__(self):
        return len(self.idx)

    def __getitem__(self, j):
        import torch  # the dataset tool and DataLoader workers read images without torch

        return torch.from_numpy(self.dataset[self.idx[j]][0])


def uint8_batches(dataset: ImageDataset, batch: int, rank: int = 0, world: int = 1, num_workers: int = 2):
    """Yield uint8 NCHW torch batches of this rank's share of the dataset."""
    import torch  # the dataset tool and DataLoader workers read images without torch

    share = _RankShare(dataset, rank, world)
    yield from torch.utils.data.DataLoader(share, batch_size=batch, num_workers=num_workers, shuffle=False)
