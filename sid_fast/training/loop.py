"""The training loop around the iteration: ticks, the status line, snapshots, training states, signals, abort.

As the official loop: a tick every --tick kimg (and after the first iteration) reads the device statistics once
(sid_fast.training.tickstats), writes stats.jsonl, the status line (with an ETA from the measured rate) and the
--tracker's curves; snapshots every --snap ticks; a training state
every --dump ticks and at the end. SIGTERM/SIGINT finish the current iteration, write a state and stop (a second
signal stops at once); a stop request is agreed on across ranks every 8 iterations and at ticks (the all-reduce is a
host sync). A run of --max-bad-steps consecutive iterations with non-finite gradients writes a state and aborts.
"""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from sid_fast import dist
from sid_fast.training import snapshots, tickstats
from sid_fast.training.context import Progress, RunContext


class TrainingAborted(RuntimeError):
    pass


def install_signal_handlers(ctx: RunContext, progress: Progress) -> None:
    def handler(signum, frame):
        if progress.stop_requested:  # second signal: give up at once
            raise KeyboardInterrupt
        progress.stop_requested = True
        ctx.log(f"Received signal {signum}: finishing the current step, then writing a training state.")

    for s in (signal.SIGTERM, signal.SIGINT):
        try:
            signal.signal(s, handler)
        except ValueError:  # not in the main thread (e.g. under some test runners)
            pass


def _progress_bar(ctx: RunContext, progress: Progress, total_nimg: int):
    if ctx.rank != 0 or not sys.stdout.isatty():
        return None
    return tqdm(total=total_nimg // 1000, initial=progress.cur_nimg // 1000, unit="kimg", leave=False)


def _end_of_tick(ctx: RunContext, progress: Progress, run: Steps, done: bool, stop: bool, times: dict, nvml) -> bool:
    """Status line, stats.jsonl, snapshot, the next tick's counters, training state at a tick boundary; returns whether
    to abort. The state is written after the counters move on, so a resumed run numbers its ticks as an uninterrupted
    one does."""
    cfg = ctx.cfg
    now = time.time()
    eta = times["eta"].update(progress.cur_nimg, now)
    rec, line = tickstats.status(
        progress.stats.reduce(),
        tick=progress.cur_tick,
        nimg=progress.cur_nimg,
        tick_nimg=progress.cur_nimg - progress.tick_start_nimg,
        tick_time=now - times["tick_start"],
        total_time=now - times["start"],
        nvml=nvml,
        device=ctx.device,
        eta=eta,
    )
    ctx.log(line)
    if ctx.rank == 0 and ctx.run_dir is not None:
        tickstats.append_jsonl(ctx.run_dir / "stats.jsonl", rec)
        ctx.tracker.log_tick(rec, progress.cur_nimg)
    too_bad = int(progress.max_consec_bad.item()) >= cfg.max_bad_steps
    extra = cfg.extra_snapshots and progress.cur_tick in snapshots.EXTRA_SNAPSHOT_TICKS
    if done or progress.cur_tick % cfg.snap == 0 or extra:
        snapshots.snapshot_and_log(ctx, progress, run.snapshot)
    dump = done or stop or too_bad or progress.cur_tick % cfg.dump == 0
    progress.cur_tick += 1
    progress.tick_start_nimg = progress.cur_nimg
    if dump:
        path = run.save()
        if path is not None:
            ctx.log(f"  wrote {path.name}")
    times["tick_start"] = time.time()
    return too_bad


@dataclass
class Steps:
    """What the loop calls: one iteration, a snapshot (its metrics or None), a training state (its path or None)."""

    step: Callable[[], None]
    snapshot: Callable[[], dict | None]
    save: Callable[[], Path | None]
    describe: str  # the algorithm's settings, for the log


def train(ctx: RunContext, progress: Progress, run: Steps) -> str:
    """Train until --duration (returns "done") or a signal (returns "stopped"); raises TrainingAborted after too many
    consecutive bad steps."""
    cfg = ctx.cfg
    install_signal_handlers(ctx, progress)
    nvml = tickstats.NVML(ctx.device)
    total_nimg = int(cfg.duration * 1e6)
    if progress.cur_nimg >= total_nimg:
        ctx.log(f"Already trained for {cfg.duration * 1000:g} kimg (--duration): nothing to do.")
        return "done"
    bar = _progress_bar(ctx, progress, total_nimg)
    if cfg.extra_snapshots and progress.cur_nimg == 0:  # official: a snapshot of the initial G_ema before training
        snapshots.snapshot_and_log(ctx, progress, run.snapshot)
    times = dict(start=time.time(), tick_start=time.time())
    start_nimg = progress.cur_nimg
    times["eta"] = tickstats.Eta(total_nimg, start_nimg, times["start"])
    ctx.log(
        f"Training for {cfg.duration * 1000:g} kimg: batch {cfg.batch} = {ctx.world} processes x "
        f"{ctx.rounds} rounds x {cfg.batch_gpu}; {run.describe}."
    )
    while True:
        run.step()
        if bar is not None:
            bar.update(progress.cur_nimg // 1000 - bar.n)
        done = progress.cur_nimg >= total_nimg
        at_tick = done or progress.cur_tick == 0 or progress.cur_nimg >= progress.tick_start_nimg + cfg.tick * 1000
        check = at_tick or ctx.world == 1 or (progress.cur_nimg // cfg.batch) % 8 == 0
        stop = dist.all_reduce_max_flag(progress.stop_requested, ctx.device) if check else False
        if not at_tick and not stop:
            continue
        if _end_of_tick(ctx, progress, run, done, stop, times, nvml):
            raise TrainingAborted(
                f"{int(progress.max_consec_bad.item())} consecutive steps had non-finite gradients "
                f"(limit --max-bad-steps {cfg.max_bad_steps}); the last training state was written."
            )
        if done or stop:
            break
    if bar is not None:
        bar.close()
    wall = time.time() - times["start"]
    stopped = stop and not done
    ctx.log(
        f"{'Stopped' if stopped else 'Finished'} at {progress.cur_nimg / 1e3:.1f} kimg: {wall:.1f} s wall time, "
        f"{(progress.cur_nimg - start_nimg) / max(wall, 1e-9):.1f} img/s overall (evaluations and snapshots included)."
    )
    return "stopped" if stopped else "done"
