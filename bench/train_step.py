"""SiD training-step throughput: img/s, sec/kimg, MFU and peak memory of full SiD iterations.

    python -m bench.train_step --config cifar10 --batch-gpu 64 --steps 10
    python -m bench.train_step --config digits --batch-gpu 64 --steps 5          # the bundled teacher, CPU-sized

Configurations: `cifar10` (DDPM++ 32x32, 55.7 M parameters) and `imagenet64` (ADM, 295.9 M), both with random weights
in the official shapes, and `digits` (the bundled teacher). One iteration = fake-score step + generator step + EMA,
one micro-batch each (no accumulation). FLOPs per image = 11 forward-equivalents: G's forward for the fake-score step
(1), the fake score's forward and backward (3), the forwards of G, teacher and fake score (3), the input-gradient
backwards through teacher and fake score (2) and G's backward (2),
with the forward counted by torch.utils.flop_counter; MFU = achieved / matmul ceiling measured in the same run.
The ladder (`--rungs`, each on a fresh trainer in the same process, side by side):
    reference      fp32, TF32 off, EDM attention, official Adam and EMA (SiD's numerics)
    bf16           bf16 UNet bodies (fp32 master weights, losses, optimizer), bf16 teacher weights
    +channels_last NHWC activations and weights
    +fused_adam    fused Adam and foreach EMA
    +compile       torch.compile (Inductor) of every network call site
    +kernels       the Triton kernels (SiD/EDM losses, GroupNorm+SiLU, flash attention)
    +cuda_graphs   compile mode reduce-overhead (CUDA only)
    +checkpointing per-block activation checkpointing of the generator phase
    +step_graph    instead of the last three: the whole iteration captured as one CUDA graph (--cuda-graphs step)
Each rung reports warm-up time (compilation included) apart from the timed steps, img/s, MFU against the matmul
ceiling of its dtype measured in the same run (fp32 without TF32, or bf16), peak memory and peak memory per image.
Results are appended as JSON lines to bench/results/train_step.jsonl; `python -m bench.report` renders them.
"""

from __future__ import annotations

import time
import types

import click
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.common import command, environment, matmul_ceiling, sync, write_jsonl
from sid_fast.families import DIGITS_TEACHER_PATH, TeacherSpec
from sid_fast.networks import build_network, official_config
from sid_fast.training import graphs
from sid_fast.training.config import resolve_config
from sid_fast.training.run import build_trainer

CONFIGS = {
    "cifar10": ("edm-cifar10-32x32-uncond-vp", dict(augment=0.12, dropout=0.13)),
    "imagenet64": ("edm-imagenet-64x64-cond-adm", dict(augment=0.0, dropout=0.1, cond=True)),
}


def forward_flops_per_image(net, kwargs: dict) -> float:
    """Forward FLOPs (2 per MAC) of one image, counted on a meta-device copy of the network."""
    with torch.device("meta"):
        m = build_network(type(net).__name__, kwargs)
    x = torch.zeros(1, net.img_channels, net.img_resolution, net.img_resolution, device="meta")
    labels = torch.zeros(1, net.label_dim, device="meta") if net.label_dim else None
    with FlopCounterMode(display=False) as c:
        m(x, torch.ones(1, device="meta"), labels)
    return float(c.get_total_flops())


RUNGS = [
    ("reference", dict()),
    ("bf16", dict(precision="bf16")),
    ("+channels_last", dict(channels_last=True)),
    ("+fused_adam", dict(optimizer="fused")),
    ("+compile", dict(compile=True)),
    ("+kernels", dict(kernels="all")),
    ("+cuda_graphs", dict(cuda_graphs="sites")),
    ("+checkpointing", dict(checkpointing="blocks")),
    # Not cumulative: the +kernels rung's options with the whole iteration captured as one CUDA graph instead of
    # compiled call sites and their graphs (sid_fast.training.graphs); no checkpointing.
    ("+step_graph", dict(cuda_graphs="step", compile=False, checkpointing="none")),
]


def make_trainer(name: str, batch_gpu: int, device, **options):
    if name == "digits":
        cfg = resolve_config("digits", dict(batch=batch_gpu, batch_gpu=batch_gpu, metrics="none", **options))
        from sid_fast.checkpoints import load_network_file

        teacher, info = load_network_file(DIGITS_TEACHER_PATH)
        kwargs = info["init_kwargs"]
    else:
        stem, extra = CONFIGS[name]
        kwargs = dict(official_config(stem), use_fp16=False)
        teacher = build_network("EDMPrecond", kwargs)
        cfg = resolve_config(
            "cifar10-uncond",
            dict(
                teacher=f"<random {stem}>",
                resolution=kwargs["img_resolution"],
                label_dim=kwargs["label_dim"],
                batch=batch_gpu,
                batch_gpu=batch_gpu,
                metrics="none",
                **extra,
                **options,
            ),
        )
    tr = build_trainer(
        cfg,
        device,
        log=lambda *a: None,
        teacher=teacher,
        teacher_spec=TeacherSpec("EDMPrecond", kwargs, teacher.state_dict()),
    )
    return tr, teacher, kwargs


def run_rung(a, device, rung, options, ceilings, env):
    torch._dynamo.reset()
    tr, teacher, kwargs = make_trainer(a.config, a.batch_gpu, device, **options)
    flops_img = 11 * forward_flops_per_image(teacher, kwargs)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    # A whole-step graph is captured after its own eager warm-up iterations: the capture is warm-up, not timed.
    warm = max(a.warmup, graphs.WARMUP_DDP + 1 if options.get("cuda_graphs") == "step" else 0)
    for _ in range(warm):
        tr.step()
    sync(device)
    warmup_s = time.perf_counter() - t0
    times = []
    for _ in range(a.steps):
        sync(device)
        t = time.perf_counter()
        tr.step()
        sync(device)
        times.append(time.perf_counter() - t)
    med = sorted(times)[len(times) // 2]
    ceiling = ceilings["bf16" if options.get("precision") == "bf16" else "fp32"]
    img_s = a.batch_gpu / med
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return dict(
        bench="train_step",
        config=a.config,
        mode=rung,
        options=options,
        batch_gpu=a.batch_gpu,
        steps=a.steps,
        step_s=times,
        step_s_median=med,
        warmup_s=warmup_s,
        img_per_s=img_s,
        sec_per_kimg=1000 / img_s,
        flops_per_img=flops_img,
        achieved_tflops=flops_img * img_s / 1e12,
        matmul_ceiling_tflops=ceiling / 1e12,
        matmul_ceiling_dtype="bf16" if options.get("precision") == "bf16" else "fp32",
        mfu=flops_img * img_s / ceiling,
        peak_mem_gb=peak,
        peak_mem_gb_per_img=None if peak is None else peak / a.batch_gpu,
        **env,
    )


@command(__doc__)
@click.option("--config", type=click.Choice(["digits", *CONFIGS]), default="cifar10", show_default=True)
@click.option("--batch-gpu", "batch_gpu", type=int, default=64, show_default=True)
@click.option("--steps", type=int, default=10, show_default=True)
@click.option("--warmup", type=int, default=2, show_default=True)
@click.option("--rungs", default=None, help="comma list of ladder rungs (default: all on CUDA, reference on CPU)")
@click.option("--out", default="train_step.jsonl", show_default=True)
def main(**kw):
    a = types.SimpleNamespace(**kw)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True
    names = [r for r, _ in RUNGS]
    wanted = (a.rungs or (",".join(names) if device.type == "cuda" else "reference")).split(",")
    unknown = [w for w in wanted if w not in names]
    if unknown:
        raise SystemExit(f"--rungs: unknown {unknown}; the ladder is {names}.")
    torch.backends.cuda.matmul.allow_tf32 = False
    ceilings = {"fp32": matmul_ceiling(device, torch.float32), "bf16": matmul_ceiling(device, torch.bfloat16)}
    env = environment()
    options, records = {}, []
    for rung, delta in RUNGS:  # each rung adds its options to the previous ones (the ladder)
        options = {**options, **delta}
        if rung not in wanted:
            continue
        if options.get("cuda_graphs") and device.type != "cuda":
            print(f"{rung}: skipped (needs CUDA)")
            continue
        try:
            rec = run_rung(a, device, rung, dict(options), ceilings, env)
        except Exception as e:  # a rung that fails is recorded, the ladder goes on
            print(f"{rung}: failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
            rec = dict(
                bench="train_step",
                config=a.config,
                mode=rung,
                options=dict(options),
                batch_gpu=a.batch_gpu,
                error=f"{type(e).__name__}: {e}"[:2000],
                **env,
            )
        records.append(rec)
        if "error" not in rec:
            base = next((r for r in records if r["mode"] == "reference" and "error" not in r), None)
            vs = f", {rec['img_per_s'] / base['img_per_s']:.2f}x reference" if base else ""
            print(
                f"{a.config} {rung:<15} batch {a.batch_gpu}: {rec['img_per_s']:.1f} img/s{vs}, MFU "
                f"{rec['mfu'] * 100:.1f}% of {rec['matmul_ceiling_tflops']:.2f} TFLOP/s "
                f"({rec['matmul_ceiling_dtype']}), "
                f"warm-up {rec['warmup_s']:.1f} s, peak mem {rec['peak_mem_gb']} GB"
            )
    path = write_jsonl(records, a.out)
    print(f"-> {path}")


if __name__ == "__main__":
    main()
