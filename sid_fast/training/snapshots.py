"""Snapshots of G_ema and their metrics: the sample grid and the generator folder (rank 0; sid_fast.hub:
model.safetensors, config.json with the snapshot's metric, a model card), FD-digits (rank 0) or FID (every rank
generates its share), metric-*.jsonl and the metric plot. As the official loop: a snapshot every --snap ticks,
at ticks 10, 20, ..., 100 and of the initial G_ema (extra_snapshots), and at the end."""

from __future__ import annotations

from pathlib import Path

import torch

from sid_fast import hub, ops
from sid_fast.sampling import image_grid, latents_and_labels, onestep_sample, save_image, to_uint8
from sid_fast.training import tickstats

EXTRA_SNAPSHOT_TICKS = frozenset(range(10, 101, 10))  # official sid_training_loop.py, besides every --snap ticks


@torch.no_grad()
def sample_ema(tr, seeds) -> torch.Tensor:
    """One-step samples of G_ema for `seeds` (on the CPU), in batches of 256."""
    z, labels, _ = latents_and_labels(tr.G_ema, seeds, device=tr.device)
    out = []
    for i in range(0, len(seeds), 256):
        lab = None if labels is None else labels[i : i + 256]
        out.append(onestep_sample(tr.G_ema, z[i : i + 256], tr.cfg.init_sigma, lab).cpu())
    return torch.cat(out)


def snapshot_name(nimg: int) -> str:
    """network-snapshot-<images seen, 12 digits> (a generator folder): distinct for every iteration, sorted by images
    up to 10^12."""
    return f"network-snapshot-{nimg:012d}"


def _write_grid(tr) -> None:
    samples = sample_ema(tr, list(range(64)))
    if tr.vae is not None:
        grid = tr.vae.decode(samples.to(tr.device)).cpu()
    elif tr.G_ema.img_channels == 4:  # EDM2 latents without --vae: no picture to draw
        grid = None
    else:
        grid = to_uint8(samples)
    if grid is not None:
        scale = max(1, 64 // grid.shape[-1])
        picture = image_grid(grid, scale=scale, gap=2)
        save_image(picture, tr.run_dir / f"fakes-{tr.cur_nimg:012d}.png")
        tr.tracker.log_image("samples/G_ema", picture, tr.cur_nimg)


def _write_network(tr, metric: dict) -> None:
    cfg = tr.cfg
    hub.save_folder(
        tr.run_dir / snapshot_name(tr.cur_nimg),
        tr.G_ema,
        tr.g_init_kwargs,
        overwrite=True,  # the run's own folder: a file someone put there is kept, never a reason to stop training
        kind="generator",
        sigma_init=cfg.init_sigma,
        alpha=cfg.alpha,
        preset=cfg.preset,
        kimg=tr.cur_nimg / 1e3,
        teacher=Path(str(cfg.teacher)).name,
        metrics=metric,
    )


def snapshot(tr) -> dict[str, float] | None:
    """Grid, metrics and generator folder of G_ema now (the folder's config.json carries the metrics); returns
    {metric key: value} on rank 0 (None without a metric)."""
    with ops.kernels(tr.kernels):
        writes = tr.rank == 0 and tr.run_dir is not None
        if writes:  # the generator is on disk before an evaluation that may take an hour (or fail)
            _write_grid(tr)
            _write_network(tr, {})
        values = _metrics(tr)
        if writes and values:
            hub.update_meta(tr.run_dir / snapshot_name(tr.cur_nimg), metrics=values)
    return values


def _metrics(tr) -> dict[str, float] | None:
    """{metric key: value} on rank 0 (None elsewhere and without metrics)."""
    cfg = tr.cfg
    if cfg.metrics == "fd-digits" and tr.rank == 0:
        from sid_fast.metrics.digits import fd_digits

        seeds = list(range(10_000_000, 10_000_000 + cfg.metric_num))
        return {"fd_digits": record_metric(tr, "fd_digits", fd_digits(sample_ema(tr, seeds)))}
    if tr.detector:  # FID and/or FD-DINOv2: every rank generates its share of the images, once for all detectors
        from sid_fast.metrics.fid import fid_against, generator_stats

        info = dict(meta=dict(kind="generator", sigma_init=cfg.init_sigma))
        stats, _ = generator_stats(
            tr.G_ema,
            info,
            range(cfg.metric_num),
            tr.detector,
            tr.device,
            batch=cfg.batch_gpu,
            rank=tr.rank,
            world=tr.world,
            progress=False,
            vae=tr.vae,
        )
        if tr.rank == 0:
            return {k: record_metric(tr, k, fid_against(s, tr.fid_ref, metric=k)) for k, s in stats.items()}
    return None


_NAMES = {"fd_digits": "FD-digits", "fid": "FID", "fd_dinov2": "FD-DINOv2", "prompt_acc": "prompt accuracy"}


def snapshot_and_log(tr) -> None:
    values = tr.snapshot()
    for key, value in (values or {}).items():
        name = _NAMES[key] + ("" if key in tickstats.DIGITS_METRICS else f"-{tr.cfg.metric_num // 1000}k")
        tr.log(f"  {name} of G_ema at {tr.cur_nimg / 1e3:.1f} kimg: {value:.3f}")


def record_metric(tr, key: str, value: float) -> float:
    """Append the value to the history, metric-<key>.jsonl and the plot (rank 0)."""
    rec = {
        "kimg": tr.cur_nimg / 1e3,
        key: value,
        "num": tr.cfg.metric_num,
        "snapshot": snapshot_name(tr.cur_nimg),
    }
    tr.metrics_history.append(rec)
    tr.tracker.log_metric(key, value, tr.cur_nimg)
    if tr.run_dir is not None:
        tickstats.append_jsonl(tr.run_dir / f"metric-{key}.jsonl", rec)
        teacher, label = tr.teacher_metric(key)
        tickstats.plot_metric(
            tr.run_dir / f"{key}.png",
            key,
            tr.metrics_history,
            teacher_value=teacher,
            metric_num=tr.cfg.metric_num,
            teacher_label=label,
        )
    return value
