"""The guidance (kappa) sweep of SiD-LSG on the text-to-image digits teacher: does the published direction hold?

SiD-LSG (ICLR 2025, Table 1) reports for SD 1.5 and SD 2.1-base that, with kappa1 = kappa2 = kappa4 = kappa, the CLIP
score (text alignment) rises with kappa while FID rises (gets worse) at large kappa. Here the stand-ins are prompt
accuracy (the digit classifier agrees with the prompt) and FD-digits, on the `digits-lsg` preset.

    python -m studies.lsg_kappa.sweep run --outdir runs/lsg-kappa --seeds 0,1,2 --jobs 2
    python -m studies.lsg_kappa.sweep collect runs/lsg-kappa/* --png studies/lsg_kappa/results/lsg_kappa.png
    python -m studies.lsg_kappa.sweep collect --from-jsonl studies/lsg_kappa/results/lsg_kappa.jsonl --png FILE.png

`run` starts one `train.py --preset digits-lsg --guidance K --seed S` per (kappa, seed), --jobs at a time with the
CPU threads split between them. `collect` writes one JSON line per run (kappa, seed, the FD-digits and prompt-accuracy
curves, wall time) and one summary line (per kappa: the final values, their mean and spread, and the teacher's own
values with 25-step DDIM at that kappa from the teacher folder's teacher_metrics.json) to results/lsg_kappa.jsonl
beside this file, and plots both metrics against kappa.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import click

from studies.runs import run_train_jobs, train_wall_s

RESULTS = Path(__file__).resolve().parent / "results"
KAPPAS = (1.0, 1.5, 2.0, 3.0, 4.5)


def read_curve(path: Path, key: str) -> list[dict]:
    f = path / f"metric-{key}.jsonl"
    rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()] if f.is_file() else []
    if not rows:
        raise SystemExit(f"{path}: no {key} evaluations in {f.name}.")
    return rows


def read_run(path) -> dict:
    """A digits-lsg run directory as one record."""
    p = Path(path)
    opts = json.loads((p / "training_options.json").read_text())
    fd, acc = read_curve(p, "fd_digits"), read_curve(p, "prompt_acc")
    return dict(
        run=p.name,
        kappa=opts["cfg_eval_real"],
        guidance=[opts["cfg_train_fake"], opts["cfg_eval_fake"], opts["cfg_eval_real"]],
        seed=opts["seed"],
        preset=opts.get("preset"),
        teacher=opts.get("teacher"),
        settings={k: opts.get(k) for k in ("batch", "lr", "glr", "alpha", "ema", "duration", "metric_num")},
        kimg=[r["kimg"] for r in fd],
        fd_digits=[r["fd_digits"] for r in fd],
        prompt_acc=[r["prompt_acc"] for r in acc],
        wall_s=train_wall_s(p),
    )


def teacher_rows(teacher: str | None) -> dict[float, dict]:
    from sid_fast.t2i.digits import FOLDER, TEACHER_METRICS

    path = Path(teacher or FOLDER) / TEACHER_METRICS
    rows = json.loads(path.read_text()).get("teacher", []) if path.is_file() else []
    return {float(r["kappa"]): r for r in rows}


def summary(runs: list[dict], teacher: dict[float, dict]) -> dict:
    out = {}
    for k in sorted({r["kappa"] for r in runs}):
        rs = sorted((r for r in runs if r["kappa"] == k), key=lambda r: r["seed"])
        fd, acc = [r["fd_digits"][-1] for r in rs], [r["prompt_acc"][-1] for r in rs]
        t = teacher.get(float(k), {})
        out[f"{k:g}"] = dict(
            kappa=k,
            seeds=[r["seed"] for r in rs],
            kimg=rs[0]["kimg"][-1],
            fd_digits=fd,
            prompt_acc=acc,
            fd_mean=statistics.fmean(fd),
            fd_sd=statistics.stdev(fd) if len(fd) > 1 else 0.0,
            acc_mean=statistics.fmean(acc),
            acc_sd=statistics.stdev(acc) if len(acc) > 1 else 0.0,
            teacher_fd_digits=t.get("fd_digits"),
            teacher_prompt_acc=t.get("prompt_acc"),
            teacher_sampler=t.get("sampler"),
        )
    return out


def plot(s: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(s.values(), key=lambda x: x["kappa"])
    ks = [x["kappa"] for x in rows]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), dpi=100)
    for ax, key, mean, name in (
        (axes[0], "fd_digits", "fd_mean", "FD-digits (lower is better)"),
        (axes[1], "prompt_acc", "acc_mean", "prompt accuracy"),
    ):
        for x in rows:
            ax.plot([x["kappa"]] * len(x[key]), x[key], "o", color="C0", ms=3, alpha=0.5)
        ax.plot(ks, [x[mean] for x in rows], "o-", color="C0", label="SiD-LSG one step (G_ema; mean, seeds)")
        tk = [(x["kappa"], x[f"teacher_{key}"]) for x in rows if x.get(f"teacher_{key}") is not None]
        if tk:
            sampler = rows[0].get("teacher_sampler") or "teacher"
            ax.plot(*zip(*tk), "s--", color="gray", label=f"teacher ({sampler})")
        ax.set_xlabel("kappa (= kappa1 = kappa2 = kappa4)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[1].legend(fontsize=7)
    fig.suptitle(f"digits-lsg at {rows[0]['kimg']:.1f} kimg", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


@click.group(context_settings=dict(help_option_names=["-h", "--help"], max_content_width=120))
def main():
    """The SiD-LSG guidance sweep on the text-to-image digits teacher (see the module docstring)."""


@main.command("run")
@click.option("--outdir", required=True, metavar="DIR", help="Where the run directories go")
@click.option("--kappas", default=",".join(f"{k:g}" for k in KAPPAS), show_default=True)
@click.option("--seeds", default="0,1,2", show_default=True)
@click.option("--jobs", type=click.IntRange(min=1), default=1, show_default=True, help="Runs at a time")
@click.option("--extra", default="", help="More train.py flags for every run, e.g. '--duration 0.008'")
def run_cmd(outdir, kappas, seeds, jobs, extra):
    """One train.py run per (kappa, seed)."""
    runs = []
    for k in map(float, kappas.split(",")):
        for s in map(int, seeds.split(",")):
            args = ["--preset", "digits-lsg", "--guidance", f"{k:g}", "--seed", str(s), *extra.split()]
            runs.append((f"kappa{k:g}-seed{s}", args))
    run_train_jobs(runs, outdir, jobs, "studies.lsg_kappa.sweep")


@main.command("collect")
@click.argument("runs", nargs=-1)
@click.option("--png", help="plot of both metrics against kappa")
@click.option("--out", default="lsg_kappa.jsonl", show_default=True)
@click.option("--from-jsonl", "from_jsonl", help="re-create the plot from recorded JSON lines")
def collect_cmd(runs, png, out, from_jsonl):
    """Read the run directories (or recorded lines), write the JSON lines and the plot."""
    from bench.common import environment, write_jsonl

    if from_jsonl:
        recs = [json.loads(line) for line in Path(from_jsonl).read_text().splitlines() if line.strip()]
        s = next(r["summary"] for r in recs if r.get("bench") == "lsg_kappa_summary")
    else:
        dirs = [p for p in runs if Path(p).is_dir()]
        if not dirs:
            raise SystemExit("studies.lsg_kappa.sweep collect: give run directories, or --from-jsonl FILE.")
        recs = [read_run(p) for p in dirs]
        teachers = {r["teacher"] for r in recs}
        if len(teachers) != 1:
            raise SystemExit(f"studies.lsg_kappa.sweep: the runs have different teachers ({sorted(teachers)}).")
        s = summary(recs, teacher_rows(teachers.pop()))
        env = environment()
        path = write_jsonl(
            [dict(bench="lsg_kappa", **r, **env) for r in recs] + [dict(bench="lsg_kappa_summary", summary=s, **env)],
            out,
            results=RESULTS,
        )
        for k, x in s.items():
            print(
                f"kappa {k:>4}: FD-digits {x['fd_mean']:7.2f} +- {x['fd_sd']:5.2f}, prompt accuracy "
                f"{x['acc_mean']:.3f} +- {x['acc_sd']:.3f} ({len(x['seeds'])} seeds, {x['kimg']:.1f} kimg); teacher "
                f"{x['teacher_fd_digits']}, {x['teacher_prompt_acc']}"
            )
        print(f"-> {path}")
    if png:
        plot(s, png)
        print(f"-> {png}")


if __name__ == "__main__":
    main()
