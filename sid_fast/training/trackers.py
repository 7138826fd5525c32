"""Experiment trackers: every tick's statistics, the metric values and the sample grids sent to TensorBoard and/or
Weights & Biases besides stats.jsonl (`--tracker tensorboard`, `wandb`, `tensorboard,wandb` or `none`; rank 0 only;
the step is the number of generator images seen, so curves of runs with different batches line up).

- tensorboard: torch.utils.tensorboard's SummaryWriter into <run_dir>/tensorboard (`tensorboard --logdir runs`);
  needs the tensorboard package (`pip install tensorboard`).
- wandb: one W&B run per run directory, its id kept in <run_dir>/wandb_id.txt so a resumed or restarted run continues
  the same W&B run; files under <run_dir>/wandb; `WANDB_MODE=offline` works without network (`wandb sync` later).
  The project is --tracker-project (default sid_fast); the entity comes from W&B's own settings (WANDB_ENTITY).

A tracker that fails while the run is going (a full disk, the W&B service gone) is logged once and switched off: the
run, its states and stats.jsonl do not depend on it.
"""

from __future__ import annotations

import importlib.util
import uuid
from pathlib import Path

import numpy as np

TRACKERS = ("none", "tensorboard", "wandb", "tensorboard,wandb")
_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def kinds(spec: str) -> list[str]:
    """--tracker as a list of trackers: "tensorboard,wandb" -> ["tensorboard", "wandb"]; "none" -> []."""
    names = [k.strip() for k in spec.split(",") if k.strip()]
    return [] if names == ["none"] else names


def check_installed(spec: str) -> str | None:
    """None when --tracker `spec` can run here, otherwise the one-sentence reason."""
    names = kinds(spec)
    bad = [k for k in names if k not in _PACKAGES]
    if bad or not spec.strip() or len(set(names)) != len(names):
        return f"--tracker must be none, tensorboard, wandb or tensorboard,wandb, got {spec!r}."
    for kind in names:
        pkg = _PACKAGES[kind]
        try:
            found = importlib.util.find_spec(pkg) is not None
        except ValueError:  # a module entry without a spec (sys.modules[pkg] = None): not importable
            found = False
        if not found:
            return (
                f"--tracker {kind} needs the {pkg} package, which is not installed: pip install {pkg} (or "
                "--tracker none)."
            )
    return None


class Tracker:
    """The no-op tracker (--tracker none) and the interface of the others."""

    kind = "none"

    def log_tick(self, record: dict, nimg: int) -> None:
        pass

    def log_metric(self, key: str, value: float, nimg: int) -> None:
        pass

    def log_image(self, key: str, image: np.ndarray, nimg: int) -> None:
        """image: uint8 [H, W, C] (C = 1 or 3) or [H, W]."""

    def close(self) -> None:
        pass


# The numbers of a stats.jsonl record that are curves (not counters or wall-clock stamps).
_SKIP = {"tick", "kimg", "timestamp"}


def _scalars(record: dict):
    for k, v in record.items():
        if k not in _SKIP and isinstance(v, (int, float)) and not isinstance(v, bool):
            yield k, float(v)


class _Guarded(Tracker):
    """Calls into a tracker library; the first failure is logged and the tracker turns itself off."""

    def __init__(self, log):
        self.log, self.alive = log, True

    def _guard(self, fn, *args):
        if not self.alive:
            return
        try:
            fn(*args)
        except Exception as e:  # the run goes on without the tracker
            self.alive = False
            self.log(f"--tracker {self.kind}: {type(e).__name__}: {e}; the tracker is off for the rest of this run.")

    def log_tick(self, record, nimg):
        self._guard(self._tick, record, nimg)

    def log_metric(self, key, value, nimg):
        self._guard(self._metric, key, value, nimg)

    def log_image(self, key, image, nimg):
        self._guard(self._image, key, image[..., None] if image.ndim == 2 else image, nimg)

    def close(self):
        self._guard(self._close)
        self.alive = False


class TensorBoardTracker(_Guarded):
    kind = "tensorboard"

    def __init__(self, run_dir: Path, config: dict, log):
        super().__init__(log)
        from torch.utils.tensorboard import SummaryWriter  # an optional dependency (tensorboard)

        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
        text = "\n".join(f"    {k}: {v}" for k, v in sorted(config.items()))
        self.writer.add_text("config", text, global_step=0)

    def _tick(self, record, nimg):
        for k, v in _scalars(record):
            self.writer.add_scalar(f"progress/{k}", v, global_step=nimg)
        self.writer.flush()

    def _metric(self, key, value, nimg):
        self.writer.add_scalar(f"metrics/{key}", value, global_step=nimg)
        self.writer.flush()

    def _image(self, key, image, nimg):
        self.writer.add_image(key, image, global_step=nimg, dataformats="HWC")
        self.writer.flush()

    def _close(self):
        self.writer.close()


class WandbTracker(_Guarded):
    kind = "wandb"

    def __init__(self, run_dir: Path, config: dict, project: str, log):
        super().__init__(log)
        import wandb

        self.wandb = wandb
        id_file = Path(run_dir) / "wandb_id.txt"
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
        if not id_file.exists():
            id_file.write_text(run_id + "\n")
        self.run = wandb.init(
            project=project,
            name=Path(run_dir).name,
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            config=config,
        )
        self.run.define_metric("*", step_metric="nimg")

    def _tick(self, record, nimg):
        self.run.log({"nimg": nimg, **{f"progress/{k}": v for k, v in _scalars(record)}})

    def _metric(self, key, value, nimg):
        self.run.log({"nimg": nimg, f"metrics/{key}": value})

    def _image(self, key, image, nimg):
        self.run.log({"nimg": nimg, key: self.wandb.Image(image)})

    def _close(self):
        self.run.finish()


class _Several(Tracker):
    """Each call sent to every tracker of the list."""

    def __init__(self, trackers: list[Tracker]):
        self.trackers = trackers
        self.kind = ",".join(t.kind for t in trackers)

    def log_tick(self, record, nimg):
        for t in self.trackers:
            t.log_tick(record, nimg)

    def log_metric(self, key, value, nimg):
        for t in self.trackers:
            t.log_metric(key, value, nimg)

    def log_image(self, key, image, nimg):
        for t in self.trackers:
            t.log_image(key, image, nimg)

    def close(self):
        for t in self.trackers:
            t.close()


def make_tracker(spec: str, run_dir: Path | None, config: dict, project: str = "sid_fast", log=print) -> Tracker:
    """The tracker(s) of --tracker `spec` for rank 0 of a run writing into run_dir (the no-op tracker elsewhere)."""
    names = kinds(spec)
    if not names or run_dir is None:
        return Tracker()
    reason = check_installed(spec)
    if reason is not None:
        raise ValueError(reason)
    made = [
        TensorBoardTracker(run_dir, config, log) if k == "tensorboard" else WandbTracker(run_dir, config, project, log)
        for k in names
    ]
    return made[0] if len(made) == 1 else _Several(made)
