"""Flow matching as SiD sees it ("Score Distillation of Flow Matching Models", Zhou, Gu, Zheng et al., arXiv
2509.25127; official repository ml-sid-dit, training/sid_dit_sd3_training_loop.py and training/sid_dit_sd3_util.py):
the noising, the conversions, the timestep law, guidance in velocity space, the few-step generator and the two losses,
with the official numerics.

Convention (diffusers' and the official code's): x0 the clean latent, eps ~ N(0, I), t in [0, 1] with t = 1 pure
noise,

    x_t = (1 - t) x0 + t eps,        the network's velocity v = eps - x0,        D(x_t) = x_t - t v  (x0-prediction).

EDM's sigma of t is t / (1 - t) (x_t / (1 - t) = x0 + sigma eps). A teacher is called at `time_scale * t` (1000 for
SD3 and SANA, 1 for FLUX).

- Timesteps: t = sigmoid(n), n ~ N(log 2, 1.6^2), a fresh draw in each phase, shared by the teacher and the fake score
  in the generator phase (official: `torch.normal(mean=log 2, std=1.6)` then sigmoid, in the run's dtype).
- Guidance (kappa1 for the fake score in its own phase, kappa2 for it in the generator loss, kappa4 for the teacher):
  v = v_u + kappa (v_c - v_u) with the empty prompt "" as the unconditional input, one call on the doubled batch
  [uncond, cond]; kappa = 1 is one conditional call.
- The fake-score loss: flow matching on G's samples, sum over elements of (v_fake^kappa1 - (eps - x_g))^2, rows with a
  NaN dropped; times ls / batch_gpu_total (official ls = 1).
- The generator loss: SiD's in x0 space with the weight w(t) of --weighting (official default `1_minus_sigma`, w = 1 -
  t; see WEIGHTINGS), rows with a NaN dropped: sum of w (y_r - y_f) ((y_r - x_g) - alpha (y_r - y_f)), with alpha = 1
  written as w (y_r - y_f) (y_f - x_g) as the official loop does; times lsg / batch_gpu_total (official lsg = 100).
- The few-step generator (K = --generator-steps, t_init = --init-timestep / 999): step i = 0..k-1 runs at t_i = t_init
  (1 - i / K) on x_i = (1 - t_i) D_{i-1} + t_i n_i (D_{-1} = 0, n_0 = z) and gives D_i = x_i - t_i v_G(x_i); G's
  sample is D_{k-1}. Re-noising n_i (--noise-type): fresh N(0, I) draws, the fixed z, or ddim's (x_{i-1} - (1 -
  t_{i-1}) D_{i-1}) / t_{i-1}. Training draws k ~ U{1..K} once per iteration (the same on every rank); the fake-score
  phase samples k steps without gradient; the generator phase runs steps 0..k-2 without gradient and step k-1 with it,
  its input detached (official: earlier steps are not trained). Sampling runs all K steps.
"""

from __future__ import annotations

import math

import torch

from sid_fast import fewstep
from sid_fast.losses import GAN_LOGIT_CLAMP  # SiDA's +-10, the same in the official flow loops

# log 2 as the official code computes it (torch.log(torch.tensor(2.0)) under torch's default float32: 0.69314718246,
# not float64's 0.69314718056), and the spread of n.
LOGIT_MEAN = float(torch.log(torch.tensor(2.0, dtype=torch.float32)))
LOGIT_STD = 1.6


def draw_t(n: int, device, generator=None, dtype=torch.float32) -> torch.Tensor:
    """t = sigmoid(n), n ~ N(log 2, 1.6^2): [n] in `dtype` (official `sigmoid(torch.normal(...)).to(dtype)`)."""
    return torch.sigmoid(torch.normal(LOGIT_MEAN, LOGIT_STD, (n,), device=device, generator=generator)).to(dtype)


def _col(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, *([1] * (like.ndim - 1)))


def noisy(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t eps."""
    t = _col(t, x0)
    return (1 - t) * x0 + t * eps


def x0_from_v(x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """D = x_t - t v (official `latents - sigmas.view(-1, 1, 1, 1) * flow_pred`)."""
    return x_t - _col(t, x_t) * v


def edm_sigma(t) -> float | torch.Tensor:
    """EDM's sigma of flow time t: t / (1 - t)."""
    return t / (1 - t)


# --weighting: the generator loss's w(t) (official --weighting_scheme), computed without gradient from t (and, for
# sid_legacy, from x_g and y_real).
WEIGHTINGS = (
    "1_minus_sigma",  # 1 - t (official default)
    "1_minus_sigma_squared",  # (1 - t)^2
    "1_over_sigma",  # 1 / max(t, 1e-5)
    "1_over_sigma2",  # 1 / max(t^2, 1e-5)
    "snr_sqrt",  # 1 / max(t / (1 - t), 1e-5)
    "snr",  # 1 / max((t / (1 - t))^2, 1e-5)
    "sid_legacy",  # SiD's 1 / max(mean |x_g - y_real|, 1e-5) per sample
)


@torch.no_grad()
def weight(scheme: str, t: torch.Tensor, x_g: torch.Tensor, y_real: torch.Tensor) -> torch.Tensor:
    """w(t) of the generator loss, shaped to broadcast over x_g's rows (official sid_dit_*_training_loop.py), in
    float32 at least (the official loop widens bf16 values to float32; float64 stays float64)."""
    if scheme == "sid_legacy":
        wide = torch.promote_types(x_g.dtype, torch.float32)
        d = (x_g.to(wide) - y_real.to(wide)).abs().mean(dim=list(range(1, x_g.ndim)), keepdim=True)
        return 1 / d.clip(min=1e-5)
    s = _col(t.to(torch.promote_types(t.dtype, torch.float32)), x_g)
    if scheme == "1_minus_sigma":
        return 1 - s
    if scheme == "1_minus_sigma_squared":
        return (1 - s) ** 2
    if scheme == "1_over_sigma":
        return 1 / s.clip(min=1e-5)
    if scheme == "1_over_sigma2":
        return 1 / (s**2).clip(min=1e-5)
    if scheme == "snr_sqrt":
        return 1 / (s / (1 - s)).clip(min=1e-5)
    if scheme == "snr":
        return 1 / ((s / (1 - s)) ** 2).clip(min=1e-5)
    raise ValueError(f"unknown weighting {scheme!r}; choose one of {', '.join(WEIGHTINGS)}.")


def guided_velocity(model, x_t, t, cond, uncond, kappa: float) -> torch.Tensor:
    """model(x, t, cond) -> v with classifier-free guidance kappa in velocity space: one conditional call at kappa 1,
    else one call on [uncond, cond] and v_u + kappa (v_c - v_u). cond/uncond: dicts of tensors (uncond's batch may be
    1: broadcast)."""
    if kappa == 1:
        return model(x_t, t, cond)
    both = {k: torch.cat([uncond[k].expand_as(c), c]) for k, c in cond.items()}
    v = model(torch.cat([x_t, x_t]), torch.cat([t, t]), both)
    v_u, v_c = v.chunk(2)
    return v_u + kappa * (v_c - v_u)


def fake_loss_rows(v: torch.Tensor, x_g: torch.Tensor, eps: torch.Tensor):
    """(per-sample loss [N], rows without NaN [N]): sum over elements of (v - (eps - x_g))^2; NaN rows give 0."""
    rows = ((eps - x_g) - v).pow(2).flatten(1).sum(1)
    ok = ~torch.isnan(rows)
    return torch.where(ok, rows, torch.zeros_like(rows)), ok


def generator_loss_rows(x_g, y_real, y_fake, w, alpha: float):
    """(per-sample loss [N], rows without NaN [N]): sum of w (y_r - y_f) ((y_r - x_g) - alpha (y_r - y_f)), at
    alpha = 1 written w (y_r - y_f) (y_f - x_g) (the official branch); rows where x_g, y_real or y_fake has a NaN
    are dropped (contribute 0, as the official loop's masking)."""
    ok = ~(x_g.isnan().flatten(1).any(1) | y_real.isnan().flatten(1).any(1) | y_fake.isnan().flatten(1).any(1))
    m = _col(ok, x_g)
    x_g, y_real, y_fake = (torch.where(m, a, torch.zeros_like(a)) for a in (x_g, y_real, y_fake))
    w = torch.where(m, w, torch.zeros_like(w))  # sid_legacy's weight of a NaN row is NaN itself
    if alpha == 1:
        per = (y_real - y_fake) * (y_fake - x_g) * w
    else:
        per = (y_real - y_fake) * ((y_real - x_g) - alpha * (y_real - y_fake)) * w
    return per.flatten(1).sum(1), ok


def step_times(init_timestep: int, steps: int) -> list[float]:
    """t_i = init_timestep (1 - i / K) / 999 for i < K (official sid_dit_generate: 1, 0.75, 0.5, 0.25 at K = 4)."""
    return [float(init_timestep) * (1.0 - float(i) / float(steps)) / 999.0 for i in range(steps)]


def generate(model, z, cond, init_timestep: int, steps: int, run: int | None = None, noise_type: str = "fresh",
             generator=None, train_last: bool = False, noises=None) -> torch.Tensor:  # fmt: skip
    """G's sample D_{run-1} of a K-step generator (K = `steps`) run for `run` steps (default K); model(x, t, cond) ->
    v. The loop, its re-noising and its gradient rule are sid_fast.fewstep.generate's with a = 1 - t, s = t and
    D = x - t v; `noises`, `generator` and `train_last` as there."""
    levels = [torch.full((z.shape[0],), t, device=z.device, dtype=z.dtype) for t in step_times(init_timestep, steps)]

    def scale(t):
        t = _col(t, z)
        return 1.0 - t, t

    def denoise(x, t):
        return x - _col(t, z) * model(x, t, cond)

    return fewstep.generate(denoise, scale, levels, z, run, noise_type, generator, train_last, noises)


assert math.isclose(LOGIT_MEAN, math.log(2), rel_tol=1e-7)


# ----------------------------------------------------------------------------------------------------------------
# The data-aided variant (official `--train_diffusiongan 1`; training/transformer_with_encoder*.py and the GAN terms of
# sid_dit_*_training_loop.py): the fake network is also the discriminator, with no parameter of its own.


class PooledTokens:
    """The fake network's discriminator logits: the final tokens after its `norm_out` (the adaLN before `proj_out`),
    averaged over tokens, [N, hidden], each channel a logit (official `spatial_pooling`). A forward hook on `norm_out`
    that records only inside `with tap:`; the transformer's forward is diffusers' own."""

    def __init__(self):
        self.handle, self.out, self._on = None, None, False

    def attach(self, net: torch.nn.Module) -> None:
        norm = getattr(net, "norm_out", None)
        if norm is None:
            raise ValueError(f"{type(net).__name__} has no norm_out, where the data-aided variant reads its logits.")
        self.handle = norm.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        if self._on:  # the mean in float32 at least (under autocast the fused adaLN kernel's output is bf16)
            self.out = output.to(torch.promote_types(output.dtype, torch.float32)).mean(dim=1)

    def __enter__(self):
        if self.handle is None:
            raise RuntimeError("PooledTokens: not attached to the fake network.")
        self._on, self.out = True, None
        return self

    def __exit__(self, *exc):
        self._on = False

    def take(self, guided: bool) -> torch.Tensor:
        """The logits of the last call: its conditional half when the call ran the doubled batch [uncond, cond]."""
        out, self.out = self.out, None
        return out.chunk(2)[1] if guided else out


class _Along(torch.autograd.Function):
    """`x` unchanged, with `other` in its graph (its gradient zeros): the real branch's logits come from a tap inside
    the network, so without this its output (the velocity) is not in the loss's graph, and FSDP2, which unshards a
    root module's parameters for the backward pass when its output's gradient arrives, would run the backward through
    the tapped layers with their parameters still sharded."""

    @staticmethod
    def forward(ctx, x, other):
        ctx.like = (other.shape, other.dtype, other.device)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        shape, dtype, device = ctx.like
        return grad, torch.zeros(shape, dtype=dtype, device=device)


def along(x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """x, with `other` (a network's output) in the graph of whatever x feeds (zero gradient to it)."""
    return _Along.apply(x, other) if torch.is_grad_enabled() and other.requires_grad else x


def bce_mean(logits: torch.Tensor, target: float) -> torch.Tensor:
    """[N]: mean over channels of BCE-with-logits(clamp(logits, -10, 10), target), in float32 at least."""
    x = logits.to(torch.promote_types(logits.dtype, torch.float32)).clamp(-GAN_LOGIT_CLAMP, GAN_LOGIT_CLAMP)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(x, torch.full_like(x, target), reduction="none")
    return bce.flatten(1).mean(1)


def discriminator_loss_rows(logits_real, logits_fake, ok, numel: int) -> torch.Tensor:
    """[N]: (BCE_mean(real, 1) + BCE_mean(fake, 0)) / 2 times the latent size C*H*W (official: no t-weight), zero
    where not `ok` (masked before the loss: a NaN row sends no NaN gradient back)."""
    real, fake = (torch.where(_col(ok, x), x, torch.zeros_like(x)) for x in (logits_real, logits_fake))
    rows = (bce_mean(real, 1.0) + bce_mean(fake, 0.0)) / 2 * numel
    return torch.where(ok, rows, torch.zeros_like(rows))


def gan_loss_rows(logits, w, ok, numel: int) -> torch.Tensor:
    """[N]: the generator's GAN term BCE_mean(fake, 1) times w(t) of --weighting and C*H*W, zero where not `ok`."""
    logits = torch.where(_col(ok, logits), logits, torch.zeros_like(logits))
    w = w.reshape(-1).to(torch.promote_types(w.dtype, torch.float32))
    rows = bce_mean(logits, 1.0) * torch.where(ok, w, torch.zeros_like(w)) * numel
    return torch.where(ok, rows, torch.zeros_like(rows))
