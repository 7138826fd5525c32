"""The training-step benchmark and the profiler script run on the bundled teacher and record what they measured."""

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_train_step_bench_records_measurements(tmp_path):
    out = tmp_path / "ts.jsonl"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.train_step",
            "--config",
            "digits",
            "--batch-gpu",
            "4",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    (rec,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert rec["config"] == "digits" and len(rec["step_s"]) == 2 and all(t > 0 for t in rec["step_s"])
    # 11 forward-equivalents of the 8x8 digits teacher per image (about 0.04 GFLOP forward; 0.43 GFLOP measured).
    assert 2e8 < rec["flops_per_img"] < 1e9
    assert 0 < rec["mfu"] < 1 and rec["torch"] and rec["device"].startswith("cpu")


@pytest.mark.slow
def test_train_step_ladder_rungs_accumulate_options(tmp_path):
    out = tmp_path / "ladder.jsonl"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.train_step",
            "--config",
            "digits",
            "--batch-gpu",
            "4",
            "--steps",
            "1",
            "--warmup",
            "1",
            "--rungs",
            "reference,bf16,+channels_last,+fused_adam",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [x["mode"] for x in recs] == ["reference", "bf16", "+channels_last", "+fused_adam"]
    assert all("error" not in x and x["img_per_s"] > 0 for x in recs), [x.get("error") for x in recs]
    assert recs[-1]["options"] == dict(precision="bf16", channels_last=True, optimizer="fused")
    assert recs[1]["matmul_ceiling_dtype"] == "bf16" and recs[0]["matmul_ceiling_dtype"] == "fp32"
    md = tmp_path / "ladder.md"
    r = subprocess.run(
        [sys.executable, "-m", "bench.report", str(out), "--md", str(md), "--png", str(tmp_path / "l.png")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "| +fused_adam |" in md.read_text()


@pytest.mark.slow
def test_profiler_writes_trace_with_sid_ranges(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "profile/torch_profile.py",
            "--config",
            "digits",
            "--batch-gpu",
            "2",
            "--active",
            "1",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    (trace,) = tmp_path.glob("*.json")
    text = trace.read_text()
    assert "sid/fake_score_step" in text and "sid/generator_step" in text


@pytest.mark.slow
def test_acceptance_script_cpu_mode_and_kernel_bench(tmp_path):
    """bench/acceptance.sh --cpu: the GPU acceptance run's steps at toy sizes (so the script cannot rot), with the
    kernel benchmark's records and the rendered tables checked."""
    import os

    out = tmp_path / "acc"
    r = subprocess.run(
        ["bash", "bench/acceptance.sh", "--cpu", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, TRITON_INTERPRET="1"),
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    steps = {x["step"]: x for x in map(json.loads, (out / "steps.jsonl").read_text().splitlines())}
    assert [k for k, v in steps.items() if v["rc"] == 0] == ["env", "gpu_tests", "kernels", "ladder_digits", "memory"]
    assert steps["nsys"]["skipped"] == steps["export"]["skipped"] == "CPU mode"
    env = json.loads((out / "env.json").read_text())
    assert env["cpu_mode"] and env["torch"] and env["triton"]
    summary = (out / "summary.md").read_text()
    assert "| kernels | ok |" in summary and "| reference |" in summary  # the ladder's table is embedded
    # the memory table: the reference generator phase of CIFAR-10 DDPM++ holds 352.5 MiB per image (bench.memory)
    assert "| cifar10 | reference | 352.5 | 1.000x |" in (out / "memory.md").read_text()
    ladder = [json.loads(line) for line in (out / "train_step_digits.jsonl").read_text().splitlines()]
    assert [x["mode"] for x in ladder] == ["reference"] and ladder[0]["img_per_s"] > 0
    # the ladder held against bench.predict's committed model (bench/results/overhead.jsonl's counts)
    compared = (out / "predicted_vs_measured.txt").read_text()
    assert "digits reference" in compared and "measured / predicted = " in compared, compared
    recs = [json.loads(line) for line in (out / "kernels.jsonl").read_text().splitlines()]
    ops = ("sid_loss", "edm_loss", "group_norm_silu")
    modes = ("fwd", "bwd", "fwd+bwd")
    mem = [x for x in recs if x["op"] != "attention"]
    assert {(x["op"], x["provider"], x["mode"]) for x in mem} == {
        (o, p, m) for o in ops for p in ("triton", "torch") for m in modes
    }
    assert all(x["ms_p50"] > 0 and x["gb_s"] > 0 and x["copy_gb_s"] > 0 for x in mem)
    att = [x for x in recs if x["op"] == "attention"]
    assert {(x["provider"], x["mode"]) for x in att} == {(p, m) for p in ("triton", "edm", "sdpa-math") for m in modes}
    # FLOPs as documented: forward 4 N heads L^2 d for the tiny case (2, 1 head, d 16, L 16).
    fwd = [x for x in att if x["mode"] == "fwd"][0]
    assert fwd["flops"] == 4 * 2 * 1 * 16**2 * 16 and fwd["tflops"] > 0
    # The script rendered a table with every provider and a plot.
    md, png = out / "kernels.md", out / "kernels.png"
    text = md.read_text()
    assert "### attention" in text and "### group_norm_silu" in text and "| sdpa-math |" in text
    assert text.count("\n| ") >= len(recs) and png.stat().st_size > 1000


def test_nsys_step_script_runs_the_fast_path_on_cpu(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "profile/nsys_step.py",
            "--config",
            "digits",
            "--batch-gpu",
            "2",
            "--warmup",
            "1",
            "--steps",
            "1",
            "--precision",
            "bf16",
            "--checkpointing",
            "blocks",
            "--optimizer",
            "fused",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "nothing was captured" in r.stdout
