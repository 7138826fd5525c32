"""The run directory as one run's property: an exclusive lock for the run's life, its own stale temporary files
removed at the next start, and its record files rewound to the state a run resumes from.

- `RunLock`: `run.lock` in the run directory, held (flock) by rank 0 from before the first file it writes until the
  process ends; the OS releases it when the holder dies (SIGKILL, a node lost), so the next command takes over. The
  file holds the holder's pid, host, start time and command, which a refused second command names. One lock per job:
  only rank 0 takes it. `outdir_lock` (a flock on the --outdir folder) serialises the choice of a run directory among
  commands sharing an --outdir, so two identical commands started together cannot both start the same run.
- `remove_stale_temporaries`: what a killed write leaves (`*.tmp` files and folders of the run's own writers, matched
  by name), removed; a snapshot folder killed between its two renames is put back first.
- `rewind_records`: stats.jsonl and metric-*.jsonl keep the records up to the resumed state's image count, so a resumed
  run logs every tick once.

flock needs a filesystem that supports it (local disks, NFSv4 and most cluster filesystems; Lustre only when mounted
with `-o flock`): where it is refused, the run goes on unlocked and says so in its log.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import sys
import time
from pathlib import Path

from sid_fast.checkpoints import atomic_write_text

try:
    import fcntl
except ImportError:  # Windows: no flock; runs there are not locked
    fcntl = None

LOCK_NAME = "run.lock"
# The names the run's own writers give their temporary files and folders (checkpoints._atomic_write: NAME.XXXX.tmp;
# hub.atomic_folder: NAME.XXXX.tmp and NAME.old.tmp; state._save_sharded: NAME.tmp).
_OWN_TEMPORARY = re.compile(
    r"^(training-state-\d+\.(pt|dcp)|network-snapshot-\d+|training_options\.json|stats\.jsonl|metric-[\w-]+\.jsonl)"
    r"(\.[^/]*)?\.tmp$"
)


class RunLocked(RuntimeError):
    """Another live process holds the run directory (the message names it)."""


def _holder() -> dict:
    return dict(
        pid=os.getpid(),
        host=socket.gethostname(),
        since=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        command=" ".join([os.path.basename(sys.argv[0] or "python"), *sys.argv[1:]])[:500],
    )


def describe_holder(text: str) -> str:
    try:
        h = json.loads(text)
        return f"pid {h['pid']} on {h['host']}, since {h['since']}: {h['command']}"
    except (ValueError, KeyError, TypeError):
        return "a process that did not say who it is"


class RunLock:
    """An exclusive, non-blocking lock on `directory/run.lock`, held until `release()` or the process ends."""

    def __init__(self, directory):
        self.path = Path(directory) / LOCK_NAME
        self.fd: int | None = None
        self.unsupported: str | None = None  # why the filesystem refused flock, when it did

    def acquire(self) -> RunLock:
        if fcntl is None:
            self.unsupported = "this platform has no flock"
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace")
            os.close(fd)
            raise RunLocked(
                f"{self.path.parent}: another run is training in this directory ({describe_holder(holder)}); wait "
                "for it to finish or stop it, or give --resume new or another --run-dir for a separate run."
            ) from None
        except OSError as e:  # a filesystem without flock (e.g. Lustre without -o flock)
            os.close(fd)
            self.unsupported = f"the filesystem refused flock ({e.strerror or e})"
            return self
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_holder()).encode(), 0)
        os.fsync(fd)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the flock; the file stays (the next run reuses it)
            self.fd = None

    def held_by_another(self) -> str | None:
        """The holder's description when the lock is held now (by any descriptor but one this call opens: another
        process's, or an earlier RunLock of this one), else None; nothing is kept."""
        if fcntl is None or not self.path.is_file():
            return None
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return describe_holder(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
        except OSError:
            return None
        finally:
            os.close(fd)  # a shared lock taken for the test goes with the descriptor
        return None


@contextlib.contextmanager
def outdir_lock(outdir):
    """A short exclusive lock while a command chooses (and locks) its run directory: a flock on the --outdir folder
    itself, or on its nearest existing parent before it exists (nothing is created, so a refusal leaves nothing)."""
    if fcntl is None:
        yield
        return
    p = Path(outdir).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    fd = os.open(p, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):  # a filesystem without flock: choose unlocked
            fcntl.flock(fd, fcntl.LOCK_EX)  # held for milliseconds by each command
        yield
    finally:
        os.close(fd)


def remove_stale_temporaries(run_dir) -> list[str]:
    """Remove what killed writes of this run left in its directory (by the writers' own names); a snapshot folder
    killed between its two renames (NAME.old.tmp present, NAME absent) is put back. Returns the names removed."""
    run_dir = Path(run_dir)
    removed = []
    for p in sorted(run_dir.iterdir()):
        if not _OWN_TEMPORARY.match(p.name):
            continue
        if p.name.endswith(".old.tmp") and p.is_dir():
            final = p.with_name(p.name[: -len(".old.tmp")])
            if not final.exists():
                os.replace(p, final)
                continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p.name)
    return removed


def rewind_records(run_dir, kimg: float) -> dict[str, int]:
    """Drop the records of stats.jsonl and metric-*.jsonl written after `kimg` (ticks a killed run logged after its
    last complete state, which the resumed run logs again); each file rewritten atomically. Returns
    {file name: records dropped} for the files that changed."""
    run_dir = Path(run_dir)
    dropped = {}
    for path in [run_dir / "stats.jsonl", *sorted(run_dir.glob("metric-*.jsonl"))]:
        if not path.is_file():
            continue
        lines = path.read_text().splitlines()
        keep = []
        for line in lines:
            try:
                rec_kimg = float(json.loads(line)["kimg"])
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a kill
            if rec_kimg <= kimg + 1e-9:
                keep.append(line)
        if len(keep) != len(lines):
            atomic_write_text(path, "".join(x + "\n" for x in keep))
            dropped[path.name] = len(lines) - len(keep)
    return dropped
