"""Kernel benchmarks: fused Triton ops against eager PyTorch and torch.compile of the same reference.

    python -m bench.kernels                      # on a GPU: official shapes, JSON lines in bench/results/kernels.jsonl
    python -m bench.kernels --shapes tiny        # CPU smoke run (Triton interpreter; wall-clock timing)

Ops and shapes:
- `sid_loss` (sid_fast/kernels/sid_loss.py) and `edm_loss` (sid_fast/kernels/edm_loss.py) on image batches: CIFAR-10
  DDPM++ at micro-batch 64 ([64, 3, 32, 32]), ImageNet-64 ADM at micro-batch 32 ([32, 3, 64, 64]), a large
  [256, 3, 64, 64].
- `group_norm_silu` (sid_fast/kernels/group_norm_silu.py) on activations: DDPM++ CIFAR-10 at micro-batch 64
  ([64, 256, 32, 32], 32 groups), ADM ImageNet-64 at micro-batch 32 with scale/shift ([32, 192, 64, 64], 32 groups),
  and a large one ([32, 384, 64, 64]); the eager provider is F.group_norm (+ addcmul) + F.silu.
- `attention` (sid_fast/kernels/attention.py) on EDM's qkv layout: DDPM++ CIFAR-10 at micro-batch 64 (1 head x 256 at
  L=256 and L=64) and ADM ImageNet-64 at micro-batch 32 (6, 9, 12 heads x 64 at L=1024, 256, 64), plus L=4096 (64x64).
  Providers: the kernel (NCHW; on CUDA also channels_last with EDM's interleaved qkv order and with the blocked order
  UNetBlock feeds it), EDM's reference op ("edm"), every SDPA backend that accepts the shape (flash,
  efficient, cudnn, math; each with the transposes from and to EDM's layout) and xformers where it imports.
  FLOPs: forward 4 N heads L^2 d (two matmuls), backward 10 N heads L^2 d (five matmuls; recomputation not
  counted), fwd+bwd 14 N heads L^2 d. Peak memory: torch.cuda.max_memory_allocated above the inputs, per mode.
Modes: fwd, bwd, fwd+bwd. Timing: on CUDA `triton.testing.do_bench` (median, 20th and 80th percentiles); without CUDA
the median of wall-clock repeats. Bytes moved are the ideal (each tensor read or written once): sid_loss fwd 3
tensors, bwd 6; edm_loss fwd 2, bwd 3; group_norm_silu fwd 2, bwd 3; fwd+bwd the sum. GB/s is reported with the
fraction of a device-to-device copy's bandwidth (bytes read + written) measured in the same run.
"""

from __future__ import annotations

import time
import types

import click
import torch

from bench.common import command, environment, write_jsonl

SHAPES = {
    "official": [
        ("cifar10-ddpmpp-mb64", (64, 3, 32, 32)),
        ("imagenet64-adm-mb32", (32, 3, 64, 64)),
        ("large", (256, 3, 64, 64)),
    ],
    "tiny": [("tiny", (2, 3, 8, 8))],
}
GN_SHAPES = {
    "official": [
        ("cifar10-ddpmpp-mb64", (64, 256, 32, 32), 32, False),
        ("imagenet64-adm-mb32", (32, 192, 64, 64), 32, True),
        ("large", (32, 384, 64, 64), 32, True),
    ],
    "tiny": [("tiny", (2, 16, 8, 8), 4, True)],
}


def timer(fn, device, reps=5):
    """(p50, p20, p80) milliseconds."""
    if device.type == "cuda":
        import triton.testing

        return tuple(triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8]))
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1e3)
    ts.sort()
    q = lambda p: ts[min(len(ts) - 1, int(p * len(ts)))]  # noqa: E731
    return q(0.5), q(0.2), q(0.8)


def copy_bandwidth(device, nbytes=1 << 30) -> float:
    """GB/s of dst.copy_(src), counting bytes read plus written."""
    n = nbytes // 4 if device.type == "cuda" else (1 << 24)
    src = torch.empty(n, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src), device)[0]
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def _modes(fn, diff, fixed):
    """fwd / bwd / fwd+bwd callables for out = fn(*diff, *fixed) (a tensor; reduced with a fixed cotangent)."""
    out = fn(*[t.clone().requires_grad_(True) for t in diff], *fixed)
    cot = torch.ones_like(out)

    def fwd():
        return fn(*diff, *fixed)

    leaves = [t.clone().requires_grad_(True) for t in diff]
    held = fn(*leaves, *fixed)

    def bwd():
        torch.autograd.grad(held, leaves, cot, retain_graph=True)

    def both():
        ls = [t.clone().requires_grad_(True) for t in diff]
        torch.autograd.grad(fn(*ls, *fixed), ls, cot)

    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": both}


def _providers(kernel, reference, diff, fixed, device):
    providers = {"triton": _modes(kernel, diff, fixed), "torch": _modes(reference, diff, fixed)}
    if device.type == "cuda":
        providers["torch.compile"] = _modes(torch.compile(reference), diff, fixed)
    return providers


def sid_loss_cases(shape, dtype, device):
    from sid_fast.kernels.sid_loss import sid_loss_rows, sid_loss_rows_ref

    g = torch.Generator(device=device).manual_seed(0)
    base = [torch.randn(shape, device=device, generator=g).to(dtype) for _ in range(3)]
    providers = _providers(
        lambda x, r, f, a: sid_loss_rows(x, r, f, a)[0],
        lambda x, r, f, a: sid_loss_rows_ref(x, r, f, a)[0],
        base,
        [1.2],
        device,
    )
    n = base[0].numel() * base[0].element_size()
    return providers, {"fwd": 3 * n, "bwd": 6 * n, "fwd+bwd": 9 * n}


def edm_loss_cases(shape, dtype, device):
    from sid_fast.kernels.edm_loss import edm_loss_rows, edm_loss_rows_ref

    g = torch.Generator(device=device).manual_seed(0)
    D, y = (torch.randn(shape, device=device, generator=g).to(dtype) for _ in range(2))
    lam = torch.rand(shape[0], device=device, generator=g) + 0.5
    providers = _providers(
        lambda d, t, w: edm_loss_rows(d, t, w)[0], lambda d, t, w: edm_loss_rows_ref(d, t, w)[0], [D], [y, lam], device
    )
    n = D.numel() * D.element_size()
    return providers, {"fwd": 2 * n, "bwd": 3 * n, "fwd+bwd": 5 * n}


def group_norm_silu_cases(shape, groups, modulate, dtype, device):
    from sid_fast.kernels.group_norm_silu import group_norm_silu, group_norm_silu_ref

    n_, c = shape[:2]
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(shape, device=device, generator=g).to(dtype)
    gamma, beta = torch.ones(c, device=device, dtype=dtype), torch.zeros(c, device=device, dtype=dtype)
    mod = (
        [0.1 * torch.randn(n_, c, device=device, generator=g).to(dtype) for _ in range(2)] if modulate else [None, None]
    )

    def kern(x, w, b, s=None, t=None):
        return group_norm_silu(x, w, b, groups, 1e-5, s, t)

    def ref(x, w, b, s=None, t=None):
        return group_norm_silu_ref(x, w, b, groups, 1e-5, s, t, upcast=False)

    diff = [x, gamma, beta] + ([m for m in mod] if modulate else [])
    providers = _providers(kern, ref, diff, [], device)
    n = x.numel() * x.element_size()
    return providers, {"fwd": 2 * n, "bwd": 3 * n, "fwd+bwd": 5 * n}


ATTN_SHAPES = {
    # (label, N, heads, d, H=W)
    "official": [
        ("ddpmpp-mb64-L256", 64, 1, 256, 16),
        ("ddpmpp-mb64-L64", 64, 1, 256, 8),
        ("adm-mb32-L1024", 32, 6, 64, 32),
        ("adm-mb32-L256", 32, 9, 64, 16),
        ("adm-mb32-L64", 32, 12, 64, 8),
        ("L4096", 4, 1, 64, 64),
    ],
    "tiny": [("tiny", 2, 1, 16, 4)],
}


def attention_cases(n, heads, d, res, dtype, device):
    from sid_fast.kernels.attention import attention_edm, attention_sdpa, flash_attention

    g = torch.Generator(device=device).manual_seed(0)
    qkv = torch.randn(n, heads * 3 * d, res, res, device=device, generator=g).to(dtype)
    providers = {
        "triton": _modes(lambda x: flash_attention(x, heads), [qkv], []),
        "edm": _modes(lambda x: attention_edm(x, heads), [qkv], []),
    }
    if (
        device.type == "cuda"
    ):  # the kernel in channels_last: EDM's interleaved qkv order, and the blocked order UNetBlock feeds it
        from sid_fast.kernels.attention import blocked_order

        cl = qkv.contiguous(memory_format=torch.channels_last)
        blk = qkv[:, blocked_order(heads, d, device)].contiguous(memory_format=torch.channels_last)
        providers["triton-channels_last"] = _modes(lambda x: flash_attention(x, heads), [cl], [])
        providers["triton-channels_last-blocked"] = _modes(lambda x: flash_attention(x, heads, blocked=True), [blk], [])
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {"sdpa-math": SDPBackend.MATH}
    if device.type == "cuda":
        backends.update(
            {
                "sdpa-flash": SDPBackend.FLASH_ATTENTION,
                "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
                "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
            }
        )
    for name, backend in backends.items():

        def sdpa(x, b=backend):
            with sdpa_kernel([b]):
                return attention_sdpa(x, heads)

        try:  # a backend that rejects the shape or dtype is left out
            sdpa(qkv.clone().requires_grad_(True)).sum().backward()
            providers[name] = _modes(sdpa, [qkv], [])
        except RuntimeError as e:
            print(f"  {name} does not accept {list(qkv.shape)} {dtype}: {str(e).splitlines()[0][:100]}")
    try:
        import xformers.ops as xops

        def xformers_attn(x):
            q, k, v = (
                t.reshape(n, heads, d, res * res).permute(0, 3, 1, 2)
                for t in x.reshape(n * heads, d, 3, res * res).unbind(2)
            )  # [N, L, heads, d]
            a = xops.memory_efficient_attention(q.contiguous(), k.contiguous(), v.contiguous())
            return a.permute(0, 2, 3, 1).reshape(n, heads * d, res, res)

        xformers_attn(qkv.clone().requires_grad_(True)).sum().backward()
        providers["xformers"] = _modes(xformers_attn, [qkv], [])
    except Exception as e:  # ImportError without xformers; NotImplementedError for unsupported shapes
        print(f"  xformers left out: {type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}")
    flops = 4 * n * heads * (res * res) ** 2 * d
    return providers, {"fwd": flops, "bwd": 2.5 * flops, "fwd+bwd": 3.5 * flops}


def peak_memory_mb(fn, device) -> float:
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def run_attention(size, names, dtypes, device, env, records):
    print(
        f"{'op':<10} {'shape':<20} {'dtype':<5} {'mode':<8} {'provider':<15} {'ms p50':>9} {'TFLOP/s':>8} "
        f"{'peak MiB':>9} {'vs edm':>7} {'vs best sdpa':>12}"
    )
    for dname in names:
        for label, n, heads, d, res in ATTN_SHAPES[size]:
            try:
                providers, flops = attention_cases(n, heads, d, res, dtypes[dname], device)
            except RuntimeError as e:
                print(f"  attention {label} {dname} skipped: {str(e).splitlines()[0][:120]}")
                continue
            for mode in ("fwd", "bwd", "fwd+bwd"):
                rows = {}
                for prov, fns in providers.items():
                    try:
                        p50, p20, p80 = timer(fns[mode], device)
                        mem = peak_memory_mb(fns[mode], device)
                    except Exception as e:
                        print(f"  {prov} {mode} failed: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
                        p50 = p20 = p80 = mem = float("nan")
                    rows[prov] = (p50, p20, p80, mem)
                sdpa = [v[0] for k, v in rows.items() if k.startswith("sdpa") and v[0] == v[0]]
                best_sdpa = min(sdpa) if sdpa else float("nan")
                for prov, (p50, p20, p80, mem) in rows.items():
                    tflops = flops[mode] / (p50 * 1e-3) / 1e12
                    rec = dict(
                        bench="kernels",
                        op="attention",
                        provider=prov,
                        mode=mode,
                        shape=[n, heads, d, res * res],
                        shape_name=label,
                        dtype=dname,
                        ms_p50=p50,
                        ms_p20=p20,
                        ms_p80=p80,
                        tflops=tflops,
                        flops=flops[mode],
                        peak_mem_mb=mem,
                        speedup_vs_edm=rows["edm"][0] / p50,
                        speedup_vs_best_sdpa=best_sdpa / p50,
                        **env,
                    )
                    records.append(rec)
                    print(
                        f"{'attention':<10} {label:<20} {dname:<5} {mode:<8} {prov:<15} {p50:>9.4f} {tflops:>8.2f} "
                        f"{mem:>9.1f} {rows['edm'][0] / p50:>6.2f}x {best_sdpa / p50:>11.2f}x"
                    )


@command(__doc__)
@click.option("--shapes", type=click.Choice(sorted(SHAPES)), default=None)
@click.option("--dtypes", default=None, help="comma list of fp32,bf16,fp16")
@click.option("--out", default="kernels.jsonl", show_default=True)
@click.option(
    "--ops", default="sid_loss,edm_loss,group_norm_silu,attention", show_default=True, help="comma list of ops to run"
)
def main(**kw):
    a = types.SimpleNamespace(**kw)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = SHAPES[a.shapes or ("official" if device.type == "cuda" else "tiny")]
    names = (a.dtypes or ("fp32,bf16" if device.type == "cuda" else "fp32")).split(",")
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    env = environment()
    copy_gbs = copy_bandwidth(device)
    records = []
    print(f"{env['device']}: device-to-device copy {copy_gbs:.0f} GB/s")
    print(
        f"{'op':<15} {'shape':<22} {'dtype':<5} {'mode':<8} {'provider':<14} {'ms p50':>9} {'GB/s':>8} "
        f"{'of copy':>8} {'speed-up':>9}"
    )
    size = a.shapes or ("official" if device.type == "cuda" else "tiny")
    cases = []
    ops = set(a.ops.split(","))
    for dname in names:
        dt = dtypes[dname]
        for label, shape in shapes:
            cases.append(("sid_loss", label, shape, dname, lambda s=shape, d=dt: sid_loss_cases(s, d, device)))
            cases.append(("edm_loss", label, shape, dname, lambda s=shape, d=dt: edm_loss_cases(s, d, device)))
        for label, shape, groups, mod in GN_SHAPES[size]:
            cases.append(
                (
                    "group_norm_silu",
                    label,
                    shape,
                    dname,
                    lambda s=shape, gr=groups, m=mod, d=dt: group_norm_silu_cases(s, gr, m, d, device),
                )
            )
    cases = [c for c in cases if c[0] in ops]
    for op, label, shape, dname, build in cases:
        providers, nbytes = build()
        for mode in ("fwd", "bwd", "fwd+bwd"):
            base_ms = None
            rows = []
            for prov, fns in providers.items():
                try:
                    p50, p20, p80 = timer(fns[mode], device)
                except Exception as e:  # a provider that fails records NaN instead of ending the run
                    print(f"  {prov} {mode} failed: {type(e).__name__}: {e}")
                    p50 = p20 = p80 = float("nan")
                gbs = nbytes[mode] / (p50 * 1e-3) / 1e9
                rows.append((prov, p50, p20, p80, gbs))
                if prov == "torch":
                    base_ms = p50
            for prov, p50, p20, p80, gbs in rows:
                rec = dict(
                    bench="kernels",
                    op=op,
                    provider=prov,
                    mode=mode,
                    shape=list(shape),
                    shape_name=label,
                    dtype=dname,
                    ms_p50=p50,
                    ms_p20=p20,
                    ms_p80=p80,
                    gb_s=gbs,
                    copy_gb_s=copy_gbs,
                    frac_of_copy=gbs / copy_gbs,
                    speedup_vs_eager=base_ms / p50,
                    **env,
                )
                records.append(rec)
                print(
                    f"{op:<15} {str(shape):<22} {dname:<5} {mode:<8} {prov:<14} {p50:>9.4f} {gbs:>8.1f} "
                    f"{gbs / copy_gbs:>8.1%} {base_ms / p50:>8.2f}x"
                )
    if "attention" in ops:
        run_attention(size, names, dtypes, device, env, records)
    path = write_jsonl(records, a.out)
    print(f"-> {path}")


if __name__ == "__main__":
    main()
