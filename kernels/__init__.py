"""Fused Triton kernels for sid_fast, one op per file, each with its pure-torch reference beside it.

kernels/ knows nothing of sid_fast/; sid_fast imports kernels, never the reverse.
"""

from kernels.edm_loss import edm_loss_rows, edm_loss_rows_ref
from kernels.group_norm_silu import group_norm_silu, group_norm_silu_ref
from kernels.sid_loss import sid_loss_rows, sid_loss_rows_ref

__all__ = [
    "edm_loss_rows",
    "edm_loss_rows_ref",
    "group_norm_silu",
    "group_norm_silu_ref",
    "sid_loss_rows",
    "sid_loss_rows_ref",
]
