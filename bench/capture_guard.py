"""The capture guard over whole training steps (sid_fast.guard): findings per micro-batch and per step, for every
family and method on the fast path (bf16, fused Adam) and on the reference path, in one process and over two gloo
processes (DDP and FSDP2).

A step with R micro-batches per phase is guarded after a warm-up step, with R = 1 and R = 2: what grows with R is per
micro-batch, the rest per step. Findings are counted by (kind, what, sid_fast line).

    python -m bench.capture_guard            # appends to bench/results/capture_guard.jsonl
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from pathlib import Path

import click
import torch

from bench.common import command, environment, write_jsonl
from sid_fast.guard import CaptureGuard
from sid_fast.training.config import resolve_config
from sid_fast.training.run import build_trainer

FAST = dict(precision="bf16", optimizer="fused")
REFERENCE = dict(precision="fp32")
# case: (preset, extra flags, batch per micro-batch)
CASES = {
    "edm": ("digits", {}, 16),
    "edm2": ("digits-edm2", {}, 16),
    "sida": ("digits-sida", dict(sida_g_start_kimg=0.0, sida_gan_start_kimg=0.0), 16),
    "sd-lsg": ("digits-lsg", {}, 16),
}
GLOO = 2


def guarded(tr) -> Counter:
    tr.step()  # warm-up: constants are made on the device at their first use
    with CaptureGuard() as g:
        tr.step()
    return Counter(str(f) for f in g.failures())


def split(by_rounds: dict[int, Counter]) -> tuple[dict, dict]:
    """(per micro-batch, per step) from the counts of steps with 1 and 2 micro-batches per phase."""
    one, two = by_rounds[1], by_rounds[2]
    per_mb = {k: two[k] - one[k] for k in two if two[k] > one[k]}
    per_step = {k: one[k] - per_mb.get(k, 0) for k in one if one[k] > per_mb.get(k, 0)}
    return per_mb, per_step


def trainer(case: str, path: dict, rounds: int, augment: bool = False, **extra):
    if case == "edm-augment":
        from bench.memory import make_trainer

        return make_trainer("cifar10", 2, dict(path, **extra), "cpu", rounds=rounds, augment=augment)
    preset, flags, b = CASES[case]
    world = extra.pop("world", 1)
    cfg = resolve_config(preset, dict(flags, **path, **extra, batch=b * rounds * world, batch_gpu=b, metrics="none"))
    return build_trainer(cfg, torch.device("cpu"), log=lambda *a: None)


def one_process(case: str, path_name: str) -> dict:
    path = FAST if path_name == "fast" else REFERENCE
    counts = {r: guarded(trainer(case, path, r, augment=case == "edm-augment")) for r in (1, 2)}
    per_mb, per_step = split(counts)
    return dict(case=case, path=path_name, processes=1, per_micro_batch=per_mb, per_step=per_step)


def _worker(rank: int, port: int, out_dir: str, mode: str) -> None:
    import torch.distributed as dist

    from sid_fast import dist as sid_dist

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(GLOO), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    sid_dist.init()
    try:
        counts = {}
        for rounds in (1, 2):
            tr = trainer("edm", dict(FAST, fsdp=mode == "fsdp"), rounds, world=GLOO)
            tr.step()  # DDP rebuilds its buckets after the first iteration
            counts[rounds] = guarded(tr)
        (Path(out_dir) / f"{mode}-{rank}.json").write_text(json.dumps({r: dict(c) for r, c in counts.items()}))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def gloo(mode: str) -> list[dict]:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(port, tmp, mode), nprocs=GLOO, join=True)
        out = []
        for rank in range(GLOO):
            raw = json.loads((Path(tmp) / f"{mode}-{rank}.json").read_text())
            per_mb, per_step = split({int(r): Counter(c) for r, c in raw.items()})
            out.append(dict(case=f"edm-{mode}", path="fast", processes=GLOO, rank=rank, per_micro_batch=per_mb,
                            per_step=per_step))  # fmt: skip
        return out


@command(__doc__)
@click.option("--out", default="capture_guard.jsonl", show_default=True, help="JSON lines appended in bench/results")
@click.option("--parallel/--no-parallel", default=True, show_default=True, help="Also DDP and FSDP2 over gloo")
def main(out, parallel):
    env = environment()
    records = []
    for case in [*CASES, "edm-augment"]:
        for path_name in ("fast", "reference"):
            rec = one_process(case, path_name)
            records.append({**rec, **env})
            print(f"{case:12s} {path_name:9s} per micro-batch {sum(rec['per_micro_batch'].values()):4d}, per step "
                  f"{sum(rec['per_step'].values()):4d}", flush=True)  # fmt: skip
    if parallel:
        for mode in ("ddp", "fsdp"):
            for rec in gloo(mode):
                records.append({**rec, **env})
                n_mb, n_step = sum(rec["per_micro_batch"].values()), sum(rec["per_step"].values())
                print(
                    f"{rec['case']:12s} rank {rec['rank']}  per micro-batch {n_mb:4d}, per step {n_step:4d}", flush=True
                )
    print(f"-> {write_jsonl(records, out)}")


if __name__ == "__main__":
    main()
