"""Build a dataset in EDM's format from a folder of images, or from the CIFAR-10 python tarball.

    python -m sid_fast.data.dataset_tool --source photos/ --dest datasets/mine-64x64.zip --resolution 64 \
        --transform center-crop
    python -m sid_fast.data.dataset_tool --source cifar-10-python.tar.gz --dest datasets/cifar10-32x32.zip

Output (as EDM's dataset_tool.py writes it): PNGs stored uncompressed
(`compress_level=0`) under `{idx // 1000:05d}/img{idx:08d}.png`, in a `ZIP_STORED` zip (or a folder when --dest has
no .zip suffix), and `dataset.json` with `{"labels": [[name, label], ...]}` or `{"labels": null}`. Labels come from
the source's own `dataset.json` (names relative to --source), or with --labels-from-subdirs from the first-level
subfolder names (sorted; their index is the label). The CIFAR-10 tarball gives its 50,000 training images and labels
in the order of data_batch_1..5, as EDM's tool reads them (its pickles are read with a restricted unpickler that
only rebuilds numpy arrays). Images are read in sorted path order, converted to RGB (or kept
grey with --grey), optionally center-cropped and resized with PIL LANCZOS, and must end square with a power-of-two side.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import tarfile
import zipfile
from pathlib import Path

import click
import numpy as np
import PIL.Image

from sid_fast.data.dataset import IMAGE_EXTENSIONS, DatasetError, _is_pow2, center_crop_resize
from sid_fast.progress import Timer, bar, summary


def _source_labels(source: Path, names: list[str], from_subdirs: bool):
    if from_subdirs:
        classes = sorted({n.split("/")[0] for n in names if "/" in n})
        if not classes:
            raise DatasetError(f"{source}: --labels-from-subdirs, but the images are not in subfolders.")
        top = [n for n in names if "/" not in n]
        if top:
            raise DatasetError(f"{source}: --labels-from-subdirs, but {top[0]} is not in a class subfolder.")
        index = {c: i for i, c in enumerate(classes)}
        return [index[n.split("/")[0]] for n in names]
    meta_path = source / "dataset.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        labels = meta["labels"]
        if labels is None:
            return None
        table = {str(n).replace("\\", "/"): int(c) for n, c in labels}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise DatasetError(
            f'{meta_path}: expected {{"labels": [[name, integer], ...]}} or {{"labels": null}}.'
        ) from None
    missing = [n for n in names if n not in table]
    if missing:
        raise DatasetError(f"{meta_path}: no label for {len(missing)} image(s), e.g. {missing[0]!r}.")
    return [table[n] for n in names]


class _CifarUnpickler(pickle.Unpickler):
    """Only what CIFAR-10's batch pickles contain: dicts, lists, bytes and numpy arrays."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR-10 batch")


def _cifar10_items(path: Path, max_images):
    """(count, has_labels, iterator of (PIL image, label, where)) for the CIFAR-10 python tarball's training set."""
    images, labels = [], []
    try:
        with tarfile.open(path, "r:gz") as tar:
            for batch in range(1, 6):
                member = f"cifar-10-batches-py/data_batch_{batch}"
                try:
                    f = tar.extractfile(member)
                except KeyError:
                    raise DatasetError(
                        f"{path}: no {member}; expected the CIFAR-10 python tarball (cifar-10-python.tar.gz)."
                    ) from None
                data = _CifarUnpickler(f, encoding="latin1").load()
                images.append(np.asarray(data["data"], np.uint8).reshape(-1, 3, 32, 32))
                labels.append(np.asarray(data["labels"], np.int64))
    except (tarfile.TarError, OSError, pickle.UnpicklingError, KeyError, ValueError) as e:
        raise DatasetError(f"{path}: not a readable CIFAR-10 python tarball ({e}).") from None
    images, labels = np.concatenate(images).transpose(0, 2, 3, 1), np.concatenate(labels)
    n = len(images) if max_images is None else min(max_images, len(images))

    def items():
        for i in range(n):
            yield PIL.Image.fromarray(images[i]), int(labels[i]), f"{path}[{i}]"

    return n, True, items()


def _folder_items(source: Path, max_images, labels_from_subdirs: bool):
    """(count, has_labels, iterator of (PIL image, label or None, file)) for a folder of images."""
    names = sorted(
        str(p.relative_to(source)).replace(os.sep, "/")
        for p in source.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )
    if not names:
        raise DatasetError(f"{source}: contains no images ({', '.join(sorted(IMAGE_EXTENSIONS))}).")
    if max_images is not None:
        names = names[:max_images]
    labels = _source_labels(source, names, labels_from_subdirs)

    def items():
        for idx, name in enumerate(names):
            try:
                img = PIL.Image.open(source / name)
                img.load()
            except (OSError, PIL.UnidentifiedImageError) as e:
                raise DatasetError(f"{source / name}: cannot read the image ({e}).") from None
            yield img, None if labels is None else labels[idx], str(source / name)

    return len(names), labels is not None, items()


TRANSFORMS = ("none", "center-crop", "center-crop-dhariwal")


def center_crop_dhariwal(img, resolution: int):
    """ADM's crop (Dhariwal & Nichol), EDM2's `--transform=center-crop-dhariwal` for ImageNet-512: halve with a box
    filter while the short side is at least twice the resolution, resize the short side to the resolution with
    bicubic filtering, then crop the center square."""
    while min(img.size) >= 2 * resolution:
        img = img.resize(tuple(x // 2 for x in img.size), resample=PIL.Image.BOX)
    scale = resolution / min(img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=PIL.Image.BICUBIC)
    w, h = img.size
    left, top = (w - resolution) // 2, (h - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))


def convert(
    source,
    dest,
    resolution: int | None = None,
    transform: str = "none",
    max_images: int | None = None,
    grey: bool = False,
    labels_from_subdirs: bool = False,
) -> int:
    """Write the dataset; returns the number of images."""
    source, dest = Path(source), Path(dest)
    if transform not in TRANSFORMS:
        raise DatasetError(f"--transform {transform!r}: expected one of {', '.join(TRANSFORMS)}.")
    if transform != "none" and resolution is None:
        raise DatasetError(f"--transform {transform} needs --resolution.")
    if source.is_dir():
        count, has_labels, items = _folder_items(source, max_images, labels_from_subdirs)
    elif source.is_file() and source.name.endswith((".tar.gz", ".tgz")):
        count, has_labels, items = _cifar10_items(source, max_images)
    else:
        raise DatasetError(f"{source}: --source must be a folder of images or the CIFAR-10 python tarball (.tar.gz).")

    to_zip = dest.suffix.lower() == ".zip"
    if to_zip:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".part")
        archive = zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED)
    else:
        if dest.exists() and any(dest.iterdir()):
            raise DatasetError(f"{dest}: --dest folder exists and is not empty.")
        dest.mkdir(parents=True, exist_ok=True)

    def write(name: str, data: bytes):
        if to_zip:
            archive.writestr(name, data)
        else:
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            (dest / name).write_bytes(data)

    shape = None
    out_labels = []
    progress = bar(count, "converting", "img")
    try:
        for idx, (img, label, where) in enumerate(items):
            progress.update(1)
            img = img.convert("L" if grey else "RGB")
            if transform == "center-crop":
                img = center_crop_resize(img, resolution)
            elif transform == "center-crop-dhariwal":
                img = center_crop_dhariwal(img, resolution)
            elif resolution is not None and img.size != (resolution, resolution):
                if img.size[0] != img.size[1]:
                    raise DatasetError(
                        f"{where}: {img.size[0]}x{img.size[1]} is not square; use --transform center-crop."
                    )
                img = img.resize((resolution, resolution), PIL.Image.LANCZOS)
            w, h = img.size
            if shape is None:
                if w != h or not _is_pow2(w):
                    raise DatasetError(
                        f"{where}: {w}x{h}; images must be square with a power-of-two side (use --resolution "
                        f"and --transform center-crop)."
                    )
                shape = (w, h)
            elif (w, h) != shape:
                raise DatasetError(f"{where}: {w}x{h}, but the first image is {shape[0]}x{shape[1]}; use --resolution.")
            out_name = f"{idx // 1000:05d}/img{idx:08d}.png"
            buf = io.BytesIO()
            img.save(buf, format="png", compress_level=0, optimize=False)
            write(out_name, buf.getvalue())
            if has_labels:
                out_labels.append([out_name, int(label)])
        write("dataset.json", json.dumps({"labels": out_labels if has_labels else None}).encode())
        progress.close()
    except BaseException:
        progress.close()
        if to_zip:
            archive.close()
            tmp.unlink(missing_ok=True)
        raise
    if to_zip:
        archive.close()
        os.replace(tmp, dest)
    return count


@click.command(context_settings=dict(help_option_names=["-h", "--help"]))
@click.option(
    "--source",
    help="Folder of images (searched recursively) or cifar-10-python.tar.gz",
    metavar="DIR|TGZ",
    required=True,
)
@click.option("--dest", help="Output: a .zip (stored, as EDM) or a folder", metavar="PATH", required=True)
@click.option("--resolution", help="Output side in pixels (power of two)", metavar="INT", type=click.IntRange(min=1))
@click.option(
    "--transform",
    help="center-crop: crop to square, then resize (LANCZOS); center-crop-dhariwal: ADM's crop (EDM2's ImageNet-512)",
    type=click.Choice(list(TRANSFORMS)),
    default="none",
    show_default=True,
)
@click.option(
    "--max-images",
    "max_images",
    help="Use only the first N images (sorted by path)",
    metavar="INT",
    type=click.IntRange(min=1),
)
@click.option("--grey", help="Write single-channel images", is_flag=True)
@click.option(
    "--labels-from-subdirs", "labels_from_subdirs", help="Label = index of the first-level subfolder", is_flag=True
)
def main(source, dest, resolution, transform, max_images, grey, labels_from_subdirs):
    """Convert a folder of images to EDM's dataset format."""
    if resolution is not None and not _is_pow2(resolution):
        raise click.BadParameter(f"{resolution} is not a power of two.", param_hint="--resolution")
    timer = Timer()
    try:
        n = convert(source, dest, resolution, transform, max_images, grey, labels_from_subdirs)
    except DatasetError as e:
        raise click.ClickException(str(e)) from None
    print(summary(f"Wrote {dest}", n, "images", timer.seconds))


if __name__ == "__main__":
    main()
