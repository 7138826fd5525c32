"""The seam between the SiD loop and a teacher family: what the phases ask of a denoiser, and nothing else.

The SiD iteration (sid_fast.training.sid) is written once. What differs between teacher families sits here:
- how G makes a sample: the network at its fixed initial noise level, x_g = D(sigma_init z, sigma_init);
- how the fake-score phase draws its noise level, and how the generator phase draws its own;
- how a network is called (augmentation labels, the log-variance head, SiDA's encoder logits) and its output read;
- the fake-score loss and the generator loss of the family (weights, u(sigma));
- what a trained network needs at the start of its phase (EDM2's forced weight normalisation).

`EDMDenoiser`: EDM's continuous sigma with its preconditioning (official training/sid_loss.py): ln sigma ~ N(-1.2,
1.2^2) for the fake score, sigma from t ~ U[0, tmax/1000] through the rho=7 map for the generator, augmentation labels
where the network has them. `EDM2Denoiser`: EDM2's networks (official sida branch, sida_training_edm2/): ln sigma ~
N(-0.4, 1.0^2), the fake score's learned log-variance u(sigma) weighting both losses when --return-logvar, no
augmentation, forced weight normalisation. A Stable Diffusion teacher (discrete timesteps, sqrt(abar) scaling,
epsilon/v-prediction, text conditioning with guidance) maps onto the same methods: abar_t gives
sigma_t = sqrt((1 - abar_t) / abar_t), so its x0-prediction is D(x, sigma) and the unweighted epsilon-MSE is EDM's loss
with weight 1 / sigma^2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sid_fast import ops
from sid_fast.losses import sample_edm_sigma, sample_generator_sigma
from sid_fast.networks import edm2


@dataclass
class FakeOutput:
    """One call of the fake score: D(x, sigma), SiDA's discriminator logits (return_flag "encoder_decoder") and
    EDM2's log-variance u(sigma) ([N, 1, 1, 1]) where the call returns them."""

    D: torch.Tensor | None
    logits: torch.Tensor | None = None
    u: torch.Tensor | None = None
    raw: torch.Tensor | None = None  # a network output the family's fake-score loss reads directly (SD: epsilon or v)


class EDMDenoiser:
    """EDM's preconditioned networks (SongUNet, DhariwalUNet) with continuous noise levels."""

    def __init__(self, cfg, teacher: torch.nn.Module, device: torch.device):
        self.cfg, self.device = cfg, device
        self.P_mean, self.P_std = (cfg.P_mean, cfg.P_std) if cfg.P_mean is not None else self.default_P
        map_augment = getattr(getattr(teacher, "model", None), "map_augment", None)
        self.aug_dim = map_augment.in_features if map_augment is not None else 0
        self.logvar = False  # the fake score returns no u(sigma)

    default_P = (-1.2, 1.2)

    def image_shape(self, n: int) -> list[int]:
        return [n, self.cfg.channels, self.cfg.resolution, self.cfg.resolution]

    # Noise levels.
    def fake_sigma(self, n: int, generator) -> torch.Tensor:
        return sample_edm_sigma(n, self.device, self.P_mean, self.P_std, generator=generator)

    def generator_sigma(self, n: int, generator) -> torch.Tensor:
        return sample_generator_sigma(n, self.cfg.tmax, self.device, generator=generator)

    # Noising at a noise level (EDM: x + sigma eps).
    def noise(self, sigma: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """The noise a level adds, from a standard normal draw eps (EDM: sigma eps)."""
        return sigma * eps

    def noisy(self, y: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """y with `noise` (from `noise`) added at its level (EDM: y + noise)."""
        return y + noise

    # Calls.
    def aug_zeros(self, n: int) -> torch.Tensor | None:
        """The augment labels of an image without augmentation (zeros), or None when the network has none."""
        return torch.zeros([n, self.aug_dim], device=self.device) if self.aug_dim else None

    @staticmethod
    def _aug_kwargs(aug) -> dict:
        return {} if aug is None else dict(augment_labels=aug)

    def generate(self, call, z: torch.Tensor, labels) -> torch.Tensor:
        """x_g = G(sigma_init z, sigma_init, labels): the one-step generator."""
        s = self.cfg.init_sigma
        sigma = torch.full([z.shape[0], 1, 1, 1], s, device=self.device)
        return call(s * z, sigma, labels, **self._aug_kwargs(self.aug_zeros(z.shape[0])))

    def teacher(self, call, x: torch.Tensor, sigma: torch.Tensor, labels) -> torch.Tensor:
        return call(x, sigma, labels, **self._aug_kwargs(self.aug_zeros(x.shape[0])))

    def fake(self, call, x, sigma, labels, aug=None, return_flag: str | None = None, training=False) -> FakeOutput:
        """The fake score on x (augment labels `aug`, zeros when None); return_flag "encoder_decoder" adds SiDA's
        logits. `training`: the call of its own phase (the same call for EDM's networks)."""
        kw = self._aug_kwargs(self.aug_zeros(x.shape[0]) if aug is None else aug)
        if return_flag is not None:
            kw["return_flag"] = return_flag
        if self.logvar:
            kw["return_logvar"] = True
        out = call(x, sigma, labels, **kw)
        out = out if isinstance(out, tuple) else (out,)
        logits = out[1] if return_flag == "encoder_decoder" else None
        return FakeOutput(D=out[0], logits=logits, u=out[-1] if self.logvar else None)

    def discriminator_logits(self, call, x, sigma, labels, aug=None) -> torch.Tensor:
        """SiDA's logits of real images (return_flag "encoder": the decoder is not run, no u)."""
        return call(x, sigma, labels, return_flag="encoder", **self._aug_kwargs(aug))

    # Losses.
    def fake_loss_sum(self, out: FakeOutput, y: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor):
        """(summed fake-score loss, [N] rows without NaN) of the fake score's output on noisy(y, noise, sigma)."""
        return ops.fake_score_loss_sum(out.D, y, sigma, u=out.u)

    def generator_loss_sum(self, x_g, y_real, out: FakeOutput, alpha: float):
        """(summed SiD generator loss, [N] rows kept)."""
        return ops.sid_generator_loss_sum(x_g, y_real, out.D, alpha, u=out.u)

    # Phases.
    def begin_phase(self, net: torch.nn.Module) -> None:
        """What a trained network needs before the first train-mode call of its phase (EDM: nothing)."""


class EDM2Denoiser(EDMDenoiser):
    """EDM2's magnitude-preserving networks: ln sigma ~ N(-0.4, 1.0^2) for the fake score, u(sigma) of the fake score
    (--return-logvar, when the teacher has the head) dividing both losses, no augmentation, forced weight
    normalisation once per optimizer step before the phase's first train-mode call (upstream does it inside every
    train-mode forward; see sid_fast.networks.edm2)."""

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


def make_denoiser(cfg, teacher: torch.nn.Module, device: torch.device) -> EDMDenoiser:
    """The denoiser of the teacher's family (Stable Diffusion teachers: sid_fast.t2i.lsg.SDDenoiser, built by its
    trainer)."""
    if isinstance(teacher, edm2.Precond):
        return EDM2Denoiser(cfg, teacher, device)
    return EDMDenoiser(cfg, teacher, device)
