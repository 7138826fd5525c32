"""SiD iterations for Nsight Systems: warm-up outside the capture range, then N steps between cudaProfilerStart/Stop.

    nsys profile --capture-range=cudaProfilerApi --capture-range-end=stop --trace=cuda,nvtx,osrt,cudnn,cublas \
        -o prof/sid python profile/nsys_step.py --config cifar10 --batch-gpu 64 --precision bf16 --compile
    (or: profile/nsys.sh OUT_NAME [options])

NVTX ranges: sid/step (each iteration), sid/fake_score_step, sid/generator_step, and inside them sid/generator,
sid/teacher, sid/fake_score, sid/backward, sid/optimizer, sid/ema. The fast-path options are the trainer's own flags.
Warm-up (compilation, autotuning, CUDA graph capture) happens before the capture range opens, so the report shows
steady-state iterations only. Without CUDA it runs the steps and says that nothing was captured.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import click
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench/ is imported from the repository root

from bench.common import command  # noqa: E402
from bench.train_step import CONFIGS, make_trainer  # noqa: E402
from sid_fast.perf import annotate  # noqa: E402


@command(__doc__)
@click.option("--config", type=click.Choice(["digits", *CONFIGS]), default="cifar10", show_default=True)
@click.option("--batch-gpu", "batch_gpu", type=int, default=64, show_default=True)
@click.option("--warmup", type=int, default=3, show_default=True)
@click.option("--steps", type=int, default=5, show_default=True)
@click.option("--precision", type=click.Choice(["fp32", "fp16", "tf32", "bf16"]), default="fp32", show_default=True)
@click.option("--channels-last", "channels_last", is_flag=True)
@click.option("--compile", "compile", is_flag=True)
@click.option("--cuda-graphs", "cuda_graphs", is_flag=True)
@click.option("--kernels", default="none", show_default=True)
@click.option("--checkpointing", type=click.Choice(["none", "nets", "blocks"]), default="none", show_default=True)
@click.option("--optimizer", type=click.Choice(["adam", "foreach", "fused"]), default="adam", show_default=True)
def main(**kw):
    a = types.SimpleNamespace(**kw)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    options = dict(
        precision=a.precision,
        channels_last=a.channels_last,
        compile=a.compile,
        cuda_graphs="sites" if a.cuda_graphs else "none",
        kernels=a.kernels,
        checkpointing=a.checkpointing,
        optimizer=a.optimizer,
    )
    tr, _, _ = make_trainer(a.config, a.batch_gpu, device, **options)
    for _ in range(a.warmup):
        tr.step()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStart()
    for _ in range(a.steps):
        with annotate("sid/step"):
            tr.step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()
        print(f"Captured {a.steps} steps of {a.config} (batch {a.batch_gpu}, {options}).")
    else:
        print(f"Ran {a.steps} steps on the CPU; Nsight Systems captures CUDA only, so nothing was captured.")


if __name__ == "__main__":
    main()
