"""The one switch between sid_fast's fused Triton kernels and their pure-torch references.

Off by default (the reference path reproduces the official numerics). Turn on with `set_use_kernels(True)` or
SID_FAST_KERNELS=1. The kernels run on CUDA tensors, or on CPU under the Triton interpreter (TRITON_INTERPRET=1);
elsewhere each kernel falls back to its reference by itself.
"""

from __future__ import annotations

import os

import torch

from sid_fast.losses import edm_loss_from_output, edm_weight, sid_generator_loss_elements

_use_kernels = os.environ.get("SID_FAST_KERNELS", "0") == "1"


def set_use_kernels(enabled: bool) -> None:
    global _use_kernels
    _use_kernels = bool(enabled)


def use_kernels() -> bool:
    return _use_kernels


def sid_generator_loss_sum(x_g: torch.Tensor, y_real: torch.Tensor, y_fake: torch.Tensor, alpha: float):
    """(sum over samples and pixels of the SiD loss, [N] bool of rows without NaN); NaN rows contribute 0."""
    if _use_kernels:
        from kernels.sid_loss import sid_loss_rows

        row, _, ok = sid_loss_rows(x_g, y_real, y_fake, alpha)
        return row.sum(), ok
    loss, ok = sid_generator_loss_elements(x_g, y_real, y_fake, alpha)
    return loss.sum(), ok


def fake_score_loss_sum(D: torch.Tensor, y: torch.Tensor, sigma: torch.Tensor):
    """(sum of lambda(sigma) (D - y)^2 over samples and pixels, [N] bool of rows without NaN) for SiD's fake score."""
    if _use_kernels:
        from kernels.edm_loss import edm_loss_rows

        row, ok = edm_loss_rows(D, y, edm_weight(sigma).reshape(-1).float())
        return row.sum(), ok
    loss, ok = edm_loss_from_output(D, y, sigma)
    return loss.sum(), ok
