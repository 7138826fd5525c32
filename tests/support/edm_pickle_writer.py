"""Writes pickles in EDM's `persistent_class` format (EDM torch_utils/persistence.py), for the loader tests.

Also EDM2's snapshot format (edm2 training/training_loop.py): a dnnlib.util.EasyDict with `encoder` and `loss_fn`
(persistent objects that are not modules), `dataset_kwargs` (an EasyDict) and `ema` (the network in float16).

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


class PersistentObject:
    """A non-module persistent object (EDM2's StabilityVAEEncoder, EDM2Loss): its class name and __dict__."""

    def __init__(self, class_name, state):
        self.class_name, self.state = class_name, state


@contextlib.contextmanager
def _stand_in_module(package: str, name: str, attr: str, obj):
    """Registers `package.name` with `attr` = obj (its __module__ set to match) for the time of a pickling, so that
    pickle can name the global; sys.modules is restored afterwards."""
    full = f"{package}.{name}"
    pkg, mod = types.ModuleType(package), types.ModuleType(full)
    obj.__module__, obj.__qualname__ = full, attr
    setattr(mod, attr, obj)
    setattr(pkg, name, mod)
    saved = {k: sys.modules.get(k) for k in (package, full)}
    sys.modules.update({package: pkg, full: mod})
    try:
        yield obj
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def _fake_dnnlib():
    """dnnlib.util.EasyDict: a dict subclass, as dnnlib's."""
    return _stand_in_module("dnnlib", "util", "EasyDict", type("EasyDict", (dict,), {}))


def _fake_persistence_module():
    def _reconstruct_persistent_obj(meta):  # never called while writing
        raise AssertionError("writer only")

    return _stand_in_module("torch_utils", "persistence", "_reconstruct_persistent_obj", _reconstruct_persistent_obj)


class _EDMPickler(pickle.Pickler):
    def __init__(self, f, reconstruct, module_src, init_kwargs_for, class_name_for):
        super().__init__(f, protocol=4)
        self._reconstruct = reconstruct
        self._module_src = module_src
        self._init_kwargs_for = init_kwargs_for
        self._class_name_for = class_name_for

    def reducer_override(self, obj):
        if isinstance(obj, PersistentObject):
            state = dict(obj.state, _init_args=(), _init_kwargs={})
            meta = dict(type="class", version=6, module_src=self._module_src, class_name=obj.class_name, state=state)
            return self._reconstruct, (meta,)
        if isinstance(obj, torch.nn.Module) and not isinstance(
            obj, (torch.nn.ModuleDict, torch.nn.ModuleList, torch.nn.Sequential)
        ):
            state = dict(obj.__dict__)
            state["_init_args"] = ()
            state["_init_kwargs"] = self._init_kwargs_for(obj)
            meta = dict(
                type="class", version=6, module_src=self._module_src, class_name=self._class_name_for(obj), state=state
            )
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


def write_edm2_snapshot(path, net, init_kwargs, *, module_src="", class_names=None):
    """An EDM2 `network-snapshot-*.pkl` / post-hoc reconstruction: EasyDict(encoder, dataset_kwargs, loss_fn, ema)
    with `ema` converted to float16 (parameters and buffers) and the encoder's numpy scale/bias arrays.
    class_names: {module path ('' = the top): class name recorded in the file} (default: the Python class names)."""
    import copy

    import numpy as np

    ema = copy.deepcopy(net).eval().requires_grad_(False).to(torch.float16)
    recorded = {id(m): class_names[n] for n, m in ema.named_modules() if n in (class_names or {})}
    scale = np.float32([0.5 / s for s in (4.17, 4.62, 3.71, 3.28)])
    bias = np.float32([-m for m in (5.81, 3.25, 0.12, -2.15)]) * scale
    with _fake_dnnlib() as easy:
        data = easy(
            encoder=PersistentObject(
                "StabilityVAEEncoder", dict(vae_name="stabilityai/sd-vae-ft-mse", scale=scale, bias=bias, batch_size=8)
            ),
            dataset_kwargs=easy(
                class_name="training.dataset.ImageFolderDataset", path="img512-sd.zip", use_labels=True
            ),
            loss_fn=PersistentObject("EDM2Loss", dict(P_mean=-0.4, P_std=1.0, sigma_data=0.5)),
            ema=ema,
        )
        with _fake_persistence_module() as reconstruct, open(path, "wb") as f:
            _EDMPickler(
                f,
                reconstruct,
                module_src,
                lambda m: dict(init_kwargs) if m is ema else {},
                lambda m: recorded.get(id(m), type(m).__name__),
            ).dump(data)
