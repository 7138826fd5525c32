"""Kernel benchmarks: fused Triton ops against eager PyTorch and torch.compile of the same reference.

    python -m bench.kernels                      # on a GPU: official shapes, JSON lines in bench/results/kernels.jsonl
    python -m bench.kernels --shapes tiny        # CPU smoke run (Triton interpreter; wall-clock timing)

Ops: `sid_loss` (kernels/sid_loss.py). Shapes: CIFAR-10 DDPM++ at micro-batch 64 ([64, 3, 32, 32]), ImageNet-64 ADM
at micro-batch 32 ([32, 3, 64, 64]), and a large one ([256, 3, 64, 64]). Modes: fwd, bwd, fwd+bwd. Timing: on CUDA
`triton.testing.do_bench` (median, 20th and 80th percentiles); without CUDA the median of wall-clock repeats.
Bytes moved (the ideal, each tensor read or written once): fwd reads 3 inputs; bwd reads 3 inputs and writes 3
gradients; fwd+bwd is their sum. GB/s is reported with the fraction of a device-to-device copy's bandwidth
(bytes read + written) measured in the same run.
"""

from __future__ import annotations

import argparse
import time

import torch

from bench.common import environment, write_jsonl

SHAPES = {
    "official": [("cifar10-ddpmpp-mb64", (64, 3, 32, 32)), ("imagenet64-adm-mb32", (32, 3, 64, 64)), ("large", (256, 3, 64, 64))],
    "tiny": [("tiny", (2, 3, 8, 8))],
}


def timer(fn, device, reps=20):
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


def sid_loss_cases(shape, dtype, device):
    from kernels.sid_loss import sid_loss_rows, sid_loss_rows_ref

    alpha = 1.2
    g = torch.Generator(device=device).manual_seed(0)
    base = [torch.randn(shape, device=device, generator=g).to(dtype) for _ in range(3)]

    def make(fn):
        def fwd():
            return fn(*base, alpha)[0].sum()

        leaves = [t.clone().requires_grad_(True) for t in base]
        out = fn(*leaves, alpha)[0].sum()

        def bwd():
            torch.autograd.grad(out, leaves, retain_graph=True)

        def both():
            ls = [t.clone().requires_grad_(True) for t in base]
            torch.autograd.grad(fn(*ls, alpha)[0].sum(), ls)

        return dict(fwd=fwd, bwd=bwd, **{"fwd+bwd": both})

    compiled = torch.compile(lambda x, r, f, a: sid_loss_rows_ref(x, r, f, a))
    providers = {"triton": make(sid_loss_rows), "torch": make(sid_loss_rows_ref)}
    if device.type == "cuda":
        providers["torch.compile"] = make(compiled)
    n = base[0].numel() * base[0].element_size()
    nbytes = {"fwd": 3 * n, "bwd": 6 * n, "fwd+bwd": 9 * n}
    return providers, nbytes


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", choices=sorted(SHAPES), default=None)
    ap.add_argument("--dtypes", default=None, help="comma list of fp32,bf16,fp16")
    ap.add_argument("--out", default="kernels.jsonl")
    a = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = SHAPES[a.shapes or ("official" if device.type == "cuda" else "tiny")]
    names = (a.dtypes or ("fp32,bf16" if device.type == "cuda" else "fp32")).split(",")
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    env = environment()
    copy_gbs = copy_bandwidth(device)
    records = []
    print(f"{env['device']}: device-to-device copy {copy_gbs:.0f} GB/s")
    print(f"{'op':<9} {'shape':<22} {'dtype':<5} {'mode':<8} {'provider':<14} {'ms p50':>9} {'GB/s':>8} {'of copy':>8} {'speed-up':>9}")
    for label, shape in shapes:
        for dname in names:
            providers, nbytes = sid_loss_cases(shape, dtypes[dname], device)
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
                    rec = dict(bench="kernels", op="sid_loss", provider=prov, mode=mode, shape=list(shape), shape_name=label,
                               dtype=dname, ms_p50=p50, ms_p20=p20, ms_p80=p80, gb_s=gbs, copy_gb_s=copy_gbs,
                               frac_of_copy=gbs / copy_gbs, speedup_vs_eager=base_ms / p50, **env)
                    records.append(rec)
                    print(f"{'sid_loss':<9} {str(shape):<22} {dname:<5} {mode:<8} {prov:<14} {p50:>9.4f} {gbs:>8.1f} "
                          f"{gbs / copy_gbs:>8.1%} {base_ms / p50:>8.2f}x")
    path = write_jsonl(records, a.out)
    print(f"-> {path}")


if __name__ == "__main__":
    main()
