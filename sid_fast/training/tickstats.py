"""What a run reports once per tick: named device-side statistics, the status line, stats.jsonl, NVML, metric plots.

The trainer adds to the statistics on the device every micro-batch; they are all-reduced and read (one host sync)
only at tick boundaries, as EDM's `training_stats` are.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from sid_fast import dist
from sid_fast.progress import format_duration

# Named slots of the one device tensor, in the order the training state stores them.
SLOTS = (
    "loss_fake",
    "loss_G",
    "rows_fake",
    "rows_G",
    "nan_samples_fake",
    "nan_samples_G",
    "bad_steps_fake",
    "bad_steps_G",
    "loss_D",
    "loss_G_gan",
)  # the last two: SiDA's discriminator and generator GAN terms
_INDEX = {name: i for i, name in enumerate(SLOTS)}


class TickStats:
    """Sums since the last tick, float64 on the device: losses (summed over samples), finite rows, NaN samples and
    steps with non-finite gradients, per phase."""

    def __init__(self, device: torch.device):
        self.values = torch.zeros(len(SLOTS), dtype=torch.float64, device=device)

    def add(self, **amounts) -> None:
        for name, amount in amounts.items():
            self.values[_INDEX[name]] += amount

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.values[_INDEX[name]]

    def reduce(self) -> dict[str, float]:
        """All-reduce over ranks, read (a host sync: once per tick) and reset."""
        total = dist.all_reduce_sum(self.values)
        self.values.zero_()
        return dict(zip(SLOTS, total.cpu().tolist()))


class NVML:
    """GPU utilisation and power through NVML (nvidia-ml-py); None where there is no NVIDIA driver."""

    def __init__(self, device: torch.device):
        self.handle = None
        if device.type != "cuda":
            return
        try:
            import pynvml  # NVML: only on a machine with an NVIDIA driver

            pynvml.nvmlInit()
            self.pynvml = pynvml
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        except Exception:  # no NVML (no driver, container without it): the columns show "--"
            self.handle = None

    def read(self) -> tuple[float | None, float | None]:
        if self.handle is None:
            return None, None
        try:
            util = self.pynvml.nvmlDeviceGetUtilizationRates(self.handle).gpu
            power = self.pynvml.nvmlDeviceGetPowerUsage(self.handle) / 1000
            return float(util), float(power)
        except Exception:
            return None, None


def status(
    sums: dict,
    *,
    tick: int,
    nimg: int,
    tick_nimg: int,
    tick_time: float,
    total_time: float,
    nvml: NVML,
    device: torch.device,
    eta: float | None = None,
) -> tuple[dict, str]:
    """(stats.jsonl record, status line) for one tick from the reduced sums; eta: the estimated seconds to --duration
    (see `Eta`)."""
    loss_f = sums["loss_fake"] / max(sums["rows_fake"], 1)
    loss_g = sums["loss_G"] / max(sums["rows_G"], 1)
    gan = sums.get("loss_D", 0.0) != 0 or sums.get("loss_G_gan", 0.0) != 0  # SiDA
    loss_d = sums.get("loss_D", 0.0) / max(sums["rows_fake"], 1)
    loss_gg = sums.get("loss_G_gan", 0.0) / max(sums["rows_G"], 1)
    kimg_tick = tick_nimg / 1e3
    util, power = nvml.read()
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    rec = dict(
        tick=tick,
        kimg=nimg / 1e3,
        time=total_time,
        sec_per_tick=tick_time,
        sec_per_kimg=tick_time / max(kimg_tick, 1e-9),
        img_per_s=kimg_tick * 1e3 / max(tick_time, 1e-9),
        eta_s=eta,
        loss_G=loss_g,
        loss_fake=loss_f,
        nan_samples_fake=sums["nan_samples_fake"],
        nan_samples_G=sums["nan_samples_G"],
        bad_steps_fake=sums["bad_steps_fake"],
        bad_steps_G=sums["bad_steps_G"],
        **(dict(loss_D=loss_d, loss_G_gan=loss_gg) if gan else {}),
        gpumem_gb=mem,
        gpu_util=util,
        power_w=power,
        timestamp=time.time(),
    )
    line = (
        f"tick {rec['tick']:<5d} kimg {rec['kimg']:<9.1f} time {rec['time']:<8.1f} sec/kimg "
        f"{rec['sec_per_kimg']:<8.2f} eta {format_duration(eta):<8s} "
        f"img/s {rec['img_per_s']:<8.1f} loss_G {loss_g:<+10.4f} loss_fake {loss_f:<9.4f} "
        + (f"loss_D {loss_d:<9.4f} loss_G_gan {loss_gg:<9.4f} " if gan else "")
        + f"gpumem {mem:<5.1f} util {'--' if util is None else f'{util:.0f}%':<5} "
        f"power {'--' if power is None else f'{power:.0f}W':<5}"
    )
    bad = [sums[k] for k in ("nan_samples_fake", "nan_samples_G", "bad_steps_fake", "bad_steps_G")]
    if any(bad):
        line += f" nan_samples {int(bad[0])}/{int(bad[1])} bad_steps {int(bad[2])}/{int(bad[3])}"
    return rec, line


class Eta:
    """Seconds left to --duration from the measured wall-clock rate of this process, snapshots, metrics and training
    states included: from the end of the first tick on (the first tick holds compilation and warm-up, so it counts
    only until a second tick has run), remaining kimg x (wall seconds / kimg since then)."""

    def __init__(self, total_nimg: int, start_nimg: int, start_time: float):
        self.total = total_nimg
        self.origin = (start_nimg, start_time)  # moved to the end of the first tick once it is known
        self.first = True

    def update(self, nimg: int, now: float) -> float | None:
        left = max(self.total - nimg, 0)
        n0, t0 = self.origin
        rate = (now - t0) / (nimg - n0) if nimg > n0 else None
        if self.first:
            self.first = False
            self.origin = (nimg, now)
        return None if rate is None else left * rate


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


DIGITS_METRICS = ("fd_digits", "prompt_acc")  # computed on all the images of a digits run: no "-30k" count in names


def plot_metric(
    path: Path,
    key: str,
    history: list[dict],
    *,
    teacher_value: float | None,
    metric_num: int,
    teacher_label: str = "teacher, Heun 35 NFE",
) -> None:
    """The metric of G_ema against images seen (log scale; prompt accuracy linear), with the teacher's value as a
    dashed line if known."""
    import matplotlib  # start-up time: only when a plot is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # start-up time: only when a plot is drawn

    hist = [r for r in history if key in r]
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
    ax.plot([r["kimg"] for r in hist], [r[key] for r in hist], "o-", label="one-step generator (G_ema)")
    if teacher_value is not None:
        ax.axhline(teacher_value, color="gray", ls="--", label=f"{teacher_label} ({teacher_value:.2f})")
    ax.set_xlabel("generator images seen (kimg)")
    labels = {"fd_digits": "FD-digits", "fid": "FID", "fd_dinov2": "FD-DINOv2", "prompt_acc": "prompt accuracy"}
    ax.set_ylabel(labels.get(key, key) + ("" if key in DIGITS_METRICS else f" ({metric_num // 1000}k)"))
    ax.set_yscale("linear" if key == "prompt_acc" else "log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


class Logger:
    """print on rank 0 that also appends to <run_dir>/log.txt."""

    def __init__(self, run_dir: Path | None):
        self.file = open(run_dir / "log.txt", "a") if run_dir is not None and dist.rank() == 0 else None

    def __call__(self, msg: str = "") -> None:
        if dist.rank() == 0:
            print(msg, flush=True)
            if self.file:
                self.file.write(msg + "\n")
                self.file.flush()

    def close(self):
        if self.file:
            self.file.close()
