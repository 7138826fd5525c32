"""SiDA against SiD on the digits: FD-digits curves of G_ema at equal images seen, several seeds.

    for s in 0 1 2; do
      python3 train.py --preset digits --seed $s --desc sid-seed$s --outdir runs/sida-study
      python3 train.py --preset digits-sida --seed $s --desc sida-seed$s --outdir runs/sida-study
    done
    python -m studies.sida_digits.compare runs/sida-study/* --out sida_digits_8x8.jsonl \
        --png studies/sida_digits/results/sida_digits_8x8.png

Both presets share every SiD setting (teacher, batch 256, lr, EMA, 48 kimg, evaluations every 8 kimg on 2,000
samples); digits-sida adds the discriminator on the bundled digits with the official loss algebra and warm-ups scaled
to 1 and 2 kimg. Writes one JSON line per run (method, seed, the whole curve) to results/ beside this file (`--out`)
and, per method, the mean and spread of the final FD-digits over seeds; `--png` plots the curves (re-created from the
JSON lines with `--from-jsonl`). Runs are grouped by arm: SiD, SiDA at the official `--lsg-gan 0.01`, and SiDA with
another GAN weight. sida_digits.jsonl holds the study on a 16x16 digits teacher (12 kimg at batch 64),
sida_digits_8x8*.jsonl the ones on the 8x8 default, sida_digits_gan_weight.jsonl the GAN-weight study (lsg_gan 0.1
and 1.0), sida_digits_weak_teacher.jsonl SiD against SiDA distilling a deliberately weak teacher
(`python -m sid_fast.training.teacher --steps 200`, FD-digits 9.3, passed as `--teacher`).
"""

from __future__ import annotations

import json
import statistics
import types
from pathlib import Path

import click

from bench.common import command, environment, read_fd_digits_run, write_jsonl

RESULTS = Path(__file__).resolve().parent / "results"


def read_run(path) -> dict:
    p, opts, curve = read_fd_digits_run(path)
    method, lsg_gan = opts.get("method", "sid"), opts.get("lsg_gan")
    # The arm: SiD, SiDA at the official --lsg-gan 0.01, or SiDA with another GAN weight (the weight study).
    arm = method if method == "sid" or lsg_gan == 0.01 else f"sida lsg_gan {lsg_gan:g}"
    return dict(
        run=p.name,
        method=method,
        arm=arm,
        lsg_gan=lsg_gan,
        seed=opts["seed"],
        kimg=[r["kimg"] for r in curve],
        fd_digits=[r["fd_digits"] for r in curve],
        num=curve[-1].get("num"),
    )


def arm(r: dict) -> str:
    return r.get("arm", r["method"])  # records written before the weight study have no arm


def summary(runs: list[dict]) -> dict:
    out = {}
    for m in sorted({arm(r) for r in runs}):
        rs = [r for r in runs if arm(r) == m]
        finals = [r["fd_digits"][-1] for r in rs]
        last3 = [statistics.fmean(r["fd_digits"][-3:]) for r in rs]
        out[m] = dict(
            seeds=[r["seed"] for r in rs],
            final=finals,
            mean=statistics.fmean(finals),
            stdev=statistics.stdev(finals) if len(finals) > 1 else 0.0,
            last3=last3,
            last3_mean=statistics.fmean(last3),
            kimg=[r["kimg"][-1] for r in rs],
        )
    return out


def plot(runs, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=100)
    arms = sorted({arm(r) for r in runs})
    palette = ["tab:blue", "tab:red", "tab:orange", "tab:purple", "tab:green", "tab:brown"]
    colors = {"sid": "tab:blue", "sida": "tab:red"}
    for m in arms:
        colors.setdefault(m, palette[(len(colors)) % len(palette)])
    for r in runs:
        ax.plot(
            r["kimg"],
            r["fd_digits"],
            "o-" if r["method"] == "sid" else "s--",
            color=colors[arm(r)],
            alpha=0.8,
            label=f"{arm(r)} seed {r['seed']}",
        )
    ax.set_xlabel("images seen (kimg)")
    ax.set_ylabel("FD-digits of G_ema")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


@command(__doc__)
@click.argument("runs", nargs=-1)
@click.option("--png", help="plot of the curves")
@click.option("--out", default="sida_digits.jsonl", show_default=True)
@click.option(
    "--from-jsonl", "from_jsonl", help="re-create the plot from recorded JSON lines instead of run directories"
)
def main(**kw):
    a = types.SimpleNamespace(**kw)
    if a.from_jsonl:
        recs = [json.loads(line) for line in Path(a.from_jsonl).read_text().splitlines() if line.strip()]
        runs = [r for r in recs if r.get("bench") == "sida_digits"]
    else:
        if not a.runs:
            raise SystemExit("studies.sida_digits.compare: give run directories, or --from-jsonl FILE.")
        runs = [read_run(p) for p in a.runs]
        env = environment()
        s = summary(runs)
        path = write_jsonl(
            [dict(bench="sida_digits", **r, **env) for r in runs]
            + [dict(bench="sida_digits_summary", summary=s, **env)],
            a.out,
            results=RESULTS,
        )
        for m, v in s.items():
            print(
                f"{m}: final FD-digits {', '.join(f'{x:.2f}' for x in v['final'])} at kimg {v['kimg']} -> mean "
                f"{v['mean']:.2f} +- {v['stdev']:.2f}; mean of the last three evaluations {v['last3_mean']:.2f}"
            )
        print(f"-> {path}")
    if a.png:
        plot(runs, a.png)
        print(f"-> {a.png}")


if __name__ == "__main__":
    main()
