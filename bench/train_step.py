"""SiD training-step throughput: img/s, sec/kimg, MFU and peak memory of full SiD iterations.

    python -m bench.train_step --config cifar10 --batch-gpu 64 --steps 10
    python -m bench.train_step --config digits --batch-gpu 64 --steps 5          # the bundled teacher, CPU-sized

Configurations: `cifar10` (DDPM++ 32x32, 55.7 M parameters) and `imagenet64` (ADM, 295.9 M), both with random weights
in the official shapes, and `digits` (the bundled teacher). One iteration = fake-score step + generator step + EMA,
one micro-batch each (no accumulation). FLOPs per image = 11 forward-equivalents (shared/design.md "Ceilings"),
with the forward counted by torch.utils.flop_counter; MFU = achieved / matmul ceiling measured in the same run.
Only the reference path (fp32, TF32 off) exists so far; the fast modes join this ladder with the performance work.
Results are appended as JSON lines to bench/results/train_step.jsonl.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.common import environment, matmul_ceiling, sync, write_jsonl
from sid_fast.networks import build_network, official_config
from sid_fast.training.config import DIGITS_TEACHER_PATH, resolve_config
from sid_fast.training.sid import SiDTrainer

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


def make_trainer(name: str, batch_gpu: int, device):
    if name == "digits":
        cfg = resolve_config("digits", dict(batch=batch_gpu, batch_gpu=batch_gpu, metrics="none"))
        from sid_fast.checkpoints import load_network_file

        teacher, info = load_network_file(DIGITS_TEACHER_PATH)
        kwargs = info["init_kwargs"]
    else:
        stem, extra = CONFIGS[name]
        kwargs = dict(official_config(stem), use_fp16=False)
        teacher = build_network("EDMPrecond", kwargs)
        cfg = resolve_config("cifar10-uncond", dict(teacher=f"<random {stem}>", resolution=kwargs["img_resolution"],
                             label_dim=kwargs["label_dim"], batch=batch_gpu, batch_gpu=batch_gpu, **extra))
        info = dict(class_name="EDMPrecond", init_kwargs=kwargs, meta={})
    tr = SiDTrainer(cfg, device, None, log=lambda *a: None, teacher=teacher,
                    student=("EDMPrecond", kwargs, teacher.state_dict()), teacher_info=info)
    return tr, teacher, kwargs


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=["digits", *CONFIGS], default="cifar10")
    ap.add_argument("--batch-gpu", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", default="train_step.jsonl")
    a = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False  # the reference path, as the official code
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = True
    tr, teacher, kwargs = make_trainer(a.config, a.batch_gpu, device)
    flops_img = 11 * forward_flops_per_image(teacher, kwargs)
    t0 = time.perf_counter()
    for _ in range(a.warmup):
        tr.step()
    sync(device)
    warmup_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(a.steps):
        sync(device)
        t = time.perf_counter()
        tr.step()
        sync(device)
        times.append(time.perf_counter() - t)
    med = sorted(times)[len(times) // 2]
    ceiling = matmul_ceiling(device)
    img_s = a.batch_gpu / med
    rec = dict(
        bench="train_step", config=a.config, mode="reference-fp32", batch_gpu=a.batch_gpu, steps=a.steps,
        step_s=times, step_s_median=med, warmup_s=warmup_s, img_per_s=img_s, sec_per_kimg=1000 / img_s,
        flops_per_img=flops_img, achieved_tflops=flops_img * img_s / 1e12, matmul_ceiling_tflops=ceiling / 1e12,
        mfu=flops_img * img_s / ceiling,
        peak_mem_gb=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        **environment(),
    )
    path = write_jsonl([rec], a.out)
    print(f"{a.config} reference-fp32 batch {a.batch_gpu}: {img_s:.1f} img/s, {1000 / img_s:.1f} sec/kimg, "
          f"{rec['achieved_tflops']:.3f} TFLOP/s, MFU {rec['mfu'] * 100:.1f}% of a measured "
          f"{rec['matmul_ceiling_tflops']:.2f} TFLOP/s matmul; peak mem {rec['peak_mem_gb']} GB -> {path}")


if __name__ == "__main__":
    main()
