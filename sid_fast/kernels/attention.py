# Flash attention in EDM's own layout, forward and backward.
#
# EDM's UNet blocks feed attention straight from a 1x1 qkv convolution: qkv is [N, heads*3*d, H, W] with
# channel = head*3d + c*3 + j, j in (q, k, v) (EDM training/networks.py, UNetBlock), and the proj convolution consumes
# [N, heads*d, H, W] with channel = head*d + c. EDM's AttentionOp reshapes to [N*heads, d, 3, L], computes the whole
# L x L softmax in fp32 and keeps it for backward. Here, per (sample, head) and block of BLOCK_M queries:
#     s = q^T k / sqrt(d)  (fp32 accumulation),  online softmax over key blocks (running max m, sum l, in fp32),
#     o = sum_k p v / l,   lse = m + log(l)  (fp32, [N*heads, L], the only thing kept besides o)
# reading q, k and v through the interleaved channel strides (NCHW or channels_last; no transposes, no copies) and
# writing o in the layout of the input's memory format. Backward (FlashAttention-2's recomputation):
#     delta_i = sum_c do_ic o_ic,  p = exp(s - lse),  dv = p^T do,  dp = do v^T,  ds = p (dp - delta),
#     dk = ds^T q / sqrt(d),  dq = ds k / sqrt(d)
# in two kernels (one per key block for dk, dv; one per query block for dq), so no L x L matrix is ever stored and no
# atomics are needed; dq, dk, dv are written into the interleaved channels of one dqkv tensor shaped like qkv.
# Precision: scores, softmax statistics and accumulators are fp32; with fp16/bf16 inputs the probabilities are cast
# to the input dtype before the p @ v product (EDM likewise applies its weights, stored in the input dtype, to v),
# and ds before its products. fp32 inputs use IEEE fp32 dot products unless torch allows TF32 for matmuls
# (torch.backends.cuda.matmul.allow_tf32), which sid_fast's reference path keeps off as SiD does; at head dims above
# 64 that case runs EDM's op instead (routed_to_reference: on FMA units every tile spills).
# Launch: one grid axis of (sample x head) x blocks, 64-bit batch offsets, so sampling batches of any size launch.
# Tiles: per head-dim class lists (_TILES) checked ahead of time for sm_90 and sm_80 by `python -m bench.static`,
# pruned per launch by a shared-memory estimate that counts element size and pipeline stages.
# The scale is 1/sqrt(d) as EDM (EDM divides k by sqrt(d) before its fp32 product; for d = 64 and 256 that division
# is exact in every dtype, so scaling the fp32 scores is the same number).
#
# Registered as torch.library.triton_op "sid_fast_kernels::edm_flash_attention" with autograd, so torch.compile
# traces it. The references (references.py, importable without Triton; re-exported here): `attention_edm`
# (EDM's AttentionOp numerics, the reference path, and the fallback wherever Triton cannot run) and `attention_sdpa`
# (PyTorch's scaled_dot_product_attention on transposed views).

from __future__ import annotations

import math
import warnings

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ._common import interpreted, nchw_strides, triton_available
from .references import (  # noqa: F401  (the references, re-exported beside the kernel)
    attention_edm,
    attention_sdpa,
    blocked_order,
    blocked_to_interleaved,
    split_qkv,
)

LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------------------------------------------
# Tuning space. The lists and the prune below are what `python -m bench.static` compiles for sm_90 and sm_80 and what
# its CI subset (tests/test_static.py) checks: every configuration kept for an official shape compiles, fits the
# architecture's shared memory and spills no register.


def wide_space(d: int, prec: str = "tf32"):
    """A broad grid of attention tiles (for choosing the lists with `bench.static --space wide`); tiles of 128 only
    for d <= 128 with tensor cores (at d = 256, or on FMA units, they spill or overflow shared memory)."""
    sizes = (16, 32, 64, 128) if d <= 128 and prec != "ieee" else (16, 32, 64)
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
        for m in sizes
        for n in sizes
        for w in (4, 8)
        for s in (1, 2, 3)
    ]


# (BLOCK_M, BLOCK_N, num_warps, num_stages). Chosen from `bench.static --space wide` on sm_90 (triton 3.7.1, bf16
# and fp32 IEEE) to compile without spills at the official shapes; the exclusions below drop what the full surveys
# (sm_90 and sm_80, triton 3.7.1 and 3.6.0) found spilling, and the prune what would not fit the device's shared
# memory (A100: 163 KB, H100: 227 KB per block).
_TILES = {
    # Head dim <= 128 on tensor cores (ADM's 64): large tiles, 3-stage cp.async pipelines, wgmma at BLOCK_M >= 64.
    ("fwd", "small"): [
        (128, 64, 8, 3),
        (128, 32, 8, 3),
        (64, 64, 4, 3),
        (64, 32, 4, 2),
        (64, 64, 8, 2),
        (32, 32, 4, 2),
    ],
    ("bwd", "small"): [(64, 64, 8, 2), (64, 32, 4, 2), (32, 64, 4, 2), (32, 32, 4, 2), (64, 64, 4, 3), (128, 32, 8, 2)],
    # TF32 (4-byte operands) at head dim <= 128: the same without M64N64 w4 s3, whose dk/dv kernel spills 128 bytes.
    ("bwd", "small-tf32"): [(64, 64, 8, 2), (64, 32, 4, 2), (32, 64, 4, 2), (32, 32, 4, 2), (128, 32, 8, 2)],
    # Head dim 256 (DDPM++'s single head): the fp32 accumulators of [BLOCK, 256] need 8 warps or small tiles.
    # The dk/dv kernel spills in the other configurations that fit (M64N64 w8 s2, M64N32 w4 s2, ...).
    ("fwd", "large"): [(64, 64, 8, 2), (64, 32, 8, 2), (32, 64, 8, 2), (32, 32, 4, 2)],
    ("bwd", "large"): [(64, 32, 8, 2), (32, 32, 8, 2), (64, 16, 8, 2), (16, 32, 8, 2), (32, 16, 8, 2)],
    # fp32 without TF32 at head dim <= 64 (FMA units): only tiles whose register tiles do not spill.
    ("fwd", "ieee"): [(32, 64, 8, 2), (64, 32, 8, 2), (32, 32, 4, 2), (16, 64, 8, 2)],
    ("bwd", "ieee"): [(32, 64, 8, 2), (32, 32, 4, 2), (32, 32, 8, 2), (16, 64, 8, 2)],
}


# Entries found spilling by bench.static (both triton 3.7.1 and 3.6.0, the version on the GPU machines this project
# is lent), by (kind, class, element size): on sm_90 (dropped on every device), and in addition on sm_80, whose
# mma.sync keeps more in registers than wgmma (dropped below compute capability 9.0).
_SPILL_ON_SM90 = {
    ("fwd", "large", 4): {(32, 64, 8, 2)},
    ("bwd", "large", 2): {(64, 16, 8, 2), (64, 32, 8, 2)},
    ("bwd", "large", 4): {(64, 32, 8, 2)},
    ("bwd", "ieee", 4): {(32, 32, 4, 2), (32, 64, 8, 2)},
}
_SPILL_BEFORE_SM90 = {
    ("fwd", "small", 4): {(64, 32, 4, 2), (64, 64, 8, 2), (128, 64, 8, 3)},
    ("fwd", "ieee", 4): {(64, 32, 8, 2)},
    ("bwd", "small", 2): {(64, 64, 4, 3), (64, 64, 8, 2)},
    ("bwd", "small-tf32", 4): {(32, 64, 4, 2), (64, 32, 4, 2), (64, 64, 8, 2), (128, 32, 8, 2)},
    ("bwd", "large", 4): {(16, 32, 8, 2), (64, 16, 8, 2)},
    ("bwd", "ieee", 4): {(32, 32, 8, 2)},
}


def tile_space(kind: str, d: int, elem: int, prec: str, arch: int | None = 90):
    """Autotuning candidates for the forward ("fwd") or the two backward kernels ("bwd") at head dim d, element size
    elem (bytes) and dot precision prec ("ieee" or "tf32"; fp32 "ieee" runs on FMA units and gets its own list), for
    compute capability arch (major * 10 + minor); arch=None: the whole list, before the spill exclusions."""
    if prec == "ieee" and elem == 4:
        cls = "ieee"
    elif d > 128:
        cls = "large"
    else:
        cls = "small-tf32" if elem == 4 and (kind, "small-tf32") in _TILES else "small"
    drop = set()
    if arch is not None:
        drop = _SPILL_ON_SM90.get((kind, cls, elem), set()) | (
            _SPILL_BEFORE_SM90.get((kind, cls, elem), set()) if arch < 90 else set()
        )
    tiles = [t for t in _TILES[(kind, cls)] if t not in drop]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in tiles]


def smem_estimate(kind: str, block_m: int, block_n: int, block_d: int, elem: int, stages: int) -> int:
    """Upper estimate of a configuration's shared memory (bytes): the operand tiles the kernel keeps for the whole
    loop plus one copy per pipeline stage of those it streams. fwd keeps q [M, D] and streams k, v [N, D]; dk/dv keeps
    k, v [N, D] and streams q, do [M, D] (and M lse/delta values); dq keeps q, do [M, D] and streams k, v [N, D].
    bench.static checks it against ptxas's figure for every configuration it compiles."""
    s = max(stages, 1)
    if kind == "fwd":
        return elem * block_d * (block_m + 2 * s * block_n)
    if kind == "bwd_dkdv":
        return elem * block_d * (2 * block_n + 2 * s * block_m) + 8 * s * block_m
    return elem * block_d * (2 * block_m + 2 * s * block_n)


def prune_tiles(configs, kind: str, d: int, elem: int, prec: str, smem_limit: int | None):
    """The configurations the autotuner may time: those whose smem_estimate fits smem_limit (bytes; None = unknown)
    for every kernel of the pass (the backward's two kernels share one list). Never empty: the smallest remains."""
    block_d = max(16, triton.next_power_of_2(d))
    kinds = ("fwd",) if kind == "fwd" else ("bwd_dkdv", "bwd_dq")

    def need(c):
        return max(
            smem_estimate(k, c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], block_d, elem, c.num_stages) for k in kinds
        )

    keep = [c for c in configs if smem_limit is None or need(c) <= smem_limit]
    return keep or [min(configs, key=need)]


def routed_to_reference(d: int, elem: int, prec: str) -> bool:
    """fp32 without TF32 (the reference numerics, tl.dot on FMA units) at head dims above 64 goes to EDM's op: there
    every tile either spills or overflows shared memory, and ptxas needs up to 10 minutes per configuration at d = 256
    (bench.static), so autotuning alone would stall a run for hours; cuBLAS's fp32 GEMMs serve it instead."""
    return prec == "ieee" and elem == 4 and d > 64


def _configs(kind: str):
    """What the autotuner is given: one configuration under the interpreter (which cannot autotune), else the union
    of the lists, narrowed per launch by _prune_fwd / _prune_bwd to the class of the case."""
    if interpreted():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4)]
    seen = dict.fromkeys(t for (k, _), tiles in _TILES.items() if k == kind for t in tiles)
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in seen]


def _device_smem(t: torch.Tensor) -> int | None:
    """Per-block shared memory opt-in limit of t's GPU (bytes); None off the GPU."""
    if not t.is_cuda:
        return None
    props = torch.cuda.get_device_properties(t.device)
    limit = getattr(props, "shared_memory_per_block_optin", None)
    if limit:
        return int(limit)
    return int(triton.runtime.driver.active.utils.get_device_properties(t.device.index or 0)["max_shared_mem"])


def _prune(kind, configs, named_args, **kwargs):
    if interpreted():
        return configs
    qkv = named_args["qkv_ptr"]
    d = kwargs.get("D", named_args.get("D"))
    prec = kwargs.get("PREC", named_args.get("PREC"))
    major, minor = torch.cuda.get_device_capability(qkv.device) if qkv.is_cuda else (9, 0)
    wanted = {
        (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
        for c in tile_space(kind, d, qkv.element_size(), prec, 10 * major + minor)
    }
    listed = [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in wanted]
    return prune_tiles(listed, kind, d, qkv.element_size(), prec, _device_smem(qkv))


def _prune_fwd(configs, named_args, **kwargs):
    return _prune("fwd", configs, named_args, **kwargs)


def _prune_bwd(configs, named_args, **kwargs):
    return _prune("bwd", configs, named_args, **kwargs)


@triton.jit
def _chan(offs_d, j: tl.constexpr, D: tl.constexpr, BLOCKED: tl.constexpr):
    """Channel of (c, j), j in (q, k, v), within a head's 3D channels: EDM's interleaved 3c + j, or the blocked
    j D + c that UNetBlock produces for this kernel (contiguous q, k and v per head)."""
    if BLOCKED:
        return j * D + offs_d
    else:
        return offs_d * 3 + j


@triton.autotune(
    configs=_configs("fwd"), key=["L", "D", "PREC", "s_l"], prune_configs_by={"early_config_prune": _prune_fwd}
)
@triton.jit
def _fwd_kernel(
    qkv_ptr,
    o_ptr,
    lse_ptr,
    L,
    H,
    sm_scale,
    s_n,
    s_c,
    s_l,
    o_n,
    o_c,
    o_l,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PREC: tl.constexpr,
    BLOCKED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # One grid axis (2^31 - 1 programs; axes 1 and 2 allow 65,535) holding (sample x head, query block), query blocks
    # of one head adjacent so they share its k and v in L2.
    num_m = tl.cdiv(L, BLOCK_M)
    bh = tl.program_id(0) // num_m
    pid_m = tl.program_id(0) % num_m
    n = (bh // H).to(tl.int64)  # 64-bit batch offsets: n * s_n passes 2^31 elements in large sampling batches
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    base = qkv_ptr + n * s_n + (h * 3 * D) * s_c
    # q as [BLOCK_M, D], k as [D, BLOCK_N], v as [BLOCK_N, D]; channel of (c, j) = 3c + j.
    q = tl.load(
        base + offs_m[:, None] * s_l + _chan(offs_d[None, :], 0, D, BLOCKED) * s_c,
        mask=(offs_m[:, None] < L) & d_ok[None, :],
        other=0.0,
    )
    qk_scale = sm_scale * 1.4426950408889634  # exp2 domain
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, L, BLOCK_N):
        cols = start_n + offs_n
        k = tl.load(
            base + cols[None, :] * s_l + _chan(offs_d[:, None], 1, D, BLOCKED) * s_c,
            mask=d_ok[:, None] & (cols[None, :] < L),
            other=0.0,
        )
        s = tl.dot(q, k, input_precision=PREC) * qk_scale
        s = tl.where(cols[None, :] < L, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            base + cols[:, None] * s_l + _chan(offs_d[None, :], 2, D, BLOCKED) * s_c,
            mask=(cols[:, None] < L) & d_ok[None, :],
            other=0.0,
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    acc = acc / l_i[:, None]
    row_ok = offs_m < L
    tl.store(lse_ptr + bh.to(tl.int64) * L + offs_m, (m_i + tl.math.log2(l_i)) / 1.4426950408889634, mask=row_ok)
    tl.store(
        o_ptr + n * o_n + (h * D + offs_d[None, :]) * o_c + offs_m[:, None] * o_l,
        acc.to(o_ptr.dtype.element_ty),
        mask=row_ok[:, None] & d_ok[None, :],
    )


@triton.jit
def _delta_kernel(
    o_ptr, do_ptr, delta_ptr, L, H, o_n, o_c, o_l, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr
):
    """delta[bh, i] = sum_c do[i, c] o[i, c] in fp32 (o and do share one layout)."""
    num_b = tl.cdiv(L, BLOCK)
    bh = tl.program_id(0) // num_b
    pid = tl.program_id(0) % num_b
    n = (bh // H).to(tl.int64)
    h = bh % H
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    ptr = n * o_n + (h * D + offs_d[None, :]) * o_c + rows[:, None] * o_l
    m = (rows[:, None] < L) & (offs_d[None, :] < D)
    o = tl.load(o_ptr + ptr, mask=m, other=0.0).to(tl.float32)
    do = tl.load(do_ptr + ptr, mask=m, other=0.0).to(tl.float32)
    tl.store(delta_ptr + bh.to(tl.int64) * L + rows, tl.sum(o * do, 1), mask=rows < L)


@triton.autotune(
    configs=_configs("bwd"), key=["L", "D", "PREC", "s_l"], prune_configs_by={"early_config_prune": _prune_bwd}
)
@triton.jit
def _bwd_dkdv_kernel(
    qkv_ptr,
    do_ptr,
    lse_ptr,
    delta_ptr,
    dqkv_ptr,
    L,
    H,
    sm_scale,
    s_n,
    s_c,
    s_l,
    o_n,
    o_c,
    o_l,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PREC: tl.constexpr,
    BLOCKED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One block of BLOCK_N keys: loop over all queries, accumulate dk and dv."""
    num_n = tl.cdiv(L, BLOCK_N)
    bh = tl.program_id(0) // num_n
    pid_n = tl.program_id(0) % num_n
    n = (bh // H).to(tl.int64)
    h = bh % H
    stat = bh.to(tl.int64) * L  # row offset into lse and delta
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    col_ok = cols < L
    base = qkv_ptr + n * s_n + (h * 3 * D) * s_c
    kv_mask = col_ok[:, None] & d_ok[None, :]
    k = tl.load(
        base + cols[:, None] * s_l + _chan(offs_d[None, :], 1, D, BLOCKED) * s_c, mask=kv_mask, other=0.0
    )  # [N, D]
    v = tl.load(
        base + cols[:, None] * s_l + _chan(offs_d[None, :], 2, D, BLOCKED) * s_c, mask=kv_mask, other=0.0
    )  # [N, D]
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    do_base = do_ptr + n * o_n + (h * D) * o_c
    for start_m in range(0, L, BLOCK_M):
        rows = start_m + offs_m
        row_ok = rows < L
        qT = tl.load(
            base + rows[None, :] * s_l + _chan(offs_d[:, None], 0, D, BLOCKED) * s_c,
            mask=d_ok[:, None] & row_ok[None, :],
            other=0.0,
        )  # [D, M]
        lse = tl.load(lse_ptr + stat + rows, mask=row_ok, other=0.0)
        # p^T [N, M] = exp(k q^T * scale - lse)
        sT = tl.dot(k, qT, input_precision=PREC) * qk_scale
        pT = tl.math.exp2(sT - lse[None, :] * 1.4426950408889634)
        pT = tl.where(col_ok[:, None] & row_ok[None, :], pT, 0.0)
        do = tl.load(
            do_base + offs_d[None, :] * o_c + rows[:, None] * o_l, mask=row_ok[:, None] & d_ok[None, :], other=0.0
        )  # [M, D]
        dv += tl.dot(pT.to(do.dtype), do, input_precision=PREC)
        delta = tl.load(delta_ptr + stat + rows, mask=row_ok, other=0.0)
        dpT = tl.dot(v, tl.trans(do), input_precision=PREC)  # [N, M]
        dsT = pT * (dpT - delta[None, :])
        dk += tl.dot(dsT.to(qT.dtype), tl.trans(qT), input_precision=PREC)
    dk = dk * sm_scale
    dbase = dqkv_ptr + n * s_n + (h * 3 * D) * s_c
    tl.store(
        dbase + cols[:, None] * s_l + _chan(offs_d[None, :], 1, D, BLOCKED) * s_c,
        dk.to(dqkv_ptr.dtype.element_ty),
        mask=kv_mask,
    )
    tl.store(
        dbase + cols[:, None] * s_l + _chan(offs_d[None, :], 2, D, BLOCKED) * s_c,
        dv.to(dqkv_ptr.dtype.element_ty),
        mask=kv_mask,
    )


@triton.autotune(
    configs=_configs("bwd"), key=["L", "D", "PREC", "s_l"], prune_configs_by={"early_config_prune": _prune_bwd}
)
@triton.jit
def _bwd_dq_kernel(
    qkv_ptr,
    do_ptr,
    lse_ptr,
    delta_ptr,
    dqkv_ptr,
    L,
    H,
    sm_scale,
    s_n,
    s_c,
    s_l,
    o_n,
    o_c,
    o_l,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PREC: tl.constexpr,
    BLOCKED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One block of BLOCK_M queries: loop over all keys, accumulate dq."""
    num_m = tl.cdiv(L, BLOCK_M)
    bh = tl.program_id(0) // num_m
    pid_m = tl.program_id(0) % num_m
    n = (bh // H).to(tl.int64)
    h = bh % H
    stat = bh.to(tl.int64) * L
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    row_ok = rows < L
    base = qkv_ptr + n * s_n + (h * 3 * D) * s_c
    q_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(
        base + rows[:, None] * s_l + _chan(offs_d[None, :], 0, D, BLOCKED) * s_c, mask=q_mask, other=0.0
    )  # [M, D]
    do = tl.load(do_ptr + n * o_n + (h * D + offs_d[None, :]) * o_c + rows[:, None] * o_l, mask=q_mask, other=0.0)
    lse = tl.load(lse_ptr + stat + rows, mask=row_ok, other=0.0)
    delta = tl.load(delta_ptr + stat + rows, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    for start_n in range(0, L, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < L
        kT = tl.load(
            base + cols[None, :] * s_l + _chan(offs_d[:, None], 1, D, BLOCKED) * s_c,
            mask=d_ok[:, None] & col_ok[None, :],
            other=0.0,
        )  # [D, N]
        vT = tl.load(
            base + cols[None, :] * s_l + _chan(offs_d[:, None], 2, D, BLOCKED) * s_c,
            mask=d_ok[:, None] & col_ok[None, :],
            other=0.0,
        )  # [D, N]
        s = tl.dot(q, kT, input_precision=PREC) * qk_scale
        p = tl.math.exp2(s - lse[:, None] * 1.4426950408889634)
        p = tl.where(row_ok[:, None] & col_ok[None, :], p, 0.0)
        dp = tl.dot(do, vT, input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kT.dtype), tl.trans(kT), input_precision=PREC)
    dq = dq * sm_scale
    dbase = dqkv_ptr + n * s_n + (h * 3 * D) * s_c
    tl.store(
        dbase + rows[:, None] * s_l + _chan(offs_d[None, :], 0, D, BLOCKED) * s_c,
        dq.to(dqkv_ptr.dtype.element_ty),
        mask=q_mask,
    )


# ----------------------------------------------------------------------------------------------------------------
# Host side.


def _precision(t: torch.Tensor) -> str:
    """tl.dot's input precision for fp32 operands (IEEE unless torch allows TF32); fp16/bf16 use their own MMA."""
    return "tf32" if t.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _out_like(qkv: torch.Tensor, channels: int):
    n, _, h, w = qkv.shape
    channels_last = qkv.stride(1) == 1 and qkv.shape[1] > 1
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(n, channels, h, w, device=qkv.device, dtype=qkv.dtype).contiguous(memory_format=fmt)


@triton_op("sid_fast_kernels::edm_flash_attention", mutates_args=())
def edm_flash_attention_op(qkv: torch.Tensor, num_heads: int, blocked: bool) -> tuple[torch.Tensor, torch.Tensor]:
    qkv, (sn, sc, sl) = nchw_strides(qkv)
    n, c3, h, w = qkv.shape
    d, L = c3 // (3 * num_heads), h * w
    o = _out_like(qkv, c3 // 3)
    _, (on, oc, ol) = nchw_strides(o)
    lse = torch.empty(n * num_heads, L, device=qkv.device, dtype=torch.float32)
    grid = lambda meta: (n * num_heads * triton.cdiv(L, meta["BLOCK_M"]),)  # noqa: E731
    wrap_triton(_fwd_kernel)[grid](
        qkv,
        o,
        lse,
        L,
        num_heads,
        1.0 / math.sqrt(d),
        sn,
        sc,
        sl,
        on,
        oc,
        ol,
        D=d,
        BLOCK_D=max(16, triton.next_power_of_2(d)),
        PREC=_precision(qkv),
        BLOCKED=blocked,
    )
    return o, lse


@triton_op("sid_fast_kernels::edm_flash_attention_bwd", mutates_args=())
def edm_flash_attention_bwd_op(
    do: torch.Tensor, qkv: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, num_heads: int, blocked: bool
) -> torch.Tensor:
    qkv, (sn, sc, sl) = nchw_strides(qkv)
    o, (on, oc, ol) = nchw_strides(o)
    # do must share o's layout so one set of strides addresses both.
    do = do.contiguous(memory_format=torch.channels_last if oc == 1 and o.shape[1] > 1 else torch.contiguous_format)
    n, c3, h, w = qkv.shape
    d, L = c3 // (3 * num_heads), h * w
    block_d = max(16, triton.next_power_of_2(d))
    delta = torch.empty_like(lse)
    wrap_triton(_delta_kernel)[(n * num_heads * triton.cdiv(L, 64),)](
        o, do, delta, L, num_heads, on, oc, ol, D=d, BLOCK_D=block_d, BLOCK=64
    )
    dqkv = torch.empty_like(qkv)
    args = (qkv, do, lse, delta, dqkv, L, num_heads, 1.0 / math.sqrt(d), sn, sc, sl, on, oc, ol)
    wrap_triton(_bwd_dkdv_kernel)[lambda meta: (n * num_heads * triton.cdiv(L, meta["BLOCK_N"]),)](
        *args, D=d, BLOCK_D=block_d, PREC=_precision(qkv), BLOCKED=blocked
    )
    wrap_triton(_bwd_dq_kernel)[lambda meta: (n * num_heads * triton.cdiv(L, meta["BLOCK_M"]),)](
        *args, D=d, BLOCK_D=block_d, PREC=_precision(qkv), BLOCKED=blocked
    )
    return dqkv


def _setup_context(ctx, inputs, output):
    qkv, num_heads, blocked = inputs
    o, lse = output
    ctx.save_for_backward(qkv, o, lse)
    ctx.num_heads, ctx.blocked = num_heads, blocked
    ctx.set_materialize_grads(False)  # lse gets no gradient: no zero tensor made for it in backward


def _backward(ctx, do, dlse):
    if do is None:  # the output did not reach the loss (grads are not materialised)
        return None, None, None
    qkv, o, lse = ctx.saved_tensors
    return edm_flash_attention_bwd_op(do, qkv, o, lse, ctx.num_heads, ctx.blocked), None, None


torch.library.register_autograd("sid_fast_kernels::edm_flash_attention", _backward, setup_context=_setup_context)


def flash_attention(qkv: torch.Tensor, num_heads: int, blocked: bool = False) -> torch.Tensor:
    """Attention over EDM's qkv conv output [N, heads*3*d, H, W] -> [N, heads*d, H, W] (same memory format).
    blocked=True: qkv's channels are in the blocked order head*3d + j*d + c (see blocked_order), which gives the kernel
    contiguous q, k and v per head, hence vector loads and cp.async in channels_last too."""
    if qkv.dim() != 4:
        raise ValueError(f"flash_attention: expected qkv of shape [N, heads*3*d, H, W], got {tuple(qkv.shape)}.")
    if num_heads < 1 or qkv.shape[1] % (3 * num_heads):
        raise ValueError(
            f"flash_attention: {qkv.shape[1]} qkv channels are not divisible by 3 * num_heads = {3 * num_heads}."
        )
    if qkv.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"flash_attention: qkv must be fp32, fp16 or bf16, got {qkv.dtype}.")
    d = qkv.shape[1] // (3 * num_heads)
    if d > 256:
        raise ValueError(f"flash_attention: head dimension {d} > 256 is not supported.")
    if not triton_available(qkv):
        return attention_edm(blocked_to_interleaved(qkv, num_heads) if blocked else qkv, num_heads)
    if routed_to_reference(d, qkv.element_size(), _precision(qkv)):
        if d not in _ROUTED_WARNED:
            _ROUTED_WARNED.add(d)
            warnings.warn(
                f"flash_attention: fp32 attention without TF32 at head dim {d} runs EDM's attention op, not "
                "the Triton kernel (on FMA units it spills at every tile; sid_fast/kernels/attention.py, "
                "routed_to_reference); bf16, fp16 or TF32 use the kernel.",
                stacklevel=2,
            )
        return attention_edm(blocked_to_interleaved(qkv, num_heads) if blocked else qkv, num_heads)
    return edm_flash_attention_op(qkv, int(num_heads), bool(blocked))[0]


_ROUTED_WARNED: set = set()
