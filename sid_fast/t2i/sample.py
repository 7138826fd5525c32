"""Text-to-image sampling with a SiD-LSG generator (a snapshot folder of `train.py` with a Stable Diffusion teacher, a
folder sid_fast.t2i.export wrote, by path or Hub id, or an official SiD-LSG .pkl read safely) and its teacher's text
encoder and VAE; or with a flow-matching generator (a transformer snapshot folder of an SD3, FLUX or SANA run) and its
teacher's text encoders and VAE. A generator runs its recorded K steps (one for SiD-LSG unless trained with
--generator-steps), or --steps.

    python -m sid_fast.t2i.sample --network runs/.../network-snapshot-XXXXXXXXXXXX --teacher stable-diffusion-v1-5 \
        --prompt "a photo of a cat" --seeds 0-15 --outdir out --grid grid.png
    torchrun --standalone --nproc_per_node=8 -m sid_fast.t2i.sample --network ... --teacher ... \
        --prompts captions.txt --outdir coco30k --resolution 256  # image i: caption line i, seed i (00000i.png)

Image i's latents are the one-step generator's x0-prediction at its init timestep on sqrt(1 - abar) z with z from
torch.Generator().manual_seed(seed) (sid_fast.t2i.export.seed_latents), so an image depends on its prompt and seed
only: not on the batch, the device count or the rank that made it (a K-step generator's re-noising of step i is the
seed's generator's next draw after z: sid_fast.t2i.export.seed_noises). With torchrun every rank makes every world-th
image. The official evaluation (generate_onestep.py) likewise gives caption i seed i. A progress bar with the time
left is shown on a terminal (rank 0), and every rank ends with one line: how many images, how fast, where.
"""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np
import PIL.Image
import torch

from sid_fast import dist
from sid_fast.checkpoints import CheckpointError
from sid_fast.data.prompts import PromptError, read_prompts
from sid_fast.families.flow import decode_flow, is_flow_generator, load_flow_generator, sample_flow
from sid_fast.progress import Timer, bar, summary
from sid_fast.sample import check_outdir, parse_int_list
from sid_fast.sampling import image_grid, save_image
from sid_fast.storage import download, hub_id
from sid_fast.t2i.export import decode, generator_latents, is_pipeline_folder, load_unet_folder, seed_noises
from sid_fast.t2i.flux import FluxError
from sid_fast.t2i.sana import SanaError
from sid_fast.t2i.sd import SDError, load_sd
from sid_fast.t2i.sd3 import SD3Error

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def jobs(prompt: str | None, prompts_file: str | None, seeds: str | None) -> list[tuple[int, str, int]]:
    """(index, prompt, seed) of every image: one prompt for every seed, or line i of a file with seed i (--seeds
    then selects lines by index)."""
    if (prompt is None) == (prompts_file is None):
        raise click.UsageError("give one of --prompt TEXT or --prompts FILE.")
    if prompt is not None:
        return [(i, prompt, s) for i, s in enumerate(parse_int_list(seeds or "0-15"))]
    try:
        lines = read_prompts(prompts_file)
    except PromptError as e:
        raise click.BadParameter(str(e), param_hint="--prompts") from None
    idx = parse_int_list(seeds) if seeds else list(range(len(lines)))
    if idx and max(idx) >= len(lines):
        raise click.BadParameter(
            f"seed {max(idx)} has no line in {prompts_file} ({len(lines)} lines).", param_hint="--seeds"
        )
    return [(i, lines[i], i) for i in idx]


def resolve_network(network: str) -> str:
    """A local generator (folder or file) as given; a Hub id (owner/name[@revision], hf://...) fetched into the Hub
    cache (or found there offline) and its folder returned."""
    parsed = hub_id(network)
    return str(download(*parsed)) if parsed is not None else network


@torch.no_grad()
def generate(
    network, teacher, todo, outdir: Path, batch: int, dtype, device, grid=None, resolution=None, log=print,
    init_timestep=None, steps=None,
) -> int:  # fmt: skip
    """Write outdir/<index, 6 digits>.png for this rank's share of `todo` (resized to `resolution` with PIL's LANCZOS
    when given, as the official FID-30k evaluates 512-pixel images at 256); returns how many it wrote.
    `init_timestep` overrides the generator's recorded one (official generate_onestep.py --init_timestep); `steps`:
    the generator's step count (default: the K it was trained for)."""
    if is_flow_generator(network):
        kind, meta = load_flow_generator(network, teacher, device)
        meta = dict(meta, init_timestep=init_timestep or meta["init_timestep"])
        kind.vae.to(device)

        def latents_of(prompts, seeds):
            return sample_flow(kind, meta, prompts, seeds, device, steps)

        def images_of(latents):
            return decode_flow(kind.vae, latents, device)

        label = f"{steps or meta['steps']} steps from timestep {meta['init_timestep']}"
        return _write(todo, outdir, batch, latents_of, images_of, label, grid, resolution, log)
    unet, meta = load_unet_folder(network, device)
    unet.to(dtype)
    t_init = int(init_timestep if init_timestep is not None else meta["init_timestep"])
    sd = load_sd(teacher, device="cpu", unet=False)  # the generator replaces the teacher's UNet
    sd.text_to(device)
    sd.vae.to(device)  # for the whole run (decode() moves it only when it is elsewhere)
    if sd.latent_channels != unet.config.in_channels:
        raise click.BadParameter(
            f"{teacher}: its latents have {sd.latent_channels} channels, the generator's {unet.config.in_channels}.",
            param_hint="--teacher",
        )
    shape = [unet.config.in_channels, unet.config.sample_size, unet.config.sample_size]

    k, noise_type = int(steps or meta.get("steps", 1)), meta.get("noise_type", "fresh")
    if k > t_init:
        raise SDError(f"--steps {k}: the generator's timesteps from {t_init} would repeat; give at most {t_init}.")

    def latents_of(prompts, seeds):
        z, noises = seed_noises(seeds, shape, k)
        return generator_latents(unet, sd.schedule, z.to(device), sd.encode_text(prompts, device), t_init, k,
                                 noise_type, [n.to(device) for n in noises])  # fmt: skip

    def images_of(latents):
        return decode(sd.vae, latents, device)

    label = f"init timestep {t_init}" if k == 1 else f"{k} steps from timestep {t_init}"
    return _write(todo, outdir, batch, latents_of, images_of, label, grid, resolution, log)


def _write(todo, outdir: Path, batch: int, latents_of, images_of, label: str, grid, resolution, log) -> int:
    """This rank's share of `todo` as PNGs (and the grid on rank 0): latents_of(prompts, seeds) -> latents,
    images_of(latents) -> uint8 images."""
    mine = todo[dist.rank() :: dist.world_size()]
    outdir.mkdir(parents=True, exist_ok=True)
    timer, written = Timer(), []
    progress = bar(len(mine), "t2i.sample", enabled=dist.rank() == 0)
    for k in range(0, len(mine), batch):
        part = mine[k : k + batch]
        images = images_of(latents_of([p for _, p, _ in part], [s for _, _, s in part]))
        for (i, _, _), img in zip(part, images):
            pixels = img.permute(1, 2, 0).numpy()
            pixels = pixels[:, :, 0] if pixels.shape[2] == 1 else pixels  # grey images (the digits teacher): H x W
            if resolution is not None and resolution != pixels.shape[0]:
                pic = PIL.Image.fromarray(pixels).resize((resolution, resolution), PIL.Image.LANCZOS)
                pixels = np.asarray(pic)
                img = torch.from_numpy(pixels.copy()).reshape(resolution, resolution, -1).permute(2, 0, 1)
            save_image(pixels, outdir / f"{i:06d}.png")
            if len(written) < 64:  # the grid's images only: a rank's share of 30k images would not fit in memory
                written.append(img)
        progress.update(len(part))
    progress.close()
    log(summary(f"rank {dist.rank()}: wrote {outdir}/ ({label})", len(mine), "images", timer.seconds))
    if grid is not None and dist.rank() == 0 and written:
        tiles = torch.stack(written[:64])
        small = tiles.shape[-1] < 64  # small tiles (the digits) enlarged to >= 64 px, with a gap between them
        save_image(image_grid(tiles, scale=max(1, 64 // tiles.shape[-1]), gap=2 if small else 0), grid)
    return len(mine)


@click.command(context_settings=dict(help_option_names=["-h", "--help"]))
@click.option(
    "--network",
    help="Generator: a SiD-LSG snapshot folder, a pipeline folder of hub convert, a Hub id, or an official .pkl",
    metavar="DIR|ID|PKL",
    required=True,
)
@click.option(
    "--teacher",
    help="The teacher's Stable Diffusion folder (text encoder, VAE; default: a pipeline --network)",
    metavar="DIR",
)
@click.option("--prompt", help="One prompt for every seed", metavar="TEXT", type=str)
@click.option("--prompts", "prompts_file", help="Prompt file: image i from line i with seed i", metavar="FILE")
@click.option("--seeds", help="Seeds (--prompt; default 0-15) or line indices (--prompts; default all)", metavar="LIST")
@click.option("--outdir", help="Where to write the images", metavar="DIR", required=True)
@click.option("--batch", help="Images per UNet call", type=click.IntRange(1, 65536), default=16, show_default=True)
@click.option("--overwrite", help="Write into an --outdir that holds other files (they are kept)", is_flag=True)
@click.option(
    "--dtype", help="UNet weights for sampling", type=click.Choice(sorted(DTYPES)), default="fp32", show_default=True
)
@click.option("--grid", help="Also save the first 64 images as one PNG", metavar="PNG")
@click.option(
    "--resolution",
    help="Save the images resized to this side (PIL LANCZOS; FID-30k: 256)",
    type=click.IntRange(8, 8192),
)
@click.option(
    "--init-timestep",
    help="The generator's timestep (default: the one it records; official .pkl: its name's _t625_, else 625)",
    type=click.IntRange(1, 999),
)
@click.option(
    "--steps",
    help="The generator's step count (default: the K it was trained for; 1 for SiD-LSG)",
    type=click.IntRange(1, 64),
)
def main(network, teacher, prompt, prompts_file, seeds, outdir, batch, overwrite, dtype, grid, resolution,
         init_timestep, steps):  # fmt: skip
    """Text-to-image sampling with a SiD-LSG generator or a flow-matching generator (their K steps)."""
    try:
        network = resolve_network(network)
    except CheckpointError as e:
        raise click.ClickException(str(e)) from None
    if teacher is None:
        if not is_pipeline_folder(network):
            raise click.UsageError(
                "--teacher is required unless --network is a pipeline folder (hub convert --teacher)."
            )
        teacher = network  # a pipeline folder holds the text encoder, tokenizer and VAE
    todo = jobs(prompt, prompts_file, seeds)
    check_outdir(outdir, grid, overwrite)
    device = dist.init()
    try:
        generate(network, teacher, todo, Path(outdir), batch, DTYPES[dtype], device, grid=grid, resolution=resolution,
                 init_timestep=init_timestep, steps=steps)  # fmt: skip
    except (SDError, SD3Error, FluxError, SanaError, CheckpointError) as e:
        raise click.ClickException(str(e)) from None
    dist.finish()


if __name__ == "__main__":
    main()
