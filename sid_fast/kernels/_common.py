"""Helpers shared by the kernel files: where Triton can run, and block sizes."""

from __future__ import annotations

import os

import torch
import triton


def interpreted() -> bool:
    """True when kernels run on the CPU through the Triton interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_available(t: torch.Tensor) -> bool:
    """Kernels run on CUDA tensors, or on any tensor under the interpreter; elsewhere the reference runs. On the meta
    device the kernel ops run their shape functions (memory accounting, bench.memory)."""
    return t.is_cuda or t.is_meta or interpreted()


def block_size(n: int, gpu_cap: int) -> int:
    """Power-of-two block covering n, at most gpu_cap on GPU; 64 under the interpreter (fast CPU tests that still
    exercise the loops over several blocks)."""
    return min(64 if interpreted() else gpu_cap, triton.next_power_of_2(max(n, 16)))


def warp_configs(gpu: bool = False, warps=(2, 4, 8, 16)):
    """Autotuning candidates for the memory-bound kernels: block sizes are fixed by the shape, the warp count is
    tuned on the GPU. No stage axis: ahead-of-time compiles for sm_90 found num_stages 1 and 2 giving the same PTX
    for every (kernel, shape, dtype, warps) pair of these kernels (176 of 176 with the current GroupNorm), so timing
    both only doubled the autotuning. The interpreter
    cannot autotune over several configurations, so it gets one (gpu=True: the GPU list regardless)."""
    if interpreted() and not gpu:
        return [triton.Config({}, num_warps=4)]
    return [triton.Config({}, num_warps=w, num_stages=1) for w in warps]


def nchw_strides(t: torch.Tensor):
    """(t in NCHW-contiguous or channels_last form, (stride_n, stride_c, stride_hw)) with hw = y * W + x; other strides
    are copied to NCHW first."""
    if not (t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)):
        t = t.contiguous()
    n, c, h, w = t.shape
    if t.is_contiguous():
        return t, (c * h * w, h * w, 1)
    return t, (h * w * c, 1, c)
