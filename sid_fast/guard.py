"""The capture guard: what a CUDA graph or an asynchronous host cannot survive inside a training step, found by
watching every torch call and every dispatched op of the step (a TorchFunctionMode and a TorchDispatchMode).

Kinds of finding:
- "host read": the host waits for a device value: `.item()`, `.tolist()`, `.numpy()`, `.cpu()`, `int(t)`,
  `float(t)`, `bool(t)` (a Python branch on a tensor), and the ops whose output size depends on values (`nonzero`,
  `masked_select`, boolean-mask indexing, `unique`, `repeat_interleave` without its output size);
- "host copy": a tensor made from host data (`torch.tensor(...)`, `torch.as_tensor(number or list or array)`): on
  CUDA a copy from pageable memory, which synchronises the stream and cannot be captured; and a copy of a host tensor
  to the device without `non_blocking=True` from pinned memory (`torch.from_numpy` itself copies nothing: the copy
  to the device is the finding);
- "cpu generator": a random draw from a CPU generator into a device tensor (a host draw and a copy).

On a CPU-only machine the step's tensors are host tensors, so the guard tells them apart by how they are made: a
tensor made from host data without a device (the tokenizer's ids, a DataLoader batch), or computed from such tensors
only, is a host tensor: reading it is free, and its copy to the device (`.to(device)` with an explicit device) must be
non_blocking (from pinned memory: on a machine without CUDA memory cannot be pinned, and non_blocking alone passes).
A tensor made from host data with a device (`torch.as_tensor(0.5, device=dev)`) is a host copy on CUDA.

A finding inside `allowed(reason)` is recorded with its reason instead (listed and justified, not a failure). Each
finding names the innermost sid_fast source line that led to it. Run it after a warm-up step: constants are made once
per device at their first use, as the official code caches them.
"""

from __future__ import annotations

import contextlib
import threading
import traceback
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

_ROOT = str(Path(__file__).resolve().parent)
_HERE = str(Path(__file__).resolve())

_HOST_READ_METHODS = {
    torch.Tensor.item: "item()",
    torch.Tensor.tolist: "tolist()",
    torch.Tensor.numpy: "numpy()",
    torch.Tensor.cpu: "cpu()",
    torch.Tensor.__bool__: "bool(tensor): a Python branch on a device value",
    torch.Tensor.__int__: "int(tensor)",
    torch.Tensor.__float__: "float(tensor)",
    torch.Tensor.__index__: "tensor used as an index",
}
_FROM_HOST = {torch.tensor: "torch.tensor", torch.as_tensor: "torch.as_tensor", torch.asarray: "torch.asarray"}
_COPIES = {torch.Tensor.to: "to", torch.Tensor.cuda: "cuda", torch.Tensor.copy_: "copy_"}
_DATA_DEPENDENT = {
    "aten.nonzero.default",
    "aten.masked_select.default",
    "aten._unique2.default",
    "aten.unique_consecutive.default",
    "aten.unique_dim.default",
    "aten.repeat_interleave.Tensor",
}


@dataclass(frozen=True)
class Finding:
    kind: str  # "host read", "host copy", "cpu generator"
    what: str
    where: str  # the innermost sid_fast source line: "sid_fast/augment.py:53"
    allowed: str | None = None  # the reason, when inside `allowed`

    def __str__(self):
        tail = f" (allowed: {self.allowed})" if self.allowed else ""
        return f"{self.kind}: {self.what} at {self.where}{tail}"


def _where() -> str:
    for frame in reversed(traceback.extract_stack()):
        f = frame.filename
        if f.startswith(_ROOT) and f != _HERE:
            return f"{Path(f).resolve().relative_to(Path(_ROOT).parent)}:{frame.lineno}"
    return "outside sid_fast"


def _device_of(args, kwargs):
    """The device a call names (its `device` keyword, or a device among its positional arguments), or None."""
    if kwargs.get("device") is not None:
        return torch.device(kwargs["device"])
    for a in args:
        if isinstance(a, (torch.device, str)) and not isinstance(a, bool):
            try:
                return torch.device(a)
            except (RuntimeError, TypeError):
                continue
    return None


class CaptureGuard:
    """Records the findings of everything run inside it (`with CaptureGuard() as g: trainer.step()`)."""

    _local = threading.local()

    def __init__(self):
        self.findings: list[Finding] = []
        self._allowed: list[str] = []
        self._host: dict[int, torch.Tensor] = {}
        self._in_read = 0
        guard = self

        class _Functions(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                guard._look(func, args, kwargs)
                reading = func in _HOST_READ_METHODS
                guard._in_read += reading
                try:
                    out = func(*args, **kwargs)
                finally:
                    guard._in_read -= reading
                guard._track(func, args, kwargs, out)
                return out

        class _Ops(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                name = str(func)
                if name in _DATA_DEPENDENT:
                    guard._add("host read", f"{name}: its output size depends on values")
                elif name in ("aten.index.Tensor", "aten.index_put.default", "aten.index_put_.default"):
                    indices = args[1] if len(args) > 1 else []
                    if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices if i is not None):
                        guard._add("host read", f"{name} with a boolean mask: its output size depends on values")
                elif name == "aten._local_scalar_dense.default" and not guard._in_read:
                    guard._add("host read", "a scalar read on the host")
                return func(*args, **kwargs)

        self._modes = (_Functions(), _Ops())

    # Recording.
    def _add(self, kind: str, what: str) -> None:
        self.findings.append(Finding(kind, what, _where(), self._allowed[-1] if self._allowed else None))

    def _is_host(self, t) -> bool:
        return isinstance(t, torch.Tensor) and id(t) in self._host

    def _track(self, func, args, kwargs, out) -> None:
        """Host tensors: made from host data without a device, or computed from host tensors only (the tokenizer's
        ids, a DataLoader batch): work of the host, free to read, and copied to the device with non_blocking."""
        if not isinstance(out, torch.Tensor) or out.device.type != "cpu":
            return
        if func in _COPIES:  # a copy to an explicit device makes a device tensor (on a CPU run: the same object)
            if _device_of(args[1:], kwargs) is not None or func is torch.Tensor.cuda:
                self._host.pop(id(out), None)
            return
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        tensors += [t for a in args if isinstance(a, (list, tuple)) for t in a if isinstance(t, torch.Tensor)]
        # Made without a device and from no tensor (host data, a host generator's draw), or from host tensors only.
        made_on_host = not tensors and _device_of(args[1:] if func in _FROM_HOST else args, kwargs) is None
        if made_on_host or (tensors and all(self._is_host(t) for t in tensors)):
            self._host[id(out)] = out  # kept alive while the guard is: ids are not reused meanwhile

    def _look(self, func, args, kwargs) -> None:
        if func in _HOST_READ_METHODS:
            if not (args and self._is_host(args[0])):
                self._add("host read", _HOST_READ_METHODS[func])
        elif func in _FROM_HOST:
            data = args[0] if args else kwargs.get("data", kwargs.get("obj"))
            target = _device_of(args[1:], kwargs)
            if not isinstance(data, torch.Tensor) and target is not None:
                self._add("host copy", f"{_FROM_HOST[func]} of host data ({type(data).__name__}) on {target.type}")
            elif isinstance(data, torch.Tensor) and target not in (None, data.device):
                self._add("host copy", f"torch.as_tensor of a {data.device.type} tensor to {target.type}")
        elif func in _COPIES and args and isinstance(args[0], torch.Tensor):
            src, dst = args[0], _device_of(args[1:], kwargs)
            if func is torch.Tensor.cuda:
                dst = torch.device("cuda")
            if func is torch.Tensor.copy_ and len(args) > 1 and isinstance(args[1], torch.Tensor):
                src, dst = args[1], args[0].device
            to_device = dst is not None and (dst.type != "cpu" or self._is_host(src))
            pinned = src.is_pinned() or not torch.cuda.is_available()  # a CPU-only machine cannot pin memory
            if src.device.type == "cpu" and to_device and not (kwargs.get("non_blocking") and pinned):
                self._add("host copy", f"{_COPIES[func]}({dst.type}) of a host tensor without pinned memory and "
                                       "non_blocking")  # fmt: skip
        else:
            gen = kwargs.get("generator")
            if isinstance(gen, torch.Generator) and gen.device.type == "cpu":
                dev = _device_of((), kwargs)
                if dev is not None and dev.type != "cpu":
                    self._add("cpu generator", f"{getattr(func, '__name__', func)} from a CPU generator into {dev}")

    @contextlib.contextmanager
    def allowed(self, reason: str):
        """Findings inside are recorded with `reason` (listed and justified), not as failures."""
        self._allowed.append(reason)
        try:
            yield
        finally:
            self._allowed.pop()

    # Use.
    def __enter__(self):
        CaptureGuard._local.active = self
        # torch.from_numpy is not seen by a TorchFunctionMode (torch.overrides ignores it): wrapped while the guard is
        # active, its tensors (token ids of a memory-mapped token file) are host tensors like the tokenizer's.
        self._from_numpy = torch.from_numpy

        def from_numpy(*args, **kwargs):
            out = self._from_numpy(*args, **kwargs)
            self._host[id(out)] = out
            return out

        torch.from_numpy = from_numpy
        for m in self._modes:
            m.__enter__()
        return self

    def __exit__(self, *exc):
        for m in reversed(self._modes):
            m.__exit__(*exc)
        torch.from_numpy = self._from_numpy
        CaptureGuard._local.active = None
        return False

    def failures(self) -> list[Finding]:
        return [f for f in self.findings if f.allowed is None]

    def summary(self) -> dict[str, int]:
        return dict(Counter(str(f) for f in self.findings))


def active() -> CaptureGuard | None:
    """The guard watching this thread, if any (product code marks its justified findings with `allowed`)."""
    return getattr(CaptureGuard._local, "active", None)


@contextlib.contextmanager
def allowed(reason: str):
    """Mark what runs inside as a listed, justified finding of the active guard (nothing when none is active)."""
    guard = active()
    if guard is None:
        yield
        return
    with guard.allowed(reason):
        yield


__all__ = ["CaptureGuard", "Finding", "active", "allowed"]
