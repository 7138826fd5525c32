"""Writes pickles in EDM's `persistent_class` format (EDM torch_utils/persistence.py), for the loader tests.

EDM wraps every network module so that it pickles as
    torch_utils.persistence._reconstruct_persistent_obj({type: 'class', version: 6, module_src, class_name, state})
with state = the module's __dict__ plus `_init_args`/`_init_kwargs`. ModuleDict containers pickle normally.
We reproduce that stream with a Pickler whose reducer_override emits the same call. The global must resolve at
pickling time, so a stand-in `torch_utils.persistence` module is registered while writing.
"""

import contextlib
import pickle
import sys
import types

import torch

# If the loader ever executed the embedded source, this would create the file named by the test.
PAYLOAD_TEMPLATE = "open({path!r}, 'w').write('executed')\n"


@contextlib.contextmanager
def _fake_persistence_module():
    def _reconstruct_persistent_obj(meta):  # never called while writing
        raise AssertionError("writer only")

    pkg = types.ModuleType("torch_utils")
    mod = types.ModuleType("torch_utils.persistence")
    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    mod._reconstruct_persistent_obj = _reconstruct_persistent_obj
    pkg.persistence = mod
    saved = {k: sys.modules.get(k) for k in ("torch_utils", "torch_utils.persistence")}
    sys.modules["torch_utils"] = pkg
    sys.modules["torch_utils.persistence"] = mod
    try:
        yield _reconstruct_persistent_obj
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


class _EDMPickler(pickle.Pickler):
    def __init__(self, f, reconstruct, module_src, init_kwargs_for, class_name_for):
        super().__init__(f, protocol=4)
        self._reconstruct = reconstruct
        self._module_src = module_src
        self._init_kwargs_for = init_kwargs_for
        self._class_name_for = class_name_for

    def reducer_override(self, obj):
        if isinstance(obj, torch.nn.Module) and not isinstance(obj, (torch.nn.ModuleDict, torch.nn.ModuleList, torch.nn.Sequential)):
            state = dict(obj.__dict__)
            state["_init_args"] = ()
            state["_init_kwargs"] = self._init_kwargs_for(obj)
            meta = dict(type="class", version=6, module_src=self._module_src, class_name=self._class_name_for(obj), state=state)
            return self._reconstruct, (meta,)
        return NotImplemented


def write_edm_pickle(path, net, init_kwargs, *, module_src="", extra=None, class_name_overrides=None):
    """Pickle dict(ema=net, **extra) as EDM does. init_kwargs is recorded for the top-level module only."""
    overrides = class_name_overrides or {}

    def kwargs_for(m):
        return dict(init_kwargs) if m is net else {}

    def class_name_for(m):
        return overrides.get(id(m), type(m).__name__)

    data = dict(ema=net)
    data.update(extra or {})
    with _fake_persistence_module() as reconstruct, open(path, "wb") as f:
        _EDMPickler(f, reconstruct, module_src, kwargs_for, class_name_for).dump(data)
