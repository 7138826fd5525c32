"""Render benchmark results (JSON lines from bench/kernels.py, train_step.py, static.py or memory.py) as markdown and
a PNG plot (kernels and training-step ladders).

    python -m bench.report bench/results/kernels.jsonl --md bench/results/kernels.md --png bench/results/kernels.png
    python -m bench.report bench/results/train_step.jsonl --md ladder.md --png ladder.png

Training-step ladders: one row per rung with img/s, the speed-up over the reference rung, MFU, warm-up time, peak
memory and peak memory per image relative to the reference; the plot shows img/s and MFU per rung.

The table has one row per (op, shape, dtype, mode, provider): median ms with the 20th-80th percentile range, GB/s and
the fraction of the copy bandwidth measured in the same run (memory-bound ops) or TFLOP/s and peak memory
(attention), and the speed-up over the eager reference (and, for attention, over the best SDPA backend). The plot
shows the fwd+bwd speed-up over the eager reference per shape and provider, one panel per op. When the file holds
several runs, only the last one (records sharing the last record's timestamp) is rendered.
"""

from __future__ import annotations

import json
import math
import types
from collections import defaultdict
from pathlib import Path

import click

from bench.common import command


def load(path) -> list[dict]:
    recs = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    recs = [r for r in recs if r.get("bench") in ("kernels", "train_step", "static", "memory")]
    if not recs:
        raise SystemExit(f"{path}: no benchmark records (bench 'kernels', 'train_step', 'static' or 'memory').")
    kind = recs[-1]["bench"]
    recs = [r for r in recs if r["bench"] == kind]
    last = recs[-1].get("timestamp")  # environment() stamps every record of one run with the same time
    return [r for r in recs if r.get("timestamp") == last]


def _fmt(x, spec):
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def ladder_markdown(recs: list[dict]) -> str:
    env = recs[0]
    ref = next((r for r in recs if r["mode"] == "reference" and "error" not in r), None)
    out = [
        f"Training-step ladder, {env['config']} at micro-batch {env['batch_gpu']}, on {env.get('device', '?')} "
        f"(torch {env.get('torch', '?')}, triton {env.get('triton', '?')}, commit "
        f"{str(env.get('git_commit', '?'))[:10]})",
        "",
        "| rung | img/s | vs reference | MFU | ceiling TFLOP/s | warm-up s | peak GB | peak/img vs reference |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in recs:
        if "error" in r:
            out.append(f"| {r['mode']} | failed: {r['error'][:80]} | | | | | | |")
            continue
        vs = r["img_per_s"] / ref["img_per_s"] if ref else float("nan")
        mem = (
            r["peak_mem_gb_per_img"] / ref["peak_mem_gb_per_img"]
            if ref and r.get("peak_mem_gb_per_img") and ref.get("peak_mem_gb_per_img")
            else None
        )
        out.append(
            f"| {r['mode']} | {_fmt(r['img_per_s'], '.1f')} | {_fmt(vs, '.2f')}x | {_fmt(r['mfu'], '.1%')} | "
            f"{_fmt(r['matmul_ceiling_tflops'], '.1f')} ({r.get('matmul_ceiling_dtype', '?')}) | "
            f"{_fmt(r['warmup_s'], '.1f')} | {_fmt(r.get('peak_mem_gb'), '.2f')} | {_fmt(mem, '.2f')} |"
        )
    return "\n".join(out)


def ladder_plot(recs: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in recs if "error" not in r]
    fig, ax = plt.subplots(figsize=(7, 3.8), dpi=100)
    xs = range(len(ok))
    ax.bar(xs, [r["img_per_s"] for r in ok], color="tab:blue")
    ax.set_xticks(list(xs))
    ax.set_xticklabels([r["mode"] for r in ok], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("img/s")
    ax2 = ax.twinx()
    ax2.plot(list(xs), [100 * r["mfu"] for r in ok], "o-", color="tab:red")
    ax2.set_ylabel("MFU (%)", color="tab:red")
    ax.set_title(f"SiD training step: {ok[0]['config'] if ok else ''}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def static_markdown(recs: list[dict]) -> str:
    """One row per (kernel, dtype, layout) over the official shapes: configurations listed and kept by the prune,
    kept ones that compile, fit shared memory and spill nothing, the worst kept registers / shared memory, the worst
    spill among listed-but-pruned ones, and the instructions the kept ones use."""
    env = recs[0]
    arch = env.get("arch")
    out = [
        f"Static survey for sm_{arch} (shared memory limit {env.get('smem_limit', 0) // 1024} KB per block), triton "
        f"{env.get('triton', '?')}, commit {str(env.get('git_commit', '?'))[:10]}: {len(recs)} cases, "
        f"{sum(1 for r in recs if not r.get('same_binary_as') and not r.get('routed'))} distinct compiles, "
        f"{sum(r.get('compile_s', 0) for r in recs):.0f} s of compile time",
        "",
        "| kernel | dtype | layout | shapes | kept / listed | kept clean | max regs | max shared KB | "
        "pruned: worst spill B / shared KB | MMA | cp.async | ld.v4 | scalar 16-bit loads |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    groups = defaultdict(list)
    for r in recs:
        groups[(r["kernel"], r["dtype"], r["layout"])].append(r)
    for (kern, dt, layout), rows in groups.items():
        shapes = len({r["shape"] for r in rows})
        if all(r.get("routed") for r in rows):
            out.append(
                f"| attention (all) | {dt} | {layout} | {shapes} | routed to {rows[0]['routed']} | | | | | | | | |"
            )
            continue
        kept = [r for r in rows if r["kept"]]
        pruned = [r for r in rows if not r["kept"] and r.get("ok")]
        clean = [r for r in kept if r.get("ok") and r.get("fits") and r.get("spills") == 0]
        ok_kept = [r for r in kept if r.get("ok")]
        mx = lambda xs, k: max((x.get(k) or 0 for x in xs), default=0)  # noqa: E731
        mma = sorted({r["mma"] for r in ok_kept})
        out.append(
            f"| {kern} | {dt} | {layout} | {shapes} | {len(kept)} / {len(rows)} | {len(clean)} / {len(kept)} | "
            f"{mx(ok_kept, 'registers')} | {mx(ok_kept, 'shared') / 1024:.0f} | "
            f"{mx(pruned, 'spills') if pruned else '-'} / {mx(pruned, 'shared') / 1024:.0f} | "
            f"{', '.join(mma) or '-'} | "
            f"{'yes' if any(r.get('cp_async') for r in ok_kept) else 'no'} | "
            f"{'yes' if any(r.get('ld_v4') for r in ok_kept) else 'no'} | "
            f"{'yes' if any(r.get('ld_b16_scalar') for r in ok_kept) else 'no'} |"
        )
    return "\n".join(out)


def memory_markdown(recs: list[dict]) -> str:
    """bench.memory: per config and rung, the generator phase's bytes per image against the reference rung."""
    MiB, GiB = 2**20, 2**30
    rows = [
        "| config | rung | generator held MiB/img | vs reference | saved (hooks) MiB/img | backward peak MiB/img "
        "+ per batch | fake-score phase held MiB/img | step GFLOP/img | recompute FLOPs | static GiB | batch-gpu fits "
        "80 / 141 GB | with FSDP x8 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in recs:
        g, f, d = r["generator"], r["fake_score"], r.get("derived", {})
        ratio = (d.get("held_vs_reference") or {}).get("generator")
        fits = d.get("batch_gpu_fits", {})
        sharded = d.get("batch_gpu_fits_fsdp", {})
        gflop = d.get("step_flops_per_image", float("nan")) / 1e9
        rows.append(
            f"| {r['config']} | {r['mode']} | {g['held']['per_image'] / MiB:.1f} | {_fmt(ratio, '.3f')}x | "
            f"{g['saved']['per_image'] / MiB:.1f} | {g['bwd_peak']['per_image'] / MiB:.1f} + "
            f"{g['bwd_peak']['intercept'] / MiB:.0f} | {f['held']['per_image'] / MiB:.1f} | {gflop:.1f} | "
            f"{_fmt(100 * d.get('recompute_flops_fraction', float('nan')), '.1f')}% | "
            f"{r['static']['total'] / GiB:.2f} | {fits.get('80GB', 'n/a')} / {fits.get('141GB', 'n/a')} | "
            f"{sharded.get('80GB x8', 'n/a')} / {sharded.get('141GB x8', 'n/a')} |"
        )
    return "\n".join(rows)


def markdown(recs: list[dict]) -> str:
    if recs[0]["bench"] == "static":
        return static_markdown(recs)
    if recs[0]["bench"] == "memory":
        return memory_markdown(recs)
    if recs[0]["bench"] == "train_step":
        return ladder_markdown(recs)
    env = recs[0]
    out = [
        f"Kernel benchmarks on {env.get('device', '?')} (torch {env.get('torch', '?')}, triton "
        f"{env.get('triton', '?')}, "
        f"commit {str(env.get('git_commit', '?'))[:10]})",
        "",
    ]
    by_op = defaultdict(list)
    for r in recs:
        by_op[r["op"]].append(r)
    for op, rows in by_op.items():
        out.append(f"### {op}")
        out.append("")
        if op == "attention":
            out.append(
                "| shape | dtype | mode | provider | ms p50 (p20-p80) | TFLOP/s | peak MiB | vs edm | vs best SDPA |"
            )
            out.append("|---|---|---|---|---|---|---|---|---|")
            for r in rows:
                out.append(
                    f"| {r['shape_name']} {r['shape']} | {r['dtype']} | {r['mode']} | {r['provider']} | "
                    f"{_fmt(r['ms_p50'], '.4f')} ({_fmt(r['ms_p20'], '.4f')}-{_fmt(r['ms_p80'], '.4f')}) | "
                    f"{_fmt(r['tflops'], '.2f')} | {_fmt(r['peak_mem_mb'], '.1f')} | "
                    f"{_fmt(r['speedup_vs_edm'], '.2f')}x | {_fmt(r['speedup_vs_best_sdpa'], '.2f')}x |"
                )
        else:
            out.append("| shape | dtype | mode | provider | ms p50 (p20-p80) | GB/s | of copy | vs eager |")
            out.append("|---|---|---|---|---|---|---|---|")
            for r in rows:
                out.append(
                    f"| {r['shape_name']} {r['shape']} | {r['dtype']} | {r['mode']} | {r['provider']} | "
                    f"{_fmt(r['ms_p50'], '.4f')} ({_fmt(r['ms_p20'], '.4f')}-{_fmt(r['ms_p80'], '.4f')}) | "
                    f"{_fmt(r['gb_s'], '.1f')} | {_fmt(r['frac_of_copy'], '.1%')} | "
                    f"{_fmt(r['speedup_vs_eager'], '.2f')}x |"
                )
        out.append("")
    return "\n".join(out)


def plot(recs: list[dict], path) -> None:
    if recs[0]["bench"] in ("static", "memory"):
        raise SystemExit(f"bench.report: {recs[0]['bench']} results have no plot; use --md.")
    if recs[0]["bench"] == "train_step":
        return ladder_plot(recs, path)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in recs if r["mode"] == "fwd+bwd"]
    ops = list(dict.fromkeys(r["op"] for r in rows))
    fig, axes = plt.subplots(1, len(ops), figsize=(4.5 * len(ops), 3.8), dpi=100, squeeze=False)
    for ax, op in zip(axes[0], ops):
        sub = [r for r in rows if r["op"] == op]
        cases = list(dict.fromkeys(f"{r['shape_name']}\n{r['dtype']}" for r in sub))
        provs = list(dict.fromkeys(r["provider"] for r in sub))
        width = 0.8 / max(len(provs), 1)
        for i, p in enumerate(provs):
            ys = []
            for c in cases:
                hit = [r for r in sub if r["provider"] == p and f"{r['shape_name']}\n{r['dtype']}" == c]
                v = hit[0].get("speedup_vs_edm" if op == "attention" else "speedup_vs_eager") if hit else float("nan")
                ys.append(v)
            ax.bar([j + i * width for j in range(len(cases))], ys, width, label=p)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))])
        ax.set_xticklabels(cases, fontsize=7)
        ax.set_title(f"{op}: fwd+bwd")
        ax.set_ylabel("speed-up over eager reference")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


@command(__doc__)
@click.argument("results")
@click.option("--md", help="markdown file to write (default: print)")
@click.option("--png", help="plot to write")
def main(**kw):
    a = types.SimpleNamespace(**kw)
    recs = load(a.results)
    text = markdown(recs)
    if a.md:
        Path(a.md).write_text(text + "\n")
        print(f"-> {a.md}")
    else:
        print(text)
    if a.png:
        plot(recs, a.png)
        print(f"-> {a.png}")


if __name__ == "__main__":
    main()
