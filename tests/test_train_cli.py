"""train.py end to end on the bundled digits teacher (a few iterations), resume, and the sampler on its snapshot."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from support.helpers import child_env

from sid_fast.checkpoints import load_network_file


def _train(*args):
    return subprocess.run([sys.executable, "train.py", *args], capture_output=True, text=True, timeout=600,
                          env=child_env())  # fmt: skip


# train.py where `import triton` and `import sklearn` fail, as on macOS/Windows (no Triton wheels) without scikit-learn:
# the default and the reference path need neither.
_WITHOUT_TRITON_OR_SKLEARN = (
    "import runpy, sys; sys.modules['triton'] = sys.modules['sklearn'] = None; sys.argv = ['train.py', *sys.argv[1:]]; "
    "runpy.run_path('train.py', run_name='__main__'); "
)


def _train_without_triton(*args):
    cmd = [sys.executable, "-c", _WITHOUT_TRITON_OR_SKLEARN, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=child_env())


@pytest.mark.slow
def test_digits_default_runs_resumes_and_samples(tmp_path):
    """The default's first 2 kimg (8 iterations of 256), run without Triton and scikit-learn: the files of a run,
    FD-digits falling from the teacher's one-step output, then resume and the sampler."""
    out = tmp_path / "runs"
    common = ["--outdir", str(out), "--tick", "1.024", "--snap", "2", "--dump", "2"]
    r = _train_without_triton(*common, "--duration", "0.002048")
    assert r.returncode == 0, r.stderr[-2000:]
    (run_dir,) = out.iterdir()
    names = {p.name for p in run_dir.iterdir()}
    assert {"training_options.json", "log.txt", "stats.jsonl", "metric-fd_digits.jsonl", "fd_digits.png"} <= names
    assert any(n.startswith("fakes-") for n in names) and any(n.startswith("network-snapshot-") for n in names)
    stats = [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]
    assert stats[-1]["kimg"] == 2.048 and all(s["loss_fake"] > 0 for s in stats)
    fds = [json.loads(line)["fd_digits"] for line in (run_dir / "metric-fd_digits.jsonl").read_text().splitlines()]
    # Measured (CPU, torch 2.13): 290.1 at 0.3 kimg -> 29.9 at 2.0 kimg (9.7x; 14.2 at 4.1 kimg). Asserted: 5x.
    assert fds[0] > 150 and fds[-1] < fds[0] / 5, fds
    assert "tick 0" in r.stdout and "FD-digits of G_ema" in r.stdout
    # Every snapshot is a generator folder whose config.json carries the snapshot's metric (as metric-*.jsonl).
    snaps = sorted(run_dir.glob("network-snapshot-*"))
    assert all((s / "model.safetensors").is_file() and (s / "README.md").is_file() for s in snaps)
    assert [json.loads((s / "config.json").read_text())["meta"]["metrics"]["fd_digits"] for s in snaps] == fds

    r = _train(*common, "--duration", "0.00256", "--metrics", "none", "--resume", str(run_dir))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Resumed from" in r.stdout and "at 2.0 kimg" in r.stdout
    resumed = sorted(out.iterdir())[-1]
    stats = [json.loads(line) for line in (resumed / "stats.jsonl").read_text().splitlines()]
    assert stats[-1]["kimg"] == 2.56

    snap = sorted(resumed.glob("network-snapshot-*"))[-1]
    net, info = load_network_file(snap)
    assert info["meta"]["kind"] == "generator" and info["meta"]["sigma_init"] == 2.5
    from click.testing import CliRunner

    from sid_fast import sample  # the sampler's command in this process (its own process start is tested elsewhere)

    r = CliRunner().invoke(
        sample.main, ["--network", str(snap), "--seeds", "0-3", "--outdir", str(tmp_path / "samples")]
    )
    assert r.exit_code == 0, r.output
    assert len(list(Path(tmp_path / "samples").glob("*.png"))) == 4


def test_bad_flags_fail_before_work(tmp_path):
    r = _train("--outdir", str(tmp_path), "--tmax", "0")
    assert r.returncode != 0 and "--tmax must be" in r.stderr
    r = _train("--outdir", str(tmp_path), "--teacher", str(tmp_path / "none.pkl"))
    assert r.returncode != 0 and "none.pkl: no such file" in r.stderr and "Traceback" not in r.stderr
    r = _train("--outdir", str(tmp_path), "--resume", str(tmp_path / "nothing"))
    assert r.returncode != 0 and "--resume" in r.stderr and "no such file" in r.stderr
    assert not any(tmp_path.iterdir())  # nothing was written


@pytest.mark.slow
def test_sigterm_stops_with_a_state_and_the_same_command_continues(tmp_path):
    """SIGTERM finishes the step, writes a state and exits with status 75; the same command, run again, continues that
    run in its directory (--resume auto) and finishes it."""
    import signal
    import time

    out = tmp_path / "runs"
    command = [sys.executable, "train.py", "--outdir", str(out), "--tick", "0.256", "--snap", "1000", "--dump", "1000"]
    command += ["--metrics", "none", "--duration", "0.001536", "--keep-states", "2"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())
    deadline = time.time() + 240
    while time.time() < deadline and not list(out.glob("*/stats.jsonl")):  # wait until training is under way
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 75, stderr[-2000:]
    assert "Received signal" in stdout and "run the same command to continue" in stdout
    (run_dir,) = out.iterdir()
    from sid_fast.training.run import latest_state, load_state_file

    stopped_at = load_state_file(latest_state(run_dir))["cur_nimg"]
    assert 0 < stopped_at < 1536 and stopped_at % 256 == 0  # written at an iteration boundary

    r = subprocess.run(command, capture_output=True, text=True, timeout=600, env=child_env())
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"at {stopped_at / 1e3:.1f} kimg" in r.stdout and "Finished at 1.5 kimg" in r.stdout
    assert [p.name for p in out.iterdir()] == [run_dir.name]  # the same run directory
    states = sorted(p.name for p in run_dir.glob("training-state-*.pt"))
    assert states[-1] == "training-state-000000001536.pt" and len(states) <= 2  # --keep-states 2
    kimgs = [json.loads(line)["kimg"] for line in (run_dir / "stats.jsonl").read_text().splitlines()]
    assert kimgs == sorted(kimgs) and kimgs[-1] == 1.536


@pytest.mark.slow
def test_readme_first_command_runs_from_a_fresh_clone(tmp_path):
    """The README's first command, exactly as written, in a fresh clone of this repository (the committed tree),
    shortened to one iteration through SID_FAST_DURATION; install.sh has already run (CI runs it first)."""
    import os
    import shutil

    root = Path(__file__).resolve().parent.parent
    block = (root / "README.md").read_text().split("```bash", 1)[1].split("```", 1)[0]
    first = block.strip().splitlines()[0].split("#")[0].strip()
    assert first == "./install.sh && python3 train.py", first
    clone = tmp_path / "clone"
    if (root / ".git").exists():
        subprocess.run(["git", "clone", "--quiet", str(root), str(clone)], check=True, timeout=120)
    else:  # an exported tree: copy it
        shutil.copytree(root, clone, ignore=shutil.ignore_patterns("runs", "__pycache__", "*.egg-info"))
    command = first.split("&&")[-1].split()
    assert command[0] == "python3"
    env = dict(os.environ, SID_FAST_DURATION="0.000256")
    r = subprocess.run([sys.executable, *command[1:]], cwd=clone, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    (run_dir,) = (clone / "runs").iterdir()
    assert json.loads((run_dir / "training_options.json").read_text())["duration"] == 0.000256
    assert "FD-digits of G_ema at 0.3 kimg" in r.stdout and "Finished at 0.3 kimg" in r.stdout
    assert (run_dir / "fd_digits.png").exists() and list(run_dir.glob("network-snapshot-*"))
