"""Inputs and runs that cannot lose data: one run per directory (a lock the OS releases when its holder dies), stale
temporary files of killed writes removed and the record files rewound on resume, destinations that hold other files
refused unless --overwrite (and then kept), prompt files with blank lines, bounded seeds, a read-only or vanished run
directory as one sentence, and refusals of unsafe files in a sentence of our own."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from sid_fast.checkpoints import CheckpointError, load_network_file, save_network
from sid_fast.training.config import ConfigError, resolve_config

ROOT = Path(__file__).resolve().parent.parent
# The digits preset, small: a tick and a state every 32 images.
FLAGS = ["--batch", "32", "--batch-gpu", "32", "--tick", "0.032", "--dump", "1", "--snap", "1000", "--metrics", "none"]


def _train(outdir, *extra):
    cmd = [sys.executable, str(ROOT / "train.py"), "--outdir", str(outdir), *FLAGS, *extra]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(predicate, timeout=120):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return True
        time.sleep(0.2)
    return False


# ----------------------------------------------------------------------------------------------------------------
# One run per directory.


def test_two_commands_started_together_train_once_and_a_killed_holder_is_taken_over(tmp_path):
    """Two identical commands started together: one trains, the other stops in one sentence naming the holder and
    writes nothing. The holder is then SIGKILLed in the middle of a state write's life (a stale temporary file planted
    as a killed write leaves it, a tick logged after its last state): the same command takes over the directory,
    removes the temporary file, and stats.jsonl ends with every tick once."""
    out = tmp_path / "runs"
    a, b = _train(out, "--duration", "1"), _train(out, "--duration", "1")
    # The loser is refused as soon as the winner holds the directory; the winner keeps training.
    loser = None
    assert _wait_for(lambda: a.poll() is not None or b.poll() is not None, 180)
    loser, winner = (a, b) if a.poll() is not None else (b, a)
    _, err = loser.communicate(timeout=60)
    assert loser.returncode == 1 and "Traceback" not in err, err[-2000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith("Error: ") and "already training there" in line and f"pid {winner.pid}" in line, line
    (run_dir,) = out.iterdir()
    assert _wait_for(lambda: len(list(run_dir.glob("training-state-*.pt"))) >= 2)
    winner.send_signal(signal.SIGKILL)
    winner.communicate(timeout=60)
    states = sorted(run_dir.glob("training-state-*.pt"))
    stale = run_dir / (states[-1].name.replace(".pt", "") + "000.pt.x1y2z3.tmp")
    stale.write_bytes(b"")  # what a kill during torch.save leaves
    with open(run_dir / "stats.jsonl", "a") as f:  # a tick logged after the newest state
        f.write(json.dumps(dict(tick=999, kimg=10.0)) + "\n")
    c = _train(out, "--duration", f"{(int(states[-1].stem.split('-')[-1]) + 64) / 1e6}")
    stdout, err = c.communicate(timeout=300)
    assert c.returncode == 0, err[-3000:]
    lines = stdout.strip().splitlines()  # the run directory, first and last, so the user knows where to look
    assert lines[0] == f"Run directory: {run_dir}" and lines[-1].startswith(f"Run directory: {run_dir} ("), lines
    log = (run_dir / "log.txt").read_text()
    assert f"Removed what killed writes left in {run_dir}: {stale.name}" in log and not stale.exists()
    assert "Dropped" in log and "stats.jsonl written after that state" in log
    kimg = [json.loads(x)["kimg"] for x in (run_dir / "stats.jsonl").read_text().splitlines()]
    assert kimg == sorted(set(kimg)) and 10.0 not in kimg
    assert json.loads((run_dir / "run.lock").read_text())["pid"] == c.pid


def test_a_held_run_directory_is_refused_and_released(tmp_path):
    """The lock itself, in one process and a child: held -> refused naming the holder; released -> taken."""
    from sid_fast.training.rundir import RunLock, RunLocked

    code = (
        f"import sys, time; sys.path.insert(0, {str(ROOT)!r}); from sid_fast.training.rundir import RunLock; "
        f"RunLock({str(tmp_path)!r}).acquire(); print('held', flush=True); time.sleep(60)"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        assert f"pid {child.pid}" in RunLock(tmp_path).held_by_another()
        with pytest.raises(RunLocked, match=rf"another run is training in this directory \(pid {child.pid} on "):
            RunLock(tmp_path).acquire()
    finally:
        child.kill()
        child.wait()
    lock = RunLock(tmp_path).acquire()  # the OS released the killed holder's lock
    assert f"pid {os.getpid()}" in RunLock(tmp_path).held_by_another()
    lock.release()
    assert RunLock(tmp_path).held_by_another() is None


def test_stale_temporaries_are_removed_by_name_and_a_half_swapped_snapshot_comes_back(tmp_path):
    from sid_fast.training.rundir import remove_stale_temporaries, rewind_records

    for name in ("training-state-000000000064.pt.abc.tmp", "network-snapshot-000000000064.k2j.tmp",
                 "training-state-000000000096.dcp.tmp", "stats.jsonl.q.tmp"):  # fmt: skip
        (tmp_path / name).mkdir() if "snapshot" in name or "dcp" in name else (tmp_path / name).write_text("")
    (tmp_path / "network-snapshot-000000000032.old.tmp").mkdir()  # killed between the two renames
    (tmp_path / "network-snapshot-000000000032.old.tmp" / "config.json").write_text("{}")
    (tmp_path / "notes.tmp").write_text("the user's")  # not a name the run writes
    removed = remove_stale_temporaries(tmp_path)
    assert sorted(removed) == [
        "network-snapshot-000000000064.k2j.tmp",
        "stats.jsonl.q.tmp",
        "training-state-000000000064.pt.abc.tmp",
        "training-state-000000000096.dcp.tmp",
    ]
    assert (tmp_path / "network-snapshot-000000000032" / "config.json").is_file()
    assert (tmp_path / "notes.tmp").read_text() == "the user's"
    (tmp_path / "stats.jsonl").write_text("".join(json.dumps(dict(kimg=k)) + "\n" for k in (0.032, 0.064, 0.096)))
    (tmp_path / "metric-fid.jsonl").write_text(json.dumps(dict(kimg=0.096, fid=3.0)) + '\n{"kimg": 0.0')
    assert rewind_records(tmp_path, 0.064) == {"stats.jsonl": 1, "metric-fid.jsonl": 2}
    assert [json.loads(x)["kimg"] for x in (tmp_path / "stats.jsonl").read_text().splitlines()] == [0.032, 0.064]
    assert (tmp_path / "metric-fid.jsonl").read_text() == ""


# ----------------------------------------------------------------------------------------------------------------
# Faults during a run.


@pytest.mark.parametrize("fault", ["read-only", "vanished"])
def test_a_run_directory_that_cannot_be_written_is_one_sentence_naming_the_last_state(tmp_path, monkeypatch, fault):
    import shutil

    from sid_fast.training import loop, tickstats
    from sid_fast.training.run import run

    real, calls = tickstats.append_jsonl, []

    def failing(path, record):
        calls.append(path)
        if len(calls) == 3:  # the third tick: states at 32 and 64 images exist
            if fault == "vanished":
                shutil.rmtree(path.parent)
                return real(path, record)  # FileNotFoundError, as the filesystem gives it
            raise PermissionError(13, "Permission denied", str(path))  # what a read-only directory gives
        return real(path, record)

    monkeypatch.setattr(loop.tickstats, "append_jsonl", failing)
    cfg = resolve_config(
        "digits",
        dict(
            outdir=str(tmp_path / "runs"),
            batch=32,
            batch_gpu=32,
            tick=0.032,
            dump=1,
            snap=1000,
            metrics="none",
            duration=0.000256,
        ),  # fmt: skip
    )
    with pytest.raises(ConfigError) as e:
        run(cfg, log_to_stdout=False)
    msg = str(e.value)
    assert "\n" not in msg and "writing failed" in msg, msg
    if fault == "read-only":
        assert "Permission denied" in msg and msg.endswith("training-state-000000000064.pt (run the same command again "
                                                           "to continue from it).")  # fmt: skip
    else:
        assert "No such file or directory" in msg and msg.endswith("the last complete training state is none.")


# ----------------------------------------------------------------------------------------------------------------
# Outputs never replace what is not theirs.


@pytest.fixture
def generator_file(tmp_path):
    from support.helpers import NET

    from sid_fast.networks import build_network

    torch.manual_seed(0)
    path = tmp_path / "gen.pt"
    save_network(path, build_network("EDMPrecond", NET), NET, kind="generator", sigma_init=2.5)
    return path


def test_hub_convert_keeps_the_users_files(generator_file, tmp_path):
    from sid_fast import hub

    dst = tmp_path / "folder"
    dst.mkdir()
    (dst / "notes.txt").write_text("mine")
    r = CliRunner().invoke(hub.main, ["convert", str(generator_file), str(dst)])
    assert r.exit_code == 1 and "did not write (notes.txt)" in r.output and "--overwrite" in r.output, r.output
    assert sorted(p.name for p in dst.iterdir()) == ["notes.txt"]
    r = CliRunner().invoke(hub.main, ["convert", str(generator_file), str(dst), "--overwrite"])
    assert r.exit_code == 0, r.output
    assert (dst / "notes.txt").read_text() == "mine" and set(hub.FOLDER_FILES) <= {p.name for p in dst.iterdir()}
    load_network_file(dst)
    r = CliRunner().invoke(hub.main, ["convert", str(generator_file), str(dst)])  # its own folder again: replaced
    assert r.exit_code == 1 and "notes.txt" in r.output  # ... unless the user's file is still there
    (dst / "notes.txt").unlink()
    assert CliRunner().invoke(hub.main, ["convert", str(generator_file), str(dst)]).exit_code == 0


def test_samplers_and_exports_refuse_destinations_holding_other_files(generator_file, tmp_path):
    from sid_fast import export, sample

    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("mine")
    args = ["--network", str(generator_file), "--seeds", "0-1", "--outdir", str(out)]
    r = CliRunner().invoke(sample.main, args)
    assert r.exit_code == 2 and "--outdir" in r.output and "thesis.tex" in r.output, r.output
    assert sorted(p.name for p in out.iterdir()) == ["thesis.tex"]
    r = CliRunner().invoke(sample.main, [*args, "--overwrite"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == ["000000.png", "000001.png", "thesis.tex"]
    assert CliRunner().invoke(sample.main, args[:-2] + ["--outdir", str(tmp_path / "new")]).exit_code == 0
    assert CliRunner().invoke(sample.main, args[:-2] + ["--outdir", str(tmp_path / "new")]).exit_code == 0  # its own
    pt2 = tmp_path / "g.pt2"
    pt2.write_text("mine")
    r = CliRunner().invoke(export.main, ["--network", str(generator_file), "--out", str(pt2)])
    assert r.exit_code == 1 and "exists; give --overwrite" in r.output and pt2.read_text() == "mine", r.output


# ----------------------------------------------------------------------------------------------------------------
# What users type.


@pytest.mark.parametrize(
    "text, prompts",
    [
        (b"a handwritten one\n\n", ["a handwritten one"]),
        (b"\n\na\n\n  \nb", ["a", "b"]),
        (b"\n a \n\n\n", ["a"]),
        (b"one\r\ntwo\r\n\r\n", ["one", "two"]),
    ],
)
def test_prompt_files_with_blank_lines_anywhere(tmp_path, text, prompts):
    from sid_fast.data.prompts import read_prompts
    from sid_fast.t2i.sample import jobs

    path = tmp_path / "p.txt"
    path.write_bytes(text)
    assert list(read_prompts(path)) == prompts
    assert [p for _, p, _ in jobs(None, str(path), None)] == prompts


@pytest.mark.parametrize("text", [b"", b"\n\n\n", b"  \t\n\r\n"])
def test_prompt_files_of_blank_lines_only_are_refused_in_one_sentence(tmp_path, text):
    from sid_fast.data.prompts import PromptError, read_prompts

    path = tmp_path / "p.txt"
    path.write_bytes(text)
    with pytest.raises(PromptError, match=r"p\.txt: the prompt file holds no prompt \(one per line\)\.$"):
        read_prompts(path)


@pytest.mark.parametrize(
    "seeds, words",
    [
        ("99999999999999999999", "99999999999999999999 is out of range: values go from 0 to 4294967295"),
        ("0-999999999999", "is out of range"),
        ("0-99999999", "names more than 10,000,000 values; split the job"),
        ("5-3", "range '5-3' is empty"),
        ("a-b", "is not a list of integers"),
    ],
)
@pytest.mark.parametrize("command", ["sample", "t2i.sample"])
def test_seeds_are_bounded_before_any_folder_is_made(tmp_path, seeds, words, command):
    from sid_fast import sample
    from sid_fast.t2i import sample as t2i_sample

    out = tmp_path / "out"
    if command == "sample":
        r = CliRunner().invoke(sample.main, ["--network", "x", "--seeds", seeds, "--outdir", str(out)])
    else:
        args = ["--network", "x", "--teacher", "y", "--prompt", "a", "--seeds", seeds, "--outdir", str(out)]
        r = CliRunner().invoke(t2i_sample.main, args)
    assert r.exit_code == 2 and "--seeds" in r.output and words in r.output, r.output
    assert "Traceback" not in r.output and not out.exists()


# ----------------------------------------------------------------------------------------------------------------
# Refusals that protect.


def test_an_unsafe_torch_file_is_refused_in_our_words(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "ran"),))

    path = tmp_path / "evil.pt"
    torch.save({"state_dict": Evil()}, path)
    with pytest.raises(CheckpointError) as e:
        load_network_file(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: refused: the file holds a reference to ") and "system" in msg, msg
    assert "nothing in it was run" in msg and "weights_only" not in msg and "\n" not in msg
    assert not (tmp_path / "ran").exists()


def test_a_resume_of_a_pickle_names_what_the_file_is(tmp_path):
    import pickle

    from sid_fast.training.run import load_state_file

    path = tmp_path / "network-snapshot.pkl"
    path.write_bytes(pickle.dumps(dict(ema=None)))
    with pytest.raises(ConfigError, match=r"--resume .*network-snapshot\.pkl: a Python pickle, not a torch\.save "):
        load_state_file(path)
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"empty\.pt: an empty file\."):
        load_state_file(tmp_path / "empty.pt")


def test_a_snapshot_written_again_keeps_a_file_put_into_it(generator_file, tmp_path):
    """A resumed run writes a snapshot of the same image count again (its own folder: overwrite=True, as the trainer
    passes it): the weights are replaced, a file someone put there stays, and nothing stops the run."""
    from sid_fast import hub

    net, info = load_network_file(generator_file)
    snap = tmp_path / "network-snapshot-000000000064"
    hub.save_folder(snap, net, info["init_kwargs"], overwrite=True, kind="generator", sigma_init=2.5)
    (snap / "notes.txt").write_text("looked good")
    with torch.no_grad():
        next(net.parameters()).add_(1.0)
    hub.save_folder(snap, net, info["init_kwargs"], overwrite=True, kind="generator", sigma_init=2.5)
    assert (snap / "notes.txt").read_text() == "looked good"
    again, _ = load_network_file(snap)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), net.state_dict().values()))
    with pytest.raises(CheckpointError, match=r"did not write \(notes\.txt\)"):
        hub.save_folder(snap, net, info["init_kwargs"], kind="generator", sigma_init=2.5)  # not asked: refused
