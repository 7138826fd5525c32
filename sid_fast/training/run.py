"""A distillation run: checks before any work, one `build_trainer`, the run directory, resume, and `run()`.

Everything that can be refused (configuration, teacher, data, FID inputs, the state to resume) is checked before a
run directory is made. `build_trainer` is the one way to construct a SiDTrainer from a configuration; train.py,
bench/ and profile/ use it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch

from sid_fast import checkpoints, dist
from sid_fast.networks import edm2
from sid_fast.training.config import ConfigError, TrainConfig, check_world
from sid_fast.training.sid import SiDTrainer, TeacherSpec, TrainingAborted
from sid_fast.training.tickstats import Logger


def check_teacher(cfg: TrainConfig, teacher, path) -> None:
    want_labels = cfg.label_dim if cfg.cond else 0
    problems = []
    if teacher.img_resolution != cfg.resolution:
        problems.append(f"resolution {teacher.img_resolution} (preset/flags: {cfg.resolution})")
    if teacher.img_channels != cfg.channels:
        problems.append(f"{teacher.img_channels} channels (preset/flags: {cfg.channels})")
    if teacher.label_dim != want_labels:
        problems.append(f"label_dim {teacher.label_dim} (preset/flags: {want_labels}, --cond {int(cfg.cond)})")
    if problems:
        raise ConfigError(f"--teacher {path}: the network has " + "; ".join(problems) + ".")


def load_label_table(cfg: TrainConfig, label_dim: int) -> np.ndarray:
    """The integer labels of --data's images, checked against the teacher; one ConfigError naming both values."""
    ds = open_dataset(cfg)
    if ds.image_shape is not None:  # a dataset.json alone has no images to check
        c, h, _ = ds.image_shape
        latents = getattr(ds, "meta", {}).get("format") == "sid_fast.latents"
        if latents:  # stored as the VAE posterior's mean and std: twice the teacher's channels
            c //= 2
        if (c, h) != (cfg.channels, cfg.resolution):
            raise ConfigError(
                f"--data {cfg.data}: {'latents' if latents else 'images'} are {c}x{h}x{h}, the teacher "
                f"makes {cfg.channels}x{cfg.resolution}x{cfg.resolution}."
            )
    if ds.labels_int is None:
        raise ConfigError(
            f"--data {cfg.data}: the dataset has no labels (dataset.json), the teacher is conditional "
            f"with {label_dim} classes."
        )
    if ds.label_dim != label_dim:
        raise ConfigError(
            f"--data {cfg.data}: labels run to class {ds.label_dim - 1} (label_dim {ds.label_dim}), the "
            f"teacher has label_dim {label_dim}."
        )
    return ds.labels_int


def open_dataset(cfg: TrainConfig):
    """--data: an EDM dataset (zip or folder), a latent dataset (sid_fast.latents), a dataset.json alone (labels for
    data-free SiD), or 'digits', the bundled digits."""
    from sid_fast.data.dataset import DatasetError, ImageDataset, LabelsDataset

    if cfg.data == "digits":
        from sid_fast.data.digits import DigitsDataset

        return DigitsDataset()
    path = Path(cfg.data)
    try:
        if path.suffix == ".json":
            return LabelsDataset(path)
        if (path / "meta.json").is_file():
            from sid_fast.latents import LatentDataset

            return LatentDataset(path)
        return ImageDataset(cfg.data)
    except (DatasetError, ValueError) as e:
        raise ConfigError(f"--data {e}") from None


def load_real_dataset(cfg: TrainConfig):
    """SiDA's real images (--data), checked against the teacher's shape (labels: by load_label_table)."""
    ds = open_dataset(cfg)
    if ds.image_shape is None:
        raise ConfigError(
            f"--data {cfg.data}: a dataset.json holds labels only; SiDA needs real images (a zip or folder)."
        )
    c, h, _ = ds.image_shape
    latents = getattr(ds, "meta", {}).get("format") == "sid_fast.latents"
    if latents:
        c //= 2  # stored as the posterior's mean and std
    if (c, h) != (cfg.channels, cfg.resolution):
        raise ConfigError(
            f"--data {cfg.data}: {'latents' if latents else 'images'} are {c}x{h}x{h}, the teacher makes "
            f"{cfg.channels}x{cfg.resolution}x{cfg.resolution}."
        )
    return ds


def load_sid_model(cfg: TrainConfig, teacher) -> dict:
    """SiD²A's generator weights (--sid-model, through the safe loader), which must fit the teacher's network
    exactly."""
    try:
        net, _ = checkpoints.load_network_file(cfg.sid_model)
    except ValueError as e:
        raise ConfigError(f"--sid-model {e}") from None

    # An EDM2 generator has no log-variance head (official EDM_2_Precond_Generator): compare the rest.
    def compared(k):
        return not (isinstance(teacher, edm2.Precond) and k.startswith("logvar_"))

    want = {k: tuple(v.shape) for k, v in teacher.state_dict().items() if compared(k)}
    got = {k: tuple(v.shape) for k, v in net.state_dict().items() if compared(k)}
    if got != want:
        diff = sorted(set(want) ^ set(got)) or [k for k in want if want[k] != got[k]]
        raise ConfigError(
            f"--sid-model {cfg.sid_model}: not a generator of this teacher's network ({len(diff)} "
            f"tensors differ in name or shape, e.g. {diff[0]})."
        )
    return {k: v.float() for k, v in net.state_dict().items()}


def prepare_fid(cfg: TrainConfig, device):
    """(reference statistics path, detector) for --metrics fid, else (None, None); refuses bad files up front."""
    if cfg.metrics != "fid":
        return None, None
    from sid_fast.metrics import load_ref_stats
    from sid_fast.metrics.inception import load_detector

    try:
        ref = checkpoints.resolve_path(cfg.data_stat)
        detector = load_detector(cfg.detector, device=device)
        load_ref_stats(ref, dim=detector.feature_dim)
    except ValueError as e:  # CheckpointError, DetectorError and bad statistics all name the file
        raise ConfigError(f"--metrics fid: {e}") from None
    return ref, detector


def load_vae_for(cfg: TrainConfig, teacher, device):
    """--vae (EDM2 latent teachers): loaded and checked against the teacher before any work; required for FID."""
    from sid_fast.sampling import check_vae

    vae = None
    if cfg.vae is not None:
        from sid_fast.latents import StabilityVAE

        try:
            vae = StabilityVAE.load(cfg.vae, device)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if vae is not None or cfg.metrics == "fid":
        try:
            check_vae(teacher, vae)
        except ValueError as e:
            raise ConfigError(f"--teacher {cfg.teacher}: {e}") from None
    return vae


def build_trainer(
    cfg: TrainConfig,
    device: torch.device | None = None,
    *,
    teacher=None,
    teacher_spec: TeacherSpec | None = None,
    run_dir: Path | None = None,
    log=print,
    fid=None,
) -> SiDTrainer:
    """Load and check the teacher (from cfg.teacher unless given), the data's labels and the FID inputs, once; then
    the trainer. `teacher` and `teacher_spec` let tests and benchmarks bring networks that are not files."""
    device = device if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check_world(cfg, dist.world_size())
    if teacher is None:
        teacher, info = checkpoints.load_network_file(cfg.teacher)
        teacher_spec = TeacherSpec(info["class_name"], info["init_kwargs"], teacher.state_dict(), info.get("meta", {}))
    elif teacher_spec is None:
        raise ValueError("build_trainer: a teacher network given without its TeacherSpec (class, kwargs, weights).")
    check_teacher(cfg, teacher, cfg.teacher)
    label_table = load_label_table(cfg, teacher.label_dim) if cfg.data is not None and teacher.label_dim else None
    real = load_real_dataset(cfg) if cfg.method == "sida" else None
    generator_init = load_sid_model(cfg, teacher) if cfg.sid_model is not None else None
    vae = load_vae_for(cfg, teacher, device)
    if fid is None:
        fid = prepare_fid(cfg, device)
    if real is not None:
        from sid_fast.training.sida import SiDATrainer

        return SiDATrainer(
            cfg,
            device,
            teacher,
            teacher_spec,
            run_dir=run_dir,
            log=log,
            fid=fid,
            label_table=label_table,
            real_dataset=real,
            generator_init=generator_init,
            vae=vae,
        )
    return SiDTrainer(
        cfg,
        device,
        teacher,
        teacher_spec,
        run_dir=run_dir,
        log=log,
        fid=fid,
        label_table=label_table,
        generator_init=generator_init,
        vae=vae,
    )


def next_run_dir(outdir: str, desc: str) -> Path:
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    ids = [int(m.group(1)) for p in out.iterdir() if (m := re.match(r"^(\d+)-", p.name))]
    run_dir = out / f"{max(ids, default=-1) + 1:05d}-{desc}"
    run_dir.mkdir()
    return run_dir


def find_resume_state(path: str) -> Path:
    p = Path(path)
    if p.is_dir():
        states = sorted(p.glob("training-state-*.pt"))
        if not states:
            raise ConfigError(f"--resume {p}: the directory holds no training-state-*.pt file.")
        return states[-1]
    if not p.exists():
        raise ConfigError(f"--resume {p}: no such file.")
    return p


def load_state_file(path) -> dict:
    """checkpoints.read_training_state with the --resume flag named in its error."""
    try:
        return checkpoints.read_training_state(path)
    except checkpoints.CheckpointError as e:
        raise ConfigError(f"--resume {e}") from None


def run(cfg: TrainConfig, log_to_stdout=True) -> Path | None:
    """Run (or resume) a distillation; returns the run directory (rank 0)."""
    device = dist.init()
    world = dist.world_size()
    resume_state = load_state_file(find_resume_state(cfg.resume)) if cfg.resume else None
    # Everything that can be refused is checked before the run directory is made: the trainer is built first,
    # with a logger that buffers until the directory exists.
    pending: list[str] = []
    trainer = build_trainer(cfg, device, log=pending.append)
    run_dir = None
    if dist.rank() == 0:
        desc = cfg.desc or f"{cfg.preset}-alpha{cfg.alpha:g}-batch{cfg.batch}-gpus{world}-{cfg.precision}"
        run_dir = next_run_dir(cfg.outdir, desc)
        labels = (
            "none (unconditional)"
            if not trainer.G.label_dim
            else "uniform"
            if trainer.label_table is None
            else f"label frequencies of {cfg.data}"
        )
        with open(run_dir / "training_options.json", "w") as f:
            json.dump(dict(cfg.to_json(), world_size=world, class_labels=labels), f, indent=2)
    log = Logger(run_dir) if log_to_stdout else (lambda *_: None)
    for line in pending:
        log(line)
    trainer.run_dir, trainer.log = run_dir, log
    if resume_state is not None:
        trainer.load_state_dict(resume_state, cfg.resume)
        log(f"Resumed from {cfg.resume} at {trainer.cur_nimg / 1e3:.1f} kimg.")
    trainer.train()
    if isinstance(log, Logger):
        log.close()
    dist.finish()
    return run_dir


__all__ = [
    "build_trainer",
    "check_teacher",
    "find_resume_state",
    "load_state_file",
    "next_run_dir",
    "run",
    "TrainingAborted",
]
