"""Frechet distances (FID, FD-digits) computed as EDM computes FID (EDM fid.py)."""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path

import numpy as np
import scipy.linalg
import torch

from sid_fast.checkpoints import read_edm_pickle
from sid_fast.files import umask_modes


def feature_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance, in float64, of [N, D] features (EDM: (sum f f^T - n mu mu^T) / (n - 1))."""
    f = features.detach().double().cpu().numpy() if torch.is_tensor(features) else np.asarray(features, np.float64)
    f = f.reshape(f.shape[0], -1)
    if f.shape[0] < 2:
        raise ValueError(f"Need at least 2 feature vectors for a covariance, got {f.shape[0]}.")
    mu = f.mean(axis=0)
    sigma = (f.T @ f - f.shape[0] * np.outer(mu, mu)) / (f.shape[0] - 1)
    return mu, sigma


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 sqrtm(S1 S2)), scipy sqrtm, real part (as EDM's fid.py)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(
            f"Statistics disagree in shape: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}."
        )
    m = np.square(mu1 - mu2).sum()
    s = scipy.linalg.sqrtm(np.dot(sigma1, sigma2))
    return float(np.real(m + np.trace(sigma1 + sigma2 - s * 2)))


class FeatureStats:
    """Running sums for mean and unbiased covariance in float64, all-reduced across ranks (EDM's fid.py)."""

    def __init__(self, dim: int, device="cpu"):
        self.n = 0
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.sum_outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def add(self, features: torch.Tensor) -> None:
        f = features.to(self.sum.device, torch.float64).reshape(features.shape[0], -1)
        self.n += f.shape[0]
        self.sum += f.sum(0)
        self.sum_outer += f.T @ f

    def all_reduce(self) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            n = torch.tensor([float(self.n)], dtype=torch.float64, device=self.sum.device)
            for t in (n, self.sum, self.sum_outer):
                torch.distributed.all_reduce(t)
            self.n = int(n.item())

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        if self.n < 2:
            raise ValueError(f"Need at least 2 feature vectors for a covariance, got {self.n}.")
        mu = self.sum / self.n
        sigma = (self.sum_outer - self.n * torch.outer(mu, mu)) / (self.n - 1)
        return mu.cpu().numpy(), sigma.cpu().numpy()


def save_ref_stats(path, mu=None, sigma=None, metrics: dict | None = None) -> None:
    """EDM's reference format, np.savez(dest, mu=[D] float64, sigma=[D, D] float64), for one metric; or, for a path
    ending in .pkl, EDM2's: a pickled {metric: {'mu', 'sigma'}} ('fid', 'fd_dinov2'). Written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if metrics is None:
        metrics = {"fid": (mu, sigma)}
    plain = {k: dict(mu=np.asarray(m, np.float64), sigma=np.asarray(s, np.float64)) for k, (m, s) in metrics.items()}
    pkl = path.suffix == ".pkl"
    if not pkl and len(plain) != 1:
        raise ValueError(f"{path}: an .npz holds one metric's statistics; write {sorted(plain)} to a .pkl (EDM2's).")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp.pkl" if pkl else ".tmp.npz")
    os.close(fd)
    try:
        if pkl:
            with open(tmp, "wb") as f:
                pickle.dump(plain, f)
        else:
            np.savez(tmp, **next(iter(plain.values())))
        umask_modes(tmp)  # mkstemp creates 0600
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_ref_stats(path, dim: int | None = None, metric: str = "fid") -> tuple[np.ndarray, np.ndarray]:
    """Read `mu`, `sigma` from an EDM npz (e.g. fid-refs/cifar10-32x32.npz: one metric's statistics) or the `metric`
    entry ('fid' or 'fd_dinov2') of an EDM2 reference pickle (dataset-refs/img512.pkl, read by the restricted
    unpickler); every problem names the file."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{p}: no such reference statistics file (make one with `python -m sid_fast.fid ref`).")
    if p.suffix == ".pkl":
        fid = read_edm_pickle(p).get(metric)
        if not isinstance(fid, dict) or not {"mu", "sigma"} <= set(fid):
            raise ValueError(f"{p}: an EDM2 reference pickle needs '{metric}' = {{'mu', 'sigma'}}.")
        mu, sigma = (np.asarray(fid[k], dtype=np.float64) for k in ("mu", "sigma"))
        return _check_stats(p, mu, sigma, dim)
    try:
        z = np.load(p, allow_pickle=False)
    except Exception as e:
        raise ValueError(f"{p}: not a readable .npz file ({type(e).__name__}: {e}).") from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise ValueError(f"{p}: a single .npy array, not an .npz with 'mu' and 'sigma'.")
    with z:
        if not {"mu", "sigma"} <= set(z.files):
            raise ValueError(f"{p}: reference statistics need the keys 'mu' and 'sigma', found {sorted(z.files)}.")
        mu, sigma = z["mu"].astype(np.float64), z["sigma"].astype(np.float64)
    return _check_stats(p, mu, sigma, dim)


def _check_stats(p, mu, sigma, dim):
    d = mu.shape[0] if mu.ndim == 1 else -1
    if mu.ndim != 1 or sigma.shape != (d, d):
        raise ValueError(f"{p}: 'mu' must be [D] and 'sigma' [D, D]; got {list(mu.shape)} and {list(sigma.shape)}.")
    if dim is not None and d != dim:
        raise ValueError(f"{p}: statistics of {d}-d features, but the detector gives {dim}-d features.")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{p}: the statistics contain NaN or infinity.")
    return mu, sigma


def inception_score(probs, num_splits: int = 10) -> tuple[float, float]:
    """IS as StyleGAN2-ADA computes it: exp(E_x KL(p(y|x) || p(y))) per split of the samples; (mean, std)."""
    p = probs.double().cpu().numpy() if torch.is_tensor(probs) else np.asarray(probs, np.float64)
    n = p.shape[0]
    if n < num_splits:
        raise ValueError(f"Inception Score: {n} samples cannot make {num_splits} splits.")
    scores = []
    for i in range(num_splits):
        part = p[i * n // num_splits : (i + 1) * n // num_splits]
        marginal = np.mean(part, axis=0, keepdims=True)
        kl = np.where(part > 0, part * (np.log(np.maximum(part, 1e-300)) - np.log(np.maximum(marginal, 1e-300))), 0.0)
        scores.append(np.exp(np.mean(np.sum(kl, axis=1))))
    return float(np.mean(scores)), float(np.std(scores))
