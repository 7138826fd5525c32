"""The precision guard's verdict on recorded FD-digits curves."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_precision_guard_verdict(tmp_path):
    def run(name, precision, fds):
        d = tmp_path / name
        d.mkdir()
        (d / "training_options.json").write_text(json.dumps(dict(precision=precision, seed=1)))
        (d / "metric-fd_digits.jsonl").write_text(
            "".join(json.dumps(dict(kimg=i, fd_digits=v)) + "\n" for i, v in enumerate(fds))
        )
        return str(d)

    ref = run("a-fp32", "fp32", [300, 40, 30, 20, 25])  # tail (4): mean 28.75, stdev 8.54 -> band 11.7..45.8
    ok = run("b-bf16", "bf16", [300, 50, 35, 30, 28])  # mean 35.75
    bad = run("c-bf16", "bf16", [300, 90, 80, 70, 75])  # mean 78.75
    out = tmp_path / "g.jsonl"
    r = subprocess.run(
        [sys.executable, "-m", "studies.precision_guard.guard", ref, ok, "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode == 0 and "PASS" in r.stdout, r.stdout + r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "studies.precision_guard.guard", ref, bad, "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode == 0 and "FAIL" in r.stdout, r.stdout + r.stderr
