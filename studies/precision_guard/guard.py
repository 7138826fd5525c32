"""Quality guard for low precision: FD-digits curves of digits runs in different --precision, compared.

    python3 train.py --seed 1 --precision fp32 --desc fp32-seed1
    python3 train.py --seed 1 --precision bf16 --desc bf16-seed1
    python -m studies.precision_guard.guard runs/00000-fp32-seed1 runs/00001-bf16-seed1 --png guard.png

Writes one JSON line per run (precision, seed, the whole FD-digits curve) to results/precision_guard.jsonl beside this
file, a plot of the curves, and the verdict. The criterion: the mean FD-digits over the last `--window` evaluations of
every low-precision run lies within the reference (fp32) runs' band, widened by the run-to-run spread. With one fp32 run
the spread is estimated from its own evaluation-to-evaluation fluctuation in that window (its standard deviation),
which on the digits default is large: the curve oscillates by up to 4x between evaluations (README).
"""

from __future__ import annotations

import statistics
import types
from pathlib import Path

import click

from bench.common import command, environment, read_fd_digits_run, write_jsonl

RESULTS = Path(__file__).resolve().parent / "results"


def read_run(path) -> dict:
    p, opts, curve = read_fd_digits_run(path)
    return dict(
        run=p.name,
        precision=opts["precision"],
        seed=opts["seed"],
        kimg=[r["kimg"] for r in curve],
        fd_digits=[r["fd_digits"] for r in curve],
    )


def verdict(runs: list[dict], window: int) -> dict:
    tail = {r["run"]: r["fd_digits"][-window:] for r in runs}
    means = {k: statistics.fmean(v) for k, v in tail.items()}
    ref = [r["run"] for r in runs if r["precision"] == "fp32"]
    if not ref:
        raise SystemExit("precision_guard: no fp32 run to compare with.")
    ref_means = [means[k] for k in ref]
    if len(ref) > 1:
        spread = statistics.stdev(ref_means)
    else:
        spread = statistics.stdev(tail[ref[0]]) if len(tail[ref[0]]) > 1 else 0.0
    lo, hi = max(0.0, min(ref_means) - 2 * spread), max(ref_means) + 2 * spread
    checks = {r["run"]: lo <= means[r["run"]] <= hi for r in runs if r["precision"] != "fp32"}
    return dict(
        window=window,
        tail_means=means,
        reference_band=[lo, hi],
        spread=spread,
        spread_from="fp32 runs' tail means" if len(ref) > 1 else "the fp32 run's own tail fluctuation",
        within_band=checks,
        passed=all(checks.values()),
    )


def plot(runs, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=100)
    for r in runs:
        ax.plot(
            r["kimg"],
            r["fd_digits"],
            "o-" if r["precision"] == "fp32" else "s--",
            label=f"{r['precision']} seed {r['seed']}",
        )
    ax.set_xlabel("generator images seen (kimg)")
    ax.set_ylabel("FD-digits")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


@command(__doc__)
@click.argument("runs", nargs=-1, required=True)
@click.option("--window", type=int, default=4, show_default=True, help="last evaluations averaged per run")
@click.option("--png", help="plot of the curves")
@click.option("--out", default="precision_guard.jsonl", show_default=True)
def main(**kw):
    a = types.SimpleNamespace(**kw)
    runs = [read_run(p) for p in a.runs]
    v = verdict(runs, a.window)
    env = environment()
    path = write_jsonl(
        [dict(bench="precision_guard", **r, **env) for r in runs] + [dict(bench="precision_guard_verdict", **v, **env)],
        a.out,
        results=RESULTS,
    )
    if a.png:
        plot(runs, a.png)
    for r in runs:
        print(
            f"{r['run']}: {r['precision']} seed {r['seed']}: last {a.window} FD-digits {r['fd_digits'][-a.window :]} "
            f"-> mean {v['tail_means'][r['run']]:.2f}"
        )
    print(
        f"fp32 band {v['reference_band'][0]:.2f}..{v['reference_band'][1]:.2f} (2 x spread {v['spread']:.2f}, from "
        f"{v['spread_from']}); {'PASS' if v['passed'] else 'FAIL'} -> {path}"
    )


if __name__ == "__main__":
    main()
