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

from tqdm import tqdm

from sid_fast import dist
from sid_fast.training import snapshots, tickstats
from sid_fast.training.state import save_training_state


class TrainingAborted(RuntimeError):
    pass


def install_signal_handlers(tr) -> None:
    def handler(signum, frame):
        if tr.stop_requested:  # second signal: give up at once
            raise KeyboardInterrupt
        tr.stop_requested = True
        tr.log(f"Received signal {signum}: finishing the current step, then writing a training state.")

    for s in (signal.SIGTERM, signal.SIGINT):
        try:
            signal.signal(s, handler)
        except ValueError:  # not in the main thread (e.g. under some test runners)
            pass


def _progress_bar(tr, total_nimg: int):
    if tr.rank != 0 or not sys.stdout.isatty():
        return None

    return tqdm(total=total_nimg // 1000, initial=tr.cur_nimg // 1000, unit="kimg", leave=False)


def _end_of_tick(tr, done: bool, stop: bool, times: dict, nvml) -> bool:
    """Status line, stats.jsonl, snapshot, the next tick's counters, training state at a tick boundary; returns whether
    to abort. The state is written after the counters move on, so a resumed run numbers its ticks as an uninterrupted
    one does."""
    cfg = tr.cfg
    now = time.time()
    eta = times["eta"].update(tr.cur_nimg, now)
    rec, line = tickstats.status(
        tr.stats.reduce(),
        tick=tr.cur_tick,
        nimg=tr.cur_nimg,
        tick_nimg=tr.cur_nimg - tr.tick_start_nimg,
        tick_time=now - times["tick_start"],
        total_time=now - times["start"],
        nvml=nvml,
        device=tr.device,
        eta=eta,
    )
    tr.log(line)
    if tr.rank == 0 and tr.run_dir is not None:
        tickstats.append_jsonl(tr.run_dir / "stats.jsonl", rec)
        tr.tracker.log_tick(rec, tr.cur_nimg)
    too_bad = int(tr.max_consec_bad.item()) >= cfg.max_bad_steps
    extra = cfg.extra_snapshots and tr.cur_tick in snapshots.EXTRA_SNAPSHOT_TICKS
    if done or tr.cur_tick % cfg.snap == 0 or extra:
        snapshots.snapshot_and_log(tr)
    dump = done or stop or too_bad or tr.cur_tick % cfg.dump == 0
    tr.cur_tick += 1
    tr.tick_start_nimg = tr.cur_nimg
    if dump:
        path = save_training_state(tr)
        if path is not None:
            tr.log(f"  wrote {path.name}")
    times["tick_start"] = time.time()
    return too_bad


def train(tr) -> str:
    """Train until --duration (returns "done") or a signal (returns "stopped"); raises TrainingAborted after too many
    consecutive bad steps."""
    cfg = tr.cfg
    install_signal_handlers(tr)
    nvml = tickstats.NVML(tr.device)
    total_nimg = int(cfg.duration * 1e6)
    if tr.cur_nimg >= total_nimg:
        tr.log(f"Already trained for {cfg.duration * 1000:g} kimg (--duration): nothing to do.")
        return "done"
    progress = _progress_bar(tr, total_nimg)
    if cfg.extra_snapshots and tr.cur_nimg == 0:  # official: a snapshot of the initial G_ema before training
        snapshots.snapshot_and_log(tr)
    times = dict(start=time.time(), tick_start=time.time())
    start_nimg = tr.cur_nimg
    times["eta"] = tickstats.Eta(total_nimg, start_nimg, times["start"])
    tr.log(
        f"Training for {cfg.duration * 1000:g} kimg: batch {cfg.batch} = {tr.world} processes x "
        f"{tr.rounds} rounds x {cfg.batch_gpu}; {tr.describe()}."
    )
    while True:
        tr.step()
        if progress is not None:
            progress.update(tr.cur_nimg // 1000 - progress.n)
        done = tr.cur_nimg >= total_nimg
        at_tick = done or tr.cur_tick == 0 or tr.cur_nimg >= tr.tick_start_nimg + cfg.tick * 1000
        check = at_tick or tr.world == 1 or (tr.cur_nimg // cfg.batch) % 8 == 0
        stop = dist.all_reduce_max_flag(tr.stop_requested, tr.device) if check else False
        if not at_tick and not stop:
            continue
        if _end_of_tick(tr, done, stop, times, nvml):
            raise TrainingAborted(
                f"{int(tr.max_consec_bad.item())} consecutive steps had non-finite gradients "
                f"(limit --max-bad-steps {cfg.max_bad_steps}); the last training state was written."
            )
        if done or stop:
            break
    if progress is not None:
        progress.close()
    wall = time.time() - times["start"]
    stopped = stop and not done
    tr.log(
        f"{'Stopped' if stopped else 'Finished'} at {tr.cur_nimg / 1e3:.1f} kimg: {wall:.1f} s wall time, "
        f"{(tr.cur_nimg - start_nimg) / max(wall, 1e-9):.1f} img/s overall (evaluations and snapshots included)."
    )
    return "stopped" if stopped else "done"
