"""The digits default as a study: FD-digits curves of short SiD runs, one setting changed at a time, several seeds.

    python3 train.py --seed 0 --desc base --outdir runs/digits-study            # one run per variant and seed
    python3 train.py --seed 0 --batch 128 --desc batch128 --outdir runs/digits-study
    python -m studies.digits_default.study runs/digits-study/* --png studies/digits_default/results/digits_study.png

Every run is a `train.py` run directory; its variant is its `--desc`. Writes one JSON line per run and evaluation
(variant, seed, the run's settings, kimg, FD-digits, wall seconds, img/s) and one summary line per variant to
results/digits_study.jsonl beside this file. The summary holds the two numbers the default is judged by ("as good as
its teacher, steadily"): the final FD-digits, and the worst ratio of an evaluation after the first 30% of the run to the
final value. `--png` plots the curves with the teacher's own FD-digits (Heun, 35 network evaluations);
`--from-jsonl` re-creates the plot from the recorded lines.
"""

from __future__ import annotations

import json
import re
import statistics
import types
from pathlib import Path

import click

from bench.common import command, environment, read_fd_digits_run, write_jsonl

RESULTS = Path(__file__).resolve().parent / "results"

# Settings recorded with each run (training_options.json keys).
SETTINGS = (
    "batch",
    "lr",
    "glr",
    "g_beta1",
    "alpha",
    "ema",
    "duration",
    "tmax",
    "init_sigma",
    "dropout",
    "metric_num",
    "teacher",
)


def steadiness(kimg: list[float], fd: list[float], skip: float = 0.3) -> float:
    """Largest FD / final FD over the evaluations after the first `skip` of the run (1.0 = never above the end)."""
    end = kimg[-1]
    late = [v for k, v in zip(kimg, fd) if k > skip * end]
    return max(late) / fd[-1]


def read_run(path) -> dict:
    p, opts, curve = read_fd_digits_run(path)
    # The run's last log line: "Finished at K kimg: W s wall time, R img/s overall (...)".
    m = re.search(r"Finished at [0-9.]+ kimg: ([0-9.]+) s wall time, ([0-9.]+) img/s", (p / "log.txt").read_text())
    wall, rate = (float(m.group(1)), float(m.group(2))) if m else (None, None)
    return dict(
        run=p.name,
        variant=opts.get("desc") or "default",
        seed=opts["seed"],
        settings={k: opts.get(k) for k in SETTINGS},
        kimg=[r["kimg"] for r in curve],
        fd_digits=[r["fd_digits"] for r in curve],
        num=curve[-1].get("num"),
        wall_s=wall,
        img_per_s=rate,
    )


def summary(runs: list[dict]) -> dict:
    out = {}
    for v in sorted({r["variant"] for r in runs}):
        rs = [r for r in runs if r["variant"] == v]
        finals = [r["fd_digits"][-1] for r in rs]
        out[v] = dict(
            seeds=[r["seed"] for r in rs],
            final=finals,
            mean=statistics.fmean(finals),
            worst=max(finals),
            steadiness=[steadiness(r["kimg"], r["fd_digits"]) for r in rs],
            kimg=rs[0]["kimg"][-1],
            wall_s=[r["wall_s"] for r in rs],
        )
    return out


def plot(runs, path, teacher=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = sorted({r["variant"] for r in runs})
    fig, axes = plt.subplots(1, len(variants), figsize=(3.2 * len(variants), 3.2), dpi=100, sharey=True, squeeze=False)
    for ax, v in zip(axes[0], variants):
        for r in (r for r in runs if r["variant"] == v):
            ax.plot(r["kimg"], r["fd_digits"], "o-", ms=3, alpha=0.8, label=f"seed {r['seed']}")
        if teacher:
            ax.axhline(teacher, color="k", ls="--", lw=1, label="teacher, Heun 35")
        ax.set_title(v, fontsize=9)
        ax.set_xlabel("kimg")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("FD-digits of G_ema")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def teacher_fd(runs) -> float | None:
    """The FD-digits (Heun, 35 NFE) stored in the runs' teacher file (all runs of a study share one teacher)."""
    from sid_fast.checkpoints import load_network_file
    from sid_fast.families import DIGITS_TEACHER_PATH

    teachers = {r["settings"].get("teacher") or str(DIGITS_TEACHER_PATH) for r in runs}
    if len(teachers) != 1:
        raise SystemExit(
            f"studies.digits_default.study: the runs have different teachers ({sorted(teachers)}); study one at a time."
        )
    return load_network_file(teachers.pop())[1]["meta"].get("fd_digits_heun35")


@command(__doc__)
@click.argument("runs", nargs=-1)
@click.option("--png", help="plot of the curves, one panel per variant")
@click.option("--out", default="digits_study.jsonl", show_default=True)
@click.option(
    "--from-jsonl", "from_jsonl", help="re-create the plot from recorded JSON lines instead of run directories"
)
def main(**kw):
    a = types.SimpleNamespace(**kw)
    if a.from_jsonl:
        recs = [json.loads(line) for line in Path(a.from_jsonl).read_text().splitlines() if line.strip()]
        runs = [r for r in recs if r.get("bench") == "digits_study"]
        teacher = next((r["teacher_fd_digits"] for r in recs if r.get("bench") == "digits_study_summary"), None)
    else:
        if not a.runs:
            raise SystemExit("studies.digits_default.study: give run directories, or --from-jsonl FILE.")
        runs = [read_run(p) for p in a.runs]
        env = environment()
        teacher = teacher_fd(runs)
        s = summary(runs)
        path = write_jsonl(
            [dict(bench="digits_study", **r, **env) for r in runs]
            + [dict(bench="digits_study_summary", summary=s, teacher_fd_digits=teacher, **env)],
            a.out,
            results=RESULTS,
        )
        print(f"teacher (Heun, 35 NFE): {teacher}")
        for v, x in s.items():
            print(
                f"{v:>24}: final {', '.join(f'{f:.2f}' for f in x['final'])} (mean {x['mean']:.2f}) at "
                f"{x['kimg']:.1f} kimg; worst late / final {', '.join(f'{q:.2f}' for q in x['steadiness'])}"
            )
        print(f"-> {path}")
    if a.png:
        plot(runs, a.png, teacher)
        print(f"-> {a.png}")


if __name__ == "__main__":
    main()
