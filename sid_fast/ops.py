"""The one switch between sid_fast's fused Triton kernels and their pure-torch references.

Off by default (the reference path reproduces the official numerics). Turn all on with `set_use_kernels(True)` or
SID_FAST_KERNELS=1, or a subset with `set_use_kernels({"sid_loss", "edm_loss", "group_norm_silu", "attention"})`.
The kernels run on CUDA tensors, or on CPU under the Triton interpreter (TRITON_INTERPRET=1);
elsewhere each kernel falls back to its reference by itself.
"""

from __future__ import annotations

import os

import torch

from sid_fast.losses import edm_loss_from_output, edm_weight, sid_generator_loss_elements

KERNELS = frozenset({"sid_loss", "edm_loss", "group_norm_silu", "attention"})
_enabled: frozenset = KERNELS if os.environ.get("SID_FAST_KERNELS", "0") == "1" else frozenset()


def set_use_kernels(enabled) -> None:
    """True (all kernels), False (none), or a set of kernel names from KERNELS."""
    global _enabled
    names = KERNELS if enabled is True else frozenset() if enabled is False else frozenset(enabled)
    if not names <= KERNELS:
        raise ValueError(f"Unknown kernels {sorted(names - KERNELS)}; known: {sorted(KERNELS)}.")
    _enabled = names


def use_kernel(name: str) -> bool:
    return name in _enabled


def sid_generator_loss_sum(x_g: torch.Tensor, y_real: torch.Tensor, y_fake: torch.Tensor, alpha: float):
    """(sum over samples and pixels of the SiD loss, [N] bool of rows without NaN); NaN rows contribute 0."""
    if use_kernel("sid_loss"):
        from kernels.sid_loss import sid_loss_rows

        row, _, ok = sid_loss_rows(x_g, y_real, y_fake, alpha)
        return row.sum(), ok
    loss, ok = sid_generator_loss_elements(x_g, y_real, y_fake, alpha)
    return loss.sum(), ok


def fake_score_loss_sum(D: torch.Tensor, y: torch.Tensor, sigma: torch.Tensor):
    """(sum of lambda(sigma) (D - y)^2 over samples and pixels, [N] bool of rows without NaN) for SiD's fake score."""
    if use_kernel("edm_loss"):
        from kernels.edm_loss import edm_loss_rows

        row, ok = edm_loss_rows(D, y, edm_weight(sigma).reshape(-1).float())
        return row.sum(), ok
    loss, ok = edm_loss_from_output(D, y, sigma)
    return loss.sum(), ok
