"""Closed-form EDM denoisers of Gaussian mixtures in image space, for tests of the sampler and of SiD.

For data p(x) = sum_k pi_k N(mu_k, s_k^2 I) and x_sigma = x + sigma * n, the ideal denoiser is
    D(x, sigma) = E[x_0 | x_sigma] = sum_k r_k(x) (mu_k + s_k^2 / (s_k^2 + sigma^2) (x - mu_k)),
    r_k(x) proportional to pi_k N(x; mu_k, (s_k^2 + sigma^2) I).
The module presents EDM's network interface: forward(x, sigma, class_labels, augment_labels=None), img_* attributes,
sigma_min/max and round_sigma, so samplers and the SiD trainer take it as a teacher.
"""

from __future__ import annotations

import torch


class GaussianMixtureDenoiser(torch.nn.Module):
    def __init__(self, means: torch.Tensor, stds, weights=None):
        """means: [K, C, H, W]; stds: [K] (isotropic per component); weights: [K] (normalised here)."""
        super().__init__()
        k = means.shape[0]
        self.img_channels, self.img_resolution = means.shape[1], means.shape[2]
        self.label_dim = 0
        self.sigma_min, self.sigma_max = 0.0, float("inf")
        self.register_buffer("means", means.double())
        self.register_buffer("stds", torch.as_tensor(stds, dtype=torch.float64).reshape(k))
        w = torch.ones(k, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        self.register_buffer("log_weights", (w / w.sum()).log())

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def forward(self, x, sigma, class_labels=None, augment_labels=None, **kwargs):
        dtype = x.dtype if x.dtype == torch.float64 else torch.float32
        xd = x.to(torch.float64)
        n = xd.shape[0]
        d = xd[0].numel()
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1)
        sigma = sigma.expand(n) if sigma.numel() == 1 else sigma
        var = self.stds[None, :] ** 2 + sigma[:, None] ** 2  # [N, K]
        diff = xd[:, None] - self.means[None]  # [N, K, C, H, W]
        sq = diff.flatten(2).square().sum(-1)  # [N, K]
        logits = self.log_weights[None] - 0.5 * sq / var - 0.5 * d * var.log()
        r = logits.softmax(dim=1)  # [N, K]
        shrink = (self.stds[None, :] ** 2 / var)[..., None, None, None]  # [N, K, 1, 1, 1]
        comp = self.means[None] + shrink * diff
        return (r[..., None, None, None] * comp).sum(1).to(dtype)

    def sample(self, n: int, generator=None) -> torch.Tensor:
        k = torch.multinomial(self.log_weights.exp(), n, replacement=True, generator=generator)
        eps = torch.randn((n,) + tuple(self.means.shape[1:]), dtype=torch.float64, generator=generator)
        return self.means[k] + self.stds[k][:, None, None, None] * eps
