"""Gaussian feature statistics and the Fréchet distance, as the ADM evaluator defines them.

ADM (openai/guided-diffusion `evaluations/evaluator.py`): `mu = mean(acts, 0)`,
`sigma = np.cov(acts, rowvar=False)` (float64, normalised by N-1), and `FIDStatistics.
frechet_distance` (TTUR's formula with an eps fallback). `FeatureStats` gets the same numbers by
streaming: it keeps the count, the feature sum and the sum of outer products in float64, so 50K
feature vectors never sit in memory, and processes can sum their parts (`all_reduce`).
Stats files use ADM's key names: `mu`, `sigma` (pool_3) and `mu_s`, `sigma_s` (spatial, sFID).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import NamedTuple, Optional, Tuple, Union

import numpy as np
import torch
from scipy import linalg

from repae import dist
from repae.fileio import ArrayFileError, read_npy

ArrayLike = Union[np.ndarray, torch.Tensor]


class GaussianStats(NamedTuple):
    mu: np.ndarray  # [D] float64
    sigma: np.ndarray  # [D, D] float64


class FeatureStats:
    """Streaming mean/covariance of feature vectors [B, D], accumulated in float64.

    `device` holds the accumulators (e.g. the GPU the features come from)."""

    def __init__(self, dim: Optional[int] = None, device: Union[str, torch.device] = "cpu"):
        self.device = torch.device(device)
        self.count = 0
        self.sum: Optional[torch.Tensor] = None  # [D] float64
        self.outer: Optional[torch.Tensor] = None  # [D, D] float64
        if dim is not None:
            self._init(dim)

    def _init(self, dim: int) -> None:
        self.sum = torch.zeros(dim, dtype=torch.float64, device=self.device)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64, device=self.device)

    @property
    def dim(self) -> Optional[int]:
        return None if self.sum is None else self.sum.numel()

    def update(self, feats: ArrayLike) -> "FeatureStats":
        """Add a batch of features [B, D]."""
        x = torch.as_tensor(feats).detach().to(self.device, torch.float64)
        if x.ndim != 2:
            raise ValueError(f"features must be [B, D], got shape {tuple(x.shape)}")
        if self.sum is None:
            self._init(x.shape[1])
        if x.shape[1] != self.dim:
            raise ValueError(f"feature dimension {x.shape[1]} does not match the accumulated {self.dim}")
        self.count += x.shape[0]
        self.sum += x.sum(0)
        self.outer += x.t() @ x
        return self

    def merge(self, other: "FeatureStats") -> "FeatureStats":
        """Add another accumulator's samples into this one (in place)."""
        if other.sum is None:
            return self
        if self.sum is None:
            self._init(other.dim)
        if other.dim != self.dim:
            raise ValueError(f"cannot merge statistics of dimension {other.dim} into {self.dim}")
        self.count += other.count
        self.sum += other.sum.to(self.device)
        self.outer += other.outer.to(self.device)
        return self

    def all_reduce(self) -> "FeatureStats":
        """Sum the accumulators of all processes (every rank then holds the total). Needs `dim` set
        on every rank (pass it to the constructor when a rank may see no samples)."""
        if self.sum is None:
            raise ValueError("FeatureStats.all_reduce needs the feature dimension: construct with dim=...")
        count = torch.tensor([float(self.count)], dtype=torch.float64, device=self.device)
        for t in (count, self.sum, self.outer):
            dist.all_reduce_sum(t)
        self.count = int(round(count.item()))
        return self

    def mean_cov(self) -> GaussianStats:
        """(mu [D], sigma [D,D]) as np.mean(axis=0) and np.cov(rowvar=False) (ddof=1), float64."""
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 samples, got {self.count}")
        mu = self.sum / self.count
        sigma = (self.outer - self.count * torch.outer(mu, mu)) / (self.count - 1)
        sigma = 0.5 * (sigma + sigma.t())  # exact symmetry despite rounding
        return GaussianStats(mu.cpu().numpy(), sigma.cpu().numpy())


# ----------------------------------------------------------------------------- Fréchet distance


def _sqrtm(m: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():  # singular products are handled by the caller, as ADM does (disp=False)
        warnings.simplefilter("ignore")
        out = linalg.sqrtm(m)
    return out[0] if isinstance(out, tuple) else out


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """||mu1-mu2||^2 + Tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2)), as ADM's FIDStatistics.

    sqrt via scipy.linalg.sqrtm of the product; if that is not finite, retry with eps*I added to
    both covariances (warning); a complex result must have |imag| <= 1e-3 on the diagonal
    (else ValueError) and its real part is used."""
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape:
        raise ValueError(f"mean vectors have different lengths: {mu1.shape}, {mu2.shape}")
    if sigma1.shape != sigma2.shape:
        raise ValueError(f"covariances have different dimensions: {sigma1.shape}, {sigma2.shape}")
    diff = mu1 - mu2
    covmean = _sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        warnings.warn(f"fid calculation produces singular product; adding {eps} to diagonal of cov estimates")
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def frechet_distance_to_features(feats: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """The Fréchet distance between the Gaussian of features [N,D] (mean, np.cov with N-1) and
    (mu2, sigma2) — `frechet_distance`'s number, computed without a DxD matrix square root when
    N <= D (a few hundred samples against 2048-d Inception features: ~15 s of scipy sqrtm each).

    With A = centred features / sqrt(N-1) (D x N), sigma1 = A A^T, and sigma1 sigma2 has the same
    non-zero eigenvalues as the N x N PSD matrix A^T sigma2 A, so Tr sqrt(sigma1 sigma2) is the
    sum of the square roots of that small matrix's eigenvalues."""
    feats = np.asarray(feats, dtype=np.float64)
    n, d = feats.shape
    if n < 2:
        raise ValueError(f"a covariance needs at least 2 samples, got {n}")
    mu1 = feats.mean(axis=0)
    if n > d:
        return frechet_distance(mu1, np.cov(feats, rowvar=False), mu2, sigma2)
    a = (feats - mu1).T / np.sqrt(n - 1)  # [D,N]
    small = a.T @ np.asarray(sigma2, dtype=np.float64) @ a  # [N,N], symmetric PSD
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((small + small.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + (a * a).sum() + np.trace(sigma2) - 2 * tr_sqrt)


def frechet_distance_noise(feats: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, resamples: int = 25,
                           seed: int = 0) -> float:
    """How much `frechet_distance_to_features(feats, ...)` would move with another draw of the same
    number of samples from the same model: the std of the distance over bootstrap resamples of the
    features [N,D] (drawn with replacement, a fixed seed). Two FIDs that differ by less than this are
    not told apart by the samples they were measured on (toy FID of 500 samples: ~0.7)."""
    feats = np.asarray(feats, dtype=np.float64)
    rng = np.random.default_rng(seed)
    values = [frechet_distance_to_features(feats[rng.integers(0, len(feats), len(feats))], mu2, sigma2)
              for _ in range(resamples)]
    return float(np.std(values, ddof=1))


# ----------------------------------------------------------------------------- files


def save_stats(path: Union[str, os.PathLike], pool: GaussianStats,
               spatial: Optional[GaussianStats] = None) -> Path:
    """Write an ADM-style stats .npz: mu, sigma (pool) and mu_s, sigma_s (spatial, if given)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"mu": pool.mu, "sigma": pool.sigma}
    if spatial is not None:
        arrays.update(mu_s=spatial.mu, sigma_s=spatial.sigma)
    with open(path, "wb") as f:  # a file object: np.savez would otherwise append ".npz"
        np.savez(f, **arrays)
    return path


COVARIANCE_RTOL = 1e-5  # of the largest eigenvalue: how negative a stored covariance's eigenvalues may be


# Inception's pool_3 features are averages of ReLU outputs, a few units each (their variances ~0.1-10); the toy
# evaluator's are as small. A mean or covariance entry beyond this is not a statistic of such features.
MAX_FEATURE_STAT = 1e8


def read_gaussian(path: Union[str, os.PathLike], mu_key: str = "mu", sigma_key: str = "sigma") -> GaussianStats:
    """mu [D] and sigma [D,D] (as float64) from members of an .npz, read with the bounded reader, so a
    forged .npy header cannot make it allocate; ArrayFileError (a ValueError) naming the file for a
    damaged member, non-numeric data, or shapes that are not a mean and its covariance."""
    mu, sigma = read_npy(path, mu_key), read_npy(path, sigma_key)
    for key, arr in ((mu_key, mu), (sigma_key, sigma)):
        if arr.dtype.kind != "f":  # integers were taken: a truncated covariance gave a plausible, wrong FID
            raise ArrayFileError(f"{path}: '{key}' holds {arr.dtype}, not the floating-point statistics of features")
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise ArrayFileError(f"{path}: '{mu_key}' {tuple(mu.shape)} and '{sigma_key}' {tuple(sigma.shape)} are not "
                             "a mean [D] and its covariance [D,D]")
    mu, sigma = mu.astype(np.float64), sigma.astype(np.float64)
    # what a covariance must be, checked here: otherwise an infinite FID, or a scipy error (NaN) or an
    # "imaginary component" (not symmetric, not PSD) only after every sample is drawn, and from the small-N
    # formula (frechet_distance_to_features clips negative eigenvalues) a wrong number with no error at all
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ArrayFileError(f"{path}: '{mu_key}' or '{sigma_key}' holds NaN or infinite values")
    scale = float(np.abs(sigma).max()) if sigma.size else 0.0
    peak = max(float(np.abs(mu).max()) if mu.size else 0.0, scale)
    if peak > MAX_FEATURE_STAT:  # e.g. sigma = 1e300 I: the matrix square root then fails after every sample is drawn
        raise ArrayFileError(f"{path}: '{mu_key}' / '{sigma_key}' reach {peak:.3g}, beyond any statistics of network "
                             f"features (at most {MAX_FEATURE_STAT:.0e})")
    if sigma.size and float(np.abs(sigma - sigma.T).max()) > 1e-6 * scale:
        raise ArrayFileError(f"{path}: '{sigma_key}' is not symmetric, so not a covariance")
    if sigma.size:
        eig = np.linalg.eigvalsh(sigma)  # ascending; ~1 s at D = 2048
        if eig[0] < -COVARIANCE_RTOL * max(eig[-1], 0.0):  # a float32 covariance of N < D samples: ~-1e-8 relative
            raise ArrayFileError(f"{path}: '{sigma_key}' has the negative eigenvalue {eig[0]:.3g} (largest "
                                 f"{eig[-1]:.3g}), so it is not a covariance")
    return GaussianStats(mu, sigma)


def npz_keys(path: Union[str, os.PathLike]) -> set:
    """Array names in an .npz archive (its `NAME.npy` members), from the zip directory alone."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as zf:
            return {n[:-4] for n in zf.namelist() if n.endswith(".npy")}
    except (zipfile.BadZipFile, OSError) as err:
        raise ArrayFileError(f"{path} is not a readable .npz archive ({err})") from None


def load_stats(path: Union[str, os.PathLike]) -> Tuple[GaussianStats, Optional[GaussianStats]]:
    """(pool, spatial or None) from an .npz with mu, sigma [, mu_s, sigma_s]. KeyError when the statistics
    are absent, ArrayFileError (a ValueError) naming the file when they are damaged (see read_gaussian)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"statistics file not found: {path}")
    keys = npz_keys(path)
    if not {"mu", "sigma"} <= keys:
        raise KeyError(f"{path} holds no FID statistics: expected keys mu, sigma [, mu_s, sigma_s], found {sorted(keys)}")
    pool = read_gaussian(path, "mu", "sigma")
    spatial = read_gaussian(path, "mu_s", "sigma_s") if {"mu_s", "sigma_s"} <= keys else None
    return pool, spatial
