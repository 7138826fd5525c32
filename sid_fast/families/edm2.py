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

from sid_fast.families.base import SiDASupport
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
    fields = ("cond", "label_dim", "P_mean", "P_std", "return_logvar", "force_normalization", "sid_model", "vae")
    sida = SiDASupport(fake_grad_clip=None, edm2_rules=True)  # official sida_training_loop_edm2.py: no clipping
    denoiser_class = EDM2Denoiser

    @classmethod
    def owns(cls, network: torch.nn.Module) -> bool:
        return isinstance(network, edm2.Precond)

    def network_kwargs(self, cfg, fp16: bool):
        """G is the Precond without the log-variance head; the fake score keeps the teacher's head when u(sigma)
        weights the losses, and is built without it otherwise (nothing unused)."""
        kwargs, _, g_state, _, fake_state = super().network_kwargs(cfg, fp16)
        no_head = dict(kwargs, logvar_channels=0)
        logvar = bool(cfg.return_logvar and self.teacher.logvar_linear is not None)
        fake_kwargs, fake_state = (kwargs, fake_state) if logvar else (no_head, _without_logvar(fake_state))
        return kwargs, no_head, _without_logvar(g_state), fake_kwargs, fake_state
