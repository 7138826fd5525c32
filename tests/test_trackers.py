"""--tracker tensorboard|wandb: the logged values read back from the files each writes; the ETA of the status line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from support.helpers import child_env

from sid_fast.progress import format_duration
from sid_fast.training.tickstats import Eta

ROOT = Path(__file__).resolve().parent.parent
# Two iterations of 32 images, a tick and a metric each: seconds on 2 cores.
RUN = [
    "--batch",
    "32",
    "--batch-gpu",
    "32",
    "--duration",
    "0.000064",
    "--tick",
    "0.032",
    "--snap",
    "1",
    "--dump",
    "100",
]
RUN += ["--metric-num", "256"]


def _train(out, *args, env=None):
    r = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--outdir", str(out), *RUN, *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=child_env(**(env or {})),
        cwd=out.parent,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    (run_dir,) = out.iterdir()
    stats = [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]
    metric = [json.loads(line) for line in (run_dir / "metric-fd_digits.jsonl").read_text().splitlines()]
    return r, run_dir, stats, metric


@pytest.mark.slow
def test_tensorboard_and_wandb_files_hold_the_logged_values_and_the_same_command_continues_both(tmp_path):
    """One run with both trackers (--tracker tensorboard,wandb; W&B offline), read back from TensorBoard's event files
    and W&B's run file; the same command with a longer --duration continues the run and the same W&B run."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    from support.wandb_reader import history
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    env = dict(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DIR=str(tmp_path))
    r, run_dir, stats, metric = _train(tmp_path / "runs", "--tracker", "tensorboard,wandb", env=env)
    assert "eta " in r.stdout and all("eta_s" in s for s in stats)
    steps = {round(s["kimg"] * 1000) for s in stats}

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    loss = {e.step: e.value for e in acc.Scalars("progress/loss_G")}
    assert loss.keys() == steps
    for s in stats:  # float32 in the event file
        assert loss[round(s["kimg"] * 1000)] == pytest.approx(s["loss_G"], rel=1e-6)
    fd = {e.step: e.value for e in acc.Scalars("metrics/fd_digits")}
    assert fd == {round(m["kimg"] * 1000): pytest.approx(m["fd_digits"], rel=1e-6) for m in metric}
    images = acc.Images("samples/G_ema")
    assert [i.step for i in images] == [round(m["kimg"] * 1000) for m in metric] and images[0].width > 8

    (run_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    run_id = (run_dir / "wandb_id.txt").read_text().strip()
    assert run_file.name == f"run-{run_id}.wandb"
    rows = history(run_file)
    loss = {row["nimg"]: row["progress/loss_G"] for row in rows if "progress/loss_G" in row}
    assert loss == {round(s["kimg"] * 1000): pytest.approx(s["loss_G"], rel=1e-12) for s in stats}
    fd = {row["nimg"]: row["metrics/fd_digits"] for row in rows if "metrics/fd_digits" in row}
    assert fd == {round(m["kimg"] * 1000): pytest.approx(m["fd_digits"], rel=1e-12) for m in metric}
    assert any(row.get("samples/G_ema/_type") == "image-file" for row in rows)

    r = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--outdir", str(tmp_path / "runs"), *RUN, "--duration", "0.000096"]
        + ["--tracker", "tensorboard,wandb"],
        capture_output=True,
        text=True,
        timeout=600,
        env=child_env(**env),
        cwd=tmp_path,
    )
    assert r.returncode == 0 and "Resumed from" in r.stdout, r.stderr[-3000:]
    files = sorted(run_dir.glob(f"wandb/offline-run-*/run-{run_id}.wandb"))
    assert len(files) == 2 and [d for d in (tmp_path / "runs").iterdir()] == [run_dir]
    later = {row["nimg"] for row in history(files[-1]) if "progress/loss_G" in row}
    assert later and min(later) > max(steps)
    acc.Reload()
    assert max(e.step for e in acc.Scalars("progress/loss_G")) == max(later)


def test_a_tracker_that_is_not_installed_stops_the_run_before_it_starts(tmp_path):
    code = (
        "import sys, runpy; sys.modules['wandb'] = None; "
        "sys.argv = ['train.py', '--outdir', 'runs', '--tracker', 'wandb']; "
        f"runpy.run_path({str(ROOT / 'train.py')!r}, run_name='__main__')"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode != 0 and "--tracker wandb needs the wandb package" in r.stderr
    assert "pip install wandb" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "runs").exists()


def test_eta_counts_from_the_end_of_the_first_tick():
    eta = Eta(total_nimg=10_000, start_nimg=0, start_time=0.0)
    assert eta.update(1000, 100.0) == pytest.approx(9 * 100)  # first tick: its own rate (compilation included)
    assert eta.update(2000, 110.0) == pytest.approx(8 * 10)  # later: from the end of the first tick on
    assert eta.update(4000, 130.0) == pytest.approx(6 * 10)
    assert eta.update(10_000, 190.0) == 0
    resumed = Eta(total_nimg=10_000, start_nimg=6000, start_time=50.0)
    assert resumed.update(6000, 50.0) is None  # no image yet: no rate
    assert [format_duration(s) for s in (None, 42, 1025, 11220, 187_200)] == ["--", "42s", "17m05s", "3h07m", "2d04h"]
