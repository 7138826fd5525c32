"""Frechet distances (FID, FD-digits) computed as EDM computes FID (shared/reference/edm.md section 5)."""

from __future__ import annotations

import numpy as np
import scipy.linalg
import torch


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
        raise ValueError(f"Statistics disagree in shape: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}.")
    m = np.square(mu1 - mu2).sum()
    s = scipy.linalg.sqrtm(np.dot(sigma1, sigma2))
    return float(np.real(m + np.trace(sigma1 + sigma2 - s * 2)))
