"""Reading networks from EDM/SiD pickles and sid_fast checkpoints, and writing files atomically.

EDM pickles (`edm-*.pkl`, SiD's `network-snapshot-*.pkl`) store each network module through EDM's `persistent_class`
mechanism: `torch_utils.persistence._reconstruct_persistent_obj(meta)` where `meta` carries the module's full source
code, its class name and its `__dict__` (EDM torch_utils/persistence.py). Unpickling them the normal way executes
that source. We never do: `EDMPickleReader` is a restricted unpickler with an allow-list of globals; persistent objects
become inert stubs from which we take the class name, the recorded init kwargs and the tensors, then we build our own
network and load the tensors with `strict=True`.

The same reader takes EDM2's snapshots and post-hoc reconstructions (a dnnlib EasyDict whose `ema` is an EDM2
Precond in float16, beside the VAE encoder, the loss and numpy arrays: edm2 training/training_loop.py) and the official
SiD/SiDA-EDM2 generator pickles, whose forward pre-hooks pickle as `builtins.getattr(module, name)`: that global
becomes an inert stub, nothing is looked up. float16 tensors are copied into our float32 parameters.

sid_fast's own checkpoints are plain dicts of tensors and Python values read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import collections
import hashlib
import io
import os
import pickle
import re
import socket
import sys
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock, Timeout
from torch.hub import download_url_to_file

from sid_fast.networks.precond import FILE_CLASS_ALIASES, PRECOND_TYPES, _plain, build_network, official_kwargs
from sid_fast.storage import (  # noqa: F401  (the names this module has always offered)
    CONFIG,
    SID_FAST_FORMAT,
    SID_FAST_FORMAT_VERSION,
    WEIGHTS,
    CheckpointError,
    atomic_save,
    atomic_write_text,
    download,
    hub_id,
    plain_value,
    read_folder,
)
from sid_fast.storage import describe_error as _describe

# ----------------------------------------------------------------------------
# Restricted unpickling of EDM persistence pickles.


class _Refused(pickle.UnpicklingError):
    """The reader's own refusal (a global outside the allow-list, a foreign persistent object); other unpickling
    errors mean a corrupt or truncated stream."""


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
    if (
        not isinstance(meta, dict)
        or meta.get("type") != "class"
        or not isinstance(meta.get("class_name"), str)
        or "state" not in meta
    ):
        raise _Refused("a persistent object without the expected type/class_name/state fields")
    if meta.get("version") != 6:
        raise _Refused(f"persistence format version {meta.get('version')!r}, expected 6")
    # meta["module_src"] (the embedded Python source) is deliberately never looked at.
    # Never str() an object from the file: a tensor's repr runs torch code (and imports) and can be huge.
    return PersistentStub(meta["class_name"], meta["state"])


def _load_storage_from_bytes(b: bytes):
    return torch.load(io.BytesIO(b), map_location="cpu", weights_only=True)


def _numpy_scalar(dtype, data=None):
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise _Refused(f"numpy scalar of unsupported dtype {dtype!r}")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


class EasyDictStub(dict):
    """dnnlib.util.EasyDict (EDM2 snapshots' top level and dataset_kwargs) read as a plain dict."""


class BoundMethodStub:
    """What `builtins.getattr(obj, name)` becomes: SiDA-EDM2 generator pickles store their MPConvs' forward pre-hooks,
    bound methods, that way (official sida branch, sida_training_edm2/networks_edm2_modified.py). Nothing is looked
    up."""

    def __init__(self, obj, name):
        self.name = name if isinstance(name, str) else "?"

    def __repr__(self) -> str:
        return f"BoundMethodStub({self.name})"


def _numpy_dtype(*args):
    d = np.dtype(*args)
    if d.hasobject:
        raise _Refused("numpy arrays of Python objects are not allowed")
    return d


def _numpy_reconstruct(cls, shape, dtype_code):
    """numpy's array pickling: an empty array that BUILD (ndarray.__setstate__) fills with the stored bytes."""
    if cls is not np.ndarray:
        raise _Refused("numpy array of a subclass")
    return np.ndarray.__new__(np.ndarray, (0,), np.uint8)


_ALLOWED_GLOBALS = {
    ("dnnlib.util", "EasyDict"): EasyDictStub,
    ("builtins", "getattr"): BoundMethodStub,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
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
    ("numpy", "dtype"): _numpy_dtype,
    ("torch.nn.modules.container", "ModuleDict"): _make_container("ModuleDict"),
    ("torch.nn.modules.container", "ModuleList"): _make_container("ModuleList"),
    ("torch.nn.modules.container", "Sequential"): _make_container("Sequential"),
}


class _BoundedReader:
    """A file view whose reads never ask for more than the bytes left, so a length field in a corrupt stream cannot
    make the unpickler allocate a buffer of the length it claims."""

    def __init__(self, f, size: int):
        self.f, self.left = f, size

    def read(self, n: int = -1) -> bytes:
        b = self.f.read(self.left if n is None or n < 0 else min(n, self.left))
        self.left -= len(b)
        return b

    def readline(self) -> bytes:
        b = self.f.readline(self.left)
        self.left -= len(b)
        return b

    def readinto(self, buf) -> int:
        data = self.read(len(buf))
        buf[: len(data)] = data
        return len(data)


# The pure-Python unpickler, not the C one: C's memo is an array that a single LONG_BINPUT opcode with a large index
# grows to that index (a 48 kB fuzzed file took 78 s and gigabytes); the Python one keeps its memo in a dict. The
# opcodes of a network pickle are few (the tensors are inside byte strings), so its speed does not matter.
class EDMPickleReader(pickle._Unpickler):
    """An unpickler that resolves only the globals EDM/SiD network pickles need (Python's 'restricting globals')."""

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise _Refused(f"global '{module}.{name}' is not allowed") from None

    def persistent_load(self, pid):
        raise _Refused("persistent ids are not used by EDM pickles")


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


def load_restricted(path, reader_class, what: str):
    """The object a restricted unpickler (`reader_class`, a pickle._Unpickler with its own allow-list) reads from the
    file, on a bounded reader; its refusals and any other failure (a corrupt stream: nothing runs but the allow-list)
    as one CheckpointError naming the file and `what` it should have been."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return reader_class(_BoundedReader(f, os.fstat(f.fileno()).st_size)).load()
    except _Refused as e:
        raise CheckpointError(f"{path}: refused to load: {e}.") from None
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable {what} (truncated or corrupt?): {_describe(e)}") from None


def read_edm_pickle(path: str | os.PathLike) -> dict:
    """Read an EDM/SiD pickle without executing anything; returns the top-level dict with stubs for modules."""
    path = Path(path)
    data = load_restricted(path, EDMPickleReader, "EDM/SiD pickle")
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a dict with key 'ema' at the top level, found {type(data).__name__}.")
    return data


# Bounds on recorded init kwargs, far above every EDM/EDM2 network (model_channels <= 448, 4-5 levels, <= 4 blocks),
# so that a file cannot make the loader build something huge before its tensors are compared.
_MAX_INT_KWARG = 1 << 16
_MAX_LIST_KWARG = 64
_MAX_BLOCKS = 64


def _check_kwarg_sizes(kwargs: dict, path) -> None:
    def walk(key, v):
        if isinstance(v, bool) or v is None:
            return
        if isinstance(v, int) and abs(v) > _MAX_INT_KWARG:
            raise CheckpointError(f"{path}: init kwarg {key}={v} is outside any plausible network size.")
        if isinstance(v, (list, tuple)):
            if len(v) > _MAX_LIST_KWARG:
                raise CheckpointError(
                    f"{path}: init kwarg {key} has {len(v)} entries, more than any plausible network."
                )
            for x in v:
                walk(key, x)
        if isinstance(v, dict):
            for k, x in v.items():
                walk(f"{key}.{k}", x)

    for k, v in kwargs.items():
        walk(k, v)
    for key in ("num_blocks", "channel_mult_emb"):
        v = kwargs.get(key)
        if isinstance(v, int) and not isinstance(v, bool) and v > _MAX_BLOCKS:
            raise CheckpointError(f"{path}: init kwarg {key}={v} is outside any plausible network size.")


def build_checked(class_name: str, init_kwargs: dict, tensors: dict, path) -> torch.nn.Module:
    """Build `class_name(**init_kwargs)` and load `tensors` strictly, refusing a mismatch before allocating anything.

    The network is first built on the meta device (no memory) and its state_dict keys and shapes compared with the
    file's tensors; only a match is built for real. Any failure is a CheckpointError naming the file.
    """
    if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise CheckpointError(f"{path}: the state dict holds values that are not tensors.")
    init_kwargs = _plain(dict(init_kwargs))  # numpy scalars from EDM pickles -> Python values
    _check_kwarg_sizes(init_kwargs, path)
    try:
        with torch.device("meta"):
            shape_net = build_network(class_name, init_kwargs)
    except Exception as e:  # recorded kwargs of the wrong type or value
        raise CheckpointError(
            f"{path}: cannot build {class_name} from its recorded init kwargs: {_describe(e)}"
        ) from None
    want = {k: tuple(v.shape) for k, v in shape_net.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if want != got:
        missing, extra = sorted(want.keys() - got.keys()), sorted(got.keys() - want.keys())
        wrong = sorted(k for k in want.keys() & got.keys() if want[k] != got[k])
        detail = "; ".join(
            f"{label} {keys[:3]}{'...' if len(keys) > 3 else ''}"
            for label, keys in (("missing", missing), ("unexpected", extra), ("wrong shape", wrong))
            if keys
        )
        raise CheckpointError(f"{path}: tensors do not match {class_name} built from its init kwargs: {detail}.")
    net = build_network(class_name, init_kwargs)
    try:
        net.load_state_dict(tensors, strict=True)
    except RuntimeError as e:  # e.g. a dtype that cannot be copied into the parameter
        raise CheckpointError(f"{path}: tensors do not load into {class_name}: {_describe(e)}") from None
    return net


def _network_from_stub(stub, path) -> torch.nn.Module:
    if not isinstance(stub, PersistentStub):
        raise CheckpointError(f"{path}: 'ema' is a {type(stub).__name__}, not an EDM persistent network.")
    if stub.class_name not in PRECOND_TYPES and stub.class_name not in FILE_CLASS_ALIASES:
        raise CheckpointError(
            f"{path}: 'ema' is a {stub.class_name}; sid_fast can build {sorted(PRECOND_TYPES)} (and the official "
            f"SiDA classes {sorted(FILE_CLASS_ALIASES)}) only."
        )
    state = stub.state
    init_args = state.get("_init_args", ())
    init_kwargs = state.get("_init_kwargs")
    if init_args or not isinstance(init_kwargs, dict):
        raise CheckpointError(f"{path}: 'ema' lacks the recorded init kwargs (_init_kwargs) needed to rebuild it.")
    tensors, classes = _stub_state_dict(stub)
    net = build_checked(stub.class_name, init_kwargs, tensors, path)
    # Cross-check the module tree's class names against ours (EDM names are kept throughout).
    for name, module in net.named_modules():
        expected = classes.get(name)
        expected = FILE_CLASS_ALIASES.get(expected, expected)
        if expected is not None and expected != type(module).__name__:
            raise CheckpointError(
                f"{path}: module {name or '<root>'} is a {expected} in the file but a {type(module).__name__} here."
            )
    return net


# ----------------------------------------------------------------------------
# sid_fast's own checkpoints.


def network_record(net: torch.nn.Module, init_kwargs: dict, **meta) -> dict:
    """The dict stored in a sid_fast network file: class, init kwargs, fp32 CPU state_dict, free-form metadata."""
    return dict(
        format=SID_FAST_FORMAT,
        version=SID_FAST_FORMAT_VERSION,
        class_name=type(net).__name__,
        init_kwargs=plain_value(init_kwargs),
        state_dict={
            k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).clone()
            for k, v in net.state_dict().items()
        },
        meta=plain_value(meta),
    )


def save_network(path, net: torch.nn.Module, init_kwargs: dict, **meta) -> None:
    atomic_save(network_record(net, init_kwargs, **meta), path)


def _file_kind(path) -> str | None:
    """What a file that is not a torch.save zip archive is, from its first bytes (None for a zip archive)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return None  # torch.load names the problem
    if head.startswith(b"PK\x03\x04"):
        return None
    if not head:
        return "an empty file"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return (
            "a Python pickle, not a torch.save archive (EDM/SiD network pickles are read by --teacher, --network "
            "and --sid-model, never as training states)"
        )
    return "neither a torch.save archive nor a pickle"


def load_torch_file(path: str | os.PathLike, mmap: bool = False) -> Any:
    """torch.load(weights_only=True) with one clear error for truncated, corrupt or unsafe files; `mmap` maps the
    tensors' storage from the file instead of reading it (a large state is paged in as it is copied). A file holding
    references to code (classes, functions) is refused in a sentence of our own: torch's text advises
    `weights_only=False`, which would run that code."""
    kind = _file_kind(path)
    if kind is not None:
        raise CheckpointError(f"{path}: {kind}.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        found = re.findall(r"GLOBAL ([\w.]+)|global[: ]+'?([\w.]+)", str(e))
        name = next((a or b for a, b in found), None)
        what = f"a reference to {name}" if name else "objects other than tensors and plain values"
        raise CheckpointError(
            f"{path}: refused: the file holds {what}, which a sid_fast file never holds, and nothing in it was run; "
            "if you trust it, load it in your own Python session and save the tensors you need with torch.save "
            "(a state_dict) or sid_fast.checkpoints.save_network."
        ) from None
    except Exception as e:  # weights_only runs no code: any other failure (torch's reader asserts too) is corruption
        raise CheckpointError(
            f"{path}: cannot be read as a torch checkpoint (truncated or corrupt?): {_describe(e)}."
        ) from None


TRAINING_STATE_FORMAT = "sid_fast.training_state"


def read_training_state(path: str | os.PathLike, mmap: bool = False) -> dict:
    """A training state written by the trainer (G, G_ema, fake score, optimizers, RNG states, counters), read with
    torch.load(weights_only=True); of a sharded state (a directory), its meta.pt (the shards are read by
    sid_fast.training.state). A truncated or foreign file is refused naming the previous state, if any."""
    path = Path(path)
    try:
        s = load_torch_file(path / "meta.pt" if path.is_dir() else path, mmap=mmap)
    except CheckpointError as e:
        older = sorted(o for o in path.parent.glob("training-state-*") if o.name < path.name and ".tmp" not in o.name)
        hint = f" The previous state is {older[-1]}." if older else ""
        raise CheckpointError(f"{e}{hint}") from None
    if not isinstance(s, dict) or s.get("format") != TRAINING_STATE_FORMAT:
        raise CheckpointError(f"{path}: not a sid_fast training state.")
    return s


def network_from_record(record: dict, path) -> torch.nn.Module:
    if not isinstance(record, dict) or record.get("format") != SID_FAST_FORMAT:
        raise CheckpointError(f"{path}: a torch file, but not a sid_fast network (no format='{SID_FAST_FORMAT}').")
    if record.get("version") != SID_FAST_FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: sid_fast network format version {record.get('version')}, expected {SID_FAST_FORMAT_VERSION}."
        )
    class_name, init_kwargs, tensors = (record.get(k) for k in ("class_name", "init_kwargs", "state_dict"))
    if not isinstance(class_name, str) or not isinstance(init_kwargs, dict) or not isinstance(tensors, dict):
        raise CheckpointError(f"{path}: a sid_fast network file without class_name, init_kwargs and state_dict.")
    return build_checked(class_name, init_kwargs, tensors, path)


# ----------------------------------------------------------------------------
# One entry point.


def cache_dir() -> Path:
    return Path(os.environ.get("SID_FAST_CACHE_DIR", Path.home() / ".cache" / "sid_fast"))


def resolve_path(path_or_url: str | os.PathLike) -> Path:
    """A local path as is (must exist: a network file, or a generator folder of sid_fast.hub); a URL, a Hub file or a
    Hub generator folder downloaded once into the cache (only when the user gives one):
    - http(s)://...: fetched with torch.hub.download_url_to_file (a unique temporary file in the cache, renamed when
      complete; a progress bar on a terminal). A fragment `#sha256=<hex>` is checked against the file.
    - hf://OWNER/REPO/PATH[@REVISION]: fetched with huggingface_hub (its own cache, locks and checks).
    - OWNER/REPO or hf://OWNER/REPO[@REVISION] (not an existing path): the generator folder of that Hub repository.
    Processes that ask for the same file at once (the ranks of a node, or jobs sharing a cache) take a file lock: one
    downloads, the others wait and read the complete file. Any failure is one CheckpointError sentence."""
    s = str(path_or_url)
    scheme = urllib.parse.urlparse(s).scheme
    if scheme in ("http", "https"):
        return _download_url(s)
    repo = hub_id(s)
    if repo is not None:  # hf://OWNER/REPO or OWNER/REPO that is not a local path: a generator folder on the Hub
        return download(*repo)
    if scheme == "hf":  # hf://OWNER/REPO/PATH: one file
        return _download_hub(s)
    p = Path(s)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or folder.")
    return p  # a folder is read by hub.read_folder, which names what it lacks


DOWNLOAD_TIMEOUT_S = 60  # per socket operation: a stalled server fails the download instead of hanging every rank


def _download_url(url: str) -> Path:
    parsed = urllib.parse.urlparse(url)
    sha256 = parsed.fragment[len("sha256=") :] if parsed.fragment.startswith("sha256=") else None
    source = urllib.parse.urlunparse(parsed._replace(fragment=""))
    name = os.path.basename(parsed.path) or "download"
    dest = cache_dir() / "downloads" / f"{hashlib.md5(source.encode()).hexdigest()}_{name}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        with FileLock(str(dest) + ".lock", timeout=3600):
            if not dest.exists():
                previous = socket.getdefaulttimeout()
                socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
                try:
                    download_url_to_file(source, str(dest), hash_prefix=sha256, progress=sys.stderr.isatty())
                finally:
                    socket.setdefaulttimeout(previous)
            elif sha256 is not None and hashlib.sha256(dest.read_bytes()).hexdigest() != sha256.lower():
                raise CheckpointError(f"{url}: the cached copy {dest} does not have the sha256 the URL names.")
    except CheckpointError:
        raise
    except Timeout:
        raise CheckpointError(f"{url}: another process has held the download lock for an hour; is it stuck?") from None
    except (OSError, RuntimeError, ValueError) as e:  # network errors, HTTP errors, a wrong hash (RuntimeError)
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(
            f"{url}: download failed ({reason}). Offline? Download the file elsewhere and pass its local path instead."
        ) from None
    return dest


def _download_hub(spec: str) -> Path:
    body = spec[len("hf://") :]
    body, _, revision = body.partition("@")
    parts = body.split("/")
    if len(parts) < 3 or not all(parts):
        raise CheckpointError(
            f"{spec}: a Hub file is hf://OWNER/REPO/PATH[@REVISION] (a generator folder hf://OWNER/REPO[@REVISION])."
        )
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise CheckpointError(f"{spec}: Hub files need huggingface_hub (pip install huggingface_hub).") from None
    try:
        local = hf_hub_download("/".join(parts[:2]), "/".join(parts[2:]), revision=revision or None)
    except Exception as e:  # huggingface_hub's errors: not found, offline, gated, network
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{spec}: the Hub download failed ({type(e).__name__}: {reason}).") from None
    return Path(local)


def load_network_file(path_or_url) -> tuple[torch.nn.Module, dict]:
    """Load a network from a generator folder (sid_fast.hub: model.safetensors + config.json, by path or Hub id), an
    EDM/SiD pickle or a sid_fast `.pt` checkpoint. Returns (network in eval mode, info).

    info: {"source": "sid_fast-folder" | "edm-pickle" | "sid_fast", "class_name", "init_kwargs", "meta"} where meta
    holds sid_fast's metadata (e.g. kind="generator" and sigma_init for distilled one-step generators) or EDM's
    other top-level keys.
    """
    path = resolve_path(path_or_url)
    if path.is_dir():  # a generator folder: model.safetensors + config.json
        record = read_folder(path)
        try:
            net, info = _sid_fast_network(record, path / WEIGHTS)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{path}: not a network folder of the expected structure: {_describe(e)}") from None
        info["source"] = "sid_fast-folder"
        net.eval().requires_grad_(False)
        return net, info
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise CheckpointError(f"{path}: the file is empty.")
    if head.startswith(b"PK"):  # torch.save's zip format
        record = load_torch_file(path)
        reader = _sid_fast_network
    elif head[:1] == b"\x80":  # a pickle (protocol >= 2)
        record = read_edm_pickle(path)
        reader = _edm_network
    else:
        raise CheckpointError(
            f"{path}: neither an EDM/SiD pickle nor a sid_fast checkpoint (unrecognised first bytes {head!r})."
        )
    try:
        net, info = reader(record, path)
    except CheckpointError:
        raise
    except Exception as e:  # a well-formed stream whose objects have the wrong structure (fuzzed or foreign files)
        raise CheckpointError(f"{path}: not a network file of the expected structure: {_describe(e)}") from None
    net.eval().requires_grad_(False)
    return net, info


def _str_keys(d: dict) -> list[str]:
    return sorted(k for k in d if isinstance(k, str))


def _sid_fast_network(record, path):
    net = network_from_record(record, path)
    meta = record.get("meta", {})
    return net, dict(
        source="sid_fast",
        class_name=record["class_name"],
        init_kwargs=record["init_kwargs"],
        meta=meta if isinstance(meta, dict) else {},
    )


def _edm_network(data, path):
    if "ema" not in data:
        raise CheckpointError(f"{path}: an EDM-style pickle without the key 'ema' (found keys {_str_keys(data)}).")
    net = _network_from_stub(data["ema"], path)
    meta = {}
    if isinstance(data.get("dataset_kwargs"), dict):
        meta["dataset_kwargs"] = dict(data["dataset_kwargs"])
    meta["keys"] = _str_keys(data)
    # Our class name and kwargs (the official SiDA classes' names and switches translated), so that the network can
    # be rebuilt from `info` alone.
    class_name, init_kwargs = official_kwargs(data["ema"].class_name, _plain(dict(data["ema"].state["_init_kwargs"])))
    if data["ema"].class_name != class_name:
        meta["file_class_name"] = data["ema"].class_name
    return net, dict(source="edm-pickle", class_name=class_name, init_kwargs=init_kwargs, meta=meta)


def load_network(path_or_url) -> torch.nn.Module:
    """Load a network (EDM/SiD pickle or sid_fast checkpoint) in eval mode with gradients off."""
    return load_network_file(path_or_url)[0]
