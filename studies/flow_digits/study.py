"""Few-step SiD on the flow-matching digits teacher: steps x guidance.

"Score Distillation of Flow Matching Models" (Zhou, Gu, Zheng et al., arXiv 2509.25127) distills flow-matching
teachers into four-step generators and reports that few-step sampling works from one to four steps. Here the stand-ins
of FID and CLIP score are FD-digits and prompt accuracy (sid_fast.t2i.digits.score_images) on the `digits-flow`
preset (sid_fast.t2i.digits_flow's teacher):

    python -m studies.flow_digits.study run --outdir runs/flow-digits --jobs 2
    python -m studies.flow_digits.study collect runs/flow-digits/*

`run` starts one `train.py --preset digits-flow --guidance KAPPA --generator-steps K` per (kappa, K), --jobs at a time
with the CPU threads split between them. `collect` evaluates each run's last snapshot (G_ema, the generator folder the
run wrote) with the public sampler (sid_fast.families.flow.sample_flow) at 1, 2 and 4 steps on --num images (image i
for the prompt naming digit i % 10, seed 10,000,000 + i, the runs' own evaluation protocol), and writes one JSON
line per (run, sampling steps) and the teacher's values (the pipeline's 28 Euler steps at the run's kappa, from the
teacher folder's teacher_metrics.json) to results/flow_digits.jsonl beside this file, and the same evaluation of the
generators' start (the teacher's own transformer sampled as a 1-, 2- and 4-step generator).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import click

from studies.runs import last_snapshot, run_train_jobs, train_wall_s

RESULTS = Path(__file__).resolve().parent / "results"
KAPPAS = (1.0, 1.5, 3.0)
TRAIN_STEPS = (1, 2, 4)
SAMPLE_STEPS = (1, 2, 4)


def evaluate_snapshot(snap: Path, teacher: str, steps: int, num: int) -> dict:
    """FD-digits and prompt accuracy of a flow generator folder's images at `steps` sampling steps."""
    import torch

    from sid_fast.families.flow import load_flow_generator, sample_flow
    from sid_fast.t2i import digits

    kind, meta = load_flow_generator(snap, teacher)
    prompts, labels = digits.eval_prompts(num)
    seeds = list(range(10_000_000, 10_000_000 + num))
    latents = torch.cat([sample_flow(kind, meta, prompts[i : i + 500], seeds[i : i + 500], "cpu", steps)
                         for i in range(0, num, 500)])  # fmt: skip
    return digits.score_images(digits.decode_images(kind.vae, latents), labels)


def teacher_rows(teacher: str) -> dict[float, dict]:
    from sid_fast.t2i.digits import TEACHER_METRICS

    path = Path(teacher) / TEACHER_METRICS
    rows = json.loads(path.read_text()).get("teacher", []) if path.is_file() else []
    return {float(r["kappa"]): r for r in rows}


@click.group(context_settings=dict(help_option_names=["-h", "--help"], max_content_width=120))
def main():
    """Steps x guidance of few-step SiD on the flow-matching digits teacher (see the module docstring)."""


@main.command("run")
@click.option("--outdir", required=True, metavar="DIR", help="Where the run directories go")
@click.option("--kappas", default=",".join(f"{k:g}" for k in KAPPAS), show_default=True)
@click.option("--train-steps", default=",".join(map(str, TRAIN_STEPS)), show_default=True, help="Generator steps K")
@click.option("--jobs", type=click.IntRange(min=1), default=1, show_default=True, help="Runs at a time")
@click.option("--extra", default="", help="More train.py flags for every run, e.g. '--duration 0.016'")
def run_cmd(outdir, kappas, train_steps, jobs, extra):
    """One train.py run per (kappa, K)."""
    runs = []
    for k in map(float, kappas.split(",")):
        for s in map(int, train_steps.split(",")):
            args = ["--preset", "digits-flow", "--guidance", f"{k:g}", "--generator-steps", str(s), *extra.split()]
            runs.append((f"kappa{k:g}-k{s}", args))
    run_train_jobs(runs, outdir, jobs, "studies.flow_digits.study")


@main.command("collect")
@click.argument("runs", nargs=-1)
@click.option("--num", type=click.IntRange(min=10), default=2000, show_default=True, help="Images per evaluation")
@click.option("--out", default="flow_digits.jsonl", show_default=True)
def collect_cmd(runs, num, out):
    """Evaluate each run's last snapshot at 1, 2 and 4 steps; write the JSON lines."""
    from bench.common import environment, write_jsonl

    dirs = [Path(p) for p in runs if Path(p).is_dir()]
    if not dirs:
        raise SystemExit("studies.flow_digits.study collect: give run directories.")
    env, recs = environment(), []
    for run in dirs:
        opts = json.loads((run / "training_options.json").read_text())
        teacher = teacher_rows(opts["teacher"]).get(float(opts["cfg_eval_real"]), {})
        snap = last_snapshot(run)
        for steps in SAMPLE_STEPS:
            t0 = time.time()
            scores = evaluate_snapshot(snap, opts["teacher"], steps, num)
            rec = dict(
                bench="flow_digits", run=run.name, kappa=opts["cfg_eval_real"], train_steps=opts["generator_steps"],
                sample_steps=steps, snapshot=snap.name, kimg=int(snap.name.split("-")[-1]) / 1e3, num=num, **scores,
                teacher_fd_digits=teacher.get("fd_digits"), teacher_prompt_acc=teacher.get("prompt_acc"),
                teacher_sampler=teacher.get("sampler"), train_wall_s=train_wall_s(run),
                settings={k: opts.get(k) for k in ("batch", "lr", "glr", "alpha", "ema", "duration", "noise_type",
                                                   "weighting", "init_timestep", "seed")},
            )  # fmt: skip
            recs.append(rec)
            print(f"{run.name}: K {rec['train_steps']} sampled at {steps} steps: FD-digits {scores['fd_digits']:.2f}, "
                  f"prompt accuracy {scores['prompt_acc']:.3f} ({time.time() - t0:.0f} s)", flush=True)  # fmt: skip
    # The generators' start: the teacher's own transformer sampled as a K-step generator (what SiD begins from).
    teacher = json.loads((dirs[0] / "training_options.json").read_text())["teacher"]
    with tempfile.TemporaryDirectory() as tmp:
        from sid_fast.families.flow import save_transformer_folder
        from sid_fast.t2i.sd3 import load_sd3

        start = save_transformer_folder(Path(tmp) / "start", load_sd3(teacher).transformer, init_timestep=999,
                                        noise_type="fresh", steps=4, resolution=8)  # fmt: skip
        for steps in SAMPLE_STEPS:
            scores = evaluate_snapshot(start, teacher, steps, num)
            recs.append(dict(bench="flow_digits_start", run="teacher weights (kimg 0)", sample_steps=steps, num=num,
                             **scores))  # fmt: skip
            print(f"start (the teacher's weights) at {steps} steps: FD-digits {scores['fd_digits']:.2f}, prompt "
                  f"accuracy {scores['prompt_acc']:.3f}", flush=True)  # fmt: skip
    path = write_jsonl([dict(r, **env) for r in recs], out, results=RESULTS)
    print(f"-> {path}")


@main.command("table")
@click.option("--jsonl", default=str(RESULTS / "flow_digits.jsonl"), show_default=True)
def table_cmd(jsonl):
    """The recorded evaluations as a markdown table: FD-digits / prompt accuracy per (kappa, K) and sampling steps."""
    recs = [json.loads(x) for x in Path(jsonl).read_text().splitlines() if x.strip()]
    steps = sorted({r["sample_steps"] for r in recs})
    head = "| kappa | trained K | " + " | ".join(f"{s} step{'s' * (s > 1)}" for s in steps) + " | teacher (Euler 28) |"
    lines = [head, "|" + "---|" * (len(steps) + 3)]
    start = {r["sample_steps"]: r for r in recs if r["bench"] == "flow_digits_start"}
    if start:
        cells = " | ".join(f"{start[s]['fd_digits']:.2f} / {start[s]['prompt_acc']:.3f}" for s in steps)
        lines.append(f"| - | start (teacher weights) | {cells} | - |")
    runs = sorted({(r["kappa"], r["train_steps"]) for r in recs if r["bench"] == "flow_digits"})
    for kappa, k in runs:
        rows = {
            r["sample_steps"]: r
            for r in recs
            if r["bench"] == "flow_digits" and (r["kappa"], r["train_steps"]) == (kappa, k)
        }
        cells = " | ".join(
            f"{rows[s]['fd_digits']:.2f} / {rows[s]['prompt_acc']:.3f}" if s in rows else "-" for s in steps
        )
        t = rows[steps[0]]
        teacher = f"{t['teacher_fd_digits']:.2f} / {t['teacher_prompt_acc']:.3f}" if t.get("teacher_fd_digits") else "-"
        lines.append(f"| {kappa:g} | {k} | {cells} | {teacher} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
