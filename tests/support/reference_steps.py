"""Three SiD steps of the reference path on the digits teacher, reduced to a digest of every parameter.

The teacher is the 16x16 digits teacher that was bundled when the digest was recorded (tests/data/digits16_teacher.pt;
the default now ships a native 8x8 one), so the pin still covers every change since.

Run in a fresh interpreter by tests/test_reference_steps.py under a recipe any x86-64 CPU reproduces bit for bit
(ATen's baseline kernels, oneDNN capped at SSE4.1, MKL's compatible mode, one thread), so that the digest recorded
before a refactoring can be asserted after it on another machine. Prints one JSON line: the SHA-256 of all
parameters (G, G_ema, fake score) in state_dict order, and per-tensor float64 sums for a readable diff.
"""

import hashlib
import json
import sys

import torch


def main() -> None:
    torch.set_num_threads(1)
    from pathlib import Path

    from sid_fast.training.config import resolve_config
    from sid_fast.training.run import build_trainer

    # The digits preset with dropout on, so that the dropout RNG is covered (the digits teacher has no augment labels).
    # The preset's SiD values as recorded: alpha 1.2, lr = glr = 1e-4, EMA 0.002 Mimg.
    teacher = Path(__file__).resolve().parents[1] / "data" / "digits16_teacher.pt"
    cfg = resolve_config(
        "digits",
        dict(
            teacher=str(teacher),
            resolution=16,
            batch=8,
            batch_gpu=4,
            metrics="none",
            augment=0.0,
            dropout=0.1,
            seed=7,
            alpha=1.2,
            lr=1e-4,
            glr=1e-4,
            ema=0.002,
        ),
    )
    tr = build_trainer(cfg, torch.device("cpu"), log=lambda *a: None)
    for _ in range(3):
        tr.step()
    h = hashlib.sha256()
    sums = {}
    for name, net in (("G", tr.G), ("G_ema", tr.G_ema), ("fake", tr.fake)):
        for k, v in net.state_dict().items():
            h.update(v.detach().contiguous().cpu().numpy().tobytes())
            sums[f"{name}.{k}"] = v.double().sum().item()
    print(json.dumps(dict(sha256=h.hexdigest(), stats=tr.stats.values.tolist(), sums=sums)))


if __name__ == "__main__":
    sys.exit(main())
