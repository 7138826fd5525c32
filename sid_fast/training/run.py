"""A distillation run: checks before any work, one `build_trainer`, the run directory, resume, and `run()`.

Everything that can be refused (configuration, teacher, data, FID inputs, the state to resume) is checked before a
run directory is made, and with several processes every rank stops with the same sentence. `build_trainer` is the
one way to construct a SiDTrainer from a configuration; train.py, bench/ and profile/ use it. `choose_run` decides
which run directory a command continues (--resume auto: the same configuration's) or starts.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch

from sid_fast import checkpoints, dist
from sid_fast.networks import edm2
from sid_fast.training.config import ConfigError, TrainConfig, check_world, identity_differences, metric_list
from sid_fast.training.config import flag as flag_name
from sid_fast.training.rundir import RunLock, RunLocked, outdir_lock, remove_stale_temporaries, rewind_records
from sid_fast.training.sid import SiDTrainer, TeacherSpec, TrainingAborted
from sid_fast.training.state import list_states
from sid_fast.training.tickstats import Logger
from sid_fast.training.trackers import make_tracker


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
    """(reference statistics path, {metric: detector}) for --metrics fid and/or fd-dinov2, else (None, None); refuses
    bad files (detectors, references without the metric's statistics) up front."""
    wanted = [m for m in metric_list(cfg.metrics) if m in ("fid", "fd_dinov2")]
    if not wanted:
        return None, None
    from sid_fast.metrics import load_ref_stats
    from sid_fast.metrics.dinov2 import load_dinov2
    from sid_fast.metrics.inception import load_detector

    detectors = {}
    try:
        ref = checkpoints.resolve_path(cfg.data_stat)
        if len(wanted) > 1 and ref.suffix != ".pkl":
            raise ValueError(
                f"{ref}: an .npz holds one metric's statistics; both need EDM2's .pkl (e.g. dataset-refs/img512.pkl, "
                "or `python -m sid_fast.fid ref --metrics fid,fd_dinov2 --dest REF.pkl`)"
            )
        for m in wanted:
            detectors[m] = load_detector(cfg.detector, device) if m == "fid" else load_dinov2(cfg.dinov2, device)
            load_ref_stats(ref, dim=detectors[m].feature_dim, metric=m)
    except ValueError as e:  # CheckpointError, DetectorError and bad statistics all name the file
        raise ConfigError(f"--metrics {cfg.metrics}: {e}") from None
    return ref, detectors


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
    if vae is not None or cfg.metrics not in ("none", "fd-digits"):
        try:
            check_vae(teacher, vae)
        except ValueError as e:
            raise ConfigError(f"--teacher {cfg.teacher}: {e}") from None
    return vae


def is_sd_folder(teacher) -> bool:
    """Is --teacher a diffusers pipeline folder (model_index.json), i.e. a Stable Diffusion teacher for SiD-LSG?"""
    return teacher is not None and (Path(str(teacher)) / "model_index.json").is_file()


SD_FLAGS = ("cfg_train_fake", "cfg_eval_fake", "cfg_eval_real")


def check_not_sd_flags(cfg: TrainConfig) -> None:
    """Guidance and prompts belong to Stable Diffusion teachers: refused with any other."""
    for flag in SD_FLAGS:
        if getattr(cfg, flag) != 1:
            raise ConfigError(
                f"{flag_name(flag)} {getattr(cfg, flag):g}: guidance applies to Stable Diffusion teachers (a diffusers "
                f"folder); --teacher {cfg.teacher} is not one."
            )
    if cfg.data_prompt_text is not None:
        raise ConfigError(
            f"--data-prompt-text {cfg.data_prompt_text}: prompts condition Stable Diffusion teachers (a diffusers "
            f"folder); --teacher {cfg.teacher} is not one."
        )


def load_sd_inputs(cfg: TrainConfig):
    """(StableDiffusion, prompts) of a SiD-LSG run, checked against the flags; one ConfigError naming the flag."""
    from sid_fast.t2i.lsg import check_precision
    from sid_fast.t2i.sd import SDError, load_sd, read_prompts

    check_precision(cfg)
    for flag, value, why in (
        ("--method", cfg.method != "sid", "SiDA with a Stable Diffusion teacher is not built"),
        ("--data", cfg.data is not None, "SiD-LSG is data-free: prompts come from --data-prompt-text"),
        ("--sid-model", cfg.sid_model is not None, "starting G from a distilled UNet is not built"),
        ("--metrics", cfg.metrics not in ("none", "fd-digits"), "FID-30k and CLIP score of text-to-image runs are "
         "not computed in the trainer (give --metrics none)"),
    ):  # fmt: skip
        if value:
            raise ConfigError(f"{flag} {getattr(cfg, flag[2:].replace('-', '_'))}: {why}.")
    if cfg.data_prompt_text is None:
        raise ConfigError(
            f"--data-prompt-text is required with the Stable Diffusion teacher {cfg.teacher}: a text file of prompts, "
            "one per line (the official runs use Aesthetics 6+ prompts)."
        )
    try:
        prompts = read_prompts(cfg.data_prompt_text)
    except SDError as e:
        raise ConfigError(f"--data-prompt-text {e}") from None
    try:
        sd = load_sd(cfg.teacher)
    except SDError as e:
        raise ConfigError(f"--teacher {e}") from None
    c, r = sd.latent_channels, sd.latent_resolution
    if (c, r) != (cfg.channels, cfg.resolution):
        raise ConfigError(
            f"--teacher {cfg.teacher}: the UNet makes {c}x{r}x{r} latents (preset "
            f"{cfg.preset}: {cfg.channels}x{cfg.resolution}x{cfg.resolution})."
        )
    if cfg.metrics == "fd-digits":
        vae = sd.vae.config
        size = sd.latent_resolution * 2 ** (len(vae.block_out_channels) - 1)
        if (vae.out_channels, size) != (1, 8):
            raise ConfigError(
                f"--metrics fd-digits: the teacher {cfg.teacher} makes {vae.out_channels}x{size}x{size} images, not "
                "8x8 digits (FD-digits and prompt accuracy are for the digits teacher, preset digits-lsg)."
            )
    if cfg.tmin >= cfg.tmax:
        raise ConfigError(
            f"--tmin {cfg.tmin} and --tmax {cfg.tmax}: timesteps are drawn in [tmin, tmax), which is empty."
        )
    steps = sd.schedule.num_train_timesteps
    if cfg.tmax > steps:
        raise ConfigError(f"--tmax {cfg.tmax}: the teacher {cfg.teacher} has {steps} timesteps (0 to {steps - 1}).")
    if cfg.init_timestep >= steps:
        raise ConfigError(
            f"--init-timestep {cfg.init_timestep}: the teacher {cfg.teacher} has {steps} timesteps (0 to {steps - 1})."
        )
    return sd, prompts


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
    the trainer. `teacher` and `teacher_spec` let tests and benchmarks bring networks that are not files.

    With several processes every rank loads its inputs, then all agree before the first collective: when any rank
    failed (an unreachable URL, a missing file on one node), every rank raises the same ConfigError, and none waits
    for the others in DDP's or FSDP's set-up."""
    device = device if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sd_inputs = label_table = real = generator_init = vae = None
    try:
        check_world(cfg, dist.world_size())
        if teacher is None and is_sd_folder(cfg.teacher):
            sd_inputs = load_sd_inputs(cfg)
        else:
            check_not_sd_flags(cfg)
            if teacher is None:
                teacher, info = checkpoints.load_network_file(cfg.teacher)
                meta = info.get("meta", {})
                teacher_spec = TeacherSpec(info["class_name"], info["init_kwargs"], teacher.state_dict(), meta)
            elif teacher_spec is None:
                raise ValueError(
                    "build_trainer: a teacher network given without its TeacherSpec (class, kwargs, weights)."
                )
            check_teacher(cfg, teacher, cfg.teacher)
            label_table = (
                load_label_table(cfg, teacher.label_dim) if cfg.data is not None and teacher.label_dim else None
            )
            if cfg.data is not None and not teacher.label_dim and cfg.method != "sida":
                open_dataset(cfg)  # unconditional SiD reads nothing from --data, but a missing one is still refused
            real = load_real_dataset(cfg) if cfg.method == "sida" else None
            generator_init = load_sid_model(cfg, teacher) if cfg.sid_model is not None else None
            vae = load_vae_for(cfg, teacher, device)
            if fid is None:
                fid = prepare_fid(cfg, device)
        failure = None
    except (ConfigError, checkpoints.CheckpointError) as e:
        failure = (type(e).__name__, str(e))
    except Exception as e:  # anything else: its own traceback alone, but never one rank gone while others wait
        if dist.world_size() == 1:
            raise
        failure = ("ConfigError", f"loading the run's inputs failed: {type(e).__name__}: {e}")
    agree_or_raise(failure)
    if sd_inputs is not None:
        from sid_fast.t2i.lsg import SiDLSGTrainer

        return SiDLSGTrainer(cfg, device, *sd_inputs, run_dir=run_dir, log=log)
    kwargs = dict(run_dir=run_dir, log=log, fid=fid, label_table=label_table, generator_init=generator_init, vae=vae)
    if real is not None:
        from sid_fast.training.sida import SiDATrainer

        return SiDATrainer(cfg, device, teacher, teacher_spec, real_dataset=real, **kwargs)
    return SiDTrainer(cfg, device, teacher, teacher_spec, **kwargs)


def agree_or_raise(failure: tuple[str, str] | None) -> None:
    """Every rank raises the same error when any rank's `failure` ((ConfigError or CheckpointError, its sentence)) is
    not None: the first failing rank's, naming it (a collective when distributed: every rank calls it)."""
    failures = dist.all_gather_object(failure)
    bad = [(r, f) for r, f in enumerate(failures) if f is not None]
    if not bad:
        return
    rank, (kind, msg) = bad[0]
    where = f" (on rank {rank}{f' and {len(bad) - 1} other(s)' if len(bad) > 1 else ''})" if len(failures) > 1 else ""
    raise (checkpoints.CheckpointError if kind == "CheckpointError" else ConfigError)(msg + where)


RUN_DIR_RE = re.compile(r"^(\d+)-(.+)$")


def run_desc(cfg: TrainConfig, world: int) -> str:
    return cfg.desc or f"{cfg.preset}-alpha{cfg.alpha:g}-batch{cfg.batch}-gpus{world}-{cfg.precision}"


def next_run_dir(outdir: str, desc: str) -> Path:
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    ids = [int(m.group(1)) for p in out.iterdir() if (m := RUN_DIR_RE.match(p.name))]
    run_dir = out / f"{max(ids, default=-1) + 1:05d}-{desc}"
    run_dir.mkdir()
    return run_dir


def latest_state(run_dir: Path) -> Path | None:
    """The newest complete training state of a run directory (names sort by images seen), or None."""
    states = list_states(run_dir)
    return states[-1] if states else None


def find_resume_state(path: str) -> Path:
    p = Path(path)
    if p.is_dir() and not (p / "meta.pt").is_file():  # a run directory, not a sharded state
        state = latest_state(p)
        if state is None:
            raise ConfigError(f"--resume {p}: the directory holds no training state (training-state-*.pt or .dcp).")
        return state
    if not p.exists():
        raise ConfigError(f"--resume {p}: no such file.")
    return p


def load_state_file(path) -> dict:
    """checkpoints.read_training_state (memory-mapped) with the --resume flag named in its error."""
    try:
        return checkpoints.read_training_state(path, mmap=True)
    except checkpoints.CheckpointError as e:
        raise ConfigError(f"--resume {e}") from None


def check_same_run(cfg: TrainConfig, state: dict, path: Path) -> None:
    """Refuse a state whose configuration differs from these flags in what the run computes."""
    diff = identity_differences(state.get("config", {}), cfg.to_json())
    if diff:
        raise ConfigError(
            f"{path}: written by another configuration ({'; '.join(diff)}: the state's value first); "
            "give the same flags, or --resume new (or another --outdir/--run-dir) for a new run."
        )


def _matching_run(cfg: TrainConfig, desc: str) -> Path | None:
    """--resume auto: the newest run directory in --outdir of this configuration (same --desc, same identity) that
    holds a training state. A directory of this configuration that a live process holds (the same command started
    twice) is refused, naming the holder."""
    out = Path(cfg.outdir)
    if not out.is_dir():
        return None
    for d in sorted((p for p in out.iterdir() if (m := RUN_DIR_RE.match(p.name)) and m.group(2) == desc), reverse=True):
        try:
            options = json.loads((d / "training_options.json").read_text())
        except (OSError, ValueError):
            continue
        if identity_differences(options, cfg.to_json()):
            continue
        holder = RunLock(d).held_by_another()
        if holder is not None:
            raise ConfigError(
                f"{d}: a run of this configuration is already training there ({holder}); wait for it or stop it, "
                "or give --resume new (or another --desc) for a separate run."
            )
        if latest_state(d) is not None:
            return d
    return None


def choose_run(cfg: TrainConfig, world: int, check=None) -> tuple[Path, Path | None]:
    """(run directory, training state to resume or None), decided on rank 0:
    - --resume auto (default): --run-dir if given (created if new), else the newest run directory of this
      configuration in --outdir that holds a state, else a new numbered one; continue from its newest state;
    - --resume new: a new numbered run directory (or --run-dir), from the start;
    - --resume PATH: a new numbered run directory, from PATH (a state, or a run directory's newest state).
    `check(state)` runs before any directory is made (a refusal leaves nothing behind)."""
    desc = run_desc(cfg, world)
    if cfg.resume not in ("auto", "new"):
        state = find_resume_state(cfg.resume)
    elif cfg.run_dir is not None:
        state = latest_state(Path(cfg.run_dir)) if cfg.resume == "auto" else None
    else:
        found = _matching_run(cfg, desc) if cfg.resume == "auto" else None
        state = latest_state(found) if found is not None else None
    if state is not None and check is not None:
        check(state)
    if cfg.run_dir is not None and cfg.resume in ("auto", "new"):
        run_dir = Path(cfg.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        return run_dir, state
    if cfg.resume == "auto" and state is not None:
        return state.parent, state
    return next_run_dir(cfg.outdir, desc), state


def _on_rank0(fn):
    """fn() on rank 0, its result (or its error as one ConfigError sentence, raised on every rank) shared with all
    ranks."""
    result, failure = None, None
    if dist.rank() == 0:
        try:
            result = fn()
        except (ConfigError, checkpoints.CheckpointError) as e:
            failure = str(e)
        except OSError as e:  # e.g. an --outdir that cannot be created
            failure = f"{e.filename or 'the run directory'}: {e.strerror or e}."
    result, failure = dist.broadcast_object((result, failure))
    if failure is not None:
        raise ConfigError(failure)
    return result


def run(cfg: TrainConfig, log_to_stdout=True) -> tuple[Path | None, str]:
    """Run, continue or resume a distillation; returns (the run directory, "done" or "stopped")."""
    device = dist.init()
    world = dist.world_size()
    # Everything that can be refused is checked before the run directory is made: the trainer is built first,
    # with a logger that buffers until the directory exists.
    pending: list[str] = []
    trainer = build_trainer(cfg, device, log=pending.append)
    lock = None  # rank 0's lock on the run directory, held until the run ends (or the process dies)

    def decide():
        nonlocal lock
        with outdir_lock(Path(cfg.run_dir).parent if cfg.run_dir is not None else cfg.outdir):
            run_dir, state_path = choose_run(cfg, world, check=lambda p: check_same_run(cfg, load_state_file(p), p))
            try:
                lock = RunLock(run_dir).acquire()
            except RunLocked as e:
                raise ConfigError(str(e)) from None
        if lock.unsupported:
            pending.append(f"Warning: {run_dir} is not locked ({lock.unsupported}): start one command per directory.")
        removed = remove_stale_temporaries(run_dir)
        if removed:
            pending.append(f"Removed what killed writes left in {run_dir}: {', '.join(removed)}.")
        checkpoints.atomic_write_text(
            run_dir / "training_options.json",
            json.dumps(dict(cfg.to_json(), world_size=world, class_labels=trainer.conditioning()), indent=2),
        )
        return run_dir, state_path

    try:
        run_dir, state_path = _on_rank0(decide)
        log = Logger(run_dir if dist.rank() == 0 else None) if log_to_stdout else (lambda *_: None)
        log(f"Run directory: {run_dir}")
        for line in pending:
            log(line)
        trainer.run_dir, trainer.log = run_dir, log  # every rank: a sharded state is written by all
        if state_path is not None:
            trainer.load_state_dict(load_state_file(state_path), state_path)
            log(f"Resumed from {state_path} at {trainer.cur_nimg / 1e3:.1f} kimg.")
            if dist.rank() == 0:
                dropped = rewind_records(run_dir, trainer.cur_nimg / 1e3)
                if dropped:
                    what = ", ".join(f"{n} record(s) of {name}" for name, n in dropped.items())
                    log(f"Dropped {what} written after that state (logged again as the run continues).")
        if dist.rank() == 0:
            trainer.tracker = make_tracker(cfg.tracker, run_dir, cfg.to_json(), cfg.tracker_project, log)
        try:
            status = trainer.train()
        except OSError as e:  # the run directory made read-only, removed, or its disk full
            last = latest_state(run_dir) if run_dir.is_dir() else None
            raise ConfigError(
                f"{e.filename or run_dir}: writing failed ({e.strerror or e}); the last complete training state is "
                f"{last or 'none'}{'' if last is None else ' (run the same command again to continue from it)'}."
            ) from None
        finally:
            trainer.tracker.close()
        log(f"Run directory: {run_dir} (states, snapshots, stats.jsonl, log.txt)")
        if isinstance(log, Logger):
            log.close()
    finally:
        if lock is not None:
            lock.release()
    dist.finish()
    return run_dir, status


__all__ = [
    "agree_or_raise",
    "build_trainer",
    "choose_run",
    "check_teacher",
    "find_resume_state",
    "load_state_file",
    "next_run_dir",
    "run",
    "TrainingAborted",
]
