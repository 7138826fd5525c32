"""What sid_fast's files are made of, shared by the network readers (sid_fast.checkpoints) and the generator folders
(sid_fast.hub): the one error type of unreadable files, atomic writes of files and folders, plain metadata values,
the names of a generator folder's files, Hub ids, and reading such a folder (local or from the Hub).

It imports nothing of sid_fast but sid_fast.files, so that both of its users stand on it and neither on the other.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from sid_fast.files import DestinationError, check_folder_destination, current_umask, fsync_dir, umask_modes

SID_FAST_FORMAT = "sid_fast.network"
SID_FAST_FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A file could not be read as a network: the message names the file and what was wrong."""


def describe_error(e: BaseException, limit: int = 200) -> str:
    """One line for an exception from a corrupt file (messages of fuzzed inputs can be long or multi-line)."""
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg[:limit]}{'...' if len(msg) > limit else ''}"


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to a temporary file in the same directory, fsync, then rename over `path`.

    A crash or kill at any point leaves either the previous file or the new one, never a partial file. A failed write
    (a full disk, a quota, an I/O error) removes the temporary file and raises a CheckpointError that says so.
    """
    _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """`text` written to `path` as atomic_save writes a state."""
    _atomic_write(path, lambda f: f.write(text.encode()))


def _atomic_write(path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp creates 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) or (isinstance(e, RuntimeError) and "write" in str(e).lower()):
            kept = "the previous file is intact" if path.exists() else "no earlier file existed"
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
            raise CheckpointError(f"{path}: writing failed ({reason}); {kept}.") from None
        raise


def plain_value(v):
    """Metadata as plain Python values only (weights_only loading refuses str/float subclasses such as TorchVersion)."""
    if isinstance(v, bool) or v is None:
        return v
    if isinstance(v, int):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return float(v)
    if isinstance(v, str):
        return str(v)
    if isinstance(v, (list, tuple)):
        return [plain_value(x) for x in v]
    if isinstance(v, dict):
        return {str(k): plain_value(x) for k, x in v.items()}
    raise TypeError(f"metadata value of type {type(v).__name__} cannot be stored in a sid_fast checkpoint")


WEIGHTS = "model.safetensors"
CONFIG = "config.json"
CARD = "README.md"
FOLDER_FILES = (WEIGHTS, CONFIG, CARD)
T2I_META = "sid_fast.json"  # marks a text-to-image generator (a diffusers UNet or pipeline folder: sid_fast.t2i.export)
# What `download` fetches of a repository: a generator folder's files, or a text-to-image generator's (a diffusers
# UNet folder, or a pipeline folder's components); never other weight formats or variants a repository may hold.
DOWNLOADED = [
    *FOLDER_FILES, T2I_META, "diffusion_pytorch_model.safetensors", "model_index.json", "*/config.json",
    "*/model.safetensors", "*/diffusion_pytorch_model.safetensors", "scheduler/*", "tokenizer/*",
]  # fmt: skip

# owner/name as the Hub spells repository ids (letters, digits, '-', '_', '.'), optionally hf:// and @revision.
_HUB_ID = re.compile(r"^(?:hf://)?([A-Za-z0-9][\w.\-]*/[\w.\-]+)(?:@([\w.\-/]+))?$")


def _error(msg: str) -> CheckpointError:
    return CheckpointError(msg)


def is_folder(path) -> bool:
    return Path(path).is_dir() and (Path(path) / CONFIG).exists()


def hub_id(spec: str) -> tuple[str, str | None] | None:
    """(repo_id, revision) when `spec` names a Hub repository rather than a local path; None otherwise. A string that
    exists on disk is always a path; `hf://owner/name` is always an id; a bare `owner/name` that does not exist
    locally and has no file suffix is taken as an id."""
    s = str(spec)
    if not s.startswith("hf://") and (os.path.exists(s) or s.startswith((".", "/", "~")) or s.count("/") != 1):
        return None
    m = _HUB_ID.match(s)
    if m is None or (not s.startswith("hf://") and Path(m.group(1)).suffix in (".pt", ".pkl", ".safetensors")):
        return None
    return m.group(1), m.group(2)


def atomic_folder(path, fill, error=None, own=(), overwrite: bool = False) -> Path:
    """The folder `path` as `fill(tmp)` writes it into a temporary folder beside it: every file fsynced, then renamed
    into place. A kill leaves the previous folder or the new one (an existing folder is first renamed to
    `<name>.old.tmp`; a kill between the two renames is undone by the next write of the same name, which also removes
    leftover `.tmp` folders). An OSError becomes `error`'s one sentence when given.

    `own` names the files `fill` writes: an existing folder holding anything else is refused before any work unless
    `overwrite`, and then those other entries are moved into the new folder, so only the command's own files are
    replaced."""
    path = Path(path)
    try:
        foreign = check_folder_destination(path, lambda name: name in own, "this command", overwrite)
    except DestinationError as e:
        if error is None:
            raise
        raise error(str(e)) from None
    path.parent.mkdir(parents=True, exist_ok=True)
    previous = path.with_name(f"{path.name}.old.tmp")
    if previous.is_dir() and not path.exists():  # killed between the two renames below: the old folder comes back
        os.replace(previous, path)
    for stale in path.parent.glob(f"{path.name}.*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent))
    try:
        fill(tmp)
        umask_modes(tmp)  # mkdtemp's 0700 and safetensors' 0600 become the umask's modes, as open() gives
        for f in sorted(tmp.rglob("*")):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        for d in sorted({f.parent for f in tmp.rglob("*")} - {tmp}):
            fsync_dir(d)
        for name in foreign:  # --overwrite: the user's own entries move into the new folder, untouched
            os.replace(path / name, tmp / name)
        old = None
        if path.exists():  # the same snapshot written again (a resumed run): swap, then drop the old folder
            old = previous
            os.replace(path, old)
        os.replace(tmp, path)
        fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and error is not None:
            kept = "the previous folder is intact" if path.exists() else "no earlier folder existed"
            raise error(f"{path}: writing failed ({e.strerror or e}); {kept}.") from None
        raise
    return path


def read_folder(path) -> dict:
    """The record of a generator folder, in the form of a sid_fast `.pt` file (format, version, class_name,
    init_kwargs, state_dict, meta), for `checkpoints.network_from_record`, which checks the tensors against the
    network config.json names. Any fault is one CheckpointError sentence naming the file."""
    path = Path(path)
    cfg_path, weights = path / CONFIG, path / WEIGHTS
    if not cfg_path.exists():
        raise _error(
            f"{path}: no {CONFIG}; a sid_fast generator folder holds {WEIGHTS} and {CONFIG} (convert a .pt file with "
            "`python -m sid_fast.hub convert`)."
        )
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _error(f"{cfg_path}: not valid JSON ({e}).") from None
    if not isinstance(config, dict) or config.get("format") != SID_FAST_FORMAT:
        raise _error(f'{cfg_path}: not a sid_fast network config (no "format": "{SID_FAST_FORMAT}").')
    if config.get("version") != SID_FAST_FORMAT_VERSION:
        raise _error(f"{cfg_path}: format version {config.get('version')}, expected {SID_FAST_FORMAT_VERSION}.")
    class_name, init_kwargs = config.get("class_name"), config.get("init_kwargs")
    if not isinstance(class_name, str) or not isinstance(init_kwargs, dict):
        raise _error(f'{cfg_path}: needs "class_name" (a string) and "init_kwargs" (an object).')
    if not weights.exists():
        raise _error(f"{path}: no {WEIGHTS} beside {CONFIG}.")
    try:
        with safe_open(str(weights), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise _error(f"{weights}: not a readable safetensors file ({reason}).") from None
    meta = config.get("meta", {})
    record = dict(
        format=SID_FAST_FORMAT,
        version=SID_FAST_FORMAT_VERSION,
        class_name=class_name,
        init_kwargs=init_kwargs,
        state_dict=tensors,
        meta=meta if isinstance(meta, dict) else {},
    )
    return record


def download(repo_id: str, revision: str | None = None) -> Path:
    """The folder of Hub repository `repo_id` (its config.json, model.safetensors and README.md), fetched into
    huggingface_hub's cache (or found there offline). One CheckpointError sentence for every failure."""
    spec = repo_id + (f"@{revision}" if revision else "")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise _error(
            f"{spec}: looks like a Hugging Face Hub id, and loading one needs huggingface_hub "
            "(pip install huggingface_hub); for a local folder give a path that exists."
        ) from None
    try:
        local = snapshot_download(repo_id, revision=revision, allow_patterns=DOWNLOADED)
    except Exception as e:  # huggingface_hub's errors: not found, offline and not cached, gated, network
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise _error(
            f"{spec}: not a local path, and the Hugging Face Hub could not provide it ({type(e).__name__}: {reason}); "
            "offline, only ids already in the Hub cache load."
        ) from None
    if not is_folder(local) and not (Path(local) / T2I_META).is_file():
        raise _error(f"{spec}: the Hub repository has no {CONFIG}; it is not a sid_fast generator folder.")
    return Path(local)
