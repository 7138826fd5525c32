"""The FID/IS command line (the library is sid_fast.metrics.fid), as EDM's fid.py and SiD's metrics compute them.

    # reference statistics of a dataset (EDM's npz: mu [2048], sigma [2048, 2048], float64)
    python -m sid_fast.fid ref --data datasets/cifar10-32x32.zip --dest fid-refs/cifar10-32x32.npz

    # FID of a generator against them: 50k images from seeds 0-49999, distributed over ranks with torchrun
    torchrun --standalone --nproc_per_node=8 -m sid_fast.fid calc --network network-snapshot-000000400000 \
        --ref fid-refs/cifar10-32x32.npz --num-images 50000

(--num-images is --num: torchrun from torch 2.8 on reads any --num in the command line as an abbreviation of its own
--numa-binding and stops, so under torchrun the long form is needed.)

    # FID of a folder of images (a random subset of --num, as EDM's calc)
    python -m sid_fast.fid calc --images out/ --ref fid-refs/cifar10-32x32.npz --num 50000

See sid_fast.metrics.fid for what is computed and how.
"""

from __future__ import annotations

import json

import click

from sid_fast import dist
from sid_fast.metrics import inception_score, load_ref_stats, save_ref_stats
from sid_fast.metrics.fid import dataset_stats, fid_against, generator_stats
from sid_fast.metrics.inception import DetectorError, load_detector


def _setup(detector_path):
    device = dist.init()
    try:
        detector = load_detector(detector_path, device=device)
    except DetectorError as e:
        raise click.ClickException(str(e)) from None
    return device, detector, dist.rank(), dist.world_size()


def _finish():
    dist.finish()


@click.group(context_settings=dict(help_option_names=["-h", "--help"]))
def main():
    """FID/IS with the Inception detector, as EDM and SiD compute them."""


_detector_option = click.option(
    "--detector",
    metavar="PATH|URL",
    help="Inception detector: NVIDIA's TorchScript inception-2015-12-05.pt or pytorch-fid's .pth "
    "[default: $SID_FAST_DETECTOR or ~/.cache/sid_fast/inception-2015-12-05.pt]",
)


@main.command()
@click.option("--data", help="Dataset: EDM zip or folder of images", metavar="ZIP|DIR", required=True)
@click.option("--dest", help="Where to write the statistics (.npz)", metavar="NPZ", required=True)
@click.option(
    "--resolution",
    help="Center-crop and resize images to this side first (PIL LANCZOS)",
    metavar="INT",
    type=click.IntRange(min=1),
)
@click.option(
    "--loader",
    help="pil, or dali for folders of JPEGs (GPU decode when there is one)",
    type=click.Choice(["pil", "dali"]),
    default="pil",
    show_default=True,
)
@click.option(
    "--batch",
    help="Images per detector call per GPU",
    metavar="INT",
    type=click.IntRange(min=1),
    default=64,
    show_default=True,
)
@click.option(
    "--workers",
    help="DataLoader workers (PIL loader)",
    metavar="INT",
    type=click.IntRange(min=0),
    default=2,
    show_default=True,
)
@_detector_option
def ref(data, dest, resolution, loader, batch, workers, detector):
    """Reference statistics of a whole dataset, in EDM's npz format."""
    from sid_fast.data.dataset import DatasetError

    device, det, rank, world = _setup(detector)
    try:
        stats, _ = dataset_stats(
            data, det, device, batch, rank, world, resolution=resolution, loader=loader, num_workers=workers
        )
    except DatasetError as e:
        raise click.ClickException(str(e)) from None
    if rank == 0:
        mu, sigma = stats.mean_cov()
        save_ref_stats(dest, mu, sigma)
        print(f"Saved statistics of {stats.n} images from {data} to {dest} (detector: {det.kind}, {det.source})")
    _finish()


@main.command()
@click.option(
    "--network",
    "network_path",
    help="Generator or teacher to sample (a snapshot folder, a Hub id, a sid_fast .pt or an EDM/SiD .pkl)",
    metavar="PATH|URL",
)
@click.option("--images", help="Or: a folder/zip of images to evaluate", metavar="DIR|ZIP")
@click.option("--ref", "ref_path", help="Reference statistics (EDM npz)", metavar="NPZ", required=True)
@click.option(
    "--num",
    "--num-images",
    "num",
    help="Number of images (under torchrun write --num-images: torch>=2.8's torchrun takes --num for its "
    "--numa-binding)",
    metavar="INT",
    type=click.IntRange(min=2),
    default=50000,
    show_default=True,
)
@click.option(
    "--seeds",
    help="First seed (generation: seeds start..start+num-1; images: subset seed)",
    metavar="INT",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
)
@click.option(
    "--batch", help="Images per batch per GPU", metavar="INT", type=click.IntRange(min=1), default=64, show_default=True
)
@click.option(
    "--sampler",
    help="auto: one step for sid_fast generators, Heun otherwise",
    type=click.Choice(["auto", "onestep", "heun"]),
    default="auto",
    show_default=True,
)
@click.option("--steps", help="Heun steps", metavar="INT", type=click.IntRange(min=1), default=18, show_default=True)
@click.option("--init_sigma", "init_sigma", help="Override the generator's sigma_init", metavar="FLOAT", type=float)
@click.option("--is", "with_is", help="Also compute the Inception Score (10 splits)", is_flag=True)
@click.option("--json", "json_out", help="Append the result as a JSON line to this file", metavar="FILE")
@click.option(
    "--vae",
    help="EDM2 latent networks: the Stability VAE (local diffusers folder of stabilityai/sd-vae-ft-mse) that "
    "decodes them",
    metavar="DIR",
    type=str,
)
@_detector_option
def calc(
    network_path, images, ref_path, num, seeds, batch, sampler, steps, init_sigma, with_is, json_out, vae, detector
):
    """FID of a network's samples (or of a folder of images) against reference statistics."""
    from sid_fast.checkpoints import CheckpointError, load_network_file
    from sid_fast.data.dataset import DatasetError

    if (network_path is None) == (images is None):
        raise click.UsageError("Give exactly one of --network and --images.")
    device, det, rank, world = _setup(detector)
    try:  # check the reference before spending an hour on generation
        load_ref_stats(ref_path, dim=det.feature_dim)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    try:
        if network_path is not None:
            from sid_fast.sampling import check_vae

            net, info = load_network_file(network_path)
            vae_model = None
            if vae is not None:
                from sid_fast.latents import StabilityVAE

                vae_model = StabilityVAE.load(vae, device)
            check_vae(net, vae_model)
            net = net.to(device)
            stats, probs = generator_stats(
                net,
                info,
                range(seeds, seeds + num),
                det,
                device,
                batch,
                rank,
                world,
                sampler,
                steps,
                init_sigma,
                want_probs=with_is,
                vae=vae_model,
            )
        else:
            stats, probs = dataset_stats(
                images, det, device, batch, rank, world, max_size=num, seed=seeds, want_probs=with_is
            )
    except (CheckpointError, DatasetError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    if rank != 0:
        _finish()
        return
    result = dict(
        fid=fid_against(stats, ref_path),
        num=stats.n,
        ref=str(ref_path),
        detector=det.kind,
        source=str(network_path or images),
        first_seed=seeds,
    )
    if with_is:
        result["is_mean"], result["is_std"] = inception_score(probs)
    print(json.dumps(result))
    if json_out:
        with open(json_out, "a") as f:
            f.write(json.dumps(result) + "\n")
    _finish()


if __name__ == "__main__":
    main()
