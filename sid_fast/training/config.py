"""SiD training configuration and the official presets (official `run_sid.sh` at HEAD, `sid_train.py` defaults).

Units follow SiD/EDM: --duration and --ema in Mimg, --tick in kimg, --snap and --dump in ticks.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from sid_fast import families
from sid_fast.families.sd import SDFamily
from sid_fast.flags import ConfigError, Domain

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DIGITS_TEACHER_PATH = ASSETS / "digits_teacher.pt"
EDM_URL = "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/"
FID_REF_URL = "https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/"
# EDM's published reference statistics per preset (official run_sid.sh --data_stat values).
FID_REFS = {
    "cifar10-uncond": "cifar10-32x32.npz",
    "cifar10-cond": "cifar10-32x32.npz",
    "imagenet64-cond": "imagenet-64x64.npz",
    "ffhq64": "ffhq-64x64.npz",
    "afhqv2-64": "afhqv2-64x64.npz",
}


@dataclass
class TrainConfig:
    # Run.
    outdir: str = "runs"
    preset: str = "digits"
    teacher: str | None = None  # path or URL of an EDM/SiD pickle or sid_fast checkpoint
    desc: str | None = None
    seed: int = 0
    resume: str = "auto"  # auto: continue the run of this configuration if any; new: a fresh run; or a state/run dir
    run_dir: str | None = None  # the run's directory exactly (no numbering): the same command continues it
    keep_states: int = 3  # training states kept in the run directory (the newest; 0 keeps all)
    # Data-free target: only shape and labels.
    cond: bool = False
    data: str | None = None  # EDM dataset (zip/folder): conditional labels follow its label frequencies, as official
    resolution: int = 16
    channels: int = 1
    label_dim: int = 0
    # SiD.
    alpha: float = 1.2
    tmax: int = 800
    init_sigma: float = 2.5
    ls: float = 1.0  # fake-score loss scale
    lsg: float = 100.0  # generator loss scale
    P_mean: float | None = None  # fake-score loss: ln sigma ~ N(P_mean, P_std^2); None: -1.2/1.2 (EDM), -0.4/1.0 (EDM2)
    P_std: float | None = None
    # EDM2 teachers (official sida_edm2_train.py --return_logvar, --force_normalization): weight the losses by the fake
    # score's learned log-variance; SiDA: forced weight normalisation (SiD always normalises, as upstream).
    return_logvar: bool = True
    force_normalization: bool = True
    # SiDA (official sida branch): the fake score is also the discriminator, trained on real images from --data.
    method: str = "sid"  # sid, sida
    lsd: float = 1.0  # discriminator loss scale (fake-score phase)
    lsg_gan: float = 0.01  # generator GAN term scale (times C*H*W)
    xflip: bool = False  # real images also mirrored (EDM's dataset x-flip)
    workers: int = 2  # DataLoader workers for real images (CUDA runs; the CPU reads in-process)
    sida_g_start_kimg: float = 100.0  # no generator step up to here (official: 100k images)
    sida_gan_start_kimg: float = 200.0  # SiD alone up to here, then 0.5 SiD + 0.5 GAN (official: 200k images)
    # Optimisation.
    batch: int = 64
    batch_gpu: int | None = None
    lr: float = 1e-5  # fake score
    glr: float = 1e-5  # generator
    g_beta1: float = 0.0
    ema: float = 0.5  # EMA half-life, Mimg
    augment: float = 0.0  # EDM augmentation probability for the fake-score loss
    dropout: float = 0.13
    precision: str = "fp32"  # fp32 (reference: TF32 off, as SiD), fp16 (EDM's --fp16 1 mode), tf32, bf16
    # The fast path (sid_fast.perf, sid_fast.ops); defaults are the reference path.
    channels_last: bool = False
    compile: bool = False  # torch.compile of the three networks
    compile_backend: str = "inductor"  # aot_eager traces the same graphs without code generation (CPU tests)
    cuda_graphs: bool = False  # compile mode "reduce-overhead" (CUDA only; implies compile)
    checkpointing: str = (
        "none"  # none, nets / blocks (teacher + fake score, generator phase), selective (sid_fast.perf)
    )
    optimizer: str = "adam"  # adam (official), foreach, fused (+ foreach EMA)
    fsdp: bool = False  # shard G and the fake score and their Adam states with FSDP2 (fully_shard) instead of DDP
    kernels: str = "none"  # none, all, or a comma list of sid_loss,edm_loss,group_norm_silu,attention (or sdpa)
    # Schedule.
    duration: float = 500.0  # Mimg
    tick: float = 10.0  # kimg
    snap: int = 50  # ticks
    dump: int = 500  # ticks
    extra_snapshots: bool = True  # official: also snapshot at kimg 0 (before training) and at ticks 10, 20, ..., 100
    # Metrics and faults.
    metrics: str = "none"  # "fid", "fd-dinov2", "fid,fd-dinov2" (EDM2), "fd-digits" or "none"
    metric_num: int = 2000  # images per evaluation (the paper's FID: 50000; 10000 for quick runs)
    data_stat: str | None = None  # reference statistics: EDM npz, EDM2 pkl (fid,fd-dinov2); path or URL
    detector: str | None = None  # Inception detector, path or URL (default: $SID_FAST_DETECTOR or the cache)
    dinov2: str | None = None  # DINOv2 ViT-L/14 for fd-dinov2, path or URL (default: $SID_FAST_DINOV2 or the cache)
    vae: str | None = None  # EDM2 latent teachers: the Stability VAE (local diffusers folder) for grids and FID
    tracker: str = "none"  # none, tensorboard, wandb, tensorboard,wandb (sid_fast.training.trackers; rank 0)
    tracker_project: str = "sid_fast"  # the W&B project
    max_bad_steps: int = 100  # consecutive steps with non-finite gradients before aborting (with a checkpoint)
    sid_model: str | None = None  # SiD²A: G and G_ema start from this SiD generator (path or URL)
    # SiD-LSG (Stable Diffusion teachers, sid_fast.t2i.lsg; official SiD-LSG flag names): timesteps in [tmin, tmax),
    # G at --init_timestep, guidance kappa1 (fake score trained), kappa2 (fake score evaluated), kappa4 (teacher).
    data_prompt_text: str | None = None  # prompt file, one per line (official: Aesthetics 6+)
    tmin: int = 20
    init_timestep: int = 625
    cfg_train_fake: float = 1.0
    cfg_eval_fake: float = 1.0
    cfg_eval_real: float = 1.0
    official_teacher: str | None = field(default=None, repr=False)
    official_data: str | None = field(default=None, repr=False)  # the SiDA presets' real images (for messages)
    needs_sid_model: bool = field(default=False, repr=False)  # the SiD²A presets

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


# Fields that do not change what a run computes: where it writes, how often it reports, how fast it runs, how long it
# runs. Every other field is the run's identity: a state is only continued under the same identity.
RUN_ONLY_FIELDS = frozenset(
    {
        "outdir", "desc", "resume", "run_dir", "keep_states", "duration", "tick", "snap", "dump", "extra_snapshots",
        "metrics", "metric_num", "data_stat", "detector", "dinov2", "vae", "workers", "max_bad_steps", "channels_last",
        "tracker", "tracker_project",
        "compile", "compile_backend", "cuda_graphs", "checkpointing", "optimizer", "fsdp", "kernels",
        "official_teacher", "official_data", "needs_sid_model",
    }
)  # fmt: skip
# Compared by file name: a moved or downloaded copy is the same input.
FILE_FIELDS = ("teacher", "data", "sid_model", "data_prompt_text")


def identity(cfg_json: dict) -> dict:
    """The fields of a configuration (TrainConfig.to_json) that decide what a run computes."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
    # A field added after a state was written takes its default (which reproduces what the state's run computed).
    out = {k: cfg_json.get(k, defaults.get(k)) for k in defaults if k not in RUN_ONLY_FIELDS}
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
    "sida_g_start_kimg": Domain(float, 0, 1e9, hint="official 100"),
    "sida_gan_start_kimg": Domain(float, 0, 1e9, hint="official 200"),
    "batch": Domain(int, 1, 2**24),
    "batch_gpu": Domain(int, 1, 2**24),
    "lr": Domain(float, 0, 1, lo_open=True, hint="SiD uses 1e-5"),
    "glr": Domain(float, 0, 1, lo_open=True, hint="SiD uses 1e-5"),
    "g_beta1": Domain(float, 0, 1, hi_open=True, hint="SiD uses 0"),
    "ema": Domain(
        float,
        0.001,
        1e6,
        hint="Mimg; the half-life is int(ema * 1000) kimg as in the official code, so at least 0.001 Mimg",
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


# Official SiD settings. All: tmax 800, init_sigma 2.5, ls 1, lsg 100, snap 50, dump 500 (4 GPUs in the scripts).
PRESETS: dict[str, dict] = {
    "cifar10-uncond": dict(
        official_teacher="edm-cifar10-32x32-uncond-vp.pkl",
        cond=False,
        resolution=32,
        channels=3,
        label_dim=0,
        alpha=1.2,
        batch=256,
        batch_gpu=16,
        lr=1e-5,
        glr=1e-5,
        precision="fp32",
        dropout=0.13,
        augment=0.12,
        ema=0.5,
        duration=500,
        tick=10,
        snap=50,
        dump=500,
        metrics="fid",
        metric_num=50000,
    ),
    "cifar10-cond": dict(
        official_teacher="edm-cifar10-32x32-cond-vp.pkl",
        cond=True,
        resolution=32,
        channels=3,
        label_dim=10,
        alpha=1.2,
        batch=256,
        batch_gpu=16,
        lr=1e-5,
        glr=1e-5,
        precision="fp32",
        dropout=0.13,
        augment=0.12,
        ema=0.5,
        duration=800,
        tick=10,
        snap=50,
        dump=500,
        metrics="fid",
        metric_num=50000,
    ),
    # The official ImageNet/FFHQ/AFHQ runs use EDM's --fp16 1 (UNet bodies in fp16 on CUDA, Adam eps 1e-6).
    "imagenet64-cond": dict(
        official_teacher="edm-imagenet-64x64-cond-adm.pkl",
        cond=True,
        resolution=64,
        channels=3,
        label_dim=1000,
        alpha=1.2,
        batch=8192,
        batch_gpu=16,
        lr=4e-6,
        glr=4e-6,
        precision="fp16",
        dropout=0.1,
        augment=0.0,
        ema=2.0,
        duration=1000,
        tick=20,
        snap=50,
        dump=500,
        metrics="fid",
        metric_num=50000,
    ),
    "ffhq64": dict(
        official_teacher="edm-ffhq-64x64-uncond-vp.pkl",
        cond=False,
        resolution=64,
        channels=3,
        label_dim=0,
        alpha=1.2,
        batch=512,
        batch_gpu=32,
        lr=1e-5,
        glr=1e-5,
        g_beta1=0.9,
        precision="fp16",
        dropout=0.05,
        augment=0.15,
        ema=0.5,
        duration=500,
        tick=10,
        snap=50,
        dump=500,
        metrics="fid",
        metric_num=50000,
    ),
    "afhqv2-64": dict(
        official_teacher="edm-afhqv2-64x64-uncond-vp.pkl",
        cond=False,
        resolution=64,
        channels=3,
        label_dim=0,
        alpha=1.0,
        batch=512,
        batch_gpu=32,
        lr=5e-6,
        glr=5e-6,
        precision="fp16",
        dropout=0.05,
        augment=0.15,
        ema=0.5,
        duration=500,
        tick=10,
        snap=50,
        dump=500,
        metrics="fid",
        metric_num=50000,
    ),
    # The embedded default: the bundled 8x8 digits teacher, sized to run on a 2-core CPU in about 4 minutes (up to 10
    # on slower 2-core machines). Higher learning rates and a shorter EMA than the image presets:
    # the network is 1.3 M parameters and the run sees tens of thousands of images, not hundreds of millions. Batch
    # 256 rather than 64: on seed 0 at 48 kimg the curve of batch 64 swung between 4.1 and 20.7 after the first 30%,
    # that of batch 256 between 5.6 and 8.8 (studies/digits_default).
    "digits": dict(
        teacher=str(DIGITS_TEACHER_PATH),
        cond=False,
        resolution=8,
        channels=1,
        label_dim=0,
        alpha=1.2,
        batch=256,
        batch_gpu=256,
        lr=1e-4,
        glr=1e-4,
        precision="fp32",
        dropout=0.0,
        augment=0.0,
        ema=0.002,
        duration=0.048,
        tick=4,
        snap=2,
        dump=4,
        metrics="fd-digits",
        metric_num=2000,
        extra_snapshots=False,  # snap=2 already evaluates every 8 kimg; a kimg-0 evaluation would cost time
    ),
    # SiDA on the bundled digits (real data: the 1,797 digits the teacher was trained on). The official warm-ups
    # (100k images without generator steps, 200k without the GAN term) would outlast the whole CPU-sized run; here
    # they are scaled to the run's 48 kimg.
    "digits-sida": dict(
        teacher=str(DIGITS_TEACHER_PATH),
        cond=False,
        resolution=8,
        channels=1,
        label_dim=0,
        method="sida",
        data="digits",
        alpha=1.2,
        batch=256,
        batch_gpu=256,
        lr=1e-4,
        glr=1e-4,
        precision="fp32",
        dropout=0.0,
        augment=0.0,
        ema=0.002,
        duration=0.048,
        tick=4,
        snap=2,
        dump=4,
        metrics="fd-digits",
        metric_num=2000,
        extra_snapshots=False,
        lsd=1.0,
        lsg_gan=0.01,
        sida_g_start_kimg=1.0,
        sida_gan_start_kimg=2.0,
    ),
}

# SiD on a tiny EDM2-architecture teacher of the same digits (magnitude-preserving UNet, learned log-variance; 180k
# parameters; FD-digits 1.85): the EDM2 code path at CPU size. EDM2's unit-norm weights barely move at the digits
# preset's 1e-4 (FD-digits 264 after 8.2 kimg, against 25.7 at 3e-3), hence higher learning rates.
PRESETS["digits-edm2"] = dict(PRESETS["digits"], teacher=str(ASSETS / "digits_edm2_teacher.pt"), lr=3e-3, glr=3e-3)

# SiD on EDM2's ImageNet-512 teachers (official sida branch: run_sid_edm2.sh, sida_edm2_train.py; 4 GPUs there): the
# post-hoc EMA reconstructions EDM2 calls its FID presets, alpha 1, tmax 800, init_sigma 2.5, batch 2048, lr = glr =
# 5e-5, fp16, ls 1, lsg 100, ema 2 Mimg, no augmentation, tick 10, snap 50, dump 200, 200 Mimg (XXL 100); dropout 0
# (XS, S) or 0.1; labels with ImageNet's frequencies from --data (img512_labels/dataset.json, or the latent dataset);
# latents decoded by --vae for grids and FID; P_mean/P_std -0.4/1.0 and u(sigma) come with the EDM2 networks.
EDM2_URL = "https://nvlabs-fi-cdn.nvidia.com/edm2/"
_EDM2_TEACHERS = {
    "xs": ("xs-2147483-0.135", 64),
    "s": ("s-2147483-0.130", 64),
    "m": ("m-2147483-0.100", 32),
    "l": ("l-1879048-0.085", 32),
    "xl": ("xl-1342177-0.085", 16),
    "xxl": ("xxl-0939524-0.070", 2),
}
for _size, (_stem, _bg) in _EDM2_TEACHERS.items():
    PRESETS[f"edm2-img512-{_size}"] = dict(
        official_teacher=f"{EDM2_URL}posthoc-reconstructions/edm2-img512-{_stem}.pkl",
        cond=True,
        resolution=64,
        channels=4,
        label_dim=1000,
        alpha=1.0,
        tmax=800,
        init_sigma=2.5,
        batch=2048,
        batch_gpu=_bg,
        lr=5e-5,
        glr=5e-5,
        precision="fp16",
        dropout=0.0 if _size in ("xs", "s") else 0.1,
        augment=0.0,
        ema=2.0,
        duration=100 if _size == "xxl" else 200,
        tick=10,
        snap=50,
        dump=200,
        metrics="fid,fd-dinov2",  # EDM2 reports both (calculate_metrics.py; img512.pkl holds both statistics)
        metric_num=50000,
        official_data="img512_labels/dataset.json",
    )
    FID_REFS[f"edm2-img512-{_size}"] = f"{EDM2_URL}dataset-refs/img512.pkl"
# SiDA and SiD²A on EDM2 (run_sida_edm2.sh, run_sid_sida_edm2.sh): lsd 100, lsg_gan 0.01, real latents from a latent
# dataset of ImageNet-512 (python -m sid_fast.latents encode); S runs without the log-variance and without forced
# normalisation; SiD²A durations 30/80/200/55/50/30 Mimg, M with lsg 50.
_EDM2_SID2A = {
    "xs": (30, 100.0),
    "s": (80, 100.0),
    "m": (200, 50.0),
    "l": (55, 100.0),
    "xl": (50, 100.0),
    "xxl": (30, 100.0),
}
for _size, (_d2, _lsg2) in _EDM2_SID2A.items():
    _base = dict(
        PRESETS[f"edm2-img512-{_size}"],
        method="sida",
        lsd=100.0,
        lsg_gan=0.01,
        official_data="img512-sd latents (python -m sid_fast.latents encode)",
    )
    if _size == "s":
        _base.update(return_logvar=False, force_normalization=False)
    PRESETS[f"edm2-img512-{_size}-sida"] = _base
    PRESETS[f"edm2-img512-{_size}-sid2a"] = dict(_base, duration=_d2, lsg=_lsg2, needs_sid_model=True)
    FID_REFS[f"edm2-img512-{_size}-sida"] = FID_REFS[f"edm2-img512-{_size}-sid2a"] = FID_REFS[f"edm2-img512-{_size}"]

# SiDA and SiD²A (official sida branch, run_sida.sh and run_sid_sida.sh; 4 GPUs there): alpha 1, lsd 1, lsg_gan 0.01,
# snap 50, dump 200. SiD²A is the same run with G and G_ema from a SiD generator (--sid-model) and a shorter duration.
# The official AFHQ scripts read ffhq-64x64.zip (a copy-paste slip); these presets expect the AFHQv2 images.
_SIDA = dict(method="sida", alpha=1.0, lsd=1.0, lsg_gan=0.01, snap=50, dump=200)
_SIDA_DATA = {
    "cifar10-uncond": "cifar10-32x32.zip",
    "cifar10-cond": "cifar10-32x32.zip",
    "imagenet64-cond": "imagenet-64x64.zip",
    "ffhq64": "ffhq-64x64.zip",
    "afhqv2-64": "afhqv2-64x64.zip",
}
_SIDA_RUNS = {  # preset: (batch, batch_gpu, lr = glr, g_beta1, SiDA duration Mimg, SiD²A duration Mimg)
    "cifar10-uncond": (256, 32, 1e-5, 0.0, 300, 100),
    "cifar10-cond": (256, 32, 1e-5, 0.0, 300, 100),
    "imagenet64-cond": (8192, 32, 4e-6, 0.0, 300, 100),
    "ffhq64": (512, 64, 1e-5, 0.0, 200, 100),
    "afhqv2-64": (512, 64, 5e-6, 0.0, 200, 100),
}
for _name, (_b, _bg, _lr, _b1, _d, _d2) in _SIDA_RUNS.items():
    _v = dict(
        PRESETS[_name], **_SIDA, batch=_b, batch_gpu=_bg, lr=_lr, glr=_lr, g_beta1=_b1, official_data=_SIDA_DATA[_name]
    )
    PRESETS[f"{_name}-sida"] = dict(_v, duration=_d)
    PRESETS[f"{_name}-sid2a"] = dict(_v, duration=_d2, needs_sid_model=True)
    FID_REFS[f"{_name}-sida"] = FID_REFS[f"{_name}-sid2a"] = FID_REFS[_name]

# SiD-LSG on Stable Diffusion (official SiD-LSG run_sid.sh, sid_train.py): G and the fake score from the teacher UNet,
# alpha 1, t in [20, 980), init_timestep 625, ls = lsg = 1, batch 512 (batch-gpu 1 on 4 GPUs there), lr = glr = 1e-6,
# Adam (0, 0.999), EMA half-life 0.05 Mimg, fp32 with TF32 off, tick 2, snap 50, dump 100, --duration 10 (the script's;
# "modify --duration to reproduce the reported results": the released checkpoints' names end in 4812 to 18789, read
# as kimg). One preset per published guidance scale, kappa1 = kappa2 = kappa4 = kappa, in latent units (4x64x64 for
# 512-pixel images). Teachers: local diffusers folders of runwayml/stable-diffusion-v1-5 and
# stabilityai/stable-diffusion-2-1-base.
SD_TEACHERS = {"sd15": "stable-diffusion-v1-5", "sd21base": "stable-diffusion-2-1-base"}
for _model, _folder in SD_TEACHERS.items():
    for _kappa in (1.5, 2.0, 3.0, 4.5):
        PRESETS[f"{_model}-lsg{_kappa:g}"] = dict(
            official_teacher=_folder,
            cond=False,
            resolution=64,
            channels=4,
            label_dim=0,
            alpha=1.0,
            tmin=20,
            tmax=980,
            init_timestep=625,
            cfg_train_fake=_kappa,
            cfg_eval_fake=_kappa,
            cfg_eval_real=_kappa,
            ls=1.0,
            lsg=1.0,
            batch=512,
            batch_gpu=1,
            lr=1e-6,
            glr=1e-6,
            precision="fp32",
            dropout=0.0,
            augment=0.0,
            ema=0.05,
            duration=10,
            tick=2,
            snap=50,
            dump=100,
            metrics="none",
        )

# SiD-LSG on the text-to-image digits teacher (sid_fast.t2i.digits: a diffusers Stable Diffusion folder with SD 1.5's
# schedule, 4x8x8 latents and prompts such as "a handwritten seven"): the official SiD-LSG settings (alpha 1, t in
# [20, 980), init_timestep 625, kappa1 = kappa2 = kappa4) at the digits preset's CPU scale (batch, learning rates and
# EMA), evaluated by FD-digits and prompt accuracy. kappa 1.5, the published scale with the lowest FID, is the default
# here too: prompt accuracy 0.994 at FD-digits 11.3 (kappa 1: 0.952 at 7.0; kappa 2: 0.999 at 21.3); the kappa sweep,
# studies/lsg_kappa, runs all of them.
PRESETS["digits-lsg"] = dict(
    PRESETS["digits"],
    teacher=str(ASSETS / "digits-sd"),
    data_prompt_text=str(ASSETS / "digits-prompts.txt"),
    channels=4,
    alpha=1.0,
    tmin=20,
    tmax=980,
    init_timestep=625,
    cfg_train_fake=1.5,
    cfg_eval_fake=1.5,
    cfg_eval_real=1.5,
    ls=1.0,
    lsg=1.0,
    batch=128,
    batch_gpu=128,
    duration=0.008,
    tick=1,
    metric_num=1000,
)

SDFamily.presets = frozenset(k for k in PRESETS if k.split("-lsg")[0] in SD_TEACHERS)

PRECISIONS = ("fp32", "fp16", "tf32", "bf16")
CHECKPOINTING = ("none", "nets", "blocks", "selective")
OPTIMIZERS = ("adam", "foreach", "fused")
METRICS = ("fid", "fd-dinov2", "fid,fd-dinov2", "fd-digits", "none")


def metric_list(metrics: str) -> list[str]:
    """--metrics as the metric keys of the files (metric-<key>.jsonl): "fid,fd-dinov2" -> ["fid", "fd_dinov2"]."""
    return [] if metrics == "none" else [m.replace("-", "_") for m in metrics.split(",")]


METHODS = ("sid", "sida")


def _ref_url(preset: str) -> str:
    ref = FID_REFS.get(preset, "<dataset>.npz")
    return ref if ref.startswith("http") else FID_REF_URL + ref


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


def _validate_fast_path(cfg: TrainConfig) -> None:
    if cfg.precision not in PRECISIONS:
        raise ConfigError(f"--precision {cfg.precision!r}: choose one of {', '.join(PRECISIONS)}.")
    if cfg.checkpointing not in CHECKPOINTING:
        raise ConfigError(f"--checkpointing {cfg.checkpointing!r}: choose one of {', '.join(CHECKPOINTING)}.")
    if cfg.optimizer not in OPTIMIZERS:
        raise ConfigError(f"--optimizer {cfg.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}.")
    from sid_fast import ops

    try:
        ops.parse(cfg.kernels)
    except ValueError as e:
        raise ConfigError(f"--kernels {cfg.kernels!r}: {e}") from None
    if cfg.compile_backend not in ("inductor", "aot_eager", "eager"):
        raise ConfigError(f"--compile-backend {cfg.compile_backend!r}: choose inductor, aot_eager or eager.")
    if cfg.cuda_graphs:
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("--cuda-graphs needs a CUDA device; this machine has none.")


def _validate_schedule(cfg: TrainConfig) -> None:
    if cfg.resume != "auto" and cfg.resume != "new" and cfg.run_dir is not None:
        raise ConfigError(
            f"--resume {cfg.resume} and --run-dir {cfg.run_dir}: a given state starts a new run directory; give one."
        )


# The Hub repositories of the SD teachers (runwayml's SD 1.5 repository was withdrawn; this is its maintained copy),
# and the files of a diffusers folder that sid_fast reads (no fp16 variants, no safety checker).
SD_HUB_REPOS = {
    "stable-diffusion-v1-5": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "stable-diffusion-2-1-base": "stabilityai/stable-diffusion-2-1-base",
}
SD_HUB_FILES = (
    "model_index.json", "'scheduler/*'", "'tokenizer/*'", "text_encoder/config.json", "text_encoder/model.safetensors",
    "vae/config.json", "vae/diffusion_pytorch_model.safetensors", "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
)  # fmt: skip


def _validate_inputs(cfg: TrainConfig) -> None:
    if cfg.teacher is None and families.detect(cfg) is SDFamily:
        repo = SD_HUB_REPOS[cfg.official_teacher]
        include = " ".join("--include " + f for f in SD_HUB_FILES)
        raise ConfigError(
            f"--teacher is required for preset {cfg.preset!r}: a local diffusers folder of {repo}, e.g. fetched with "
            f"`hf download {repo} --local-dir {cfg.official_teacher} {include}` (huggingface_hub's "
            "CLI; sid_fast itself downloads nothing)."
        )
    if cfg.teacher is None:
        official = cfg.official_teacher or ""
        raise ConfigError(
            f"--teacher is required for preset {cfg.preset!r}: a local path or a URL, e.g. "
            f"{official if official.startswith('http') else EDM_URL + official}"
        )
    if (cfg.P_mean is None) != (cfg.P_std is None):
        raise ConfigError(f"--p-mean and --p-std go together (got --p-mean {cfg.P_mean}, --p-std {cfg.P_std}).")


def _validate_sida(cfg: TrainConfig) -> None:
    if cfg.method not in METHODS:
        raise ConfigError(f"--method {cfg.method!r}: choose one of {', '.join(METHODS)}.")
    if cfg.method == "sida" and cfg.data is None:
        raise ConfigError(
            "--method sida trains its discriminator on real images: give --data (an EDM dataset, zip or "
            "folder, of the teacher's resolution and channels"
            + (
                f"; this preset's: {cfg.official_data}, made with sid_fast.data.dataset_tool"
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
    from sid_fast.training.trackers import check_installed

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
    if cfg.metrics == "fd-digits" and (cfg.resolution, cfg.channels) != (8, 1) and families.detect(cfg) is not SDFamily:
        raise ConfigError("--metrics fd-digits needs 8x8 single-channel images (the digits preset).")
