"""Shared helpers for benchmarks: environment record, JSON lines output, hardware ceilings measured in the same run."""

from __future__ import annotations

import datetime
import json
import platform
import subprocess
import time
from pathlib import Path

import click
import torch

RESULTS = Path(__file__).resolve().parent / "results"


def command(doc: str):
    """click.command for a bench or profile script: its module docstring as the help, each paragraph kept as written
    (click would rewrap them), -h and --help."""
    paragraphs = [p for p in doc.strip().split("\n\n") if p.strip()]
    return click.command(
        help="\n\n".join("\b\n" + p for p in paragraphs),
        context_settings=dict(help_option_names=["-h", "--help"], max_content_width=120),
    )


def environment() -> dict:
    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=RESULTS.parent, timeout=10
            ).stdout.strip()
            or None
        )
    except Exception:
        commit = None
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    cuda = torch.cuda.is_available()
    return dict(
        device=torch.cuda.get_device_name()
        if cuda
        else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        torch=torch.__version__,
        triton=triton_version,
        cuda=torch.version.cuda if cuda else None,
        git_commit=commit,
        timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_ceiling(device, dtype=None, n=None, reps=10) -> float:
    """Measured dense matmul FLOP/s: bf16 8192^3 on GPU, fp32 1024^3 on CPU (median of reps)."""
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    n = n or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t)
    times.sort()
    return 2 * n**3 / times[len(times) // 2]


def write_jsonl(records: list[dict], name: str, results: Path = RESULTS) -> Path:
    """Append the records, one JSON line each, to results/name (bench/results unless a study names its own)."""
    results.mkdir(parents=True, exist_ok=True)
    path = results / name
    with open(path, "a") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


def read_fd_digits_run(path) -> tuple[Path, dict, list[dict]]:
    """A train.py run directory's (path, training options, FD-digits evaluations); exits with one sentence if empty."""
    p = Path(path)
    opts = json.loads((p / "training_options.json").read_text())
    curve = [json.loads(line) for line in (p / "metric-fd_digits.jsonl").read_text().splitlines() if line.strip()]
    if not curve:
        raise SystemExit(f"{p}: no FD-digits evaluations in metric-fd_digits.jsonl.")
    return p, opts, curve
