"""The predicted ladder: img/s per H100 of each rung, from what the CPU counts, with the model written down.

    python -m bench.predict                                   # bench/results/predicted_ladder.jsonl and .md
    python -m bench.predict --compare OUT/train_step_cifar10.jsonl   # measured / predicted for a GPU run's ladder

Inputs (committed results, nothing measured on a GPU): per configuration and rung, the launches, host syncs and
memory-bound bytes of one iteration at the official batch (bench.overhead, bench/results/overhead.jsonl), the FLOPs
per image and the largest batch per GPU that fits (bench.memory, memory.jsonl / memory_edm2.jsonl).

The model of one iteration on one H100 SXM (every constant is an assumption, stated here, that the first GPU run
tests; `--compare` prints the ratio per rung):
  device time  t_dev  = FLOPs / (E_MM x peak) + bytes / (E_BW x 3.35 TB/s) + launches x 2.5 us
                 peak: 989 TFLOP/s dense bf16 (the bf16 rungs), 67 TFLOP/s fp32 without TF32 (the reference);
                 E_MM = 0.45 (UNet convolutions of 128-512 channels at 8x8-64x64: far from the GEMM peak),
                 E_BW = 0.6; 2.5 us is the shortest a kernel takes (launch latency on the device);
                 bytes: what the memory-bound ops read and write, each op on its own (eager); compiled rungs move
                 half of the eager bytes (Inductor fuses elementwise chains into the convolutions' neighbours).
  host time    t_host = launches x c_launch + syncs x 20 us
                 c_launch: 6 us per op in eager PyTorch (dispatch + launch), 3 us per kernel from Inductor's
                 wrapper, 0 inside a CUDA graph (one replay of ~30 us per call site and micro-batch instead).
  t_step = max(t_dev, t_host) + syncs x min(t_dev, t_host) / (syncs + 1)
                 (the host runs ahead of the device until a sync drains the queue; each sync exposes its share).
  8 GPUs (DDP over NVLink): each phase all-reduces its network's fp32 gradients (bench.collectives: issued during
  backward, buckets of bench.parallel's ddp_bucket_mb), ring time 2 (n - 1) / n x bytes / 360 GB/s; exposed: the
  last bucket (1/8 of it) plus whatever exceeds the backward of that network (about 2/11 of the step's device
  time). Efficiency = t_step / (t_step + exposed).
Launches of the compiled rungs: Inductor's own count is only known for digits (bench.overhead's `inductor` part,
CPU code generation); elsewhere the compiled rungs are predicted with one launch per dense op (convolutions and
matmuls, extern kernels) plus one fused kernel per dense op for its epilogue and the gradient cleaning, optimizer and
EMA launches of the eager rung: stated as an assumption in the output (`launch_source`).
"""

from __future__ import annotations

import json
import types
from pathlib import Path

import click

from bench.common import RESULTS, command, environment

PEAK = {"bf16": 989e12, "fp32": 67e12}
E_MM, E_BW, HBM = 0.45, 0.6, 3.35e12
T_KERNEL = 2.5e-6
C_LAUNCH = {"eager": 6e-6, "compiled": 3e-6, "graphs": 0.0}
T_SYNC = 20e-6
T_GRAPH_REPLAY = 30e-6
NVLINK_BUSBW = 360e9
WORLD = 8

# The ladder of bench.train_step (what a GPU run measures) and where each rung's counts come from.
RUNGS = {
    "reference": dict(counts="reference", dtype="fp32", host="eager"),
    "bf16": dict(counts="bf16", dtype="bf16", host="eager"),
    "+channels_last": dict(counts="+channels_last", dtype="bf16", host="eager"),
    "+fused_adam": dict(counts="+fused_adam", dtype="bf16", host="eager"),
    "+compile": dict(counts="+fused_adam", dtype="bf16", host="compiled"),
    "+kernels": dict(counts="+kernels", dtype="bf16", host="compiled"),
    "+cuda_graphs": dict(counts="+kernels", dtype="bf16", host="graphs"),
}
# bench.memory's rung with the same bytes and FLOPs (memory depends on dtype, layout and kernels only).
MEMORY_RUNG = {
    "reference": "reference",
    "bf16": "bf16",
    "+channels_last": "+channels_last",
    "+fused_adam": "+channels_last",
    "+compile": "+channels_last",
    "+kernels": "+kernels",
    "+cuda_graphs": "+kernels",
}


def _load(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _latest(records, **match) -> dict | None:
    hits = [r for r in records if all(r.get(k) == v for k, v in match.items())]
    return hits[-1] if hits else None


# Each constant as a range: (pessimistic, central, optimistic). A rung's img/s is given for the three cases.
CASES = ("low", "mid", "high")
E_MM_RANGE = dict(low=0.35, mid=E_MM, high=0.55)
E_BW_RANGE = dict(low=0.5, mid=E_BW, high=0.7)
# Host time per eager dispatch on an H100 host: 6 us is PyTorch's dispatcher and launch alone; a module call with
# autograd recording and Python glue is typically 9-12 us (sid_fast's own measurement of this machine's cost through
# the same path is `host_us_per_dispatch` in the output). Inductor's wrapper: 2-5 us per kernel.
C_LAUNCH_RANGE = {"eager": dict(low=12e-6, mid=9e-6, high=6e-6), "compiled": dict(low=5e-6, mid=3e-6, high=2e-6),
                  "graphs": dict(low=0.0, mid=0.0, high=0.0)}  # fmt: skip
# A public anchor for the fp32 reference (EDM's README: CIFAR-10 DDPM++ trained for 200 Mimg in about 2 days on 8
# V100s, i.e. about 145 img/s per V100 at 3 forward-equivalents per image). A SiD iteration is 11 forward-equivalents
# per image: about 40 img/s per V100; an H100 without TF32 has 67 / 15.7 = 4.3x a V100's fp32 peak: about 170 img/s
# at EDM's efficiency, taken as the range 85-170 (EDM's "about 2 days" implies 18 TFLOP/s on a 15.7 TFLOP/s V100, so
# it is loose or Winograd convolutions were used; SiD's batch of 16 per GPU is smaller than EDM's 64).
ANCHOR = dict(
    config="cifar10",
    rung="reference",
    img_per_s=(85.0, 170.0),
    source="EDM README: 200 Mimg in ~2 days on 8 V100 (145 img/s/V100) x 3/11 forward-equivalents x 4.3",
)


def predict_step(counts: dict, rung: str, batch: int, flops_per_image: float, syncs: int, case: str = "mid") -> dict:
    spec = RUNGS[rung]
    official = counts["batch_gpu"]
    per_batch = {k: v for k, v in counts["membound_bytes"].items() if k.split("/")[1] not in FIXED_PARTS}
    fixed = sum(v for k, v in counts["membound_bytes"].items() if k.split("/")[1] in FIXED_PARTS)
    nbytes = fixed + sum(per_batch.values()) * batch / official
    dense = sum(n for op, n in counts["top_ops"].items() if op in DENSE)
    if spec["host"] == "eager":
        launches = counts["launches_cuda"]  # dispatches: what the host pays for
        lo, hi = counts.get("kernels_low", launches), counts.get("kernels_high", launches)
        kernels = dict(low=hi, mid=(lo + hi) / 2, high=lo)[case]  # what the device runs
    else:
        launches = 2 * dense + sum(counts["by_part"][ph].get(p, 0) for ph in PHASES for p in FIXED_PARTS)
        kernels = launches
        nbytes = nbytes / 2
    t_mm = flops_per_image * batch / (E_MM_RANGE[case] * PEAK[spec["dtype"]])
    t_bw = nbytes / (E_BW_RANGE[case] * HBM)
    t_dev = t_mm + t_bw + kernels * T_KERNEL
    if spec["host"] == "graphs":
        t_host = 5 * T_GRAPH_REPLAY + syncs * T_SYNC
    else:
        t_host = launches * C_LAUNCH_RANGE[spec["host"]][case] + syncs * T_SYNC
    t_step = max(t_dev, t_host) + syncs * min(t_dev, t_host) / (syncs + 1)
    return dict(
        t_step_ms=t_step * 1e3,
        t_dev_ms=t_dev * 1e3,
        t_host_ms=t_host * 1e3,
        t_matmul_ms=t_mm * 1e3,
        t_membound_ms=t_bw * 1e3,
        launches=launches,
        kernels=kernels,
        launch_source="counted (eager dispatch)" if spec["host"] == "eager" else "2 per dense op + fixed (assumed)",
        bound="host (launches)" if t_host > t_dev else "device",
        img_per_s=batch / t_step,
    )


FIXED_PARTS = ("clean", "optimizer", "ema")
PHASES = ("fake_score", "generator", "ema")
DENSE = {"aten.convolution", "aten.convolution_backward", "aten.mm", "aten.addmm", "aten.bmm"}


def scaling(pred: dict, params: int, world: int = WORLD) -> float:
    """8-GPU DDP efficiency: exposed all-reduce time of both phases against the step."""
    t_step = pred["t_step_ms"] / 1e3
    grad_bytes = 4 * params
    t_ring = 2 * (world - 1) / world * grad_bytes / NVLINK_BUSBW
    window = (2 / 11) * pred["t_dev_ms"] / 1e3  # the trained network's backward, per phase
    exposed = 2 * (t_ring / 8 + max(0.0, t_ring - window))
    return t_step / (t_step + exposed)


def build(overhead: list[dict], memory: list[dict]) -> list[dict]:
    out = []
    for config in ("digits", "cifar10", "imagenet64", "edm2-xs"):
        for rung, spec in RUNGS.items():
            counts = _latest(overhead, part="launches", config=config, mode=spec["counts"])
            if counts is None:
                continue
            syncs_rec = _latest(overhead, part="syncs", config=config, mode=spec["counts"]) or _latest(
                overhead, part="syncs", config=config, mode="+fused_adam"
            )
            syncs = syncs_rec["syncs_per_step"] if syncs_rec else 0
            mem = _latest(memory, config=config, mode=MEMORY_RUNG[rung])
            flops = mem["derived"]["step_flops_per_image"] if mem else counts["flops"] / counts["batch_gpu"]
            fits = mem["derived"]["batch_gpu_fits"]["80GB"] if mem else None
            params = counts.get("trained_params") or 0
            for label, batch in (("official", counts["batch_gpu"]), ("max_80GB", fits)):
                if not batch:
                    continue
                pred = predict_step(counts, rung, batch, flops, syncs)
                for case in ("low", "high"):
                    pred[f"img_per_s_{case}"] = predict_step(counts, rung, batch, flops, syncs, case)["img_per_s"]
                pred["kernels_low"], pred["kernels_high"] = counts.get("kernels_low"), counts.get("kernels_high")
                pred["ddp8_efficiency"] = scaling(pred, params) if params else None
                out.append(
                    dict(
                        bench="predicted_ladder",
                        config=config,
                        mode=rung,
                        batch_gpu=batch,
                        batch_label=label,
                        flops_per_image=flops,
                        syncs_per_step=syncs,
                        **pred,
                    )
                )
    # Speed-ups over the predicted fp32 reference of the same configuration (official batch), per case; for CIFAR-10
    # also over the public anchor of the reference (ANCHOR), which does not share the fp32 model's assumptions.
    for r in out:
        ref = next((x for x in out if x["config"] == r["config"] and x["mode"] == "reference"
                    and x["batch_label"] == "official"), None)  # fmt: skip
        if ref is None:
            continue
        ups = [r[f"img_per_s{s}"] / ref[f"img_per_s{s}"] for s in ("_low", "", "_high")]
        r["speedup_vs_reference"] = [min(ups), ups[1], max(ups)]
        if r["config"] == ANCHOR["config"]:  # this rung's prediction against the anchored reference's range
            lo, hi = ANCHOR["img_per_s"]
            r["x_anchored_reference"] = [r["img_per_s_low"] / hi, r["img_per_s_high"] / lo]
    return out


def markdown(records: list[dict], host: dict | None = None) -> str:
    lines = [
        "| config | rung | batch/GPU | predicted img/s (low-high) | x reference (low-high) | x anchored reference | "
        "step ms | device ms (matmul + mem) | host ms | bound | dispatches | kernels (est.) | 8-GPU eff. |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        eff = f"{r['ddp8_efficiency'] * 100:.0f}%" if r["ddp8_efficiency"] else "-"
        up = r.get("speedup_vs_reference")
        up = f"{up[1]:.1f} ({up[0]:.1f}-{up[2]:.1f})" if up else "-"
        anc = r.get("x_anchored_reference")
        anc = f"{anc[0]:.1f}-{anc[1]:.1f}" if anc else "-"
        eager = r.get("kernels_low") and "eager" in r["launch_source"]
        kern = f"{r['kernels_low']}-{r['kernels_high']}" if eager else f"{r['kernels']:.0f} (assumed)"
        lines.append(
            f"| {r['config']} | {r['mode']} | {r['batch_gpu']} ({r['batch_label']}) | {r['img_per_s']:.0f} "
            f"({r['img_per_s_low']:.0f}-{r['img_per_s_high']:.0f}) | {up} | {anc} | "
            f"{r['t_step_ms']:.1f} | {r['t_dev_ms']:.1f} ({r['t_matmul_ms']:.1f} + {r['t_membound_ms']:.1f}) | "
            f"{r['t_host_ms']:.1f} | {r['bound']} | {r['launches']} | {kern} | {eff} |"
        )
    if host:
        lines += ["", f"This machine's host cost through the eager dispatch path (bench.predict.measure_host_cost, "
                      f"{host['threads']} threads): a digits step at batch {host['batch']} takes {host['step_ms']:.1f} "
                      f"ms for {host['dispatches']} dispatched ops ({host['us_per_dispatch']:.1f} us each), "
                      f"{host['launching']} of them kernel-launching ({host['us_per_launching_op']:.1f} us each): "
                      "compute included, so upper bounds. Anchor of the CIFAR-10 reference: "
                      f"{ANCHOR['source']}."]  # fmt: skip
    return "\n".join(lines) + "\n"


def measure_host_cost(batch: int = 1, repeats: int = 5) -> dict:
    """This machine's host time per dispatched op through the real path (module calls, autograd, the optimizer): a
    digits SiD step at `batch` on the CPU, whose compute is tiny, divided by the ops it dispatches."""
    import statistics
    import time

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from bench.memory import make_trainer

    tr = make_trainer("digits", batch, {}, "cpu")
    tr.step()
    from bench.overhead import NO_LAUNCH, _is_view, _name

    n = [0, 0]  # every dispatched op, those that launch a kernel on a GPU (not views or allocations)

    class _Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            n[0] += 1
            n[1] += not (_is_view(func) or _name(func) in NO_LAUNCH)
            return func(*args, **(kwargs or {}))

    with _Count():
        tr.step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        tr.step()
        times.append(time.perf_counter() - t0)
    step = statistics.median(times)
    return dict(batch=batch, dispatches=n[0], launching=n[1], step_ms=step * 1e3, us_per_dispatch=step / n[0] * 1e6,
                us_per_launching_op=step / n[1] * 1e6, threads=torch.get_num_threads())  # fmt: skip


def compare(measured_path: Path, overhead, memory) -> None:
    """measured / predicted for each rung of a bench.train_step result file (a GPU run)."""
    for m in _load(measured_path):
        if "error" in m or m.get("mode") not in RUNGS:
            continue
        counts = _latest(overhead, part="launches", config=m["config"], mode=RUNGS[m["mode"]]["counts"])
        if counts is None:
            print(f"{m['config']} {m['mode']}: no counts to predict from")
            continue
        mem = _latest(memory, config=m["config"], mode=MEMORY_RUNG[m["mode"]])
        flops = mem["derived"]["step_flops_per_image"] if mem else counts["flops"] / counts["batch_gpu"]
        syncs_rec = _latest(overhead, part="syncs", config=m["config"], mode=RUNGS[m["mode"]]["counts"])
        pred = predict_step(counts, m["mode"], m["batch_gpu"], flops, syncs_rec["syncs_per_step"] if syncs_rec else 0)
        print(
            f"{m['config']} {m['mode']:<15} batch {m['batch_gpu']}: measured {m['img_per_s']:.1f} img/s, predicted "
            f"{pred['img_per_s']:.1f} ({pred['bound']}-bound): measured / predicted = "
            f"{m['img_per_s'] / pred['img_per_s']:.2f}"
        )


@command(__doc__)
@click.option("--overhead", default=str(RESULTS / "overhead.jsonl"), show_default=True)
@click.option("--compare", default=None, help="a bench.train_step result file to hold against the prediction")
@click.option("--out", default=str(RESULTS / "predicted_ladder.jsonl"), show_default=True)
def main(**kw):
    a = types.SimpleNamespace(**kw)
    overhead = _load(Path(a.overhead))
    memory = _load(RESULTS / "memory.jsonl") + _load(RESULTS / "memory_edm2.jsonl")
    records = build(overhead, memory)
    if a.compare:
        compare(Path(a.compare), overhead, memory)
        return
    env = environment()
    host = measure_host_cost()
    records.append(dict(bench="host_cost", **host))
    Path(a.out).write_text("".join(json.dumps({**r, **env}) + "\n" for r in records))
    md = Path(a.out).with_suffix(".md")
    ladder = [r for r in records if r.get("bench") == "predicted_ladder"]
    md.write_text(markdown(ladder, host))
    print(markdown(ladder, host))
    print(f"-> {a.out}, {md}")


if __name__ == "__main__":
    main()
