"""Generate images from a network file: SiD generators (one step, or their K steps) or EDM teachers (Heun sampler).

    python -m sid_fast.sample --network runs/00000-.../network-snapshot-000000048128 --seeds 0-63 --outdir out
    python -m sid_fast.sample --network edm-cifar10-32x32-cond-vp.pkl --seeds 0-63 --steps 18 --outdir out

The sampler is chosen from the file: sid_fast generator snapshots carry kind="generator", their sigma_init and step
count and are sampled with those steps (sid_fast.sampling.generator_sample); anything else runs EDM's Heun sampler.
SiD's own `network-snapshot-*.pkl` files look like EDM teachers from the outside: pass `--sampler onestep` for them.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import click
import torch

from sid_fast.checkpoints import CheckpointError, load_network_file
from sid_fast.files import DestinationError, check_folder_destination
from sid_fast.flags import init_sigma_option
from sid_fast.latents import StabilityVAE
from sid_fast.sampling import check_vae, generate_uint8, image_grid, save_image

# Seeds feed torch.Generator(...).manual_seed(seed % 2**32), as EDM's StackedRandomGenerator does: a larger seed
# would silently repeat a smaller one's image. A list is held in memory (one image per entry), hence its bound.
MAX_SEED = 2**32 - 1
MAX_SEEDS = 10_000_000


def parse_int_list(s: str) -> list[int]:
    """'0-3,10,12-13' -> [0, 1, 2, 3, 10, 12, 13]; every value in [0, MAX_SEED], at most MAX_SEEDS of them (counted
    before the list is made). Anything else is a click.BadParameter sentence naming --seeds."""
    parts, count = [], 0
    for part in s.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise click.BadParameter(f"{s!r} is not a list of integers and ranges like 0-63,100.", param_hint="--seeds")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise click.BadParameter(f"range {part.strip()!r} is empty.", param_hint="--seeds")
        if hi > MAX_SEED:
            raise click.BadParameter(f"{hi} is out of range: values go from 0 to {MAX_SEED}.", param_hint="--seeds")
        count += hi - lo + 1
        if count > MAX_SEEDS:
            raise click.BadParameter(
                f"{s!r} names more than {MAX_SEEDS:,} values; split the job.", param_hint="--seeds"
            )
        parts.append((lo, hi))
    return [v for lo, hi in parts for v in range(lo, hi + 1)]


_SAMPLE_NAME = re.compile(r"^\d{6,}(\.png)?$")  # NNNNNN.png, and NNNNNN/ subfolders of 1000 seeds


def check_outdir(outdir, grid=None, overwrite: bool = False) -> None:
    """A sampler's --outdir: new, empty, or holding only images it names (a previous run's, which it replaces);
    anything else is refused unless --overwrite (then it is kept: the sampler writes only its own names). --grid must
    name a PNG file (an existing one is replaced: the user named it as the output)."""
    if grid is not None and (Path(grid).is_dir() or Path(grid).suffix.lower() != ".png"):
        raise click.BadParameter(
            f"{grid}: the grid is written as a PNG file (a name ending in .png).", param_hint="--grid"
        )
    grid_name = Path(grid).name if grid and Path(grid).resolve().parent == Path(outdir).resolve() else None
    try:
        check_folder_destination(
            outdir, lambda n: bool(_SAMPLE_NAME.match(n)) or n == grid_name, "the sampler", overwrite
        )
    except DestinationError as e:
        raise click.BadParameter(str(e), param_hint="--outdir") from None


@click.command(context_settings=dict(help_option_names=["-h", "--help"]))
@click.option(
    "--network",
    "network_path",
    help="Network: a generator folder or Hub id (sid_fast.hub), a sid_fast .pt or an EDM/SiD .pkl (path or URL)",
    metavar="PATH|ID|URL",
    required=True,
)
@click.option("--outdir", help="Where to save the images", metavar="DIR", type=str, required=True)
@click.option(
    "--seeds", help="Random seeds, e.g. 0-63,100", metavar="LIST", type=str, default="0-63", show_default=True
)
@click.option(
    "--sampler",
    help="auto: a sid_fast generator's own steps (generator), Heun otherwise; onestep: a generator's first step alone",
    type=click.Choice(["auto", "generator", "onestep", "heun"]),
    default="auto",
    show_default=True,
)
@click.option(
    "--steps",
    help="Heun steps (NFE = 2 * steps - 1)",
    metavar="INT",
    type=click.IntRange(1, 10_000),
    default=18,
    show_default=True,
)
@click.option(
    "--churn",
    help="Stochastic Heun: S_churn,S_min,S_max,S_noise (ImageNet: 40,0.05,50,1.003)",
    metavar="LIST",
    type=str,
)
@click.option(
    "--class", "class_idx", help="Class label (default: random per seed)", metavar="INT", type=click.IntRange(min=0)
)
@init_sigma_option("Override the generator's sigma_init")
@click.option(
    "--batch",
    "max_batch",
    help="Maximum batch size",
    metavar="INT",
    type=click.IntRange(1, 65536),
    default=64,
    show_default=True,
)
@click.option("--subdirs", help="Save into subdirectories of 1000 seeds", is_flag=True)
@click.option("--overwrite", help="Write into an --outdir that holds other files (they are kept)", is_flag=True)
@click.option("--grid", help="Also save a grid of all images to this file (PNG)", metavar="FILE", type=str)
@click.option(
    "--vae",
    help="EDM2 latent networks: the Stability VAE (local diffusers folder of stabilityai/sd-vae-ft-mse) that "
    "decodes them",
    metavar="DIR",
    type=str,
)
def main(
    network_path, outdir, seeds, sampler, steps, churn, class_idx, init_sigma, max_batch, subdirs, overwrite, grid, vae
):
    """Generate images from a SiD generator or an EDM teacher."""
    seed_list = parse_int_list(seeds)
    check_outdir(outdir, grid, overwrite)
    churn_t = None
    if churn:
        try:
            churn_t = tuple(float(v) for v in churn.split(","))
            assert len(churn_t) == 4 and all(math.isfinite(v) and v >= 0 for v in churn_t)
        except (ValueError, AssertionError):
            raise click.BadParameter(
                f"{churn!r}: expected four finite non-negative numbers S_churn,S_min,S_max,S_noise.",
                param_hint="--churn",
            ) from None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        net, info = load_network_file(network_path)
    except CheckpointError as e:
        raise click.ClickException(str(e)) from None
    if class_idx is not None and not 0 <= class_idx < max(net.label_dim, 1):
        raise click.ClickException(f"--class {class_idx}: the network has {net.label_dim} classes.")
    vae_model = None
    try:
        if vae is not None:
            vae_model = StabilityVAE.load(vae, device)
        check_vae(net, vae_model)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    net = net.to(device)
    all_images = []
    os.makedirs(outdir, exist_ok=True)
    for i in range(0, len(seed_list), max_batch):
        batch_seeds = seed_list[i : i + max_batch]
        images = generate_uint8(
            net, info, batch_seeds, device, sampler, steps, class_idx, init_sigma, churn_t, vae_model
        ).cpu()
        for seed, img in zip(batch_seeds, images):
            d = Path(outdir) / (f"{seed - seed % 1000:06d}" if subdirs else "")
            d.mkdir(parents=True, exist_ok=True)
            save_image(image_grid(img[None], cols=1), d / f"{seed:06d}.png")
        all_images.append(images)
    if grid:
        side = all_images[0].shape[-1]
        save_image(image_grid(torch.cat(all_images), scale=max(1, 64 // side), gap=2), grid)
    print(f"Saved {len(seed_list)} images to {outdir}" + (f" and a grid to {grid}" if grid else ""))


if __name__ == "__main__":
    main()
