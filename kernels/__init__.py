"""Fused Triton kernels for sid_fast, one op per file, each with its pure-torch reference (kernels/references.py,
re-exported by the op's file).

kernels/ knows nothing of sid_fast/; sid_fast imports kernels, never the reverse. Importing this package imports no
Triton: the kernel files (and Triton) load when one of their names is first used, so the references run on machines
without Triton (macOS, Windows).
"""

import importlib

_WHERE = {
    "edm_loss_rows": "kernels.edm_loss",
    "edm_loss_rows_ref": "kernels.references",
    "group_norm_silu": "kernels.group_norm_silu",
    "group_norm_silu_ref": "kernels.references",
    "sid_loss_rows": "kernels.sid_loss",
    "sid_loss_rows_ref": "kernels.references",
}

__all__ = sorted(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'kernels' has no attribute {name!r}")


def triton_installed() -> bool:
    """True when the triton package imports (Linux wheels; the kernels need it, the references do not)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
