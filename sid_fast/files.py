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
