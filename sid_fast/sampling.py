"""Sampling: EDM's Heun sampler for teachers (EDM generate.py, edm_sampler) and SiD's generators, one-step or K-step
(sid_fast.fewstep).

Latents and class labels are drawn per image from `torch.Generator().manual_seed(seed % 2**32)`, as EDM's
`StackedRandomGenerator` does, so a seed gives the same image whatever the batch it falls in.
"""

from __future__ import annotations

import numpy as np
import torch

from sid_fast import fewstep


class StackedRandomGenerator:
    """One torch.Generator per image (EDM's per-seed RNG)."""

    def __init__(self, device, seeds):
        self.generators = [torch.Generator(device).manual_seed(int(s) % (1 << 32)) for s in seeds]

    def randn(self, size, **kwargs):
        assert size[0] == len(self.generators)
        return torch.stack([torch.randn(size[1:], generator=g, **kwargs) for g in self.generators])

    def randn_like(self, x):
        return self.randn(x.shape, dtype=x.dtype, layout=x.layout, device=x.device)

    def randint(self, *args, size, **kwargs):
        assert size[0] == len(self.generators)
        return torch.stack([torch.randint(*args, size=size[1:], generator=g, **kwargs) for g in self.generators])


def karras_sigmas(num_steps: int, sigma_min=0.002, sigma_max=80.0, rho=7.0, dtype=torch.float64, device="cpu"):
    """EDM's time steps t_0 > ... > t_{N-1} followed by t_N = 0, in float64."""
    i = torch.arange(num_steps, dtype=dtype, device=device)
    t = (sigma_max ** (1 / rho) + i / max(num_steps - 1, 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([t, torch.zeros_like(t[:1])])


def edm_sampler(
    net,
    latents,
    class_labels=None,
    randn_like=torch.randn_like,
    num_steps=18,
    sigma_min=0.002,
    sigma_max=80,
    rho=7,
    S_churn=0,
    S_min=0,
    S_max=float("inf"),
    S_noise=1,
):
    """EDM's stochastic Heun sampler (Algorithm 2); deterministic when S_churn=0. NFE = 2 * num_steps - 1."""
    sigma_min = max(sigma_min, getattr(net, "sigma_min", 0))
    sigma_max = min(sigma_max, getattr(net, "sigma_max", float("inf")))
    t_steps = karras_sigmas(num_steps, sigma_min, sigma_max, rho, device=latents.device)
    t_steps = torch.cat([torch.as_tensor(net.round_sigma(t_steps[:-1])).to(t_steps), t_steps[-1:]])

    x_next = latents.to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        gamma = min(S_churn / num_steps, np.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0
        t_hat = torch.as_tensor(net.round_sigma(t_cur + gamma * t_cur)).to(t_cur)
        x_hat = x_cur + (t_hat**2 - t_cur**2).sqrt() * S_noise * randn_like(x_cur)

        denoised = net(x_hat, t_hat, class_labels).to(torch.float64)
        d_cur = (x_hat - denoised) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        if i < num_steps - 1:  # Heun correction; the last step is Euler only.
            denoised = net(x_next, t_next, class_labels).to(torch.float64)
            d_prime = (x_next - denoised) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


def onestep_sample(generator, z, sigma_init: float, class_labels=None):
    """SiD's one-step generator: x_g = G(sigma_init * z, sigma_init, c) (official training/sid_training_loop.py)."""
    sigma = torch.full([z.shape[0], 1, 1, 1], float(sigma_init), device=z.device)
    return generator(sigma_init * z.to(torch.float32), sigma, class_labels)


def edm_fewstep(denoise, z, sigma_init: float, steps: int, run: int | None = None, noise_type: str = "fresh",
                generator=None, train_last: bool = False, noises=None):  # fmt: skip
    """D_{run-1} of the K-step EDM generator (K = `steps`) at sigma_i = sid_fast.fewstep.edm_sigmas(sigma_init, K):
    x_i = D_{i-1} + sigma_i n_i, D_i = denoise(x_i, sigma_i [N, 1, 1, 1]); the rest as sid_fast.fewstep.generate."""
    levels = [torch.full([z.shape[0], 1, 1, 1], s, device=z.device) for s in fewstep.edm_sigmas(sigma_init, steps)]
    return fewstep.generate(denoise, lambda sigma: (1.0, sigma), levels, z, run, noise_type, generator, train_last,
                            noises)  # fmt: skip


def generator_sample(generator, z, sigma_init: float, class_labels=None, steps: int = 1, noise_type: str = "fresh",
                     randn_like=None):  # fmt: skip
    """A SiD generator's sample of z: one step (onestep_sample) or its K = `steps` steps, fresh re-noising drawn by
    `randn_like` (per seed: StackedRandomGenerator.randn_like, after z and the labels)."""
    if steps == 1:
        return onestep_sample(generator, z, sigma_init, class_labels)
    z = z.to(torch.float32)
    noises = None
    if noise_type == "fresh":
        draw = randn_like if randn_like is not None else torch.randn_like
        noises = [draw(z) for _ in range(steps - 1)]
    return edm_fewstep(lambda x, sigma: generator(x, sigma, class_labels), z, sigma_init, steps,
                       noise_type=noise_type, noises=noises)  # fmt: skip


def latents_and_labels(net, seeds, device="cpu", class_idx=None):
    """Per-seed latents [B, C, H, W] and one-hot labels (uniform random per seed, or a fixed class), as EDM."""
    rnd = StackedRandomGenerator(device, seeds)
    latents = rnd.randn([len(seeds), net.img_channels, net.img_resolution, net.img_resolution], device=device)
    labels = None
    if net.label_dim:
        labels = torch.eye(net.label_dim, device=device)[rnd.randint(net.label_dim, size=[len(seeds)], device=device)]
        if class_idx is not None:
            labels[:, :] = 0
            labels[:, class_idx] = 1
    return latents, labels, rnd


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float -> uint8 NCHW, as EDM: (x * 127.5 + 128).clip(0, 255)."""
    return (images * 127.5 + 128).clip(0, 255).to(torch.uint8)


def image_grid(
    images_uint8: torch.Tensor, cols: int | None = None, scale: int = 1, gap: int = 0, fill: int = 128
) -> np.ndarray:
    """uint8 [N, C, H, W] -> one HWC (or HW) uint8 array with the images on a grid.

    Each image is enlarged `scale` times (nearest neighbour); `gap` pixels of grey `fill` separate the tiles (and
    frame the grid), so small images such as the 8x8 digits do not run into each other.
    """
    n, c, h, w = images_uint8.shape
    cols = cols or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    tiles = images_uint8.cpu()
    if scale > 1:
        tiles = tiles.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
        h, w = h * scale, w * scale
    grid = torch.full((rows * cols, c, h + gap, w + gap), fill, dtype=torch.uint8)
    grid[:n, :, gap:, gap:] = tiles
    grid = grid.reshape(rows, cols, c, h + gap, w + gap).permute(0, 3, 1, 4, 2)
    grid = grid.reshape(rows * (h + gap), cols * (w + gap), c)
    if gap:  # close the frame on the right and at the bottom
        grid = torch.nn.functional.pad(grid.permute(2, 0, 1), (0, gap, 0, gap), value=fill).permute(1, 2, 0)
    grid = grid.contiguous().numpy()
    return grid[:, :, 0] if c == 1 else grid


def save_image(array: np.ndarray, path, scale: int = 1) -> None:
    import PIL.Image  # start-up time: PIL costs ~0.1 s, paid where an image is written

    img = PIL.Image.fromarray(array, "L" if array.ndim == 2 else "RGB")
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), PIL.Image.NEAREST)
    img.save(path)


def check_vae(net, vae, flag="--vae") -> None:
    """A 4-channel network makes EDM2's VAE latents: images need the VAE; a pixel network must not get one."""
    if vae is None and net.img_channels == 4:
        raise ValueError(
            f"the network makes 4-channel outputs, EDM2's VAE latents: give {flag}, the folder of "
            "stabilityai/sd-vae-ft-mse in diffusers' format, to decode them to images."
        )
    if vae is not None and net.img_channels != 4:
        raise ValueError(f"{flag} given, but the network makes {net.img_channels}-channel images, not VAE latents.")


def generate_uint8(
    net, info, seeds, device, sampler="auto", steps=18, class_idx=None, init_sigma=None, churn=None, vae=None
) -> torch.Tensor:
    """uint8 images [N, C, H, W] for the seeds: pixels as EDM (to_uint8), or EDM2's latents decoded by `vae` (a
    sid_fast.latents.StabilityVAE: clamp to [0, 1], x 255, truncated)."""
    out = generate(net, info, seeds, device, sampler, steps, class_idx, init_sigma, churn)
    return vae.decode(out) if vae is not None else to_uint8(out)


def generate(net, info, seeds, device, sampler="auto", steps=18, class_idx=None, init_sigma=None, churn=None):
    """Images in [-1, 1] for the given seeds (one batch). Samplers: "generator" (a SiD generator's own steps, K from
    its metadata, default 1), "onestep" (its first step alone), "heun" (EDM's, `steps` steps), "auto" ("generator"
    for a file whose metadata says kind "generator", else "heun")."""
    meta = info.get("meta", {})
    if sampler == "auto":
        sampler = "generator" if meta.get("kind") == "generator" else "heun"
    latents, labels, rnd = latents_and_labels(net, seeds, device=device, class_idx=class_idx)
    with torch.no_grad():
        if sampler in ("generator", "onestep"):
            sigma = init_sigma if init_sigma is not None else meta.get("sigma_init", 2.5)
            k = int(meta.get("steps", 1)) if sampler == "generator" else 1
            return generator_sample(net, latents, sigma, labels, k, meta.get("noise_type", "fresh"), rnd.randn_like)
        kw = dict(num_steps=steps)
        if churn:
            kw.update(S_churn=churn[0], S_min=churn[1], S_max=churn[2], S_noise=churn[3])
        return edm_sampler(net, latents, labels, randn_like=rnd.randn_like, **kw).float()
