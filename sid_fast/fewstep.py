"""The few-step generator of every teacher family: K steps, each a noising of the previous step's x0-prediction at a
lower noise level and one call of G.

A family writes its noising at level l as x = a(l) x0 + s(l) n (flow matching: a = 1 - t, s = t; EDM: a = 1,
s = sigma; Stable Diffusion: a = sqrt(abar_t), s = sqrt(1 - abar_t)) and G's output as an x0-prediction D(x, l).
Step i = 0..k-1 runs at level l_i on x_i = a_i D_{i-1} + s_i n_i (D_{-1} = 0, n_0 = z) and gives D_i = D(x_i, l_i); the
sample is D_{k-1}. Re-noising n_i (--noise-type): fresh N(0, I) draws, the fixed z, or ddim's (x_{i-1} - a_{i-1}
D_{i-1}) / s_{i-1} (the noise the previous step's prediction implies). Step 0 is the one-step generator itself.

The levels follow SiD on flow matching's law (official ml-sid-dit training/sid_dit_sd3_util.py, sid_dit_generate):
t_i = t_init (1 - i / K) on the teacher's own time axis.

- flow matching: t_init = --init-timestep / 999, t_i = t_init (1 - i / K) (1, 0.75, 0.5, 0.25 at K = 4).
- EDM and EDM2 (sigma): the same law on flow time, through the map between the two processes (x / (1 + sigma) of
  EDM's x = x0 + sigma n is flow matching's x_t at t = sigma / (1 + sigma)): t_init = sigma_init / (1 + sigma_init),
  sigma_i = t_i / (1 - t_i) (2.5, 1.154, 0.556, 0.217 at sigma_init 2.5, K = 4).
- Stable Diffusion (integer timesteps): the law on the timestep index, rounded half up: round(init_timestep (1 - i /
  K)) (625, 469, 313, 156 at 625, K = 4); from 999 it gives 999, 749, 500, 250, next to the 999, 749, 499, 249 of
  DMD2's four-step SDXL generator.

No official code defines few-step SiD for EDM or Stable Diffusion teachers: these levels are this package's choice
(docs/few-step.md). Training draws k ~ U{1..K} per iteration (sid_fast.training.sid.SiDTrainer.generator_steps_now);
its generator phase runs steps 0..k-2 without gradient and step k-1 with gradient on its detached input
(`train_last`), as the official flow loops do.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

NOISE_TYPES = ("fresh", "fixed", "ddim")


def flow_times(t_init: float, steps: int) -> list[float]:
    """t_i = t_init (1 - i / K), i < K."""
    return [float(t_init) * (1.0 - float(i) / float(steps)) for i in range(steps)]


def edm_sigmas(sigma_init: float, steps: int) -> list[float]:
    """sigma_i of a K-step EDM generator: flow_times on t = sigma / (1 + sigma), mapped back by sigma = t / (1 - t);
    sigma_0 is sigma_init exactly (float64 arithmetic, rounded once to the caller's dtype)."""
    times = flow_times(sigma_init / (1.0 + sigma_init), steps)
    return [float(sigma_init)] + [t / (1.0 - t) for t in times[1:]]


def timestep_indices(init_timestep: int, steps: int) -> list[int]:
    """t_i = round(init_timestep (1 - i / K)) (half up) of a K-step Stable Diffusion generator."""
    return [math.floor(int(init_timestep) * (steps - i) / steps + 0.5) for i in range(steps)]


def generate(
    denoise: Callable,
    scale: Callable,
    levels: Sequence[torch.Tensor],
    z: torch.Tensor,
    run: int | None = None,
    noise_type: str = "fresh",
    generator: torch.Generator | None = None,
    train_last: bool = False,
    noises: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """D_{run-1} of the K-step generator (K = len(levels)) run for `run` steps (default K). denoise(x, level) -> D;
    scale(level) -> (a, s), each a number or a tensor that broadcasts against z. Fresh re-noising draws N(0, I) from
    `generator` at each step after the first (or takes noises[i - 1] when given: per-seed sampling). `train_last`:
    the last step runs with gradient on its detached input and every earlier step without (the generator phase);
    otherwise every step runs as the caller's grad mode says."""
    run = len(levels) if run is None else run
    if not 1 <= run <= len(levels):
        raise ValueError(f"run {run}: a {len(levels)}-step generator runs 1 to {len(levels)} steps.")
    if noise_type not in NOISE_TYPES:
        raise ValueError(f"unknown noise type {noise_type!r}; choose one of {', '.join(NOISE_TYPES)}.")
    D = torch.zeros_like(z)
    x = a = s = None
    for i in range(run):
        if i == 0 or noise_type == "fixed":
            n = z
        elif noise_type == "fresh" and noises is not None:
            n = noises[i - 1]
        elif noise_type == "fresh":
            n = torch.randn(z.shape, device=z.device, dtype=z.dtype, generator=generator)
        else:  # ddim
            n = ((x - a * D) / s).detach()
        level = levels[i]
        a, s = scale(level)
        last = i == run - 1
        with torch.set_grad_enabled(torch.is_grad_enabled() and (last or not train_last)):
            x = a * D + s * n
            if train_last and last:
                x = x.detach()
            D = denoise(x, level)
    return D
