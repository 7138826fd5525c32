"""Few-step SiD on the EDM and Stable Diffusion digits teachers: a K-step generator (sid_fast.fewstep) against the
one-step generator of the same preset, each sampled with 1, 2 and 4 steps.

No official code trains few-step SiD generators for EDM or Stable Diffusion teachers; sid_fast's levels
(sid_fast.fewstep: flow matching's law t_i = t_init (1 - i / K) through sigma = t / (1 - t) for EDM, on the timestep
index for Stable Diffusion) are its own choice, and this study is what it measured of them on the bundled digits:

    python -m studies.fewstep_digits.study run --outdir runs/fewstep --jobs 2
    python -m studies.fewstep_digits.study collect runs/fewstep/*

`run` starts `train.py --preset P --generator-steps K --seed S` for P in digits (EDM, 48 kimg) and digits-lsg (Stable
Diffusion, 8 kimg), K in 1 and 4, the seeds given. `collect` evaluates each run's last generator folder with the
public samplers (sid_fast.sampling.generator_sample; sid_fast.t2i.export.generator_latents) at 1, 2 and 4 steps on
--num images (seeds 10,000,000 + i; digits-lsg: the prompt naming digit i % 10, FD-digits and prompt accuracy) and
writes one JSON line per (run, sampling steps) to results/fewstep_digits.jsonl beside this file.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from studies.runs import last_snapshot, run_train_jobs, train_wall_s

RESULTS = Path(__file__).resolve().parent / "results"
PRESETS = ("digits", "digits-lsg")
TRAIN_STEPS = (1, 4)
SAMPLE_STEPS = (1, 2, 4)


def evaluate_edm(snap: Path, steps: int, num: int) -> dict:
    """FD-digits of an EDM generator folder's images sampled with `steps` steps."""
    import torch

    from sid_fast.checkpoints import load_network_file
    from sid_fast.metrics.digits import fd_digits
    from sid_fast.sampling import generator_sample, latents_and_labels

    net, info = load_network_file(snap)
    meta, seeds, out = info["meta"], list(range(10_000_000, 10_000_000 + num)), []
    with torch.no_grad():
        for i in range(0, num, 500):
            z, labels, rnd = latents_and_labels(net, seeds[i : i + 500])
            out.append(generator_sample(net, z, meta["sigma_init"], labels, steps, meta["noise_type"], rnd.randn_like))
    return {"fd_digits": fd_digits(torch.cat(out))}


def evaluate_sd(snap: Path, teacher: str, steps: int, num: int) -> dict:
    """FD-digits and prompt accuracy of a Stable Diffusion generator folder's images sampled with `steps` steps."""
    import torch

    from sid_fast.t2i import digits
    from sid_fast.t2i.export import generator_latents, load_unet_folder, seed_noises
    from sid_fast.t2i.sd import load_sd

    unet, meta = load_unet_folder(snap)
    sd = load_sd(teacher, unet=False)
    prompts, labels = digits.eval_prompts(num)
    seeds, out = list(range(10_000_000, 10_000_000 + num)), []
    shape = [unet.config.in_channels, unet.config.sample_size, unet.config.sample_size]
    for i in range(0, num, 500):
        z, noises = seed_noises(seeds[i : i + 500], shape, steps)
        cond = sd.encode_text(prompts[i : i + 500], "cpu")
        out.append(generator_latents(unet, sd.schedule, z, cond, meta["init_timestep"], steps, meta["noise_type"],
                                     noises))  # fmt: skip
    return digits.score_images(digits.decode_images(sd.vae, torch.cat(out)), labels)


@click.group(context_settings=dict(help_option_names=["-h", "--help"], max_content_width=120))
def main():
    """Few-step SiD on the EDM and Stable Diffusion digits teachers (see the module docstring)."""


@main.command("run")
@click.option("--outdir", required=True, metavar="DIR", help="Where the run directories go")
@click.option("--presets", default=",".join(PRESETS), show_default=True)
@click.option("--seeds", default="0", show_default=True)
@click.option("--jobs", type=click.IntRange(min=1), default=1, show_default=True, help="Runs at a time")
@click.option("--extra", default="", help="More train.py flags for every run, e.g. '--duration 0.016'")
def run_cmd(outdir, presets, seeds, jobs, extra):
    """One train.py run per (preset, K, seed)."""
    runs = []
    for preset in presets.split(","):
        for k in TRAIN_STEPS:
            for seed in map(int, seeds.split(",")):
                args = ["--preset", preset, "--generator-steps", str(k), "--seed", str(seed), *extra.split()]
                runs.append((f"{preset}-k{k}-seed{seed}", args))
    run_train_jobs(runs, outdir, jobs, "studies.fewstep_digits.study")


@main.command("collect")
@click.argument("runs", nargs=-1)
@click.option("--num", type=click.IntRange(min=10), default=2000, show_default=True, help="Images per evaluation")
@click.option("--out", default="fewstep_digits.jsonl", show_default=True)
def collect_cmd(runs, num, out):
    """Evaluate each run's last snapshot at 1, 2 and 4 steps; write the JSON lines."""
    from bench.common import environment, write_jsonl

    dirs = [Path(p) for p in runs if Path(p).is_dir()]
    if not dirs:
        raise SystemExit("studies.fewstep_digits.study collect: give run directories.")
    env, recs = environment(), []
    for run in dirs:
        opts = json.loads((run / "training_options.json").read_text())
        snap = last_snapshot(run)
        for steps in SAMPLE_STEPS:
            t0 = time.time()
            if opts["preset"] == "digits":
                scores = evaluate_edm(snap, steps, num)
            else:
                scores = evaluate_sd(snap, opts["teacher"], steps, num)
            rec = dict(
                bench="fewstep_digits", run=run.name, preset=opts["preset"], train_steps=opts["generator_steps"],
                sample_steps=steps, seed=opts["seed"], snapshot=snap.name, kimg=int(snap.name.split("-")[-1]) / 1e3,
                num=num, **scores, train_wall_s=train_wall_s(run),
                settings={k: opts.get(k) for k in ("batch", "lr", "glr", "alpha", "ema", "duration", "noise_type",
                                                   "init_sigma", "init_timestep", "cfg_eval_real")},
            )  # fmt: skip
            recs.append(rec)
            acc = f", prompt accuracy {scores['prompt_acc']:.3f}" if "prompt_acc" in scores else ""
            print(f"{run.name}: K {rec['train_steps']} sampled at {steps} steps: FD-digits {scores['fd_digits']:.2f}"
                  f"{acc} ({time.time() - t0:.0f} s)", flush=True)  # fmt: skip
    path = write_jsonl([dict(r, **env) for r in recs], out, results=RESULTS)
    print(f"-> {path}")


@main.command("table")
@click.option("--jsonl", default=str(RESULTS / "fewstep_digits.jsonl"), show_default=True)
def table_cmd(jsonl):
    """The recorded evaluations as a markdown table: FD-digits (/ prompt accuracy) per (preset, K, seed) and
    sampling steps."""
    recs = [json.loads(x) for x in Path(jsonl).read_text().splitlines() if x.strip()]
    steps = sorted({r["sample_steps"] for r in recs})
    lines = ["| preset | trained K | seed | kimg | " + " | ".join(f"{s} step{'s' * (s > 1)}" for s in steps) + " |",
             "|" + "---|" * (len(steps) + 4)]  # fmt: skip
    for key in sorted({(r["preset"], r["train_steps"], r["seed"]) for r in recs}):
        rows = {r["sample_steps"]: r for r in recs if (r["preset"], r["train_steps"], r["seed"]) == key}

        def cell(r):
            return f"{r['fd_digits']:.2f}" + (f" / {r['prompt_acc']:.3f}" if "prompt_acc" in r else "")

        cells = " | ".join(cell(rows[s]) if s in rows else "-" for s in steps)
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {rows[steps[0]]['kimg']:g} | {cells} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
