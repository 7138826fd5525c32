"""Static GPU survey: compile every Triton kernel ahead of time for a GPU that is not there, and record what ptxas says.

    python -m bench.static                        # sm_90 and sm_80, every kernel x config x dtype x official shape
    python -m bench.static --arch 90 --kernels attention --dtypes bf16 --space kept --jobs 2
    python -m bench.report bench/results/static_sm90.jsonl --md static.md

Triton compiles for a target without a driver (`triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`,
with the ptxas shipped in its wheel), so a CPU machine can learn whether a kernel would load on an H100 (sm_90) or an
A100 (sm_80): registers and spill bytes from ptxas's `-v` log, shared memory from the compiled kernel's metadata
(against the architecture's per-block opt-in limit), and the instructions it uses from the PTX (wgmma / mma.sync
tensor-core ops, cp.async and TMA copies, vector loads). Arguments are specialised as Triton's JIT specialises a real
launch: pointers 16-byte aligned, integers equal to 1 become constants, integers divisible by 16 carry the
divisibility hint, integers >= 2^31 are i64.

Configurations: `--space all` (default) compiles every configuration the autotuner lists and marks those that its
prune keeps for the case (`kept`); `--space kept` compiles only those (the CI subset); `--space wide` a larger grid
of attention tiles, for choosing the lists. The fp32 attention without TF32 ("fp32-ieee") at head dim > 64 is
routed to EDM's attention op by the dispatcher (see sid_fast/kernels/attention.py), so it is recorded as routed, not
compiled.

Attention is compiled for four layouts: NCHW and channels_last, each with EDM's interleaved qkv channels (what
`flash_attention` takes by default) and with the blocked order that UNetBlock feeds it (`-blocked`; q, k, v contiguous
per head).

One JSON line per compile goes to bench/results/static_sm{arch}.jsonl (appended; `bench.report` renders the last
run). Each line: kernel, shape, layout, dtype, config, kept, arch, ok / error, registers, spill bytes, shared bytes and
limit, fits, MMA kind and count, cp.async / TMA / vector-load counts, compile seconds, estimate of shared memory used
by the prune, triton version and git commit.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import re
import sys
import time
import types
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import click

from bench.common import RESULTS, command, environment

# Per-block shared memory (opt-in maximum, bytes) by compute capability (CUDA programming guide, "Technical
# Specifications per Compute Capability"): sm_80 163 KB, sm_86/89 99 KB, sm_90 227 KB.
SMEM_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}

DTYPES = ("bf16", "fp16", "fp32-tf32", "fp32-ieee")
ELEM = {"bf16": 2, "fp16": 2, "fp32-tf32": 4, "fp32-ieee": 4}
PTR = {"bf16": "*bf16", "fp16": "*fp16", "fp32-tf32": "*fp32", "fp32-ieee": "*fp32"}

# Official shapes (EDM training/networks.py configurations at the official micro-batches):
# attention (label, N, heads, d, H, W): DDPM++ (CIFAR-10 32x32 and FFHQ/AFHQ 64x64) attends at 16x16 with one head of
# 256 channels (L = 256; L = 64 is the 8x8 case of the kernel benchmark); ADM ImageNet-64 at 32x32, 16x16 and 8x8
# with 64 channels per head (384, 576, 768 channels: 6, 9, 12 heads).
ATTN_SHAPES = [
    ("ddpmpp-16x16", 64, 1, 256, 16, 16),
    ("ddpmpp-8x8", 64, 1, 256, 8, 8),
    ("adm-32x32", 32, 6, 64, 32, 32),
    ("adm-16x16", 32, 9, 64, 16, 16),
    ("adm-8x8", 32, 12, 64, 8, 8),
]
# Per-sample loss rows (label, N, C, H, W): CIFAR-10 at micro-batch 64, 64x64 (FFHQ, AFHQv2, ImageNet) at 32.
LOSS_SHAPES = [("cifar10", 64, 3, 32, 32), ("64x64", 32, 3, 64, 64)]
# GroupNorm(+SiLU) activations (label, N, C, H, W, groups, modulated): DDPM++ CIFAR-10 (128 and 256 channels at
# 32x32 ... 4x4), DDPM++ 64x64 (128 at 64x64), ADM ImageNet-64 (192 ... 768 channels, scale/shift modulation).
GN_SHAPES = [
    ("ddpmpp-cifar10-32x32", 64, 128, 32, 32, 32, False),
    ("ddpmpp-cifar10-16x16", 64, 256, 16, 16, 32, False),
    ("ddpmpp-cifar10-4x4", 64, 256, 4, 4, 32, False),
    ("ddpmpp-64-64x64", 32, 128, 64, 64, 32, False),
    ("adm-64x64", 32, 192, 64, 64, 32, True),
    ("adm-16x16", 32, 576, 16, 16, 32, True),
    ("adm-8x8", 32, 768, 8, 8, 32, True),
]

# DiT adaLN modulation rows (label, N, L, D) of the transformers whose adaLN modules sid_fast.networks.dit fuses, at
# 1024 px (4,096 image tokens), micro-batch 1: SD3-Medium (1,536 channels), SD3.5-Large (2,432), FLUX.1-dev (3,072).
ADALN_SHAPES = [
    ("sd3-medium-1024", 1, 4096, 1536),
    ("sd35-large-1024", 1, 4096, 2432),
    ("flux-dev-1024", 1, 4096, 3072),
]


@dataclass
class Case:
    kernel: str  # e.g. "attention.fwd"
    module: str  # kernels module
    attr: str  # autotuned or jitted kernel in it
    shape: str
    layout: str
    dtype: str
    args: dict  # argument name -> value ("*bf16" for pointers)
    config: dict  # num_warps, num_stages and the block constexprs
    kept: bool
    smem_estimate: int | None = None
    grid: list = field(default_factory=list)


def _jit_fn(module: str, attr: str):
    from triton.runtime.jit import JITFunction

    k = getattr(importlib.import_module(module), attr)
    while not isinstance(k, JITFunction):  # autotuner / heuristics wrappers
        k = k.fn
    return k


def specialise(fn, values: dict):
    """(signature, constexprs, attrs) as Triton's JIT builds them for a launch with these argument values."""
    sig, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        name = p.name
        if name not in values:
            raise KeyError(f"{fn.__name__}: no value for argument {name!r}")
        v = values[name]
        if p.is_constexpr:
            sig[name], constexprs[name] = "constexpr", v
        elif isinstance(v, str):  # pointer: allocations are 16-byte aligned
            sig[name] = v
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[name] = "fp32"
        elif isinstance(v, bool):
            sig[name] = "i1"
        elif v == 1 and not p.do_not_specialize:
            sig[name], constexprs[name] = "constexpr", 1
        else:
            sig[name] = "i32" if -(2**31) <= v < 2**31 else "i64"
            if v % 16 == 0 and not p.do_not_specialize:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, constexprs, attrs


_PTXAS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
PTX_COUNTS = {
    "wgmma": r"wgmma\.mma_async",
    "mma_sync": r"\bmma\.sync",
    "cp_async": r"cp\.async\.c[ag]",
    "tma": r"cp\.async\.bulk\.tensor",
    "ld_v4": r"ld\.global(?:\.\w+)*\.v4",
    "ld_v2": r"ld\.global(?:\.\w+)*\.v2",
    "ld_b16_scalar": r"ld\.global(?:\.(?!v[24])\w+)*\.b16\s",
    "fma_f32": r"fma\.rn\.f32",
}


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout()


def compile_case(case: Case, arch: int, timeout: int = 0) -> dict:
    """Compile one case for sm_{arch}; returns the record (never raises). timeout: seconds (0 = none), recorded as
    an error when exceeded (some fp32 FMA kernels take ptxas minutes)."""
    import signal

    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    rec = dict(asdict(case), arch=arch, smem_limit=SMEM_LIMIT[arch])
    rec.pop("module"), rec.pop("attr")
    t0 = time.perf_counter()
    if timeout:
        signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(timeout)
    try:
        fn = _jit_fn(case.module, case.attr)
        sig, constexprs, attrs = specialise(
            fn, {**case.args, **{k: v for k, v in case.config.items() if not k.startswith("num_")}}
        )
        knobs.nvidia.dump_ptxas_log = True
        knobs.compilation.always_compile = True  # a cache hit would skip ptxas and its log
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            k = triton.compile(
                ASTSource(fn, sig, constexprs, attrs),
                target=GPUTarget("cuda", arch, 32),
                options=dict(num_warps=case.config["num_warps"], num_stages=case.config.get("num_stages", 3)),
            )
        log = buf.getvalue()
        regs, spill = _PTXAS.search(log), _SPILL.search(log)
        ptx = k.asm["ptx"]
        counts = {name: len(re.findall(pat, ptx)) for name, pat in PTX_COUNTS.items()}
        shared = int(k.metadata.shared)
        rec["ptx_sha256"] = __import__("hashlib").sha256(re.sub(r"//.*", "", ptx).encode()).hexdigest()[:16]
        rec.update(
            ok=True,
            registers=int(regs.group(1)) if regs else None,
            spill_stores=int(spill.group(1)) if spill else None,
            spill_loads=int(spill.group(2)) if spill else None,
            shared=shared,
            fits=shared <= SMEM_LIMIT[arch],
            mma="wgmma" if counts["wgmma"] else "mma.sync" if counts["mma_sync"] else "none",
            mma_count=counts["wgmma"] or counts["mma_sync"],
            **counts,
        )
        rec["spills"] = (rec["spill_stores"] or 0) + (rec["spill_loads"] or 0)
    except _Timeout:
        rec.update(ok=False, error=f"timeout: no result after {timeout} s")
    except Exception as e:  # a compile failure is a finding, recorded as such
        rec.update(
            ok=False, error=f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
        )
    finally:
        if timeout:
            signal.alarm(0)
    rec["compile_s"] = round(time.perf_counter() - t0, 3)
    return rec


# ----------------------------------------------------------------------------------------------------------------
# Cases: one per (kernel, shape, layout, dtype, config), with the arguments a real launch passes.


def _strides(n, c, h, w, layout):
    """(s_n, s_c, s_hw) of an [n, c, h, w] tensor."""
    return (c * h * w, h * w, 1) if layout == "nchw" else (h * w * c, 1, c)


def _attention_cases(dtypes, space, arch):
    A = importlib.import_module("sid_fast.kernels.attention")

    cases = []
    seen_d = set()
    for label, n, heads, d, h, w in ATTN_SHAPES:
        if space == "wide" and d in seen_d:
            continue  # the wide grid compiles one shape per head dim (L and heads are runtime arguments)
        seen_d.add(d)
        L = h * w
        for layout in ("nchw", "channels_last", "nchw-blocked", "channels_last-blocked"):
            mem = layout.split("-")[0]
            sn, sc, sl = _strides(n, 3 * heads * d, h, w, mem)
            on, oc, ol = _strides(n, heads * d, h, w, mem)
            for dt in dtypes:
                prec = "tf32" if dt == "fp32-tf32" else "ieee"
                shape = f"{label} N={n} heads={heads} d={d} L={L}"
                if A.routed_to_reference(d, ELEM[dt], prec):
                    cases.append(Case("attention.*", "", "", shape, layout, dt, {}, {}, False))
                    continue
                common = dict(
                    qkv_ptr=PTR[dt],
                    lse_ptr="*fp32",
                    L=L,
                    H=heads,
                    sm_scale=1.0 / d**0.5,
                    s_n=sn,
                    s_c=sc,
                    s_l=sl,
                    o_n=on,
                    o_c=oc,
                    o_l=ol,
                    D=d,
                    BLOCK_D=max(16, 1 << (d - 1).bit_length()),
                    PREC=prec,
                    BLOCKED=layout.endswith("blocked"),
                )
                cases += _attention_tile_cases(A, shape, layout, dt, prec, common, space, arch)
                if not layout.endswith("blocked"):  # the delta kernel reads o and do, whose layout has no blocks
                    cases.append(_attention_delta_case(shape, layout, dt, common))
    return cases


def _attention_tile_cases(A, shape, layout, dt, prec, common, space, arch) -> list:
    """The forward and the two backward kernels of one attention shape, layout and dtype, at every tile listed
    (space "listed"/"wide") or kept by the autotuner on `arch` (space "kept")."""
    d = common["D"]
    cases = []
    for kind, attr, extra in (
        ("fwd", "_fwd_kernel", dict(o_ptr=PTR[dt])),
        ("bwd_dkdv", "_bwd_dkdv_kernel", dict(do_ptr=PTR[dt], delta_ptr="*fp32", dqkv_ptr=PTR[dt])),
        ("bwd_dq", "_bwd_dq_kernel", dict(do_ptr=PTR[dt], delta_ptr="*fp32", dqkv_ptr=PTR[dt])),
    ):
        tune = "fwd" if kind == "fwd" else "bwd"
        # Listed: the whole list; kept: what the autotuner may time on this arch (the entries known to spill there
        # dropped, then the shared-memory prune).
        listed = A.tile_space(tune, d, ELEM[dt], prec, None) if space != "wide" else A.wide_space(d, prec)
        arch_space = A.tile_space(tune, d, ELEM[dt], prec, arch) if space != "wide" else listed
        kept = A.prune_tiles(arch_space, tune, d, ELEM[dt], prec, SMEM_LIMIT[arch])
        kept_keys = {_cfg(c) for c in kept}
        for c in kept if space == "kept" else listed:
            cfg = dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
            est = A.smem_estimate(kind, cfg["BLOCK_M"], cfg["BLOCK_N"], common["BLOCK_D"], ELEM[dt], cfg["num_stages"])
            args = {**common, **extra}
            cases.append(
                Case(
                    f"attention.{kind}",
                    "sid_fast.kernels.attention",
                    attr,
                    shape,
                    layout,
                    dt,
                    args,
                    cfg,
                    _cfg(c) in kept_keys,
                    est,
                )
            )
    return cases


def _attention_delta_case(shape, layout, dt, common) -> Case:
    args = dict(o_ptr=PTR[dt], do_ptr=PTR[dt], delta_ptr="*fp32")
    args.update({k: common[k] for k in ("L", "H", "o_n", "o_c", "o_l", "D", "BLOCK_D")}, BLOCK=64)
    return Case(
        "attention.delta",
        "sid_fast.kernels.attention",
        "_delta_kernel",
        shape,
        layout,
        dt,
        args,
        dict(num_warps=4, num_stages=3),
        True,
    )


def _cfg(c):
    return (tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages)


def _elementwise(configs):
    return [dict(num_warps=c.num_warps, num_stages=c.num_stages) for c in configs]


def _loss_cases(dtypes):
    from sid_fast.kernels import _common

    sid_loss = importlib.import_module("sid_fast.kernels.sid_loss")

    cases = []
    for label, n, c, h, w in LOSS_SHAPES:
        D = c * h * w
        shape = f"{label} [{n}, {c}, {h}, {w}]"
        for dt in dtypes:
            if dt == "fp32-ieee":
                continue  # no dot products: fp32 is one case, recorded under fp32-tf32's name "fp32"
            p = PTR[dt]
            name = "fp32" if dt == "fp32-tf32" else dt
            blk = sid_loss.gpu_block(D)
            # (op, module, kernel, arguments): the row kernels of both losses, forward and backward
            kernels = (
                (
                    "sid_loss.fwd",
                    "sid_fast.kernels.sid_loss",
                    "_sid_loss_fwd_kernel",
                    dict(
                        x_ptr=p,
                        r_ptr=p,
                        f_ptr=p,
                        row_ptr="*fp32",
                        w_ptr="*fp32",
                        ok_ptr="*i8",
                        D=D,
                        alpha=1.2,
                        BLOCK=blk,
                    ),
                ),
                (
                    "sid_loss.bwd",
                    "sid_fast.kernels.sid_loss",
                    "_sid_loss_bwd_kernel",
                    dict(
                        x_ptr=p,
                        r_ptr=p,
                        f_ptr=p,
                        g_ptr="*fp32",
                        w_ptr="*fp32",
                        ok_ptr="*i8",
                        dx_ptr=p,
                        dr_ptr=p,
                        df_ptr=p,
                        D=D,
                        alpha=1.2,
                        BLOCK=blk,
                    ),
                ),
                (
                    "edm_loss.fwd",
                    "sid_fast.kernels.edm_loss",
                    "_edm_loss_fwd_kernel",
                    dict(d_ptr=p, y_ptr=p, lam_ptr="*fp32", row_ptr="*fp32", ok_ptr="*i8", D=D, BLOCK=blk),
                ),
                (
                    "edm_loss.bwd",
                    "sid_fast.kernels.edm_loss",
                    "_edm_loss_bwd_kernel",
                    dict(d_ptr=p, y_ptr=p, lam_ptr="*fp32", g_ptr="*fp32", ok_ptr="*i8", dd_ptr=p, D=D, BLOCK=blk),
                ),
            )
            for cfg in _elementwise(_common.warp_configs(gpu=True)):
                for op, module, attr, args in kernels:
                    cases.append(Case(op, module, attr, shape, "rows", name, dict(args), cfg, True))
    return cases


def _gn_cases(dtypes):
    from sid_fast.kernels import _common

    G = importlib.import_module("sid_fast.kernels.group_norm_silu")  # the package exports a function of the same name

    cases = []
    for label, n, c, h, w, groups, mod in GN_SHAPES:
        shape = f"{label} [{n}, {c}, {h}, {w}] G={groups}{' modulated' if mod else ''}"
        for layout in ("nchw", "channels_last"):
            sn, sc, shw = _strides(n, c, h, w, layout)
            for dt in dtypes:
                if dt == "fp32-ieee":
                    continue
                p = PTR[dt]
                name = "fp32" if dt == "fp32-tf32" else dt
                blocks = G.gpu_blocks(c // groups, h * w)
                common = dict(
                    x_ptr=p,
                    w_ptr="*fp32",
                    b_ptr="*fp32",
                    scale_ptr="*fp32" if mod else "*fp32",
                    shift_ptr="*fp32",
                    mean_ptr="*fp32",
                    rstd_ptr="*fp32",
                    C=c,
                    HW=h * w,
                    G=groups,
                    stride_n=sn,
                    stride_c=sc,
                    stride_hw=shw,
                    MODULATE=mod,
                    SILU=True,
                    **blocks,
                )
                for cfg in _elementwise(_common.warp_configs(gpu=True, warps=G.WARPS)):
                    cases.append(
                        Case(
                            "group_norm_silu.fwd",
                            "sid_fast.kernels.group_norm_silu",
                            "_gn_fwd_kernel",
                            shape,
                            layout,
                            name,
                            dict(common, y_ptr=p, eps=1e-5),
                            cfg,
                            True,
                        )
                    )
                    cases.append(
                        Case(
                            "group_norm_silu.bwd",
                            "sid_fast.kernels.group_norm_silu",
                            "_gn_bwd_kernel",
                            shape,
                            layout,
                            name,
                            dict(
                                common,
                                dy_ptr=p,
                                dx_ptr=p,
                                dw_part_ptr="*fp32",
                                db_part_ptr="*fp32",
                                dscale_ptr="*fp32",
                                dshift_ptr="*fp32",
                            ),
                            cfg,
                            True,
                        )
                    )
    return cases


def _adaln_cases(dtypes):
    from sid_fast.kernels import _common

    A = importlib.import_module("sid_fast.kernels.ada_layer_norm")  # the package exports a function of the same name

    cases = []
    for label, n, length, d in ADALN_SHAPES:
        shape = f"{label} [{n}, {length}, {d}]"
        for dt in dtypes:
            if dt == "fp32-ieee":
                continue
            p = PTR[dt]
            name = "fp32" if dt == "fp32-tf32" else dt
            # Under CUDA autocast x is the fp32 or bf16 residual stream and the output float32 (layer_norm runs in
            # float32); s1 and shift come from a bf16 linear. Recorded: x, y and dx in the dtype, s1 in it too.
            common = dict(x_ptr=p, s1_ptr=p, mean_ptr="*fp32", rstd_ptr="*fp32", L=length, D=d, BLOCK_D=A._block_d(d),
                          BLOCK_R=A.block_rows(gpu=True))  # fmt: skip
            rows = A.rows_per_program(length, gpu=True)
            for cfg in _elementwise(_common.warp_configs(gpu=True, warps=A.WARPS)):
                fwd = dict(common, y_ptr="*fp32", shift_ptr=p, eps=1e-6, ROWS=1)
                bwd = dict(common, dy_ptr="*fp32", dx_ptr=p, ds1_ptr="*fp32", dshift_ptr="*fp32",
                           chunks=-(-length // rows), ROWS=rows)  # fmt: skip
                for op, attr, args in (("ada_layer_norm.fwd", "_fwd_kernel", fwd), ("ada_layer_norm.bwd",
                                                                                   "_bwd_kernel", bwd)):  # fmt: skip
                    cases.append(Case(op, "sid_fast.kernels.ada_layer_norm", attr, shape, "rows", name, args, cfg,
                                      True))  # fmt: skip
    return cases


def build_cases(kernels, dtypes, space, arch):
    cases = []
    if "attention" in kernels:
        cases += _attention_cases(dtypes, space, arch)
    if "loss" in kernels:
        cases += _loss_cases(dtypes)
    if "group_norm" in kernels:
        cases += _gn_cases(dtypes)
    if "ada_norm" in kernels:
        cases += _adaln_cases(dtypes)
    return cases


def _routed_record(case: Case, arch: int) -> dict:
    rec = dict(asdict(case), arch=arch, smem_limit=SMEM_LIMIT[arch], ok=True, routed="attention_edm", compile_s=0.0)
    rec.pop("module"), rec.pop("attr")
    return rec


def _worker(item):
    case, arch, timeout = item
    return compile_case(case, arch, timeout)


def run(
    arch: int, kernels, dtypes, space: str, jobs: int, out: Path | None, log=print, timeout: int = 300
) -> list[dict]:
    env = environment()
    env.pop("device", None)
    cases = build_cases(kernels, dtypes, space, arch)
    # Longest first (attention backward, fp32) so the pool finishes together.
    order = sorted(
        range(len(cases)),
        key=lambda i: (not cases[i].kernel.startswith("attention.bwd"), cases[i].dtype != "fp32-ieee"),
    )
    records = [None] * len(cases)
    # Cases that specialise identically (shapes differing only in runtime integers) compile once.
    first, same = {}, {}
    for i in order:
        c = cases[i]
        if c.kernel == "attention.*":
            records[i] = _routed_record(c, arch)
            continue
        try:
            fn = _jit_fn(c.module, c.attr)
            spec = specialise(fn, {**c.args, **{k: v for k, v in c.config.items() if not k.startswith("num_")}})
            key = json.dumps(
                [c.module, c.attr, spec[0], spec[1], sorted((str(k), v) for k, v in spec[2].items()), c.config],
                sort_keys=True,
                default=str,
            )
        except Exception:
            key = f"unique-{i}"  # compile_case records the error
        if key in first:
            same[i] = first[key]
        else:
            first[key] = i
    todo = list(first.values())
    t0 = time.perf_counter()
    done = 0
    with ProcessPoolExecutor(max_workers=jobs) if jobs > 1 else contextlib.nullcontext() as pool:
        items = [(cases[i], arch, timeout) for i in todo]
        results = pool.map(_worker, items) if pool else map(_worker, items)
        for i, rec in zip(todo, results):
            records[i] = rec
            done += 1
            if done % 20 == 0 or done == len(todo):
                log(f"  sm_{arch}: {done}/{len(todo)} distinct compiles ({time.perf_counter() - t0:.0f} s)")
    for i, j in same.items():  # the same binary: its facts, with this case's own labels
        rec = dict(records[j])
        rec.update(
            {k: v for k, v in asdict(cases[i]).items() if k not in ("module", "attr")},
            same_binary_as=cases[j].shape,
            compile_s=0.0,
        )
        records[i] = rec
    for r in records:
        r.update(bench="static", **env)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
    return records


def mma_m(rec: dict) -> int:
    """The M dimension of an attention kernel's products: BLOCK_M (forward, dq) or BLOCK_N (dk/dv)."""
    c = rec["config"]
    return c.get("BLOCK_N", 0) if rec["kernel"] == "attention.bwd_dkdv" else c.get("BLOCK_M", 0)


def violations(records: list[dict]) -> list[str]:
    """What the acceptance forbids, one line each: a kept configuration that fails to compile, overflows shared
    memory, or spills; on sm_90 a 16-bit attention tile whose products have M >= 64 and 4+ warps without wgmma; a
    shared-memory estimate below ptxas's figure; a (kernel, shape, layout, dtype) with no clean kept configuration."""
    out = []
    for r in records:
        if r.get("routed"):
            continue
        where = f"{r['kernel']} {r['shape']} {r['layout']} {r['dtype']} sm_{r['arch']} {r['config']}"
        if r["kept"]:
            if not r["ok"]:
                out.append(f"{where}: does not compile ({r.get('error')})")
                continue
            if not r["fits"]:
                out.append(f"{where}: needs {r['shared']} bytes of shared memory, over the {r['smem_limit']} limit")
            if r["spills"]:
                out.append(f"{where}: spills {r['spill_stores']} bytes (stores) / {r['spill_loads']} (loads)")
            if (
                r["arch"] == 90
                and r["kernel"] in ("attention.fwd", "attention.bwd_dq", "attention.bwd_dkdv")
                and r["dtype"] in ("bf16", "fp16")
                and mma_m(r) >= 64
                and r["config"]["num_warps"] >= 4
                and not r.get("wgmma")
            ):
                out.append(f"{where}: no wgmma although the products have M = {mma_m(r)} (uses {r['mma']})")
        if r.get("ok") and r.get("smem_estimate") is not None and r["smem_estimate"] < r["shared"]:
            out.append(f"{where}: shared-memory estimate {r['smem_estimate']} below the compiled {r['shared']}")
    for (kern, shape, layout, dt), g in summary(records).items():
        if not g["routed"] and g["kept_clean"] == 0:
            out.append(f"{kern} {shape} {layout} {dt}: no kept configuration compiles cleanly")
    return out


def summary(records: list[dict]) -> dict:
    """The acceptance facts per (kernel, shape, layout, dtype): kept configs that compile, fit, and do not spill."""
    groups = {}
    for r in records:
        key = (r["kernel"], r["shape"], r["layout"], r["dtype"])
        g = groups.setdefault(key, dict(listed=0, kept=0, kept_clean=0, kept_bad=[], routed=False))
        if r.get("routed"):
            g["routed"] = True
            continue
        g["listed"] += 1
        if r["kept"]:
            g["kept"] += 1
            clean = r["ok"] and r["fits"] and r["spills"] == 0
            g["kept_clean"] += clean
            if not clean:
                g["kept_bad"].append(r["config"])
    return groups


@command(__doc__)
@click.option(
    "--arch",
    type=click.Choice([str(a) for a in sorted(SMEM_LIMIT)]),
    multiple=True,
    help="compute capability to compile for (repeatable; default 90 and 80)",
)
@click.option(
    "--kernels",
    default="attention,loss,group_norm,ada_norm",
    show_default=True,
    help="comma list of attention, loss, group_norm, ada_norm",
)
@click.option("--dtypes", default=",".join(DTYPES), show_default=True, help=f"comma list of {', '.join(DTYPES)}")
@click.option("--space", type=click.Choice(["all", "kept", "wide"]), default="all", show_default=True)
@click.option("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compile processes [default: all CPUs]")
@click.option(
    "--timeout", type=int, default=300, show_default=True, help="seconds per compile before it is recorded as a timeout"
)
@click.option("--out", help="JSON lines file (default bench/results/static_sm{arch}.jsonl; '-' for none)")
def main(**kw):
    # Compile for a GPU target, never interpret: the kernels' configuration lists depend on this when they are first
    # imported (done lazily, below). Importing this module changes nothing, so tests may use violations().
    os.environ.pop("TRITON_INTERPRET", None)
    a = types.SimpleNamespace(**kw)
    a.arch = [int(x) for x in a.arch]
    kernels = [k.strip() for k in a.kernels.split(",") if k.strip()]
    dtypes = [d.strip() for d in a.dtypes.split(",") if d.strip()]
    for k in kernels:
        if k not in ("attention", "loss", "group_norm", "ada_norm"):
            raise click.BadParameter(
                f"unknown kernel family {k!r} (attention, loss, group_norm, ada_norm)", param_hint="--kernels"
            )
    for d in dtypes:
        if d not in DTYPES:
            raise click.BadParameter(f"unknown dtype {d!r} ({', '.join(DTYPES)})", param_hint="--dtypes")
    failed = False
    for arch in a.arch or [90, 80]:
        out = None if a.out == "-" else Path(a.out.format(arch=arch)) if a.out else RESULTS / f"static_sm{arch}.jsonl"
        print(f"sm_{arch}: compiling ({a.space} configs, {a.jobs} processes)" + (f" -> {out}" if out else ""))
        recs = run(arch, kernels, dtypes, a.space, a.jobs, out, timeout=a.timeout)
        n_ok = sum(r["ok"] for r in recs)
        found = violations(recs) if a.space != "wide" else []
        print(f"sm_{arch}: {n_ok}/{len(recs)} cases compiled; {len(found)} violation(s)")
        for v in found[:40]:
            print(f"  {v}")
        failed |= bool(found)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
