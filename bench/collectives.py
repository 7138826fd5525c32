"""Collectives of one SiD iteration with two gloo processes (bench.overhead's `collectives` part).

    python -m bench.collectives                       # digits, DDP and FSDP2, bf16 and the reference

Each process builds the digits trainer as train.py would under torchrun (sid_fast.dist.init), warms up two
iterations (DDP rebuilds its buckets after the first), then runs one under torch.profiler. The collectives are its
c10d ops (whoever issues them: DDP's C++ reducer, FSDP2's hooks, the EMA, the trainer): kind, element count, bytes
(fp32: the trained parameters and gradients are fp32 in every rung), and the phase that issued them. A collective
issued inside an autograd engine event (a DDP bucket's all-reduce from a gradient hook, FSDP2's reduce-scatter after
a block's backward or its all-gather before one) is issued while backward runs, which is what lets NCCL hide it
behind the remaining backward on a GPU; the others wait for the compute in front of them.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from pathlib import Path

import torch

MODES = [
    ("ddp-reference", dict(precision="fp32")),
    ("ddp-bf16", dict(precision="bf16", optimizer="fused")),
    ("fsdp-bf16", dict(precision="bf16", optimizer="fused", fsdp=True)),
]
WORLD = 2
BATCH_GPU = 64


def _worker(rank: int, port: int, out_dir: str, mode: str, options: dict) -> None:
    import torch.distributed as dist

    from bench.memory import make_trainer
    from sid_fast import dist as sid_dist

    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    sid_dist.init()
    try:
        tr = make_trainer("digits", BATCH_GPU, options, "cpu", rounds=2)
        tr.step()
        tr.step()  # DDP rebuilds its buckets after the first iteration (a broadcast): warmed past it
        phases = []
        for name in ("fake_score_phase", "generator_phase"):
            fn = getattr(tr, name)

            def wrapped(fn=fn, name=name):
                with torch.profiler.record_function(f"bench/{name}"):
                    return fn()

            setattr(tr, name, wrapped)
            phases.append(name)
        trace = Path(out_dir) / f"{mode}-rank{rank}.json"
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
            with torch.profiler.record_function("bench/step"):
                tr.step()
        prof.export_chrome_trace(str(trace))
        params = {
            "G": sum(p.numel() for p in tr.G.parameters()),
            "fake_score": sum(p.numel() for p in tr.fake.parameters()),
        }
        (Path(out_dir) / f"{mode}-rank{rank}-params.json").write_text(json.dumps(params))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def parse(trace_path: Path) -> list[dict]:
    """The collectives of a chrome trace (its c10d ops): kind, elements, phase, issued during backward."""
    events = json.loads(Path(trace_path).read_text())["traceEvents"]
    spans = [e for e in events if e.get("ph") == "X"]
    phases = [e for e in spans if e["name"].startswith("bench/") and e["name"] != "bench/step"]
    engine = [e for e in spans if e["name"].startswith("autograd::engine::evaluate_function")]
    out = []
    for e in sorted(spans, key=lambda e: e["ts"]):
        if not e["name"].startswith("c10d::") or e["name"] in ("c10d::barrier", "c10d::monitored_barrier"):
            continue
        t = e["ts"]

        def inside(s, t=t):
            return s["ts"] <= t <= s["ts"] + s["dur"]

        dims = (e.get("args", {}).get("Input Dims") or [[]])[0]
        dims = dims if dims and isinstance(dims[0], list) else [dims]
        elements = sum(_prod(d) for d in dims if d)
        out.append(
            dict(
                kind=e["name"][len("c10d::") :].strip("_"),
                elements=elements,
                phase=next((p["name"][len("bench/") :] for p in phases if inside(p)), "step"),
                during_backward=any(inside(s) for s in engine),
            )
        )
    return out


def _prod(dims) -> int:
    n = 1
    for d in dims:
        n *= d
    return n


def run_all() -> list[dict]:
    import torch.multiprocessing as mp

    records = []
    for i, (mode, options) in enumerate(MODES):
        with tempfile.TemporaryDirectory() as out_dir:
            port = 29400 + os.getpid() % 300 + 7 * i
            mp.spawn(_worker, args=(port, out_dir, mode, options), nprocs=WORLD)
            colls = parse(Path(out_dir) / f"{mode}-rank0.json")
            params = json.loads((Path(out_dir) / f"{mode}-rank0-params.json").read_text())
        by = Counter()
        nbytes = Counter()
        for c in colls:
            key = f"{c['phase']}/{c['kind']}/{'in backward' if c['during_backward'] else 'outside backward'}"
            by[key] += 1
            nbytes[key] += 4 * c["elements"]  # fp32: the trained parameters and their gradients in every rung
        summary = ", ".join(f"{k}: {by[k]} ({nbytes[k] / 2**20:.2f} MiB)" for k in sorted(by))
        records.append(
            dict(
                bench="overhead",
                part="collectives",
                config="digits",
                mode=mode,
                options=options,
                world=WORLD,
                batch_gpu=BATCH_GPU,
                rounds=2,
                params=params,
                collectives=colls,
                count=len(colls),
                bytes=4 * sum(c["elements"] for c in colls),
                by_kind=dict(by),
                bytes_by_kind=dict(nbytes),
                summary=summary,
            )
        )
    return records


if __name__ == "__main__":
    for rec in run_all():
        print(rec["mode"], rec["summary"])
