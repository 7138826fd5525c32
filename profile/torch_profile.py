"""Profile SiD iterations with torch.profiler: a Chrome trace and a kernel table.

    python profile/torch_profile.py --config cifar10 --batch-gpu 64 --out prof/
    python profile/torch_profile.py --config digits --batch-gpu 64 --out prof/      # CPU-sized

The trainer marks its phases with ranges (sid/fake_score_step, sid/generator_step, sid/ema) that show in the trace
(and as NVTX ranges under Nsight Systems on CUDA). Schedule: wait 1, warm-up 1, then --active iterations recorded.
Run as a script (this directory is deliberately not a package: it would shadow Python's own `profile` module).
"""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import click
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench/ is imported from the repository root

from bench.common import command  # noqa: E402
from bench.train_step import CONFIGS, make_trainer  # noqa: E402


@command(__doc__)
@click.option("--config", type=click.Choice(["digits", *CONFIGS]), default="cifar10", show_default=True)
@click.option("--batch-gpu", "batch_gpu", type=int, default=64, show_default=True)
@click.option("--active", type=int, default=3, show_default=True)
@click.option("--out", default="prof", show_default=True)
@click.option("--rows", type=int, default=30, show_default=True)
def main(**kw):
    a = types.SimpleNamespace(**kw)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tr, _, _ = make_trainer(a.config, a.batch_gpu, device)
    os.makedirs(a.out, exist_ok=True)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    schedule = torch.profiler.schedule(wait=1, warmup=1, active=a.active, repeat=1)
    with torch.profiler.profile(activities=activities, schedule=schedule, record_shapes=True) as prof:
        for _ in range(2 + a.active):
            tr.step()
            prof.step()
    trace = Path(a.out) / f"sid_{a.config}_b{a.batch_gpu}.json"
    prof.export_chrome_trace(str(trace))
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=a.rows)
    (Path(a.out) / f"sid_{a.config}_b{a.batch_gpu}.txt").write_text(table)
    print(table)
    print(f"Chrome trace: {trace} (open in chrome://tracing or ui.perfetto.dev)")


if __name__ == "__main__":
    main()
