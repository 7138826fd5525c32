"""SiD training configuration: one dataclass whose fields are declared in sections, each field's domain, and the
checks of fields on their own and against each other. The presets (the official settings) are the teacher families'
(sid_fast.families: each family module holds its own).

Sections (`section` of each field, declared once in TrainConfig):
- run: where a run writes and how long it runs; metrics: what it measures and reports; speed: how fast it runs (the
  fast path); parallel: how it is spread over processes; preset: what a preset says about itself (for messages);
- inputs, algorithm, family: what it computes: the teacher and data, SiD's and SiDA's settings, and the teacher
  family's own settings. These three sections are a run's identity: a training state is continued only by a
  configuration with the same identity (the speed, parallel, run and metrics sections may change on resume).
Units follow SiD/EDM: --duration and --ema in Mimg, --tick in kimg, --snap and --dump in ticks.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

import torch

from sid_fast import families, fewstep, ops
from sid_fast.families import ASSETS, FID_REFS, PRESETS  # noqa: F401  (the presets, read here by their users)
from sid_fast.flags import ConfigError, Domain
from sid_fast.training.trackers import check_installed

# name: is the section part of a run's identity?
SECTIONS = {
    "run": False,
    "inputs": True,
    "algorithm": True,
    "family": True,
    "speed": False,
    "parallel": False,
    "metrics": False,
    "preset": False,
}


def _in(section: str, default=None, **kw):
    """A field of `section` (SECTIONS)."""
    assert section in SECTIONS, section
    return field(default=default, metadata={"section": section}, **kw)


@dataclass
class TrainConfig:
    # run: where it writes, how long it runs, what it keeps.
    outdir: str = _in("run", "runs")
    desc: str | None = _in("run")
    resume: str = _in("run", "auto")  # auto: continue the run of this configuration; new: a fresh run; or a state/dir
    run_dir: str | None = _in("run")  # the run's directory exactly (no numbering): the same command continues it
    keep_states: int = _in("run", 3)  # training states kept in the run directory (the newest; 0 keeps all)
    duration: float = _in("run", 500.0)  # Mimg
    tick: float = _in("run", 10.0)  # kimg
    snap: int = _in("run", 50)  # ticks
    dump: int = _in("run", 500)  # ticks
    extra_snapshots: bool = _in("run", True)  # official: also snapshot at kimg 0 and at ticks 10, 20, ..., 100
    max_bad_steps: int = _in("run", 100)  # consecutive steps with non-finite gradients before aborting (checkpointed)
    # inputs: the preset, the teacher, the data, the seed.
    preset: str = _in("inputs", "digits")
    teacher: str | None = _in("inputs")  # EDM/SiD pickle, sid_fast file or folder, or a diffusers SD folder
    data: str | None = _in("inputs")  # EDM dataset: conditional labels follow its label frequencies; SiDA's real images
    sid_model: str | None = _in("inputs")  # SiD²A: G and G_ema start from this SiD generator (path or URL)
    data_prompt_text: str | None = _in("inputs")  # prompt file, one per line (official SiD-LSG: Aesthetics 6+)
    seed: int = _in("inputs", 0)
    # algorithm: SiD (official sid_train.py names), SiDA (official sida branch), the optimiser and the EMA.
    method: str = _in("algorithm", "sid")  # sid, sida
    alpha: float = _in("algorithm", 1.2)
    tmax: int = _in("algorithm", 800)
    init_sigma: float = _in("algorithm", 2.5)
    ls: float = _in("algorithm", 1.0)  # fake-score loss scale
    lsg: float = _in("algorithm", 100.0)  # generator loss scale
    lsd: float = _in("algorithm", 1.0)  # SiDA: discriminator loss scale (fake-score phase)
    lsg_gan: float = _in("algorithm", 0.01)  # SiDA: generator GAN term scale (times C*H*W)
    xflip: bool = _in("algorithm", False)  # SiDA: real images also mirrored (EDM's dataset x-flip)
    sida_g_start_kimg: float = _in("algorithm", 100.0)  # SiDA: no generator step up to here (official: 100k images)
    sida_gan_start_kimg: float = _in("algorithm", 200.0)  # SiDA: SiD alone up to here, then 0.5 SiD + 0.5 GAN
    batch: int = _in("algorithm", 64)
    batch_gpu: int | None = _in("algorithm")  # per process and micro-batch: it groups the seeded draws (identity)
    lr: float = _in("algorithm", 1e-5)  # fake score
    glr: float = _in("algorithm", 1e-5)  # generator
    g_beta1: float = _in("algorithm", 0.0)
    ema: float = _in("algorithm", 0.5)  # EMA half-life, Mimg
    augment: float = _in("algorithm", 0.0)  # EDM augmentation probability for the fake-score loss
    dropout: float = _in("algorithm", 0.13)
    precision: str = _in("algorithm", "fp32")  # fp32 (reference: TF32 off, as SiD), fp16 (EDM's --fp16 1), tf32, bf16
    # family: the teacher family's own settings (each family declares which it reads: sid_fast.families).
    cond: bool = _in("family", False)
    resolution: int = _in("family", 16)
    channels: int = _in("family", 1)
    label_dim: int = _in("family", 0)
    P_mean: float | None = _in("family")  # fake-score loss: ln sigma ~ N(P_mean, P_std^2); None: the family's default
    P_std: float | None = _in("family")
    return_logvar: bool = _in("family", True)  # EDM2: u(sigma) of the fake score weights the losses
    force_normalization: bool = _in("family", True)  # EDM2 SiDA: forced weight normalisation (SiD always)
    tmin: int = _in("family", 20)  # Stable Diffusion: timesteps in [tmin, tmax)
    init_timestep: int = _in("family", 625)  # Stable Diffusion: G's timestep
    cfg_train_fake: float = _in("family", 1.0)  # Stable Diffusion: guidance kappa1 (fake score trained)
    cfg_eval_fake: float = _in("family", 1.0)  # kappa2 (fake score evaluated)
    cfg_eval_real: float = _in("family", 1.0)  # kappa4 (teacher)
    generator_steps: int = _in("family", 1)  # K of the few-step generator (official flow --num_steps; sid_fast.fewstep)
    noise_type: str = _in("family", "fresh")  # re-noising between generator steps (fresh, fixed, ddim)
    weighting: str = _in("family", "1_minus_sigma")  # flow matching: the generator loss's w(t) (--weighting_scheme)
    # speed: the fast path (sid_fast.perf, sid_fast.ops); defaults are the reference path.
    channels_last: bool = _in("speed", False)
    compile: bool = _in("speed", False)  # torch.compile of the three networks
    compile_backend: str = _in("speed", "inductor")  # aot_eager traces the same graphs without code generation
    cuda_graphs: str = _in("speed", "none")  # sites: compile mode "reduce-overhead"; step: the whole iteration (CUDA)
    checkpointing: str = _in("speed", "none")  # none, nets, blocks, selective (sid_fast.perf)
    optimizer: str = _in("speed", "adam")  # adam (official), foreach, fused (+ foreach EMA)
    kernels: str = _in("speed", "none")  # none, all, or a comma list of sid_loss,edm_loss,group_norm_silu,attention
    workers: int = _in("speed", 2)  # DataLoader workers for real images (CUDA runs; the CPU reads in-process)
    # parallel: how the processes share the work.
    fsdp: bool = _in("parallel", False)  # shard G and the fake score and their Adam states with FSDP2 (fully_shard)
    # metrics: what a run measures and where it reports.
    metrics: str = _in("metrics", "none")  # "fid", "fd-dinov2", "fid,fd-dinov2" (EDM2), "fd-digits" or "none"
    metric_num: int = _in("metrics", 2000)  # images per evaluation (the paper's FID: 50000)
    data_stat: str | None = _in("metrics")  # reference statistics: EDM npz, EDM2 pkl (fid,fd-dinov2); path or URL
    detector: str | None = _in("metrics")  # Inception detector, path or URL (default: $SID_FAST_DETECTOR or cache)
    dinov2: str | None = _in("metrics")  # DINOv2 ViT-L/14 for fd-dinov2, path or URL
    vae: str | None = _in("metrics")  # EDM2 latent teachers: the Stability VAE (diffusers folder) for grids and FID
    validation_prompts: str | None = _in("metrics")  # Stable Diffusion: the snapshot grid's prompts (first 16 lines)
    tracker: str = _in("metrics", "none")  # none, tensorboard, wandb, tensorboard,wandb (rank 0)
    tracker_project: str = _in("metrics", "sid_fast")  # the W&B project
    # preset: what a preset says about itself (messages only).
    official_teacher: str | None = _in("preset", repr=False)
    official_data: str | None = _in("preset", repr=False)  # the SiDA presets' real images
    needs_sid_model: bool = _in("preset", False, repr=False)  # the SiD²A presets

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def sections(self, family_fields=None) -> dict[str, dict]:
        """The configuration by section; with `family_fields`, the family section holds those fields only (the
        detected family's: --dry-run)."""
        out: dict[str, dict] = {name: {} for name in SECTIONS}
        for f in dataclasses.fields(self):
            section = f.metadata["section"]
            if section == "family" and family_fields is not None and f.name not in family_fields:
                continue
            out[section][f.name] = getattr(self, f.name)
        return out


def identity_fields(cls=None) -> frozenset[str]:
    """The fields of the identity sections (SECTIONS) of a configuration class; a field without a section is an
    error (every field is declared in one)."""
    fields = dataclasses.fields(cls or TrainConfig)
    missing = [f.name for f in fields if f.metadata.get("section") not in SECTIONS]
    if missing:
        raise TypeError(f"configuration fields without a section: {missing}")
    return frozenset(f.name for f in fields if SECTIONS[f.metadata["section"]])


SECTION_OF = {f.name: f.metadata["section"] for f in dataclasses.fields(TrainConfig)}
IDENTITY_FIELDS = identity_fields(TrainConfig)
# Compared by file name: a moved or downloaded copy is the same input.
FILE_FIELDS = ("teacher", "data", "sid_model", "data_prompt_text")


def identity(cfg_json: dict) -> dict:
    """The fields of a configuration (TrainConfig.to_json) that decide what a run computes: those of the identity
    sections."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    # A field added after a state was written takes its default (which reproduces what the state's run computed).
    out = {k: cfg_json.get(k, defaults[k]) for k in sorted(IDENTITY_FIELDS)}
    for k in FILE_FIELDS:
        if out.get(k) is not None:
            out[k] = os.path.basename(str(out[k]).rstrip("/"))
    return out


# Fields that come from the preset only (no flag): named by what sets them.
_PRESET_FIELDS = frozenset(
    {"resolution", "channels", "label_dim", "official_teacher", "official_data", "needs_sid_model"}
)


def flag(name: str) -> str:
    """A TrainConfig field's flag as `python train.py --help` prints it."""
    if name in _PRESET_FIELDS:
        return f"the preset's {name}"
    return "--" + name.replace("_", "-").lower()  # train.py spells every flag with dashes (official names: aliases)


def identity_differences(a: dict, b: dict) -> list[str]:
    """The flags (as --help prints them) whose values differ between two configurations' identities."""
    ia, ib = identity(a), identity(b)
    keys = sorted(set(ia) | set(ib))
    return [f"{flag(k)} {ia.get(k)!r} vs {ib.get(k)!r}" for k in keys if ia.get(k) != ib.get(k)]


_GUIDANCE = Domain(float, 0, 100, lo_open=True, hint="1 is no guidance")


# Every numeric field's domain, checked first by `validate` (one place, one sentence naming the flag). Relations
# between fields (tmin < tmax, batch divisible, ...) and checks that need the teacher come after.
DOMAINS: dict[str, Domain] = {
    "seed": Domain(int, 0, 2**32 - 1),
    "keep_states": Domain(int, 0, 10**6, hint="0 keeps all"),
    "resolution": Domain(int, 1, 4096),
    "channels": Domain(int, 1, 64),
    "label_dim": Domain(int, 0, 100_000),
    "alpha": Domain(float, 0, 10, hint="SiD uses 1.0 or 1.2"),
    "tmax": Domain(int, 0, 1000, lo_open=True, hint="SiD uses 800, SiD-LSG 980"),
    "init_sigma": Domain(float, 0.002, 80, lo_open=True, hint="SiD uses 2.5"),
    "ls": Domain(float, 0, 1e6, lo_open=True, hint="SiD uses 1"),
    "lsg": Domain(float, 0, 1e6, lo_open=True, hint="SiD uses 100, SiD-LSG 1"),
    "P_mean": Domain(float, -10, 10, hint="EDM uses -1.2"),
    "P_std": Domain(float, 0, 10, lo_open=True, hint="EDM uses 1.2"),
    "lsd": Domain(float, 0, 1e6, hint="SiDA uses 1 or 100"),
    "lsg_gan": Domain(float, 0, 1e6, hint="SiDA uses 0.01"),
    "workers": Domain(int, 0, 1024),
    "sida_g_start_kimg": Domain(float, 0, 1e9, hint="official 100; 20 on flow-matching teachers"),
    "sida_gan_start_kimg": Domain(float, 0, 1e9, hint="official 200; 40 on flow-matching teachers"),
    "batch": Domain(int, 1, 2**24),
    "batch_gpu": Domain(int, 1, 2**24),
    "lr": Domain(float, 0, 1, lo_open=True, hint="SiD uses 1e-5"),
    "glr": Domain(float, 0, 1, lo_open=True, hint="SiD uses 1e-5"),
    "g_beta1": Domain(float, 0, 1, hi_open=True, hint="SiD uses 0"),
    "ema": Domain(
        float,
        0,
        1e6,
        hint="Mimg; the half-life is int(ema * 1000) kimg as in the official code; 0 turns the EMA off",
    ),
    "augment": Domain(float, 0, 1, hint="a probability"),
    "dropout": Domain(float, 0, 1, hi_open=True),
    "duration": Domain(float, 0, 1e6, lo_open=True, hint="Mimg"),
    "tick": Domain(float, 0, 1e6, lo_open=True, hint="kimg"),
    "snap": Domain(int, 1, 10**9, hint="ticks"),
    "dump": Domain(int, 1, 10**9, hint="ticks"),
    "metric_num": Domain(int, 2, 10_000_000),
    "max_bad_steps": Domain(int, 1, 10**9),
    "tmin": Domain(int, 0, 1000, hint="SiD-LSG uses 20"),
    "init_timestep": Domain(int, 0, 999, hint="SiD-LSG uses 625"),
    "cfg_train_fake": _GUIDANCE,
    "cfg_eval_fake": _GUIDANCE,
    "cfg_eval_real": _GUIDANCE,
    "generator_steps": Domain(int, 1, 64, hint="SiD on flow matching uses 4"),
}


def check_text(cfg) -> None:
    """Names and paths: no NUL or other control character anywhere (the OS refuses them in paths), and --desc, which
    becomes part of a folder name, without path separators."""
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if isinstance(v, str) and any(ord(c) < 32 for c in v):
            raise ConfigError(f"{flag(f.name)} {v!r}: contains a control character (a NUL, a newline, ...).")
    if cfg.desc is not None and (cfg.desc in (".", "..") or any(c in cfg.desc for c in "/\\")):
        raise ConfigError(f"--desc {cfg.desc!r}: it becomes part of the run directory's name; use no / or \\.")


def check_domains(cfg) -> None:
    """Every numeric field of `cfg` in its declared domain (None is 'not set' where the field allows it)."""
    for name, domain in DOMAINS.items():
        v = getattr(cfg, name)
        if v is None and name in ("P_mean", "P_std", "batch_gpu"):
            continue
        if not domain.admits(v):
            raise ConfigError(f"{flag(name)} must be {domain.describe()}, got {v!r}.")


PRECISIONS = ("fp32", "fp16", "tf32", "bf16")
CHECKPOINTING = ("none", "nets", "blocks", "selective")
OPTIMIZERS = ("adam", "foreach", "fused")
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")
CUDA_GRAPHS = (
    "none",
    "sites",
    "step",
)  # sites: per call site (torch.compile reduce-overhead); step: sid_fast.training.graphs
METRICS = ("fid", "fd-dinov2", "fid,fd-dinov2", "fd-digits", "none")


def metric_list(metrics: str) -> list[str]:
    """--metrics as the metric keys of the files (metric-<key>.jsonl): "fid,fd-dinov2" -> ["fid", "fd_dinov2"]."""
    return [] if metrics == "none" else [m.replace("-", "_") for m in metrics.split(",")]


METHODS = ("sid", "sida")


def _ref_url(preset: str) -> str:
    return FID_REFS.get(preset, "<dataset>.npz")


def resolve_config(preset: str, overrides: dict) -> TrainConfig:
    """Preset values, then every explicitly given flag (None means 'not given'), then validation."""
    if preset not in PRESETS:
        raise ConfigError(f"--preset: unknown preset {preset!r}; choose one of {', '.join(sorted(PRESETS))}.")
    values = dict(PRESETS[preset], preset=preset)
    values.update({k: v for k, v in overrides.items() if v is not None})
    cfg = TrainConfig(**values)
    if cfg.batch_gpu is None:
        cfg.batch_gpu = cfg.batch
    validate(cfg)
    return cfg


def check_world(cfg: TrainConfig, world_size: int) -> None:
    """--batch against the number of processes (known once the process group exists)."""
    if cfg.batch % (world_size * cfg.batch_gpu):
        raise ConfigError(
            f"--batch {cfg.batch} is not divisible by the number of processes ({world_size}) times --batch-gpu "
            f"{cfg.batch_gpu}."
        )


def validate(cfg: TrainConfig) -> None:
    """Every flag on its own (its declared domain) and against the others; the process count is checked by
    `check_world`, what needs the teacher by the teacher family's loader."""
    check_text(cfg)
    check_domains(cfg)
    check_world(cfg, 1)
    _validate_fast_path(cfg)
    _validate_schedule(cfg)
    _validate_inputs(cfg)
    _validate_sida(cfg)
    _validate_metrics(cfg)
    family = families.detect(cfg)
    if cfg.noise_type not in fewstep.NOISE_TYPES:
        raise ConfigError(f"--noise-type {cfg.noise_type!r}: choose one of {', '.join(fewstep.NOISE_TYPES)}.")
    family.check_config(cfg)  # the teacher family's own flags


def _validate_fast_path(cfg: TrainConfig) -> None:
    if cfg.precision not in PRECISIONS:
        raise ConfigError(f"--precision {cfg.precision!r}: choose one of {', '.join(PRECISIONS)}.")
    if cfg.checkpointing not in CHECKPOINTING:
        raise ConfigError(f"--checkpointing {cfg.checkpointing!r}: choose one of {', '.join(CHECKPOINTING)}.")
    if cfg.optimizer not in OPTIMIZERS:
        raise ConfigError(f"--optimizer {cfg.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}.")

    try:
        ops.parse(cfg.kernels)
    except ValueError as e:
        raise ConfigError(f"--kernels {cfg.kernels!r}: {e}") from None
    if cfg.compile_backend not in COMPILE_BACKENDS:
        raise ConfigError(f"--compile-backend {cfg.compile_backend!r}: choose one of {', '.join(COMPILE_BACKENDS)}.")
    if isinstance(cfg.cuda_graphs, bool):  # a configuration written when the flag was a switch (per call site)
        cfg.cuda_graphs = "sites" if cfg.cuda_graphs else "none"
    if cfg.cuda_graphs not in CUDA_GRAPHS:
        raise ConfigError(f"--cuda-graphs {cfg.cuda_graphs!r}: choose one of {', '.join(CUDA_GRAPHS)}.")
    if cfg.cuda_graphs != "none" and not torch.cuda.is_available():
        raise ConfigError("--cuda-graphs needs a CUDA device; this machine has none.")
    if cfg.cuda_graphs == "step":
        for flag, given, why in (
            ("--fsdp", cfg.fsdp, "FSDP2's all-gathers and frees around each block are not captured"),
            ("--method sida", cfg.method == "sida", "SiDA reads real images from a loader every micro-batch"),
            (f"--generator-steps {cfg.generator_steps}", cfg.generator_steps > 1, "the number of generator steps k ~ "
             "U{1..K} changes from one iteration to the next"),
        ):  # fmt: skip
            if given:
                raise ConfigError(f"--cuda-graphs step with {flag}: {why}; use --cuda-graphs sites.")


def _validate_schedule(cfg: TrainConfig) -> None:
    if 0 < cfg.ema < 0.001:
        raise ConfigError(
            f"--ema {cfg.ema}: the half-life is int(ema * 1000) kimg as in the official code, 0 below 0.001 Mimg; give "
            "--ema 0 to turn the EMA off (G_ema = G, as ml-sid-dit) or at least 0.001 Mimg."
        )
    if cfg.resume != "auto" and cfg.resume != "new" and cfg.run_dir is not None:
        raise ConfigError(
            f"--resume {cfg.resume} and --run-dir {cfg.run_dir}: a given state starts a new run directory; give one."
        )


def _validate_inputs(cfg: TrainConfig) -> None:
    if cfg.teacher is None:
        raise ConfigError(families.detect(cfg).missing_teacher(cfg))
    if (cfg.P_mean is None) != (cfg.P_std is None):
        raise ConfigError(f"--p-mean and --p-std go together (got --p-mean {cfg.P_mean}, --p-std {cfg.P_std}).")


def _validate_sida(cfg: TrainConfig) -> None:
    if cfg.method not in METHODS:
        raise ConfigError(f"--method {cfg.method!r}: choose one of {', '.join(METHODS)}.")
    if cfg.method == "sida" and cfg.data is None:
        raise ConfigError(
            "--method sida trains its discriminator on real images: give --data (an EDM dataset, zip or "
            "folder, of the teacher's resolution and channels; for flow-matching teachers a pairs folder of "
            "sid_fast.t2i.pairs"
            + (
                f"; this preset's: {cfg.official_data}"
                + ("" if "python -m" in cfg.official_data else ", made with sid_fast.data.dataset_tool")
                if cfg.official_data
                else ""
            )
            + ")."
        )
    if cfg.needs_sid_model and cfg.sid_model is None:
        raise ConfigError(
            f"--preset {cfg.preset} is SiD²A: give --sid-model, the SiD generator (a snapshot folder, a Hub id, "
            "a network-snapshot pickle or a sid_fast file) that G and G_ema start from."
        )
    if not 0 <= cfg.sida_g_start_kimg <= cfg.sida_gan_start_kimg:
        raise ConfigError(
            f"--sida-g-start-kimg {cfg.sida_g_start_kimg} and --sida-gan-start-kimg "
            f"{cfg.sida_gan_start_kimg}: need 0 <= generator start <= GAN start (official: 100 and 200)."
        )


def _validate_metrics(cfg: TrainConfig) -> None:
    reason = check_installed(cfg.tracker)
    if reason is not None:
        raise ConfigError(reason)
    cfg.metrics = {"fd-dinov2,fid": "fid,fd-dinov2"}.get(cfg.metrics, cfg.metrics)
    if cfg.metrics not in METRICS:
        raise ConfigError(f"--metrics must be one of {', '.join(METRICS)}, got {cfg.metrics!r}.")
    if cfg.metrics not in ("fd-digits", "none") and cfg.data_stat is None:
        raise ConfigError(
            f"--metrics {cfg.metrics} needs --data-stat REF.npz|REF.pkl, the reference statistics (path or URL; the "
            f"official ones for this preset: "
            f"{_ref_url(cfg.preset)}, or make one with `python -m sid_fast.fid ref`); "
            f"or pass --metrics none."
        )
