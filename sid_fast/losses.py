"""Losses: EDM's denoising loss (teacher training and SiD's fake-score loss) and SiD's generator loss.

Formulas of the official `training/sid_loss.py` (SiD) and EDM's `training/loss.py`.

Reference numerics:
- Generator loss per element: (y_real - y_fake) * ((y_real - x_g) - alpha * (y_real - y_fake)) / w, with
  w = stopgrad(mean_{C,H,W} |x_g - y_real|) in fp32, clipped at 1e-5; noise level from t ~ U[0, tmax/1000] through
  the rho=7 Karras map over [0.002, 80]; no augmentation; gradients reach x_g directly and through both networks'
  inputs.
- Fake-score loss per element: lambda(sigma) * (f_psi(y + sigma n) - y)^2 with ln sigma ~ N(-1.2, 1.2^2),
  lambda = (sigma^2 + 0.25) / (0.5 sigma)^2, y (and its augment labels) from EDM's augmentation when enabled.
- NaN handling: the official code drops samples whose x_g, y_real or y_fake contain a NaN, then divides the summed
  loss by the full per-GPU batch. We mask instead (zeros for those rows), which keeps shapes static and gives the
  same loss and the same gradient for the remaining rows. `where` also blocks NaN from reaching the gradient.
"""

from __future__ import annotations

import torch

SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0


def sigma_from_t(t: torch.Tensor, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rho=RHO) -> torch.Tensor:
    """Karras rho=7 map of t in [0, 1] onto [sigma_min, sigma_max] (t=0 -> 0.002, t=1 -> 80)."""
    return (sigma_min ** (1 / rho) + t * (sigma_max ** (1 / rho) - sigma_min ** (1 / rho))) ** rho


def sample_generator_sigma(n: int, tmax: int, device, generator=None) -> torch.Tensor:
    """sigma for the generator loss: t ~ U[0, tmax/1000], shape [N, 1, 1, 1]."""
    t = torch.rand([n, 1, 1, 1], device=device, generator=generator) * (tmax / 1000)
    return sigma_from_t(t)


def sample_edm_sigma(n: int, device, P_mean=-1.2, P_std=1.2, generator=None) -> torch.Tensor:
    """EDM training noise levels: ln sigma ~ N(P_mean, P_std^2), shape [N, 1, 1, 1]."""
    return (torch.randn([n, 1, 1, 1], device=device, generator=generator) * P_std + P_mean).exp()


def edm_weight(sigma: torch.Tensor, sigma_data: float = 0.5) -> torch.Tensor:
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def finite_rows(*tensors: torch.Tensor) -> torch.Tensor:
    """[N] bool: True where no tensor has a NaN in that row (the official code's criterion)."""
    ok = None
    for t in tensors:
        r = ~torch.isnan(t).flatten(1).any(dim=1)
        ok = r if ok is None else ok & r
    return ok


def _f32(t: torch.Tensor) -> torch.Tensor:
    """At least fp32: low-precision inputs are upcast, float64 stays float64 (tests compare against float64)."""
    return t if t.dtype == torch.float64 else t.float()


def _mask(rows_ok: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.where(rows_ok.reshape(-1, *[1] * (x.ndim - 1)), x, torch.zeros_like(x))


# ----------------------------------------------------------------------------
# SiD generator loss.


def sid_weight(x_g: torch.Tensor, y_real: torch.Tensor) -> torch.Tensor:
    """w = mean_{C,H,W} |x_g - y_real| in fp32 without gradient, clipped at 1e-5; shape [N, 1, 1, 1]."""
    with torch.no_grad():
        w = (_f32(x_g) - _f32(y_real)).abs().mean(dim=(1, 2, 3), keepdim=True)
        return w.clamp(min=1e-5)


def sid_generator_loss_elements(x_g, y_real, y_fake, alpha: float, u=None, keep=None):
    """Per-element SiD loss [N, C, H, W] (fp32) with NaN rows zeroed; also returns the [N] mask of the rows kept.
    u: the fake score's learned log-variance u(sigma) [N, 1, 1, 1] on EDM2 networks, which divides the loss by e^u
    (official sida branch, sida_training_edm2/sida_loss_edm2.py: generator_loss). keep: [N] bool, further rows to
    drop (EDM2 SiDA drops rows with NaN logits from both of its generator terms)."""
    ok = finite_rows(x_g, y_real, y_fake) if u is None else finite_rows(x_g, y_real, y_fake, u)
    if keep is not None:
        ok = ok & keep
    x_g, y_real, y_fake = (_mask(ok, _f32(t)) for t in (x_g, y_real, y_fake))
    w = sid_weight(x_g, y_real)
    diff = y_real - y_fake
    loss = diff * ((y_real - x_g) - alpha * diff) / w
    if u is not None:
        loss = loss / _mask(ok, _f32(u).reshape(-1, 1, 1, 1)).exp()
    return _mask(ok, loss), ok


def sid_generator_loss_ref(x_g, y_real, y_fake, alpha: float, loss_scale: float, batch_total: int):
    """The reduced loss as the official loop backpropagates it: sum(L) * loss_scale / batch_gpu_total."""
    loss, ok = sid_generator_loss_elements(x_g, y_real, y_fake, alpha)
    return loss.sum() * (loss_scale / batch_total), ok


# ----------------------------------------------------------------------------
# EDM denoising loss (teacher training; SiD's fake-score loss on generator samples).


def edm_loss_from_output(D, y, sigma):
    """lambda(sigma) * (D - y)^2 per element for a denoiser output D, NaN rows zeroed; returns (loss, ok)."""
    ok = finite_rows(y, D)
    loss = edm_weight(sigma) * (_mask(ok, _f32(D)) - _mask(ok, _f32(y))) ** 2
    return _mask(ok, loss), ok


def edm2_loss_from_output(D, y, sigma, u):
    """EDM2's loss with the learned log-variance u(sigma) [N, 1, 1, 1]: lambda(sigma) / e^u * (D - y)^2 + u per element
    (edm2 training/training_loop.py EDM2Loss; SiD's fake-score loss on EDM2, official sida_loss_edm2.py), NaN rows
    (in y, D or u) zeroed; returns (loss, ok)."""
    ok = finite_rows(y, D, u)
    u = _mask(ok, _f32(u).reshape(-1, 1, 1, 1))
    loss = edm_weight(sigma) / u.exp() * (_mask(ok, _f32(D)) - _mask(ok, _f32(y))) ** 2 + u
    return _mask(ok, loss), ok


def edm_loss_elements(net, y, sigma, labels=None, augment_labels=None, noise=None):
    """lambda(sigma) * (D(y + sigma n, sigma) - y)^2 per element, NaN rows zeroed; returns (loss, ok)."""
    n = torch.randn_like(y) if noise is None else noise
    kwargs = {} if augment_labels is None else dict(augment_labels=augment_labels)
    return edm_loss_from_output(net(y + sigma * n, sigma, labels, **kwargs), y, sigma)


class EDMLoss:
    """EDM's loss: ln sigma ~ N(P_mean, P_std^2), weight (sigma^2 + sd^2) / (sigma sd)^2, optional augmentation; on an
    EDM2 network with a log-variance head, EDM2's form lambda / e^u (D - y)^2 + u (same sigma and noise draws)."""

    def __init__(self, P_mean=-1.2, P_std=1.2, sigma_data=0.5, augment_pipe=None):
        self.P_mean, self.P_std, self.sigma_data = P_mean, P_std, sigma_data
        self.augment_pipe = augment_pipe

    def __call__(self, net, images, labels=None, generator=None):
        sigma = sample_edm_sigma(images.shape[0], images.device, self.P_mean, self.P_std, generator)
        y, aug = (images, None) if self.augment_pipe is None else self.augment_pipe(images, generator)
        noise = torch.randn(y.shape, device=y.device, generator=generator)
        if getattr(net, "logvar_linear", None) is not None:  # an EDM2 network with its log-variance head: EDM2Loss
            if aug is not None:
                raise ValueError("EDM2 networks take no augmentation labels; train them without an augment pipe.")
            D, u = net(y + sigma * noise, sigma, labels, return_logvar=True)
            return edm2_loss_from_output(D, y, sigma, u)
        return edm_loss_elements(net, y, sigma, labels, aug, noise)


# ----------------------------------------------------------------------------
# SiDA (Zhou et al., "Adversarial Score identity Distillation", ICLR 2025): the fake score f_psi is also the
# discriminator; its logits are the channel mean of its encoder's last feature map (networks: return_flag).
# Formulas of the official sida branch, sida_training/sida_loss.py and sida_training_loop.py:
# - discriminator, per sample: lambda(sigma_i) * (BCE(logits_real, 1) + BCE(logits_fake, 0)) / 2, where each BCE is
#   PyTorch's BCEWithLogitsLoss with its default 'mean' reduction over every logit of the micro-batch (a scalar that
#   each sample's lambda multiplies); real and fake share sigma ~ LogNormal(-1.2, 1.2) and the noise; no clamp.
# - generator GAN term, per sample: BCE(clamp(logits, -10, 10), 1) / w_i on the x_t of the SiD term (w: SiD's weight).
# - reductions: sum(L_D) * lsd / batch_gpu_total; C*H*W * sum(L_gan) * lsg_gan / batch_gpu_total.
# - schedule by images seen before the iteration: no generator step up to 100k images, SiD alone up to 200k, then
#   0.5 SiD + 0.5 GAN.
# NaN samples are masked as in SiD above; a mean over the micro-batch then averages over the finite samples only,
# which is the official drop-then-mean, except where an official version takes its mean before dropping (the EDM
# generator's GAN term: sid_fast.training.sida.sida_generator_terms).

GAN_LOGIT_CLAMP = 10.0
SIDA_GENERATOR_START_NIMG = 100_000
SIDA_GAN_START_NIMG = 200_000


def bce_mean_rows(logits: torch.Tensor, target: float, ok: torch.Tensor) -> torch.Tensor:
    """BCEWithLogitsLoss(reduction='mean') against a constant target over every logit of the rows where `ok` (fp32
    or float64 scalar; 0 when no row is finite)."""
    x = _mask(ok, _f32(logits))
    per = torch.nn.functional.binary_cross_entropy_with_logits(x, torch.full_like(x, target), reduction="none")
    count = ok.sum() * (x[0].numel() if x.shape[0] else 0)
    return _mask(ok, per).sum() / count.clamp(min=1)


def sida_discriminator_loss(
    logits_real: torch.Tensor, logits_fake: torch.Tensor, sigma: torch.Tensor, ok: torch.Tensor
) -> torch.Tensor:
    """Per-sample discriminator loss [N, 1, 1, 1]: lambda(sigma_i) (BCE_mean(real, 1) + BCE_mean(fake, 0)) / 2, zero
    where not `ok` (the official filter: NaN in y, D_fake, logits_fake or logits_real)."""
    bce = (bce_mean_rows(logits_real, 1.0, ok) + bce_mean_rows(logits_fake, 0.0, ok)) / 2
    lam = edm_weight(_f32(sigma).reshape(-1, 1, 1, 1))
    return _mask(ok, lam * bce)


def sida_generator_gan_loss(logits: torch.Tensor, w: torch.Tensor, ok: torch.Tensor, mean_over=None) -> torch.Tensor:
    """Per-sample GAN term of the generator [N, 1, 1, 1]: BCE_mean(clamp(logits, -10, 10), 1) / w_i, zero where not
    `ok`. The BCE mean runs over the logits of the rows in `mean_over` (default `ok`; the official EDM version takes
    every row, NaN ones included, see sid_fast.training.sida.sida_generator_terms)."""
    bce = bce_mean_rows(
        _f32(logits).clamp(-GAN_LOGIT_CLAMP, GAN_LOGIT_CLAMP), 1.0, ok if mean_over is None else mean_over
    )
    return _mask(ok, bce / _f32(w).reshape(-1, 1, 1, 1))


def sida_schedule(
    cur_nimg: int, generator_start: int = SIDA_GENERATOR_START_NIMG, gan_start: int = SIDA_GAN_START_NIMG
) -> tuple[bool, float, float]:
    """(step the generator?, weight of the SiD term, weight of the GAN term) for an iteration that starts with
    `cur_nimg` images seen (the official loop compares before counting the iteration's images; its thresholds are
    100k and 200k images, the defaults)."""
    step = cur_nimg > generator_start
    return (step, 0.5, 0.5) if cur_nimg > gan_start else (step, 1.0, 0.0)
