"""The studies' runner: train.py runs started a few at a time, each logging to OUTDIR/DESC.out, with the cores shared
among them (OMP_NUM_THREADS = cores // jobs)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_train_jobs(runs: list[tuple[str, list[str]]], outdir, jobs: int, who: str) -> None:
    """Run `train.py ARGS --outdir OUTDIR --desc DESC` for each (DESC, ARGS), `jobs` at a time; SystemExit naming
    the runs that failed."""
    todo = list(runs)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    Path(outdir).mkdir(parents=True, exist_ok=True)
    running: list[tuple[subprocess.Popen, str]] = []
    failed = []
    while todo or running:
        while todo and len(running) < jobs:
            desc, args = todo.pop(0)
            cmd = [sys.executable, str(ROOT / "train.py"), *args, "--outdir", str(outdir), "--desc", desc]
            with open(Path(outdir) / f"{desc}.out", "w") as log:  # the child keeps its own copy of the descriptor
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
            running.append((proc, desc))
            print(f"started {desc}: {' '.join(cmd)}", flush=True)
        time.sleep(2)
        for proc, desc in list(running):
            if proc.poll() is not None:
                running.remove((proc, desc))
                print(f"{desc}: exit {proc.returncode}", flush=True)
                if proc.returncode:
                    failed.append(desc)
    if failed:
        raise SystemExit(f"{who}: runs failed: {', '.join(failed)} (their .out files in {outdir}).")


def last_snapshot(run: Path) -> Path:
    """The newest network-snapshot-* folder of a run directory; SystemExit when it has none."""
    snaps = sorted(p for p in Path(run).glob("network-snapshot-*") if p.is_dir())
    if not snaps:
        raise SystemExit(f"{run}: no network-snapshot-* folder.")
    return snaps[-1]


def train_wall_s(run: Path) -> float | None:
    """The run's wall time in seconds from its log's last line ("Finished at K kimg: W s wall time, ..."), or None."""
    m = re.search(r"Finished at [0-9.]+ kimg: ([0-9.]+) s wall time", (Path(run) / "log.txt").read_text())
    return float(m.group(1)) if m else None
