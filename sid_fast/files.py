"""File-system helpers shared by every writer of sid_fast: the modes a written file gets, durable renames.

Every file and folder sid_fast writes ends with the mode `open()`/`mkdir()` give under the process's umask, whatever
created it (mkstemp, mkdtemp, safetensors), so that a generator or state written on a shared filesystem is readable
by the colleagues the umask admits.
"""

from __future__ import annotations

import os
from pathlib import Path


def current_umask() -> int:
    """The process's umask (read by setting and restoring it): mkstemp/mkdtemp create 0600/0700, this gives the usual
    permissions back."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def umask_modes(root) -> None:
    """Give `root` and everything below it the modes `open()` and `mkdir()` would under the process's umask
    (0644/0755 under umask 022). Temporary files and folders are created 0600/0700, and some writers (safetensors'
    save_file) create 0600 files: renamed into place as they are, colleagues on a shared filesystem could not read
    them."""
    mask = current_umask()
    root = Path(root)
    for p in [root, *root.rglob("*")] if root.is_dir() else [root]:
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def fsync_dir(directory) -> None:
    """fsync a directory, so that a rename into it survives a power loss."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DestinationError(ValueError):
    """A destination a command will not write into (one sentence naming it and what to do)."""


def _shown(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def check_folder_destination(path, own, what: str, overwrite: bool = False) -> list[str]:
    """Refuse to write the folder `path` when it holds entries that `what` does not write (`own(name)` is False for
    them) unless `overwrite`; returns those foreign entries (kept beside the command's own files when it writes).
    A path that is a file is refused whatever `overwrite` says. Nothing is created."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise DestinationError(f"{p}: exists and is not a folder; {what} writes a folder there.")
    if not p.is_dir():
        return []
    foreign = sorted(e.name for e in p.iterdir() if not own(e.name))
    if foreign and not overwrite:
        raise DestinationError(
            f"{p}: the folder holds files that {what} did not write ({_shown(foreign)}); give --overwrite to write "
            "beside them (only its own files are replaced), or choose another folder."
        )
    return foreign


def check_file_destination(path, what: str, overwrite: bool = False) -> None:
    """Refuse to replace an existing file (or to write over a folder) unless `overwrite` (for files)."""
    p = Path(path)
    if p.is_dir():
        raise DestinationError(f"{p}: is a folder; {what} writes a file there.")
    if p.exists() and not overwrite:
        raise DestinationError(f"{p}: exists; give --overwrite to replace it, or choose another name.")
