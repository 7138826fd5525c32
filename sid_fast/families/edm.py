"""The EDM family: EDM's preconditioned networks (SongUNet, DhariwalUNet behind EDMPrecond/VPPrecond/VEPrecond) read
from EDM/SiD pickles, sid_fast files or generator folders, with continuous noise levels sigma and one-hot class labels.

Its denoiser follows the official training/sid_loss.py: ln sigma ~ N(-1.2, 1.2^2) for the fake score, sigma from
t ~ U[0, tmax/1000] through the rho=7 map for the generator, G = D(sigma_init z, sigma_init), augmentation labels
where the network has them. Its inputs: the teacher file, --data's label frequencies (conditional teachers), SiDA's
real images, SiD²A's generator (--sid-model), FID/FD-DINOv2 inputs. Its outputs: sid_fast generator folders
(sid_fast.hub). EDM2 (sid_fast.families.edm2) is this family with EDM2's networks.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch

from sid_fast import checkpoints, fewstep, hub, ops
from sid_fast.data.dataset import DatasetError, ImageDataset, LabelsDataset
from sid_fast.data.digits import DigitsDataset
from sid_fast.families.base import ASSETS, FakeOutput, Family, Networks, SiDASupport, TeacherSpec, fitted_generator
from sid_fast.flags import ConfigError
from sid_fast.losses import sample_edm_sigma, sample_generator_sigma
from sid_fast.networks import build_network
from sid_fast.networks.precond import PRECOND_TYPES
from sid_fast.sampling import check_vae, edm_fewstep, generator_sample, latents_and_labels, to_uint8

GUIDANCE_FLAGS = ("cfg_train_fake", "cfg_eval_fake", "cfg_eval_real")


class EDMDenoiser:
    """The seam the SiD phases call, for EDM's preconditioned networks: noise levels are sigma [N, 1, 1, 1], the
    condition is one-hot class labels (or None), outputs are the denoised D(x, sigma)."""

    default_P = (-1.2, 1.2)

    def __init__(self, cfg, teacher: torch.nn.Module, device: torch.device):
        self.cfg, self.device = cfg, device
        self.P_mean, self.P_std = (cfg.P_mean, cfg.P_std) if cfg.P_mean is not None else self.default_P
        map_augment = getattr(getattr(teacher, "model", None), "map_augment", None)
        self.aug_dim = map_augment.in_features if map_augment is not None else 0
        self.logvar = False  # the fake score returns no u(sigma)
        self.multistep = cfg.generator_steps > 1  # the trainer passes the iteration's step count to `generate`

    def image_shape(self, n: int) -> list[int]:
        return [n, self.cfg.channels, self.cfg.resolution, self.cfg.resolution]

    # Noise levels.
    def fake_level(self, n: int, generator) -> torch.Tensor:
        return sample_edm_sigma(n, self.device, self.P_mean, self.P_std, generator=generator)

    def generator_level(self, n: int, generator) -> torch.Tensor:
        return sample_generator_sigma(n, self.cfg.tmax, self.device, generator=generator)

    # Noising at a noise level (EDM: x + sigma eps).
    def noise(self, level: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """The noise a level adds, from a standard normal draw eps (EDM: sigma eps)."""
        return level * eps

    def noisy(self, y: torch.Tensor, noise: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        """y with `noise` (from `noise`) added at its level (EDM: y + noise)."""
        return y + noise

    # Calls.
    def aug_zeros(self, n: int) -> torch.Tensor | None:
        """The augment labels of an image without augmentation (zeros), or None when the network has none."""
        return torch.zeros([n, self.aug_dim], device=self.device) if self.aug_dim else None

    @staticmethod
    def _aug_kwargs(aug) -> dict:
        return {} if aug is None else dict(augment_labels=aug)

    def generate(self, call, z: torch.Tensor, cond, run: int | None = None, generator=None, train: bool = False):
        """x_g = G(sigma_init z, sigma_init, labels): the one-step generator. With --generator-steps K > 1 (`multistep`)
        the K-step generator run for `run` steps (sid_fast.sampling.edm_fewstep), fresh re-noising drawn from
        `generator`; `train`: only the last step with gradient."""
        aug = self._aug_kwargs(self.aug_zeros(z.shape[0]))
        if self.multistep:
            return edm_fewstep(lambda x, sigma: call(x, sigma, cond, **aug), z, self.cfg.init_sigma,
                               self.cfg.generator_steps, run, self.cfg.noise_type, generator, train)  # fmt: skip
        s = self.cfg.init_sigma
        sigma = torch.full([z.shape[0], 1, 1, 1], s, device=self.device)
        return call(s * z, sigma, cond, **aug)

    def teacher(self, call, x: torch.Tensor, level: torch.Tensor, cond) -> torch.Tensor:
        return call(x, level, cond, **self._aug_kwargs(self.aug_zeros(x.shape[0])))

    def fake(self, call, x, level, cond, aug=None, return_flag: str | None = None, training=False) -> FakeOutput:
        """The fake score on x (augment labels `aug`, zeros when None); return_flag "encoder_decoder" adds SiDA's
        logits. `training`: the call of its own phase (the same call for EDM's networks)."""
        kw = self._aug_kwargs(self.aug_zeros(x.shape[0]) if aug is None else aug)
        if return_flag is not None:
            kw["return_flag"] = return_flag
        if self.logvar:
            kw["return_logvar"] = True
        out = call(x, level, cond, **kw)
        out = out if isinstance(out, tuple) else (out,)
        logits = out[1] if return_flag == "encoder_decoder" else None
        return FakeOutput(D=out[0], logits=logits, u=out[-1] if self.logvar else None)

    def discriminator_logits(self, call, x, level, cond, aug=None) -> torch.Tensor:
        """SiDA's logits of real images (return_flag "encoder": the decoder is not run, no u)."""
        return call(x, level, cond, return_flag="encoder", **self._aug_kwargs(aug))

    # Losses.
    def fake_loss_sum(self, out: FakeOutput, y: torch.Tensor, noise: torch.Tensor, level: torch.Tensor):
        """(summed fake-score loss, [N] rows without NaN) of the fake score's output on noisy(y, noise, level)."""
        return ops.fake_score_loss_sum(out.D, y, level, u=out.u)

    def generator_loss_sum(self, x_g, y_real, out: FakeOutput, alpha: float, level=None):
        """(summed SiD generator loss, [N] rows kept)."""
        return ops.sid_generator_loss_sum(x_g, y_real, out.D, alpha, u=out.u)

    # Phases.
    def begin_phase(self, net: torch.nn.Module) -> None:
        """What a trained network needs before the first train-mode call of its phase (EDM: nothing)."""


class EDMFamily(Family):
    """EDM's networks from a network file (see the module docstring)."""

    name = "edm"
    generator_classes = tuple(k for k in PRECOND_TYPES if k != "Precond")
    fields = ("cond", "resolution", "channels", "label_dim", "P_mean", "P_std", "generator_steps", "noise_type")
    sida = SiDASupport(fake_grad_clip=1.0, edm2_rules=False)  # official sida_training_loop.py: clip_grad_value_(1)
    folder_files = hub.FOLDER_FILES
    denoiser_class = EDMDenoiser

    @classmethod
    def owns(cls, network: torch.nn.Module) -> bool:
        """Is a loaded teacher network of this family? (EDM: every network file that no other family owns.)"""
        return True

    @classmethod
    def claims(cls, cfg) -> bool:
        return False  # a network file: decided by the loaded network (sid_fast.families.detect)

    @classmethod
    def missing_teacher(cls, cfg) -> str:
        official = cfg.official_teacher or ""
        return (
            f"--teacher is required for preset {cfg.preset!r}: a local path or a URL, e.g. "
            f"{official if official.startswith('http') else EDM_URL + official}"
        )

    @classmethod
    def check_config(cls, cfg) -> None:
        if cfg.metrics == "fd-digits" and (cfg.resolution, cfg.channels) != (8, 1):
            raise ConfigError("--metrics fd-digits needs 8x8 single-channel images (the digits preset).")
        for name in GUIDANCE_FLAGS:
            if getattr(cfg, name) != 1:
                raise ConfigError(
                    f"--{name.replace('_', '-')} {getattr(cfg, name):g}: guidance applies to Stable Diffusion teachers "
                    f"(a diffusers folder); --teacher {cfg.teacher} is not one."
                )
        if cfg.validation_prompts is not None:
            raise ConfigError(
                f"--validation-prompts {cfg.validation_prompts}: prompts condition Stable Diffusion teachers (a "
                f"diffusers folder); --teacher {cfg.teacher} is not one."
            )
        if cfg.data_prompt_text is not None:
            raise ConfigError(
                f"--data-prompt-text {cfg.data_prompt_text}: prompts condition Stable Diffusion teachers (a diffusers "
                f"folder); --teacher {cfg.teacher} is not one."
            )

    def __init__(self, cfg, device, teacher: torch.nn.Module, spec: TeacherSpec, fid=None):
        """The teacher and the family's inputs, each checked against the flags (one ConfigError naming the flag)."""
        self.teacher, self.spec, self.device = teacher, spec, device
        self.label_dim = int(teacher.label_dim)
        check_teacher(cfg, teacher, cfg.teacher)
        if cfg.augment > 0 and not self.denoiser_class(cfg, teacher, device).aug_dim:
            raise ConfigError(
                f"--augment {cfg.augment}: the networks have no augment labels (augment_dim 0); use --augment 0."
            )
        labels = load_label_table(cfg, teacher.label_dim) if cfg.data is not None and teacher.label_dim else None
        if cfg.data is not None and not teacher.label_dim and cfg.method != "sida":
            open_dataset(cfg)  # unconditional SiD reads nothing from --data, but a missing one is still refused
        self.label_table = None if labels is None else torch.as_tensor(labels, device=device)
        self.data = cfg.data
        self.real_data = load_real_dataset(cfg) if cfg.method == "sida" else None
        self.generator_init = load_sid_model(cfg, teacher) if cfg.sid_model is not None else None
        self.vae = load_vae_for(cfg, teacher, device)
        self.fid_ref, self.detectors = fid if fid is not None else prepare_fid(cfg, device)

    @classmethod
    def load(cls, cfg, device, teacher=None, spec=None, fid=None) -> EDMFamily:
        return cls(cfg, device, teacher, spec, fid)

    # Networks.
    def network_kwargs(self, cfg, fp16: bool) -> tuple[dict, dict, dict, dict, dict]:
        """(init kwargs, G's init kwargs, G's weights, the fake score's init kwargs, its weights)."""
        kwargs = dict(self.spec.init_kwargs, dropout=cfg.dropout, use_fp16=fp16)
        g_state = self.generator_init if self.generator_init is not None else self.spec.state_dict
        return kwargs, kwargs, g_state, kwargs, self.spec.state_dict

    def build_networks(self, cfg, device, log) -> Networks:
        """The teacher (frozen), G and the fake score (trained) and G_ema: G starts from the teacher or (SiD²A,
        --sid-model) from a SiD generator's weights, the fake score from the teacher, G_ema as a copy of G."""
        # --precision fp16 is EDM's use_fp16 on every network (official sid_train.py sets it for all three; G_ema is
        # a copy of G): UNet bodies in fp16 on CUDA, fp32 on a CPU (EDM's own rule). Other precisions leave it off.
        fp16 = cfg.precision == "fp16"
        if fp16 and device.type != "cuda":
            log(
                "--precision fp16: EDM's fp16 mode runs the UNet bodies in fp16 on CUDA only; on this CPU they run in "
                "fp32, as EDM's code does (Adam eps is 1e-6 all the same)."
            )
        if self.label_dim:
            if self.label_table is None:
                log(
                    f"Class labels: uniform over {self.label_dim} classes (no --data; the official code follows the "
                    "training set's label frequencies)."
                )
            else:
                log(f"Class labels: drawn with the label frequencies of --data {self.data} ({len(self.label_table)} "
                    "images).")  # fmt: skip
        self.teacher.use_fp16 = fp16
        teacher = self.teacher.to(device).eval().requires_grad_(False)
        kwargs, g_kwargs, g_state, fake_kwargs, fake_state = self.network_kwargs(cfg, fp16)
        G = self._copy(g_state, g_kwargs, device).train().requires_grad_(True)
        fake = self._copy(fake_state, fake_kwargs, device).train().requires_grad_(True)
        G_ema = copy.deepcopy(G).eval().requires_grad_(False)
        return Networks(teacher, G, fake, G_ema, self.spec.class_name, kwargs, g_kwargs, fake_kwargs)

    def _copy(self, state_dict, init_kwargs, device):
        net = build_network(self.spec.class_name, init_kwargs)
        net.load_state_dict(state_dict)
        return net.to(device)

    def make_denoiser(self, cfg, device):
        return self.denoiser_class(cfg, self.teacher, device)

    # Conditioning: class labels.
    def draw(self, g, n: int, device, fake_phase: bool, image_shape=None):
        """z ~ N(0, I) and one-hot class labels (None for unconditional networks), in this order from `g`: a
        uniformly drawn training image's label (--data's frequencies), or uniform classes."""
        z = torch.randn(image_shape, device=device, generator=g)
        labels = None
        if self.label_dim:
            if self.label_table is None:
                idx = torch.randint(self.label_dim, [n], device=device, generator=g)
            else:
                idx = self.label_table[torch.randint(len(self.label_table), [n], device=device, generator=g)]
            labels = torch.eye(self.label_dim, device=device)[idx]
        return z, labels

    def conditioning(self) -> str:
        if not self.label_dim:
            return "none (unconditional)"
        return "uniform" if self.label_table is None else f"label frequencies of {self.data}"

    def describe(self, cfg) -> str:
        steps = ""
        if cfg.generator_steps > 1:
            sigmas = ", ".join(f"{s:.4g}" for s in fewstep.edm_sigmas(cfg.init_sigma, cfg.generator_steps))
            steps = f", {cfg.generator_steps}-step generator at sigma {sigmas} ({cfg.noise_type} re-noising)"
        return f"alpha {cfg.alpha}, tmax {cfg.tmax}, init_sigma {cfg.init_sigma}{steps}"

    # Outputs.
    @torch.no_grad()
    def sample(self, G_ema, cfg, seeds, device) -> torch.Tensor:
        """Samples of G_ema (its --generator-steps steps) for `seeds` (on the CPU), in batches of 256, per seed as
        `python -m sid_fast.sample` draws them."""
        out = []
        for i in range(0, len(seeds), 256):
            z, labels, rnd = latents_and_labels(G_ema, seeds[i : i + 256], device=device)
            out.append(generator_sample(G_ema, z, cfg.init_sigma, labels, cfg.generator_steps, cfg.noise_type,
                                        rnd.randn_like).cpu())  # fmt: skip
        return torch.cat(out)

    def grid(self, G_ema, cfg, device):
        samples = self.sample(G_ema, cfg, list(range(64)), device)
        if self.vae is not None:
            return self.vae.decode(samples.to(device)).cpu()
        if G_ema.img_channels == 4:  # EDM2 latents without --vae: no picture to draw
            return None
        return to_uint8(samples)

    def write_generator(self, folder, nets: Networks, cfg, kimg: float) -> Path:
        return hub.save_folder(
            folder,
            nets.G_ema,
            nets.g_init_kwargs,
            overwrite=True,  # the run's own folder: a file someone put there is kept, never a reason to stop training
            **generator_meta(cfg.to_json(), kimg),
            metrics={},
        )

    def update_generator(self, folder, **meta) -> None:
        hub.update_meta(folder, **meta)

    def evaluate(self, G_ema, cfg, device, rank: int, world: int):
        from sid_fast.metrics.digits import fd_digits  # start-up: the metrics import scipy (~0.1 s)
        from sid_fast.metrics.fid import fid_against, generator_stats  # start-up: scipy

        if cfg.metrics == "fd-digits" and rank == 0:
            seeds = list(range(10_000_000, 10_000_000 + cfg.metric_num))
            return {"fd_digits": fd_digits(self.sample(G_ema, cfg, seeds, device))}
        if self.detectors:  # FID and/or FD-DINOv2: every rank generates its share, once for all detectors
            meta = dict(kind="generator", sigma_init=cfg.init_sigma, steps=cfg.generator_steps)
            info = dict(meta=dict(meta, noise_type=cfg.noise_type))
            stats, _ = generator_stats(G_ema, info, range(cfg.metric_num), self.detectors, device,
                                       batch=cfg.batch_gpu, rank=rank, world=world, progress=False,
                                       vae=self.vae)  # fmt: skip
            if rank == 0:
                return {k: fid_against(s, self.fid_ref, metric=k) for k, s in stats.items()}
        return None

    def teacher_metric(self, key: str, cfg):
        value = self.spec.teacher_meta.get("fd_digits_heun35") if key == "fd_digits" else None
        return value, "teacher, Heun 35 NFE"

    @classmethod
    def export(cls, state: dict, state_path, out, overwrite: bool) -> Path:
        """A sid_fast generator folder, or a sid_fast .pt file when `out` ends in .pt."""
        net = build_network(state["class_name"], state["g_init_kwargs"])
        try:
            net.load_state_dict(state["G_ema"])
        except RuntimeError as e:
            raise checkpoints.CheckpointError(f"{state_path}: G_ema does not fit its recorded network: {e}") from None
        meta = generator_meta(state["config"], state["cur_nimg"] / 1e3)
        if str(out).endswith(".pt"):
            checkpoints.save_network(out, net, state["g_init_kwargs"], **meta)
        else:
            hub.save_folder(out, net, state["g_init_kwargs"], overwrite=overwrite, **meta)
        return Path(out)


def generator_meta(cfg_json: dict, kimg: float) -> dict:
    """The metadata of an EDM-family generator folder: how it samples (sigma_init, its steps and re-noising) and how
    it was made."""
    return dict(
        kind="generator",
        sigma_init=cfg_json["init_sigma"],
        steps=cfg_json.get("generator_steps", 1),
        noise_type=cfg_json.get("noise_type", "fresh"),
        alpha=cfg_json["alpha"],
        preset=cfg_json["preset"],
        kimg=kimg,
        teacher=Path(str(cfg_json["teacher"])).name,
    )


# ----------------------------------------------------------------------------------------------------------------
# The family's inputs, each checked against the flags.


def check_teacher(cfg, teacher, path) -> None:
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


def open_dataset(cfg):
    """--data: an EDM dataset (zip or folder), a latent dataset (sid_fast.latents), a dataset.json alone (labels for
    data-free SiD), or 'digits', the bundled digits."""
    if cfg.data == "digits":
        return DigitsDataset()
    path = Path(cfg.data)
    try:
        if path.suffix == ".json":
            return LabelsDataset(path)
        if (path / "meta.json").is_file():
            from sid_fast.latents import LatentDataset  # diffusers' VAE behind it: imported when a latent set is given

            return LatentDataset(path)
        return ImageDataset(cfg.data)
    except (DatasetError, ValueError) as e:
        raise ConfigError(f"--data {e}") from None


def _check_data_shape(cfg, ds) -> None:
    c, h, _ = ds.image_shape
    latents = getattr(ds, "meta", {}).get("format") == "sid_fast.latents"
    if latents:  # stored as the VAE posterior's mean and std: twice the teacher's channels
        c //= 2
    if (c, h) != (cfg.channels, cfg.resolution):
        raise ConfigError(
            f"--data {cfg.data}: {'latents' if latents else 'images'} are {c}x{h}x{h}, the teacher "
            f"makes {cfg.channels}x{cfg.resolution}x{cfg.resolution}."
        )


def load_label_table(cfg, label_dim: int) -> np.ndarray:
    """The integer labels of --data's images, checked against the teacher; one ConfigError naming both values."""
    ds = open_dataset(cfg)
    if ds.image_shape is not None:  # a dataset.json alone has no images to check
        _check_data_shape(cfg, ds)
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


def load_real_dataset(cfg):
    """SiDA's real images (--data), checked against the teacher's shape (labels: by load_label_table)."""
    ds = open_dataset(cfg)
    if ds.image_shape is None:
        raise ConfigError(
            f"--data {cfg.data}: a dataset.json holds labels only; SiDA needs real images (a zip or folder)."
        )
    _check_data_shape(cfg, ds)
    return ds


def load_sid_model(cfg, teacher) -> dict:
    """SiD²A's generator weights (--sid-model, through the safe loader), which must fit the teacher's network
    exactly (an EDM2 generator has no log-variance head, official EDM_2_Precond_Generator: the rest is compared)."""
    try:
        net, _ = checkpoints.load_network_file(cfg.sid_model)
    except ValueError as e:
        raise ConfigError(f"--sid-model {e}") from None
    skip_logvar = type(teacher).__name__ == "Precond"
    return fitted_generator(cfg, teacher.state_dict(), net.state_dict(), "this teacher's network",
                            skip=lambda k: skip_logvar and k.startswith("logvar_"))  # fmt: skip


def prepare_fid(cfg, device):
    """(reference statistics path, {metric: detector}) for --metrics fid and/or fd-dinov2, else (None, None); refuses
    bad files (detectors, references without the metric's statistics) up front."""
    wanted = [m for m in ([] if cfg.metrics == "none" else cfg.metrics.replace("-", "_").split(","))
              if m in ("fid", "fd_dinov2")]  # fmt: skip
    if not wanted:
        return None, None
    from sid_fast.metrics import load_ref_stats  # start-up: the metrics import scipy (~0.1 s)
    from sid_fast.metrics.dinov2 import load_dinov2  # start-up: scipy
    from sid_fast.metrics.inception import load_detector  # start-up: scipy

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


def load_vae_for(cfg, teacher, device):
    """--vae (EDM2 latent teachers): loaded and checked against the teacher before any work; required for FID."""
    vae = None
    if cfg.vae is not None:
        from sid_fast.latents import StabilityVAE  # diffusers' AutoencoderKL behind it: only when --vae is given

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


# ----------------------------------------------------------------------------------------------------------------
# Presets: the official settings, each a base plus what the preset changes (the configuration applies flags on top).

DIGITS_TEACHER_PATH = ASSETS / "digits_teacher.pt"
EDM_URL = "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/"
FID_REF_URL = "https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/"

# Official SiD settings (run_sid.sh at HEAD, sid_train.py defaults; 4 GPUs in the scripts). All: tmax 800, init_sigma
# 2.5, ls 1, lsg 100, snap 50, dump 500; FID of 50,000 images against EDM's published reference statistics.
_SID_IMAGES = dict(
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
)
PRESETS: dict[str, dict] = {
    "cifar10-uncond": dict(_SID_IMAGES, official_teacher="edm-cifar10-32x32-uncond-vp.pkl"),
    "cifar10-cond": dict(
        _SID_IMAGES, official_teacher="edm-cifar10-32x32-cond-vp.pkl", cond=True, label_dim=10, duration=800
    ),
    # The official ImageNet/FFHQ/AFHQ runs use EDM's --fp16 1 (UNet bodies in fp16 on CUDA, Adam eps 1e-6).
    "imagenet64-cond": dict(
        _SID_IMAGES,
        official_teacher="edm-imagenet-64x64-cond-adm.pkl",
        cond=True,
        resolution=64,
        label_dim=1000,
        batch=8192,
        lr=4e-6,
        glr=4e-6,
        precision="fp16",
        dropout=0.1,
        augment=0.0,
        ema=2.0,
        duration=1000,
        tick=20,
    ),
    "ffhq64": dict(
        _SID_IMAGES,
        official_teacher="edm-ffhq-64x64-uncond-vp.pkl",
        resolution=64,
        batch=512,
        batch_gpu=32,
        g_beta1=0.9,
        precision="fp16",
        dropout=0.05,
        augment=0.15,
    ),
    "afhqv2-64": dict(
        _SID_IMAGES,
        official_teacher="edm-afhqv2-64x64-uncond-vp.pkl",
        resolution=64,
        alpha=1.0,
        batch=512,
        batch_gpu=32,
        lr=5e-6,
        glr=5e-6,
        precision="fp16",
        dropout=0.05,
        augment=0.15,
    ),
    # The embedded default: the bundled 8x8 digits teacher, sized to run on a 2-core CPU in about 4 minutes (up to 10
    # on slower 2-core machines). Higher learning rates and a shorter EMA than the image presets: the network is
    # 1.3 M parameters and the run sees tens of thousands of images, not hundreds of millions. Batch 256 rather than
    # 64: on seed 0 at 48 kimg the curve of batch 64 swung between 4.1 and 20.7 after the first 30%, that of batch
    # 256 between 5.6 and 8.8 (studies/digits_default).
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
}
# SiDA on the bundled digits (real data: the 1,797 digits the teacher was trained on). The official warm-ups (100k
# images without generator steps, 200k without the GAN term) would outlast the whole CPU-sized run; here they are
# scaled to the run's 48 kimg.
PRESETS["digits-sida"] = dict(
    PRESETS["digits"], method="sida", data="digits", lsd=1.0, lsg_gan=0.01, sida_g_start_kimg=1.0,
    sida_gan_start_kimg=2.0,
)  # fmt: skip
# EDM's published reference statistics per preset (official run_sid.sh --data_stat values).
FID_REFS = {
    "cifar10-uncond": "cifar10-32x32.npz",
    "cifar10-cond": "cifar10-32x32.npz",
    "imagenet64-cond": "imagenet-64x64.npz",
    "ffhq64": "ffhq-64x64.npz",
    "afhqv2-64": "afhqv2-64x64.npz",
}

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
FID_REFS = {k: FID_REF_URL + v for k, v in FID_REFS.items()}
