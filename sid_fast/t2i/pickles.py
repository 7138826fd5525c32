"""The released SiD-LSG generators, read without executing anything from the file.

The official training loop (SiD-LSG training/sid_training_loop.py, `save_data`) writes each snapshot as a plain
`pickle.dump(dict(ema=G_ema), f)` of a diffusers `UNet2DConditionModel`; the released checkpoints (Hugging Face
`UT-Austin-PML/SiD-LSG`, e.g. `batch512_cfg1.51.51.5_t625_18789_v2.pkl`) are such files and the official sampler reads
them with `pickle.load(f)['ema']` (generate_onestep.py), which runs whatever the file names. sid_fast never does:

- `DiffusersPickleReader` is a restricted unpickler (the pure-Python one, on a bounded reader, as the EDM reader in
  sid_fast.checkpoints). A global of a `diffusers.` or `torch.nn.modules.` module becomes an inert stub class that
  records the name and is never imported; the tensor and storage rebuilders, OrderedDict and torch dtypes are
  allowed; every other global is refused by name.
- From the stub tree we take the UNet's configuration (its `_internal_dict`, diffusers' FrozenDict: plain values
  only, bounded) and the tensors (the `_parameters` and persistent `_buffers` of every `_modules` entry, exactly
  the keys of `state_dict()`), build `UNet2DConditionModel.from_config` on the meta device, compare every key and
  shape with the file's, and only then load the tensors (float32) with `strict=True`.

What the file does not record: the init timestep the generator was trained at. The released files carry it in
their names (`_t625_`); otherwise the official default, 625, is taken (`meta["init_timestep_from"]` says which).
"""

from __future__ import annotations

import collections
import pickle
import re
from pathlib import Path

import torch

from sid_fast.checkpoints import _ALLOWED_GLOBALS, _Refused, load_restricted
from sid_fast.storage import CheckpointError
from sid_fast.storage import describe_error as _describe

SD_CLASS = "UNet2DConditionModel"
OFFICIAL_INIT_TIMESTEP = 625  # official sid_train.py --init_timestep default, and every released file's `_t625_`

# The tensors of a module: torch's rebuild functions as the EDM reader allows them.
_TENSOR_GLOBALS = {
    key: _ALLOWED_GLOBALS[key]
    for key in (
        ("torch._utils", "_rebuild_tensor_v2"),
        ("torch._utils", "_rebuild_parameter"),
        ("torch._utils", "_rebuild_parameter_with_state"),
        ("torch.storage", "_load_from_bytes"),
        ("collections", "OrderedDict"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
    )
}
_DTYPES = {
    name: getattr(torch, name)
    for name in ("float16", "bfloat16", "float32", "float64", "int64", "int32", "uint8", "bool")
}
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_STUB_MODULES = ("diffusers.", "torch.nn.modules.")


class ObjectStub:
    """What an object of a diffusers or torch.nn class becomes: the class's name and the pickled state, inert."""

    module_name = "?"
    class_name = "?"
    state = None

    def __setstate__(self, state) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"ObjectStub({self.module_name}.{self.class_name})"


class FrozenDictStub(collections.OrderedDict):
    """diffusers.configuration_utils.FrozenDict (a model's configuration) read as a plain ordered dict."""

    def __setstate__(self, state) -> None:  # FrozenDict's own attributes (its frozen flag): not needed
        pass


def _device_stub(*args):
    return str(args[0]) if args and isinstance(args[0], str) else "cpu"


class DiffusersPickleReader(pickle._Unpickler):
    """An unpickler that resolves only what a pickled diffusers model needs, as inert stubs (module docstring)."""

    def __init__(self, f):
        super().__init__(f)
        self._stubs: dict[tuple[str, str], type] = {}

    def find_class(self, module: str, name: str):
        if (module, name) in _TENSOR_GLOBALS:
            return _TENSOR_GLOBALS[(module, name)]
        if module == "torch" and name in _DTYPES:
            return _DTYPES[name]
        if (module, name) == ("torch", "device"):
            return _device_stub
        if (module, name) == ("diffusers.configuration_utils", "FrozenDict"):
            return FrozenDictStub
        if module.startswith(_STUB_MODULES) and _NAME.match(name) and all(map(_NAME.match, module.split("."))):
            key = (module, name)
            if key not in self._stubs:  # never imported: a class of the same name, holding the state BUILD gives it
                self._stubs[key] = type(name + "Stub", (ObjectStub,), {"module_name": module, "class_name": name})
            return self._stubs[key]
        raise _Refused(f"global '{module}.{name}' is not allowed")

    def persistent_load(self, pid):
        raise _Refused("persistent ids are not used by the official generator pickles")


def read_pickle(path) -> dict:
    """The top-level dict of an official SiD-LSG pickle, with stubs for its objects; nothing from the file runs."""
    path = Path(path)
    data = load_restricted(path, DiffusersPickleReader, "generator pickle")
    if not isinstance(data, dict) or "ema" not in data:
        found = sorted(k for k in data if isinstance(k, str)) if isinstance(data, dict) else type(data).__name__
        raise CheckpointError(f"{path}: expected a dict with the key 'ema' (the official snapshots'), found {found}.")
    return data


def is_diffusers_pickle(path) -> bool:
    """Whether `path` is a pickle whose first global is a diffusers class (the official snapshots start with the
    UNet's class): read from the first kilobytes, nothing unpickled."""
    p = Path(path)
    if not p.is_file():
        return False
    with open(p, "rb") as f:
        head = f.read(4096)
    return head[:1] == b"\x80" and b"diffusers." in head


# Bounds on the configuration's values, far above any Stable Diffusion UNet (SDXL: block_out_channels up to 1280,
# cross_attention_dim 2048, 10 transformer layers), so that a file cannot make the loader build something huge
# before its tensors are compared.
_MAX_INT = 1 << 14
_MAX_LIST = 16


def _plain_config(config, path) -> dict:
    def bad(key, what):
        return CheckpointError(f"{path}: the UNet's configuration entry {key} {what}.")

    def plain(key, v, depth=0):
        if v is None or isinstance(v, (bool, str)):
            if isinstance(v, str) and len(v) > 256:
                raise bad(key, f"is a string of {len(v)} characters")
            return v
        if isinstance(v, int):
            if abs(v) > _MAX_INT:
                raise bad(f"{key}={v}", "is outside any plausible UNet")
            return v
        if isinstance(v, float):
            return v
        if isinstance(v, (list, tuple)) and depth < 2:
            if len(v) > _MAX_LIST:
                raise bad(key, f"has {len(v)} items")
            return [plain(key, x, depth + 1) for x in v]
        raise bad(key, f"is a {type(v).__name__}, not a plain value")

    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: the UNet carries no configuration (diffusers' _internal_dict).")
    return {k: plain(k, v) for k, v in config.items() if isinstance(k, str) and not k.startswith("_")}


def _tensors(stub, path, prefix: str = "", out=None, depth: int = 0) -> dict:
    """The state_dict() of a stub tree: parameters and persistent buffers of every module, by their dotted names."""
    out = collections.OrderedDict() if out is None else out
    state = stub.state
    where = prefix.rstrip(".") or "<root>"
    if depth > 32 or not isinstance(state, dict) or not isinstance(state.get("_modules"), dict):
        raise CheckpointError(f"{path}: object {where} ({stub.class_name}) is not a torch module.")
    skip = state.get("_non_persistent_buffers_set") or set()
    for kind in ("_parameters", "_buffers"):
        for name, t in (state.get(kind) or {}).items():
            if t is None or (kind == "_buffers" and name in skip):
                continue
            if not isinstance(name, str) or not isinstance(t, torch.Tensor):
                raise CheckpointError(f"{path}: {prefix}{name} of {where} is not a tensor.")
            out[prefix + name] = t.detach()
    for name, child in state["_modules"].items():
        if child is None:
            continue
        if not isinstance(child, ObjectStub) or not isinstance(name, str):
            raise CheckpointError(f"{path}: submodule {prefix}{name} is a {type(child).__name__}, not a module.")
        _tensors(child, path, prefix + name + ".", out, depth + 1)
    return out


def init_timestep_of(path) -> tuple[int, str]:
    """(init timestep, where it came from): the released files' `_t<N>_` name part, else the official default."""
    m = re.search(r"(?:^|_)t(\d{1,4})(?:_|$)", Path(path).stem)
    if m and 0 < int(m.group(1)) < 1000:
        return int(m.group(1)), "file name"
    return OFFICIAL_INIT_TIMESTEP, "official default"


def read_parts(path) -> tuple[dict, dict]:
    """(configuration, tensors) of an official SiD-LSG pickle's UNet, both checked as plain data; nothing built."""
    path = Path(path)
    data = read_pickle(path)
    ema = data["ema"]
    if not isinstance(ema, ObjectStub) or ema.class_name != SD_CLASS or not ema.module_name.startswith("diffusers."):
        what = f"{ema.module_name}.{ema.class_name}" if isinstance(ema, ObjectStub) else type(ema).__name__
        raise CheckpointError(f"{path}: its 'ema' is a {what}, not a diffusers {SD_CLASS}.")
    if not isinstance(ema.state, dict):
        raise CheckpointError(f"{path}: its 'ema' holds no module state.")
    return _plain_config(ema.state.get("_internal_dict"), path), _tensors(ema, path)


def load_official_generator(path, device="cpu"):
    """(UNet2DConditionModel in eval mode, meta) of an official SiD-LSG pickle, read as the module docstring says;
    meta as sid_fast's generator folders carry it (init_timestep, and where the network came from)."""
    from diffusers import UNet2DConditionModel  # an optional dependency: text-to-image only

    path = Path(path)
    config, tensors = read_parts(path)
    try:
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(config)
    except Exception as e:
        raise CheckpointError(f"{path}: its configuration does not build a {SD_CLASS}: {_describe(e)}") from None
    want = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if want != got:
        diff = sorted(set(want) ^ set(got)) or sorted(k for k in want if want[k] != got[k])
        raise CheckpointError(
            f"{path}: its tensors do not match its configuration ({len(diff)} differ in name or shape, e.g. {diff[0]})."
        )
    state = {k: v.to(torch.float32).contiguous() if v.is_floating_point() else v for k, v in tensors.items()}
    unet.load_state_dict(state, strict=True, assign=True)
    leftover = [n for n, t in [*unet.named_parameters(), *unet.named_buffers()] if t.is_meta]
    if leftover:  # a tensor the module keeps outside its state dict: build it for real instead
        unet = UNet2DConditionModel.from_config(config)
        unet.load_state_dict(state, strict=True)
    t, source = init_timestep_of(path)
    meta = dict(init_timestep=t, init_timestep_from=source, source="official-pickle", converted_from=path.name)
    return unet.to(device).eval().requires_grad_(False), meta
