"""Runs that survive a cluster: concurrent downloads, failures agreed on by every rank, a full disk, killed and
restarted torchrun jobs that end bit-identical to uninterrupted ones."""

import errno
import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from support.helpers import gloo_process

from sid_fast import checkpoints
from sid_fast.checkpoints import CheckpointError, atomic_save
from sid_fast.training.config import ConfigError, resolve_config

ROOT = Path(__file__).resolve().parent.parent


class _Server:
    """A local HTTP server for one file, slow enough (1 MiB chunks, 20 ms apart) that concurrent readers overlap;
    counts the GET requests it answers."""

    def __init__(self, payload: bytes):
        self.payload, self.gets = payload, 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.gets += 1
                self.send_response(200)
                self.send_header("Content-Length", str(len(outer.payload)))
                self.end_headers()
                for i in range(0, len(outer.payload), 1 << 20):
                    self.wfile.write(outer.payload[i : i + (1 << 20)])
                    time.sleep(0.02)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/teacher.pkl"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


_FETCH = """
import hashlib, os, sys, time
from pathlib import Path
from sid_fast.checkpoints import resolve_path
go = Path(sys.argv[2])
while not go.exists():
    time.sleep(0.005)
p = resolve_path(sys.argv[1])
print(p, hashlib.sha256(p.read_bytes()).hexdigest())
"""


def test_concurrent_downloads_leave_one_identical_file(tmp_path):
    """Six processes ask for one 24 MiB URL at the same moment: every one gets the complete file, one request is
    made, and no temporary file is left behind."""
    payload = os.urandom(24 << 20)
    server = _Server(payload)
    env = dict(os.environ, SID_FAST_CACHE_DIR=str(tmp_path / "cache"))
    go = tmp_path / "go"
    try:
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", _FETCH, server.url, str(go)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(6)
        ]
        time.sleep(3)  # every process is waiting for the go file (imports done)
        go.touch()
        results = [p.communicate(timeout=300) for p in procs]
    finally:
        server.close()
    want = hashlib.sha256(payload).hexdigest()
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err[-2000:]
        assert out.split()[-1] == want
    assert len({out.split()[0] for out, _ in results}) == 1
    assert server.gets == 1
    leftovers = [p.name for p in (tmp_path / "cache" / "downloads").iterdir() if not p.name.endswith(".lock")]
    assert len(leftovers) == 1, leftovers


def test_download_failures_are_one_sentence(tmp_path, monkeypatch):
    monkeypatch.setenv("SID_FAST_CACHE_DIR", str(tmp_path / "cache"))
    payload = os.urandom(3 << 20)
    server = _Server(payload)
    try:
        bad = "0" * 64
        with pytest.raises(CheckpointError, match=r"teacher\.pkl#sha256=0+: download failed \(invalid hash value"):
            checkpoints.resolve_path(f"{server.url}#sha256={bad}")
        good = hashlib.sha256(payload).hexdigest()
        assert checkpoints.resolve_path(f"{server.url}#sha256={good}").read_bytes() == payload
    finally:
        server.close()
    with pytest.raises(CheckpointError, match=r"127\.0\.0\.1:9/x\.pkl: download failed .*Offline\?"):
        checkpoints.resolve_path("http://127.0.0.1:9/x.pkl")  # the discard port: nothing listens
    leftovers = [p.name for p in (tmp_path / "cache" / "downloads").iterdir() if p.name.endswith(".partial")]
    assert not leftovers


def test_hub_file_offline_is_one_sentence(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    code = (
        "from sid_fast.checkpoints import resolve_path, CheckpointError\n"
        "try:\n    resolve_path('hf://no-such-owner/no-such-repo/teacher.pkl')\n"
        "except CheckpointError as e:\n    print('ERR', e)\n"
        "try:\n    resolve_path('hf://owner-only')\n"
        "except CheckpointError as e:\n    print('ERR', e)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    lines = [line for line in r.stdout.splitlines() if line.startswith("ERR")]
    assert len(lines) == 2, r.stdout + r.stderr
    assert "hf://no-such-owner/no-such-repo/teacher.pkl: the Hub download failed" in lines[0]
    assert "a Hub file is hf://OWNER/REPO/PATH[@REVISION]" in lines[1]


def _missing_teacher_worker(rank, world, port, teacher, out):
    from sid_fast.training.run import build_trainer

    with gloo_process(rank, world, port):
        over = dict(batch=4, batch_gpu=2, metrics="none", dropout=0.0)
        if rank == 1:  # this node cannot reach the teacher
            over["teacher"] = teacher + ".missing-on-this-node"
        try:
            build_trainer(resolve_config("digits", over), torch.device("cpu"), log=lambda *_: None)
            Path(out.format(rank)).write_text("built")
        except CheckpointError as e:
            Path(out.format(rank)).write_text(f"CheckpointError: {e}")


def test_a_rank_that_cannot_load_its_teacher_stops_every_rank(tmp_path):
    from sid_fast.families import DIGITS_TEACHER_PATH

    out = str(tmp_path / "rank{}.txt")
    port = 29700 + os.getpid() % 500
    ctx = mp.spawn(_missing_teacher_worker, args=(2, port, str(DIGITS_TEACHER_PATH), out), nprocs=2, join=False)
    deadline = time.time() + 180
    while not ctx.join(timeout=1):
        assert time.time() < deadline, "a rank hangs"
    said = [Path(out.format(r)).read_text() for r in range(2)]
    assert said[0] == said[1], said
    assert (
        said[0].startswith("CheckpointError: ")
        and ".missing-on-this-node: no such file or folder. (on rank 1)" in said[0]
    )


def test_a_full_disk_keeps_the_previous_state(tmp_path, monkeypatch):
    path = tmp_path / "training-state-000000000256.pt"
    atomic_save(dict(format="x", value=torch.arange(5)), path)
    before = path.read_bytes()

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"\0" * 1000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoints.torch, "save", full_disk)
    with pytest.raises(CheckpointError, match=r"000256\.pt: writing failed \(No space left on device\); the previous"):
        atomic_save(dict(format="x", value=torch.zeros(10)), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left


# ----------------------------------------------------------------------------------------------------------------
# Killed and restarted torchrun jobs.

# The digits preset in two processes: 8 iterations of 32 images, a tick per iteration, a state every 2 ticks.
_FLAGS = ["--batch", "32", "--batch-gpu", "16", "--duration", "0.000256", "--tick", "0.032", "--dump", "2"]
_FLAGS += ["--snap", "1000", "--metrics", "none", "--keep-states", "0", "--seed", "3"]


def _torchrun(outdir: Path, fault: str | None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("SID_FAST_TEST_FAULT", None)
    if fault:
        env["SID_FAST_TEST_FAULT"] = fault
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=1"]
    cmd += [str(ROOT / "tests" / "support" / "faulty_train.py"), "--outdir", str(outdir), *_FLAGS]
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)


def _final_state(outdir: Path) -> dict:
    (run_dir,) = outdir.iterdir()
    from sid_fast.training.run import latest_state, load_state_file

    return load_state_file(latest_state(run_dir))


def _assert_states_equal(a: dict, b: dict):
    assert a["cur_nimg"] == b["cur_nimg"] == 256 and a["cur_tick"] == b["cur_tick"]
    for key in ("G", "G_ema", "fake_score"):
        for k, v in a[key].items():
            assert torch.equal(v, b[key][k]), (key, k)
    for key in ("opt_g", "opt_fake"):
        for i, st in a[key]["state"].items():
            for k, v in st.items():
                assert torch.equal(torch.as_tensor(v), torch.as_tensor(b[key]["state"][i][k])), (key, i, k)
    for ra, rb in zip(a["rng"], b["rng"]):
        assert torch.equal(ra["cpu"], rb["cpu"])


@pytest.mark.slow
def test_killed_and_restarted_jobs_end_bit_identical(tmp_path):
    """torchrun --max-restarts=1 restarts a job one of whose two gloo processes was killed with SIGKILL, in the middle
    of an iteration (rank 1, after the fake-score step of the 7th iteration; the newest state is at 160 images) and,
    separately, in the middle of writing a state (rank 0, the state at 160 images; the newest complete one is at 96):
    the restarted job continues by itself from the newest complete state (--resume auto) and ends with every tensor of
    its final state bit-identical to an uninterrupted job's. States are written at 32, 96, 160, 224 and 256 images.
    The restarted job takes over the run directory's lock (one per job: rank 0's), removes the killed write's temporary
    file and rewinds stats.jsonl, which then holds every tick once, as the uninterrupted job's does."""
    clean = _torchrun(tmp_path / "clean", None)
    assert clean.returncode == 0, clean.stderr[-3000:]
    reference = _final_state(tmp_path / "clean")
    (clean_dir,) = (tmp_path / "clean").iterdir()
    ticks = [json.loads(line)["kimg"] for line in (clean_dir / "stats.jsonl").read_text().splitlines()]
    assert len(ticks) == 8 and ticks == sorted(set(ticks))
    for name, fault, resumed_at in (
        ("iteration", "iteration:1:192", "at 0.2 kimg"),
        ("state-write", "state-write:160", "at 0.1 kimg"),
    ):
        r = _torchrun(tmp_path / name, fault)
        assert r.returncode == 0, r.stderr[-3000:]
        log = r.stdout + r.stderr
        assert "Resumed from" in log, log[-3000:]
        assert resumed_at in log, log[-3000:]
        _assert_states_equal(_final_state(tmp_path / name), reference)
        (run_dir,) = (tmp_path / name).iterdir()
        assert not list(run_dir.glob("*.tmp"))  # what the killed write left was removed by the restarted job
        if name == "state-write":
            assert "Removed what killed writes left in" in log, log[-3000:]
        assert [json.loads(line)["kimg"] for line in (run_dir / "stats.jsonl").read_text().splitlines()] == ticks
        holder = json.loads((run_dir / "run.lock").read_text())  # one lock for the job, written by its rank 0
        assert set(holder) == {"pid", "host", "since", "command"} and "--seed 3" in holder["command"]


def test_run_directory_choice_and_refusal_of_another_configuration(tmp_path):
    """--resume auto picks the newest run directory of this configuration that holds a state; --resume new and another
    configuration start a new one; a state of another configuration, named by --run-dir, is refused in one sentence
    naming the flags, before anything is written."""
    from sid_fast.training.run import check_same_run, choose_run
    from sid_fast.training.state import state_name

    cfg = resolve_config("digits", dict(outdir=str(tmp_path), metrics="none"))
    run_dir, state = choose_run(cfg, 1)
    assert run_dir.name == "00000-digits-alpha1.2-batch256-gpus1-fp32" and state is None
    (run_dir / "training_options.json").write_text(json.dumps(cfg.to_json()))
    assert choose_run(cfg, 1)[0].name.startswith("00001-")  # no state yet: a new run
    atomic_save(dict(format="x", config=cfg.to_json()), run_dir / state_name(256))
    atomic_save(dict(format="x", config=cfg.to_json()), run_dir / state_name(2_000_000_000))  # sorts after 256
    assert choose_run(cfg, 1) == (run_dir, run_dir / state_name(2_000_000_000))
    longer = resolve_config("digits", dict(outdir=str(tmp_path), metrics="none", duration=1.0, tick=1.0))
    assert choose_run(longer, 1)[0] == run_dir  # how long and how often to report: the same run
    other = resolve_config("digits", dict(outdir=str(tmp_path), metrics="none", alpha=1.0, glr=3e-4))
    assert choose_run(other, 1)[0].name.startswith("00002-digits-alpha1-")
    fresh = resolve_config("digits", dict(outdir=str(tmp_path), metrics="none", resume="new"))
    assert choose_run(fresh, 1)[0].name.startswith("00003-")
    named = resolve_config("digits", dict(outdir=str(tmp_path), metrics="none", alpha=1.0, run_dir=str(run_dir)))
    path = choose_run(named, 1)[1]
    with pytest.raises(ConfigError) as e:
        check_same_run(named, torch.load(path, weights_only=True), path)
    msg = str(e.value)
    assert (
        "written by another configuration (--alpha 1.2 vs 1.0: the state's value first)" in msg
        and "--resume new" in msg
    )
    assert "\n" not in msg


def test_state_and_snapshot_names_sort_by_images_at_any_duration():
    from sid_fast.training.snapshots import snapshot_name
    from sid_fast.training.state import state_name

    images = [0, 256, 1000, 999_999_744, 1_000_000_000, 2_000_000_000_000 // 2]  # beyond 999,999 kimg too
    for name in (state_name, snapshot_name):
        names = [name(n) for n in images]
        assert sorted(names) == names and len(set(names)) == len(names)


def test_a_state_exports_its_generator_for_sampling(teacher_file, tmp_path):
    """`python -m sid_fast.training.state export`: G_ema of a training state as a network file that loads in a fresh
    process and gives G_ema's outputs."""
    from support.helpers import cfg_for, cpu_trainer

    from sid_fast.checkpoints import load_network_file

    tr = cpu_trainer(cfg_for(teacher_file))
    tr.step()
    tr.run_dir = tmp_path
    path = tr.save_state()
    x, sigma = torch.randn(2, 1, 8, 8), torch.full([2, 1, 1, 1], 2.5)
    labels = torch.eye(3)[[0, 2]]
    for out in (tmp_path / "G_ema", tmp_path / "G_ema.pt"):  # a generator folder, or a .pt file by its suffix
        r = subprocess.run([sys.executable, "-m", "sid_fast.training.state", "export", str(path), str(out)],
                           capture_output=True, text=True, timeout=300)  # fmt: skip
        assert r.returncode == 0, r.stderr[-2000:]
        assert out.is_dir() == (out.suffix != ".pt")
        net, info = load_network_file(out)
        assert info["meta"]["kind"] == "generator" and info["meta"]["kimg"] == 0.008
        with torch.no_grad():
            torch.testing.assert_close(net(x, sigma, labels), tr.G_ema(x, sigma, labels), rtol=0, atol=0)
    r = subprocess.run([sys.executable, "-m", "sid_fast.training.state", "export", str(tmp_path / "none.pt"), str(out)],
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode != 0 and "none.pt" in r.stderr and "Traceback" not in r.stderr
