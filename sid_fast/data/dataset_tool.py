"""Build a dataset in EDM's format from a folder of images.

    python -m sid_fast.data.dataset_tool --source photos/ --dest datasets/mine-64x64.zip --resolution 64 \
        --transform center-crop

Output (as EDM's dataset_tool.py writes it, shared/reference/edm.md section 5): PNGs stored uncompressed
(`compress_level=0`) under `{idx // 1000:05d}/img{idx:08d}.png`, in a `ZIP_STORED` zip (or a folder when --dest has
no .zip suffix), and `dataset.json` with `{"labels": [[name, label], ...]}` or `{"labels": null}`. Labels come from
the source's own `dataset.json` (names relative to --source), or with --labels-from-subdirs from the first-level
subfolder names (sorted; their index is the label). Images are read in sorted path order, converted to RGB (or kept
grey with --grey), optionally center-cropped and resized with PIL LANCZOS, and must end square with a power-of-two side.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path

import click

from sid_fast.data.dataset import IMAGE_EXTENSIONS, DatasetError, _is_pow2, center_crop_resize


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
        table = {str(n).replace("\\", "/"): int(l) for n, l in labels}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise DatasetError(f"{meta_path}: expected {{\"labels\": [[name, integer], ...]}} or {{\"labels\": null}}.") from None
    missing = [n for n in names if n not in table]
    if missing:
        raise DatasetError(f"{meta_path}: no label for {len(missing)} image(s), e.g. {missing[0]!r}.")
    return [table[n] for n in names]


def convert(source, dest, resolution: int | None = None, transform: str = "none", max_images: int | None = None,
            grey: bool = False, labels_from_subdirs: bool = False) -> int:
    """Write the dataset; returns the number of images."""
    import PIL.Image

    source, dest = Path(source), Path(dest)
    if not source.is_dir():
        raise DatasetError(f"{source}: --source must be a folder of images.")
    names = sorted(str(p.relative_to(source)).replace(os.sep, "/") for p in source.rglob("*")
                   if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not names:
        raise DatasetError(f"{source}: contains no images ({', '.join(sorted(IMAGE_EXTENSIONS))}).")
    if max_images is not None:
        names = names[:max_images]
    labels = _source_labels(source, names, labels_from_subdirs)
    if transform not in ("none", "center-crop"):
        raise DatasetError(f"--transform {transform!r}: expected 'none' or 'center-crop'.")
    if transform == "center-crop" and resolution is None:
        raise DatasetError("--transform center-crop needs --resolution.")

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
    try:
        for idx, name in enumerate(names):
            try:
                img = PIL.Image.open(source / name)
                img.load()
            except (OSError, PIL.UnidentifiedImageError) as e:
                raise DatasetError(f"{source / name}: cannot read the image ({e}).") from None
            img = img.convert("L" if grey else "RGB")
            if transform == "center-crop":
                img = center_crop_resize(img, resolution)
            elif resolution is not None and img.size != (resolution, resolution):
                if img.size[0] != img.size[1]:
                    raise DatasetError(f"{source / name}: {img.size[0]}x{img.size[1]} is not square; use --transform center-crop.")
                img = img.resize((resolution, resolution), PIL.Image.LANCZOS)
            w, h = img.size
            if shape is None:
                if w != h or not _is_pow2(w):
                    raise DatasetError(
                        f"{source / name}: {w}x{h}; images must be square with a power-of-two side (use --resolution "
                        f"and --transform center-crop)."
                    )
                shape = (w, h)
            elif (w, h) != shape:
                raise DatasetError(f"{source / name}: {w}x{h}, but the first image is {shape[0]}x{shape[1]}; use --resolution.")
            out_name = f"{idx // 1000:05d}/img{idx:08d}.png"
            buf = io.BytesIO()
            img.save(buf, format="png", compress_level=0, optimize=False)
            write(out_name, buf.getvalue())
            if labels is not None:
                out_labels.append([out_name, int(labels[idx])])
        write("dataset.json", json.dumps({"labels": out_labels if labels is not None else None}).encode())
    except BaseException:
        if to_zip:
            archive.close()
            tmp.unlink(missing_ok=True)
        raise
    if to_zip:
        archive.close()
        os.replace(tmp, dest)
    return len(names)


@click.command(context_settings=dict(help_option_names=["-h", "--help"]))
@click.option("--source", help="Folder of images (searched recursively)", metavar="DIR", required=True)
@click.option("--dest", help="Output: a .zip (stored, as EDM) or a folder", metavar="PATH", required=True)
@click.option("--resolution", help="Output side in pixels (power of two)", metavar="INT", type=click.IntRange(min=1))
@click.option("--transform", help="center-crop: crop to square before resizing", type=click.Choice(["none", "center-crop"]), default="none", show_default=True)
@click.option("--max-images", "max_images", help="Use only the first N images (sorted by path)", metavar="INT", type=click.IntRange(min=1))
@click.option("--grey", help="Write single-channel images", is_flag=True)
@click.option("--labels-from-subdirs", "labels_from_subdirs", help="Label = index of the first-level subfolder", is_flag=True)
def main(source, dest, resolution, transform, max_images, grey, labels_from_subdirs):
    """Convert a folder of images to EDM's dataset format."""
    if resolution is not None and not _is_pow2(resolution):
        raise click.BadParameter(f"{resolution} is not a power of two.", param_hint="--resolution")
    try:
        n = convert(source, dest, resolution, transform, max_images, grey, labels_from_subdirs)
    except DatasetError as e:
        raise click.ClickException(str(e)) from None
    print(f"Wrote {n} images to {dest}")


if __name__ == "__main__":
    main()
