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
import sys

import click

from sid_fast import dist
from sid_fast.checkpoints import CheckpointError, load_network_file
from sid_fast.data.dataset import DatasetError
from sid_fast.flags import init_sigma_option
from sid_fast.latents import StabilityVAE
from sid_fast.metrics import inception_score, load_ref_stats, save_ref_stats
from sid_fast.metrics.dinov2 import load_dinov2
from sid_fast.metrics.fid import dataset_stats, fid_against, generator_stats
from sid_fast.metrics.inception import DetectorError, load_detector
from sid_fast.progress import Timer, summary
from sid_fast.sampling import check_vae

METRIC_NAMES = ("fid", "fd_dinov2")


def parse_metrics(value: str) -> list[str]:
    names = [m.strip().replace("-", "_") for m in value.split(",") if m.strip()]
    bad = [m for m in names if m not in METRIC_NAMES]
    if bad or not names:
        raise click.BadParameter(f"{value!r}: a comma list of {', '.join(METRIC_NAMES)}.", param_hint="--metrics")
    return list(dict.fromkeys(names))


def _setup(detector_path, metrics=("fid",), dinov2_path=None):
    """(device, {metric: detector}, rank, world): the Inception detector for fid, DINOv2 for fd_dinov2."""
    device = dist.init()
    detectors = {}
    try:
        if "fid" in metrics:
            detectors["fid"] = load_detector(detector_path, device=device)
        if "fd_dinov2" in metrics:
            detectors["fd_dinov2"] = load_dinov2(dinov2_path, device=device)
    except DetectorError as e:
        raise click.ClickException(str(e)) from None
    return device, detectors, dist.rank(), dist.world_size()


def _finish():
    dist.finish()


@click.group(context_settings=dict(help_option_names=["-h", "--help"]))
def main():
    """FID/IS with the Inception detector, as EDM and SiD compute them; FD-DINOv2 as EDM2 computes it."""


_detector_option = click.option(
    "--detector",
    metavar="PATH|URL",
    help="Inception detector: NVIDIA's TorchScript inception-2015-12-05.pt or pytorch-fid's .pth "
    "[default: $SID_FAST_DETECTOR or ~/.cache/sid_fast/inception-2015-12-05.pt]",
)
_metrics_option = click.option(
    "--metrics",
    metavar="LIST",
    help="fid, fd_dinov2, or both (fid,fd_dinov2: one pass over the images, as EDM2)",
    default="fid",
    show_default=True,
    callback=lambda ctx, param, value: parse_metrics(value),
)
_dinov2_option = click.option(
    "--dinov2",
    metavar="PATH|URL",
    help="DINOv2 ViT-L/14 for fd_dinov2: Meta's dinov2_vitl14_pretrain.pth "
    "[default: $SID_FAST_DINOV2 or ~/.cache/sid_fast/dinov2_vitl14_pretrain.pth]",
)


@main.command()
@click.option("--data", help="Dataset: EDM zip or folder of images", metavar="ZIP|DIR", required=True)
@click.option(
    "--dest",
    help="Where to write the statistics: .npz (EDM's format, one metric) or .pkl (EDM2's: every metric)",
    metavar="NPZ|PKL",
    required=True,
)
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
@_metrics_option
@_detector_option
@_dinov2_option
def ref(data, dest, resolution, loader, batch, workers, metrics, detector, dinov2):
    """Reference statistics of a whole dataset: EDM's npz (one metric) or EDM2's pkl format."""
    if len(metrics) > 1 and not dest.endswith(".pkl"):
        raise click.BadParameter(f"{dest}: several metrics are written to a .pkl (EDM2's format).", param_hint="--dest")
    device, dets, rank, world = _setup(detector, metrics, dinov2)
    timer = Timer()
    try:
        stats, _ = dataset_stats(
            data, dets, device, batch, rank, world, resolution=resolution, loader=loader, num_workers=workers
        )
    except DatasetError as e:
        raise click.ClickException(str(e)) from None
    if rank == 0:
        save_ref_stats(dest, metrics={k: s.mean_cov() for k, s in stats.items()})
        n = next(iter(stats.values())).n
        used = ", ".join(f"{k}: {d.kind}, {d.source}" for k, d in dets.items())
        print(f"Saved statistics of {n} images from {data} to {dest} ({used})")
        print(summary("Reference statistics", n, "images", timer.seconds))
    _finish()


@main.command()
@click.option(
    "--network",
    "network_path",
    help="Generator or teacher to sample (a snapshot folder, a Hub id, a sid_fast .pt or an EDM/SiD .pkl)",
    metavar="PATH|URL",
)
@click.option("--images", help="Or: a folder/zip of images to evaluate", metavar="DIR|ZIP")
@click.option(
    "--ref",
    "ref_path",
    help="Reference statistics: EDM's npz, or EDM2's pkl (fid and fd_dinov2)",
    metavar="NPZ|PKL",
    required=True,
)
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
    help="auto: a sid_fast generator's own steps (generator), Heun otherwise; onestep: a generator's first step alone",
    type=click.Choice(["auto", "generator", "onestep", "heun"]),
    default="auto",
    show_default=True,
)
@click.option("--steps", help="Heun steps", metavar="INT", type=click.IntRange(min=1), default=18, show_default=True)
@init_sigma_option("Override the generator's sigma_init")
@click.option("--is", "with_is", help="Also compute the Inception Score (10 splits)", is_flag=True)
@click.option("--json", "json_out", help="Append the result as a JSON line to this file", metavar="FILE")
@click.option(
    "--vae",
    help="EDM2 latent networks: the Stability VAE (local diffusers folder of stabilityai/sd-vae-ft-mse) that "
    "decodes them",
    metavar="DIR",
    type=str,
)
@_metrics_option
@_detector_option
@_dinov2_option
def calc(
    network_path,
    images,
    ref_path,
    num,
    seeds,
    batch,
    sampler,
    steps,
    init_sigma,
    with_is,
    json_out,
    vae,
    metrics,
    detector,
    dinov2,
):
    """FID (and/or FD-DINOv2) of a network's samples (or of a folder of images) against reference statistics."""
    if (network_path is None) == (images is None):
        raise click.UsageError("Give exactly one of --network and --images.")
    if with_is and "fid" not in metrics:
        raise click.UsageError("--is needs the Inception detector: add fid to --metrics.")
    device, dets, rank, world = _setup(detector, metrics, dinov2)
    timer = Timer()
    try:  # check the reference before spending an hour on generation
        if len(dets) > 1 and not str(ref_path).endswith(".pkl"):
            raise ValueError(
                f"{ref_path}: an .npz holds one metric's statistics; --metrics {','.join(dets)} needs a .pkl."
            )
        for k, d in dets.items():
            load_ref_stats(ref_path, dim=d.feature_dim, metric=k)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    try:
        if network_path is not None:
            net, info = load_network_file(network_path)
            vae_model = None
            if vae is not None:
                vae_model = StabilityVAE.load(vae, device)
            check_vae(net, vae_model)
            net = net.to(device)
            stats, probs = generator_stats(
                net,
                info,
                range(seeds, seeds + num),
                dets,
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
                images, dets, device, batch, rank, world, max_size=num, seed=seeds, want_probs=with_is
            )
    except (CheckpointError, DatasetError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    if rank != 0:
        _finish()
        return
    result = {k: fid_against(s, ref_path, metric=k) for k, s in stats.items()}
    n = next(iter(stats.values())).n
    result.update(
        num=n,
        ref=str(ref_path),
        detector=dets["fid"].kind if "fid" in dets else None,
        source=str(network_path or images),
        first_seed=seeds,
    )
    if with_is:
        result["is_mean"], result["is_std"] = inception_score(probs)
    values = ", ".join(f"{k} {result[k]:.4f}" for k in stats)
    print(summary(values, n, "images", timer.seconds), file=sys.stderr)
    print(json.dumps(result))
    if json_out:
        with open(json_out, "a") as f:
            f.write(json.dumps(result) + "\n")
    _finish()


if __name__ == "__main__":
    main()
