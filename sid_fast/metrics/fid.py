"""FID and IS statistics as EDM's fid.py and SiD's metrics compute them: the library behind `python -m sid_fast.fid`
and the trainer's snapshot metrics.

Features are the detector's 2048-d pool features of uint8 NCHW images (grey repeated to RGB). Statistics: float64
mean and unbiased covariance, all-reduced over ranks. FID = |mu - mu_ref|^2 + tr(S + S_ref - 2 sqrtm(S S_ref)),
scipy sqrtm, real part. Generated images are quantised as (x * 127.5 + 128).clip(0, 255) -> uint8 and their seeds
are split over ranks in batches as EDM's generate.py does. EDM's published reference files work as they are.
"""

from __future__ import annotations

import torch

from sid_fast import dist
from sid_fast.data.dali import dali_batches
from sid_fast.data.dataset import DatasetError, ImageDataset, uint8_batches
from sid_fast.metrics import FeatureStats, frechet_distance, load_ref_stats
from sid_fast.progress import bar
from sid_fast.sampling import generate_uint8


def _progress(total: int, desc: str, enabled: bool):
    return bar(total, desc, "img", enabled)


def rank_seed_batches(seeds: list[int], batch: int, rank: int, world: int) -> list[list[int]]:
    """EDM generate.py: split all seeds into a multiple of `world` near-equal batches of <= `batch`, rank r takes
    r::world."""
    if not seeds:
        return []
    num_batches = ((len(seeds) - 1) // (batch * world) + 1) * world
    all_batches = torch.as_tensor(seeds).tensor_split(num_batches)
    return [b.tolist() for b in all_batches[rank::world] if len(b)]


def generator_stats(
    net,
    info,
    seeds,
    detector,
    device,
    batch=64,
    rank=0,
    world=1,
    sampler="auto",
    steps=18,
    init_sigma=None,
    want_probs=False,
    progress=True,
    vae=None,
):
    """Feature statistics (all-reduced) of images generated for the seeds; also class probabilities for IS. EDM2
    latent networks need `vae` (sid_fast.latents.StabilityVAE), which decodes them to images first."""

    batches = (
        generate_uint8(net, info, b, device, sampler, steps, None, init_sigma, vae=vae)
        for b in rank_seed_batches(list(seeds), batch, rank, world)
    )
    return _accumulate(batches, detector, device, len(seeds), "generating", want_probs, world, progress and rank == 0)


def dataset_stats(
    path,
    detector,
    device,
    batch=64,
    rank=0,
    world=1,
    max_size=None,
    seed=0,
    resolution=None,
    loader="pil",
    want_probs=False,
    progress=True,
    num_workers=2,
):
    """Feature statistics (all-reduced) of a dataset (zip or folder); a random subset of max_size as EDM's calc."""
    if loader == "dali":
        if max_size is not None:
            raise DatasetError("--loader dali reads whole folders; --num (a random subset) needs the PIL loader.")
        n = len(ImageDataset(path, use_labels=False, resolution=resolution))
        batches = dali_batches(path, resolution, batch, rank, world, device)
    else:
        ds = ImageDataset(path, max_size=max_size, random_seed=seed, use_labels=False, resolution=resolution)
        if max_size is not None and len(ds) < max_size:
            raise DatasetError(f"{path}: {len(ds)} images, fewer than the {max_size} requested (--num).")
        n = len(ds)
        batches = uint8_batches(ds, batch, rank, world, num_workers=num_workers)
    return _accumulate(batches, detector, device, n, "reading", want_probs, world, progress and rank == 0)


def _accumulate(batches, detector, device, total, desc, want_probs, world, progress):
    """Feature statistics (all-reduced over ranks) of uint8 image batches; class probabilities too for IS (from the
    Inception detector). `detector`: one detector (-> one FeatureStats), or {metric: detector} (-> {metric:
    FeatureStats}, every detector seeing the same images: EDM2's FID and FD-DINOv2 from one pass)."""
    detectors = detector if isinstance(detector, dict) else {"fid": detector}
    stats = {k: FeatureStats(d.feature_dim, device=device) for k, d in detectors.items()}
    probs = []
    with _progress(total, desc, progress) as bar:
        for images in batches:
            images = images.to(device)
            for k, d in detectors.items():
                stats[k].add(d.features(images))
            if want_probs:
                probs.append(detectors["fid"].probabilities(images).cpu())
            bar.update(len(images) * world)
    for s in stats.values():
        s.all_reduce()
    return stats if isinstance(detector, dict) else stats["fid"], _gather_probs(probs) if want_probs else None


def _gather_probs(parts):

    local = torch.cat(parts) if parts else torch.zeros(0, 0, dtype=torch.float64)
    return torch.cat([p for p in dist.all_gather_object(local) if p.numel()])


def fid_against(stats: FeatureStats, ref_path, metric: str = "fid") -> float:
    """The Frechet distance of `stats` to the reference's statistics of `metric` ("fid" or "fd_dinov2")."""
    mu, sigma = stats.mean_cov()
    mu_ref, sigma_ref = load_ref_stats(ref_path, dim=mu.shape[0], metric=metric)
    return frechet_distance(mu, sigma, mu_ref, sigma_ref)


# ----------------------------------------------------------------------------------------------------------------
# CLI.
