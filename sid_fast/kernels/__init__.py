"""Fused Triton kernels for sid_fast, one op per file, each with its pure-torch reference (references.py, re-exported by
the op's file).

sid_fast.kernels is the lowest layer: it imports nothing else of sid_fast (its files import each other relatively), and
the rest of sid_fast reaches the kernels through sid_fast.ops only. Importing this package imports no
Triton: the kernel files (and Triton) load when one of their names is first used, so the references run on machines
without Triton (macOS, Windows).
"""

import importlib

_WHERE = {
    "ada_layer_norm": __name__ + ".ada_layer_norm",
    "ada_layer_norm_ref": __name__ + ".references",
    "edm_loss_rows": __name__ + ".edm_loss",
    "edm_loss_rows_ref": __name__ + ".references",
    "group_norm_silu": __name__ + ".group_norm_silu",
    "group_norm_silu_ref": __name__ + ".references",
    "sid_loss_rows": __name__ + ".sid_loss",
    "sid_loss_rows_ref": __name__ + ".references",
}

__all__ = sorted(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def triton_installed() -> bool:
    """True when the triton package imports (Linux wheels; the kernels need it, the references do not)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
