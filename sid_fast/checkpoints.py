"""Reading networks from EDM/SiD pickles and sid_fast checkpoints, and writing files atomically.

EDM pickles (`edm-*.pkl`, SiD's `network-snapshot-*.pkl`) store each network module through EDM's `persistent_class`
mechanism: `torch_utils.persistence._reconstruct_persistent_obj(meta)` where `meta` carries the module's full source
code, its class name and its `__dict__` (shared/reference/edm.md section 3). Unpickling them the normal way executes
that source. We never do: `EDMPickleReader` is a restricted unpickler with an allow-list of globals; persistent objects
become inert stubs from which we take the class name, the recorded init kwargs and the tensors, then we build our own
network and load the tensors with `strict=True`.

sid_fast's own checkpoints are plain dicts of tensors and Python values read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import collections
import hashlib
import io
import os
import pickle
import tempfile
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sid_fast.networks.precond import PRECOND_TYPES, _plain, build_network

SID_FAST_FORMAT = "sid_fast.network"
SID_FAST_FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A file could not be read as a network: the message names the file and what was wrong."""


# ----------------------------------------------------------------------------
# Restricted unpickling of EDM persistence pickles.


class PersistentStub:
    """What a `persistent_class` object becomes when read safely: its class name and state, nothing executable."""

    def __init__(self, class_name: str, state: dict):
        self.class_name = class_name
        self.state = state

    def __repr__(self) -> str:
        return f"PersistentStub({self.class_name})"


class ContainerStub:
    """Stands in for torch.nn.ModuleDict / Sequential / ModuleList, which EDM pickles with NEWOBJ + BUILD."""

    class_name = "ModuleDict"

    def __setstate__(self, state: dict) -> None:
        self.state = state


def _make_container(name: str):
    return type(name + "Stub", (ContainerStub,), {"class_name": name})


def _reconstruct_persistent_obj(meta):
    if not isinstance(meta, dict) or meta.get("type") != "class" or "class_name" not in meta or "state" not in meta:
        raise pickle.UnpicklingError("a persistent object without the expected type/class_name/state fields")
    if meta.get("version") != 6:
        raise pickle.UnpicklingError(f"persistence format version {meta.get('version')!r}, expected 6")
    # meta["module_src"] (the embedded Python source) is deliberately never looked at.
    return PersistentStub(str(meta["class_name"]), meta["state"])


def _load_storage_from_bytes(b: bytes):
    return torch.load(io.BytesIO(b), map_location="cpu", weights_only=True)


def _numpy_scalar(dtype, data=None):
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise pickle.UnpicklingError(f"numpy scalar of unsupported dtype {dtype!r}")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


_ALLOWED_GLOBALS = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): torch._utils._rebuild_parameter_with_state,
    ("torch.storage", "_load_from_bytes"): _load_storage_from_bytes,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy", "dtype"): np.dtype,
    ("torch.nn.modules.container", "ModuleDict"): _make_container("ModuleDict"),
    ("torch.nn.modules.container", "ModuleList"): _make_container("ModuleList"),
    ("torch.nn.modules.container", "Sequential"): _make_container("Sequential"),
}


class EDMPickleReader(pickle.Unpickler):
    """pickle.Unpickler that resolves only the globals EDM/SiD network pickles need (Python's 'restricting globals')."""

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed") from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not used by EDM pickles")


def _stub_state_dict(stub, prefix: str = "", out: dict | None = None, classes: dict | None = None):
    """Walk a stub tree and emit exactly the keys of nn.Module.state_dict() (parameters, persistent buffers)."""
    out = collections.OrderedDict() if out is None else out
    classes = {} if classes is None else classes
    state = stub.state
    classes[prefix.rstrip(".")] = stub.class_name
    if not isinstance(state, dict) or "_parameters" not in state or "_modules" not in state:
        raise CheckpointError(f"object {prefix.rstrip('.') or '<root>'} ({stub.class_name}) is not a torch module")
    for name, p in state["_parameters"].items():
        if p is not None:
            out[prefix + name] = p.detach() if isinstance(p, torch.Tensor) else p
    non_persistent = state.get("_non_persistent_buffers_set", set())
    for name, b in state.get("_buffers", {}).items():
        if b is not None and name not in non_persistent:
            out[prefix + name] = b
    for name, child in state["_modules"].items():
        if child is None:
            continue
        if not isinstance(child, (PersistentStub, ContainerStub)):
            raise CheckpointError(f"submodule {prefix + name} has unexpected type {type(child).__name__}")
        _stub_state_dict(child, prefix + name + ".", out, classes)
    return out, classes


def read_edm_pickle(path: str | os.PathLike) -> dict:
    """Read an EDM/SiD pickle without executing anything; returns the top-level dict with stubs for modules."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = EDMPickleReader(f).load()
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refused to load: {e}.") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, RuntimeError, OverflowError) as e:
        raise CheckpointError(f"{path}: not a readable EDM/SiD pickle (truncated or corrupt?): {type(e).__name__}: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a dict with key 'ema' at the top level, found {type(data).__name__}.")
    return data


def _network_from_stub(stub, path) -> torch.nn.Module:
    if not isinstance(stub, PersistentStub):
        raise CheckpointError(f"{path}: 'ema' is a {type(stub).__name__}, not an EDM persistent network.")
    if stub.class_name not in PRECOND_TYPES:
        raise CheckpointError(
            f"{path}: 'ema' is a {stub.class_name}; sid_fast can build {sorted(PRECOND_TYPES)} only."
        )
    state = stub.state
    init_args = state.get("_init_args", ())
    init_kwargs = state.get("_init_kwargs")
    if init_args or not isinstance(init_kwargs, dict):
        raise CheckpointError(f"{path}: 'ema' lacks the recorded init kwargs (_init_kwargs) needed to rebuild it.")
    try:
        net = build_network(stub.class_name, init_kwargs)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    tensors, classes = _stub_state_dict(stub)
    # Cross-check the module tree's class names against ours (EDM names are kept throughout).
    for name, module in net.named_modules():
        expected = classes.get(name)
        if expected is not None and expected != type(module).__name__:
            raise CheckpointError(f"{path}: module {name or '<root>'} is a {expected} in the file but a {type(module).__name__} here.")
    try:
        net.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: tensors do not match {stub.class_name}({init_kwargs}): {e}") from None
    return net


# ----------------------------------------------------------------------------
# sid_fast's own checkpoints.


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to a temporary file in the same directory, fsync, then rename over `path`.

    A crash or kill at any point leaves either the previous file or the new one, never a partial file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _plain_value(v):
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
        return [_plain_value(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain_value(x) for k, x in v.items()}
    raise TypeError(f"metadata value of type {type(v).__name__} cannot be stored in a sid_fast checkpoint")


def network_record(net: torch.nn.Module, init_kwargs: dict, **meta) -> dict:
    """The dict stored in a sid_fast network file: class, init kwargs, fp32 CPU state_dict, free-form metadata."""
    return dict(
        format=SID_FAST_FORMAT,
        version=SID_FAST_FORMAT_VERSION,
        class_name=type(net).__name__,
        init_kwargs=_plain_value(init_kwargs),
        state_dict={k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).clone() for k, v in net.state_dict().items()},
        meta=_plain_value(meta),
    )


def save_network(path, net: torch.nn.Module, init_kwargs: dict, **meta) -> None:
    atomic_save(network_record(net, init_kwargs, **meta), path)


def load_torch_file(path: str | os.PathLike) -> Any:
    """torch.load(weights_only=True) with one clear error for truncated, corrupt or unsafe files."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refused to load (holds objects other than tensors and plain values): {e}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise CheckpointError(f"{path}: cannot be read as a torch checkpoint (truncated or corrupt?): {e}") from None


def network_from_record(record: dict, path) -> torch.nn.Module:
    if not isinstance(record, dict) or record.get("format") != SID_FAST_FORMAT:
        raise CheckpointError(f"{path}: a torch file, but not a sid_fast network (no format='{SID_FAST_FORMAT}').")
    if record.get("version") != SID_FAST_FORMAT_VERSION:
        raise CheckpointError(f"{path}: sid_fast network format version {record.get('version')}, expected {SID_FAST_FORMAT_VERSION}.")
    try:
        net = build_network(record["class_name"], record["init_kwargs"])
        net.load_state_dict(record["state_dict"], strict=True)
    except (ValueError, RuntimeError, KeyError) as e:
        raise CheckpointError(f"{path}: {e}") from None
    return net


# ----------------------------------------------------------------------------
# One entry point.


def cache_dir() -> Path:
    return Path(os.environ.get("SID_FAST_CACHE_DIR", Path.home() / ".cache" / "sid_fast"))


def resolve_path(path_or_url: str | os.PathLike) -> Path:
    """A local path as is (must exist); a URL downloaded once into the cache (only when the user gives a URL)."""
    s = str(path_or_url)
    if urllib.parse.urlparse(s).scheme in ("http", "https"):
        name = os.path.basename(urllib.parse.urlparse(s).path) or "download"
        dest = cache_dir() / "downloads" / f"{hashlib.md5(s.encode()).hexdigest()}_{name}"
        if not dest.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_suffix(dest.suffix + ".part")
            try:
                with urllib.request.urlopen(s, timeout=60) as r, open(tmp, "wb") as f:
                    while chunk := r.read(1 << 20):
                        f.write(chunk)
            except OSError as e:
                if tmp.exists():
                    tmp.unlink()
                raise CheckpointError(
                    f"{s}: download failed ({e}). Offline? Download the file elsewhere and pass its local path instead."
                ) from None
            os.replace(tmp, dest)
        return dest
    p = Path(s)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file.")
    if p.is_dir():
        raise CheckpointError(f"{p}: is a directory, expected a network file (.pkl or .pt).")
    return p


def load_network_file(path_or_url) -> tuple[torch.nn.Module, dict]:
    """Load a network from an EDM/SiD pickle or a sid_fast checkpoint. Returns (network in eval mode, info).

    info: {"source": "edm-pickle" | "sid_fast", "class_name", "init_kwargs", "meta"} where meta holds sid_fast's
    metadata (e.g. kind="generator" and sigma_init for distilled one-step generators) or EDM's other top-level keys.
    """
    path = resolve_path(path_or_url)
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise CheckpointError(f"{path}: the file is empty.")
    if head.startswith(b"PK"):  # torch.save's zip format
        record = load_torch_file(path)
        net = network_from_record(record, path)
        info = dict(source="sid_fast", class_name=record["class_name"], init_kwargs=record["init_kwargs"], meta=record.get("meta", {}))
    elif head[:1] == b"\x80":  # a pickle (protocol >= 2)
        data = read_edm_pickle(path)
        if "ema" not in data:
            raise CheckpointError(f"{path}: an EDM-style pickle without the key 'ema' (found keys {sorted(map(str, data))}).")
        net = _network_from_stub(data["ema"], path)
        meta = {}
        if isinstance(data.get("dataset_kwargs"), dict):
            meta["dataset_kwargs"] = dict(data["dataset_kwargs"])
        meta["keys"] = sorted(map(str, data))
        info = dict(source="edm-pickle", class_name=data["ema"].class_name, init_kwargs=_plain(dict(data["ema"].state["_init_kwargs"])), meta=meta)
    else:
        raise CheckpointError(f"{path}: neither an EDM/SiD pickle nor a sid_fast checkpoint (unrecognised first bytes {head!r}).")
    net.eval().requires_grad_(False)
    return net, info


def load_network(path_or_url) -> torch.nn.Module:
    """Load a network (EDM/SiD pickle or sid_fast checkpoint) in eval mode with gradients off."""
    return load_network_file(path_or_url)[0]
