"""The trainer's collaborators take a typed context (sid_fast.training.context), not the trainer: the loop runs on a
RunContext, a Progress and its Steps alone; the trainer's counters are its Progress's (one place holds each)."""

from __future__ import annotations

import torch

from sid_fast import families
from sid_fast.training import loop
from sid_fast.training.config import resolve_config
from sid_fast.training.context import Progress, RunContext


def test_the_loop_runs_on_its_context_alone(tmp_path):
    """Ticks every 1 kimg of 0.25-kimg iterations, a snapshot every 2 ticks, a state every 3 and at the end: the
    cadence of the official loop, with no trainer behind the calls."""
    cfg = resolve_config("digits", dict(batch=250, batch_gpu=250, duration=0.002, tick=1, snap=2, dump=3))
    ctx = RunContext(cfg, families.EDMFamily, torch.device("cpu"), 0, 1, 1, None, tmp_path, log=lambda *a: None)
    progress = Progress.start(ctx.device)
    calls = []

    def step():
        progress.cur_nimg += cfg.batch
        calls.append("step")

    def snapshot():
        calls.append(f"snapshot@{progress.cur_nimg}")

    def save():
        calls.append(f"state@{progress.cur_nimg}")

    assert loop.train(ctx, progress, loop.Steps(step, snapshot, save, "test")) == "done"
    assert calls.count("step") == 8 and progress.cur_nimg == 2000 and progress.cur_tick == 3
    assert [c for c in calls if c != "step"] == ["snapshot@250", "state@250", "snapshot@2000", "state@2000"]
    assert (tmp_path / "stats.jsonl").read_text().count("\n") == 3


def test_the_trainers_counters_are_its_progress():
    from support.helpers import cpu_trainer

    tr = cpu_trainer(resolve_config("digits", dict(batch=16, batch_gpu=16)))
    tr.step()
    assert tr.cur_nimg == tr.progress.cur_nimg == 16
    tr.cur_nimg = 32  # one place: writing through the trainer moves the progress
    assert tr.progress.cur_nimg == 32 and tr.ctx.run_dir is tr.run_dir is None
