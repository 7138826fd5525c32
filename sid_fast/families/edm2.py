"""The EDM2 family: EDM2's magnitude-preserving networks (Precond with its learned log-variance head) read from EDM2
pickles, post-hoc reconstructions, official SiD/SiDA-EDM2 generator pickles or sid_fast files (official sida branch,
sida_training_edm2/).

What differs from EDM (sid_fast.families.edm): ln sigma ~ N(-0.4, 1.0^2) for the fake score; u(sigma) of the fake score
(--return-logvar, when the teacher has the head) dividing both losses; no augmentation; forced weight normalisation
once per optimizer step before the phase's first train-mode call (upstream does it inside every train-mode forward;
see sid_fast.networks.edm2); G without the log-variance head (official EDM_2_Precond_Generator); SiDA without gradient
clipping and with the EDM2 loop's NaN rules.
"""

from __future__ import annotations

import torch

from sid_fast.families import edm
from sid_fast.families.base import ASSETS, SiDASupport
from sid_fast.families.edm import EDMDenoiser, EDMFamily
from sid_fast.networks import edm2


class EDM2Denoiser(EDMDenoiser):
    """EDM2's networks behind the seam (see the module docstring)."""

    default_P = (-0.4, 1.0)

    def __init__(self, cfg, teacher: edm2.Precond, device: torch.device):
        super().__init__(cfg, teacher, device)
        self.aug_dim = 0
        self.logvar = bool(cfg.return_logvar and teacher.logvar_linear is not None)
        # Upstream normalises inside every train-mode forward unless SiDA runs with --force_normalization 0.
        self.force_wn = cfg.method == "sid" or bool(cfg.force_normalization)

    def begin_phase(self, net: torch.nn.Module) -> None:
        if self.force_wn:
            edm2.force_weight_norm_(net)


def _without_logvar(state_dict: dict) -> dict:
    return {k: v for k, v in state_dict.items() if not k.startswith("logvar_")}


class EDM2Family(EDMFamily):
    """EDM2's networks from a network file (see the module docstring)."""

    name = "edm2"
    generator_classes = ("Precond",)
    fields = (*EDMFamily.fields, "return_logvar", "force_normalization")
    sida = SiDASupport(fake_grad_clip=None, edm2_rules=True)  # official sida_training_loop_edm2.py: no clipping
    denoiser_class = EDM2Denoiser

    @classmethod
    def owns(cls, network: torch.nn.Module) -> bool:
        return isinstance(network, edm2.Precond)

    @classmethod
    def claims(cls, cfg) -> bool:
        """Before the network is read: one of its presets (the loaded network decides in the end)."""
        return cfg.preset in PRESETS

    def network_kwargs(self, cfg, fp16: bool):
        """G is the Precond without the log-variance head; the fake score keeps the teacher's head when u(sigma)
        weights the losses, and is built without it otherwise (nothing unused)."""
        kwargs, _, g_state, _, fake_state = super().network_kwargs(cfg, fp16)
        no_head = dict(kwargs, logvar_channels=0)
        logvar = bool(cfg.return_logvar and self.teacher.logvar_linear is not None)
        fake_kwargs, fake_state = (kwargs, fake_state) if logvar else (no_head, _without_logvar(fake_state))
        return kwargs, no_head, _without_logvar(g_state), fake_kwargs, fake_state


# ----------------------------------------------------------------------------------------------------------------
# Presets: a base plus what each preset changes.

# SiD on a tiny EDM2-architecture teacher of the same digits (magnitude-preserving UNet, learned log-variance; 180k
# parameters; FD-digits 1.85): the EDM2 code path at CPU size. EDM2's unit-norm weights barely move at the digits
# preset's 1e-4 (FD-digits 264 after 8.2 kimg, against 25.7 at 3e-3), hence higher learning rates.
PRESETS: dict[str, dict] = {
    "digits-edm2": dict(edm.PRESETS["digits"], teacher=str(ASSETS / "digits_edm2_teacher.pt"), lr=3e-3, glr=3e-3),
}
FID_REFS: dict[str, str] = {}

# SiD on EDM2's ImageNet-512 teachers (official sida branch: run_sid_edm2.sh, sida_edm2_train.py; 4 GPUs there): the
# post-hoc EMA reconstructions EDM2 calls its FID presets, alpha 1, tmax 800, init_sigma 2.5, batch 2048, lr = glr =
# 5e-5, fp16, ls 1, lsg 100, ema 2 Mimg, no augmentation, tick 10, snap 50, dump 200, 200 Mimg (XXL 100); dropout 0
# (XS, S) or 0.1; labels with ImageNet's frequencies from --data (img512_labels/dataset.json, or the latent dataset);
# latents decoded by --vae for grids and FID; P_mean/P_std -0.4/1.0 and u(sigma) come with the EDM2 networks.
EDM2_URL = "https://nvlabs-fi-cdn.nvidia.com/edm2/"
_IMG512 = dict(
    cond=True,
    resolution=64,
    channels=4,
    label_dim=1000,
    alpha=1.0,
    tmax=800,
    init_sigma=2.5,
    batch=2048,
    lr=5e-5,
    glr=5e-5,
    precision="fp16",
    augment=0.0,
    ema=2.0,
    duration=200,
    tick=10,
    snap=50,
    dump=200,
    metrics="fid,fd-dinov2",  # EDM2 reports both (calculate_metrics.py; img512.pkl holds both statistics)
    metric_num=50000,
    official_data="img512_labels/dataset.json",
)
_TEACHERS = {  # size: (post-hoc reconstruction, batch per GPU)
    "xs": ("xs-2147483-0.135", 64),
    "s": ("s-2147483-0.130", 64),
    "m": ("m-2147483-0.100", 32),
    "l": ("l-1879048-0.085", 32),
    "xl": ("xl-1342177-0.085", 16),
    "xxl": ("xxl-0939524-0.070", 2),
}
for _size, (_stem, _bg) in _TEACHERS.items():
    PRESETS[f"edm2-img512-{_size}"] = dict(
        _IMG512,
        official_teacher=f"{EDM2_URL}posthoc-reconstructions/edm2-img512-{_stem}.pkl",
        batch_gpu=_bg,
        dropout=0.0 if _size in ("xs", "s") else 0.1,
        duration=100 if _size == "xxl" else 200,
    )
    FID_REFS[f"edm2-img512-{_size}"] = f"{EDM2_URL}dataset-refs/img512.pkl"
# SiDA and SiD²A on EDM2 (run_sida_edm2.sh, run_sid_sida_edm2.sh): lsd 100, lsg_gan 0.01, real latents from a latent
# dataset of ImageNet-512 (python -m sid_fast.latents encode); S runs without the log-variance and without forced
# normalisation; SiD²A durations 30/80/200/55/50/30 Mimg, M with lsg 50.
_SID2A = {
    "xs": (30, 100.0),
    "s": (80, 100.0),
    "m": (200, 50.0),
    "l": (55, 100.0),
    "xl": (50, 100.0),
    "xxl": (30, 100.0),
}
for _size, (_d2, _lsg2) in _SID2A.items():
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
