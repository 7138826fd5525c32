"""Snapshots of G_ema and their metrics: the sample grid and the generator folder (rank 0; written by the teacher's
family: a sid_fast generator folder of sid_fast.hub, or a diffusers UNet folder), the family's metrics (FD-digits on
rank 0, or FID/FD-DINOv2 with every rank generating its share), metric-*.jsonl and the metric plot. As the official
loop: a snapshot every --snap ticks, at ticks 10, 20, ..., 100 and of the initial G_ema (extra_snapshots), and at the
end."""

from __future__ import annotations

import contextlib

import torch

from sid_fast import ops
from sid_fast.families import Networks
from sid_fast.sampling import image_grid, save_image
from sid_fast.training import tickstats
from sid_fast.training.context import Progress, RunContext

EXTRA_SNAPSHOT_TICKS = frozenset(range(10, 101, 10))  # official sid_training_loop.py, besides every --snap ticks


def snapshot_name(nimg: int) -> str:
    """network-snapshot-<images seen, 12 digits> (a generator folder): distinct for every iteration, sorted by images
    up to 10^12."""
    return f"network-snapshot-{nimg:012d}"


def _write_grid(ctx: RunContext, progress: Progress, G_ema) -> None:
    grid = ctx.family.grid(G_ema, ctx.cfg, ctx.device)
    if grid is not None:
        scale = max(1, 64 // grid.shape[-1])
        picture = image_grid(grid, scale=scale, gap=2)
        save_image(picture, ctx.run_dir / f"fakes-{progress.cur_nimg:012d}.png")
        ctx.tracker.log_image("samples/G_ema", picture, progress.cur_nimg)


def snapshot(ctx: RunContext, progress: Progress, nets: Networks) -> dict[str, float] | None:
    """Grid, metrics and generator folder of G_ema now (the folder's metadata carries the metrics); returns
    {metric key: value} on rank 0 (None without a metric)."""
    folder = ctx.run_dir / snapshot_name(progress.cur_nimg) if ctx.run_dir is not None else None
    with ops.kernels(ctx.kernels), on_device(nets.G_ema, ctx.device):
        writes = ctx.rank == 0 and folder is not None
        if writes:  # the generator is on disk before an evaluation that may take an hour (or fail)
            _write_grid(ctx, progress, nets.G_ema)
            ctx.family.write_generator(folder, nets, ctx.cfg, progress.cur_nimg / 1e3)
        values = ctx.family.evaluate(nets.G_ema, ctx.cfg, ctx.device, ctx.rank, ctx.world)
        if values is not None and ctx.rank == 0:
            values = {k: record_metric(ctx, progress, k, v) for k, v in values.items()}
            if writes:
                ctx.family.update_generator(folder, metrics=values)
    return values


@contextlib.contextmanager
def on_device(net, device):
    """`net` on `device` for the block, and back where it was after it (a G_ema kept on the host: --ema 0)."""
    home = next(net.parameters()).device
    if home == torch.device(device) or home.type == "meta":
        yield net
        return
    net.to(device)
    try:
        yield net
    finally:
        net.to(home)


_NAMES = {"fd_digits": "FD-digits", "fid": "FID", "fd_dinov2": "FD-DINOv2", "prompt_acc": "prompt accuracy"}


def snapshot_and_log(ctx: RunContext, progress: Progress, take) -> None:
    """`take()` (the trainer's snapshot) and a log line per metric."""
    values = take()
    for key, value in (values or {}).items():
        name = _NAMES[key] + ("" if key in tickstats.DIGITS_METRICS else f"-{ctx.cfg.metric_num // 1000}k")
        ctx.log(f"  {name} of G_ema at {progress.cur_nimg / 1e3:.1f} kimg: {value:.3f}")


def record_metric(ctx: RunContext, progress: Progress, key: str, value: float) -> float:
    """Append the value to the history, metric-<key>.jsonl and the plot (rank 0)."""
    rec = {
        "kimg": progress.cur_nimg / 1e3,
        key: value,
        "num": ctx.cfg.metric_num,
        "snapshot": snapshot_name(progress.cur_nimg),
    }
    progress.metrics_history.append(rec)
    ctx.tracker.log_metric(key, value, progress.cur_nimg)
    if ctx.run_dir is not None:
        tickstats.append_jsonl(ctx.run_dir / f"metric-{key}.jsonl", rec)
        teacher, label = ctx.family.teacher_metric(key, ctx.cfg)
        tickstats.plot_metric(
            ctx.run_dir / f"{key}.png",
            key,
            progress.metrics_history,
            teacher_value=teacher,
            metric_num=ctx.cfg.metric_num,
            teacher_label=label,
        )
    return value
