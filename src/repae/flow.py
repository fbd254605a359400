"""Flow-matching paths, time sampling and the denoising loss.

Convention everywhere (SiT/REPA): **t=0 is data, t=1 is noise**.
    x_t = alpha(t) x_0 + sigma(t) eps,      v = d x_t / dt = alpha'(t) x_0 + sigma'(t) eps
linear: alpha = 1-t, sigma = t (so v = eps - x_0); cosine: alpha = cos(pi t/2), sigma = sin(pi t/2).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

PATHS = ("linear", "cosine")


class PathCoefficients(NamedTuple):
    alpha: torch.Tensor
    sigma: torch.Tensor
    d_alpha: torch.Tensor
    d_sigma: torch.Tensor


def path_coefficients(t: torch.Tensor, path_type: str) -> PathCoefficients:
    """alpha, sigma and their time derivatives at t (any shape; same shape out)."""
    if path_type == "linear":
        return PathCoefficients(1 - t, t, -torch.ones_like(t), torch.ones_like(t))
    if path_type == "cosine":
        half_pi = math.pi / 2
        return PathCoefficients(
            torch.cos(half_pi * t), torch.sin(half_pi * t),
            -half_pi * torch.sin(half_pi * t), half_pi * torch.cos(half_pi * t),
        )
    raise ValueError(f"unknown path_type {path_type!r}; use one of {PATHS}")


def _expand(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[B] -> [B,1,1,...] broadcastable against x."""
    return t.reshape(t.shape[0], *([1] * (x.dim() - 1))).to(x.dtype)


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, path_type: str = "linear") -> torch.Tensor:
    """x_t = alpha(t) x0 + sigma(t) noise. x0, noise: [B,...]; t: [B]."""
    c = path_coefficients(_expand(t, x0), path_type)
    return c.alpha * x0 + c.sigma * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, path_type: str = "linear") -> torch.Tensor:
    """v = d x_t / dt = alpha'(t) x0 + sigma'(t) noise. [B,...]."""
    c = path_coefficients(_expand(t, x0), path_type)
    return c.d_alpha * x0 + c.d_sigma * noise


def sample_time(
    batch_size: int,
    scheme: str = "uniform",
    path_type: str = "linear",
    lognormal_mean: float = 0.0,
    lognormal_std: float = 1.0,
    generator: Optional[torch.Generator] = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Training times t in [0,1], [B] float32.

    uniform: t ~ U(0,1). lognormal (EDM): sigma = exp(N(mean, std)) is the noise-to-signal
    ratio sigma/alpha, mapped to t: linear t = s/(1+s), cosine t = (2/pi) atan(s).
    """
    if scheme == "uniform":
        return torch.rand(batch_size, generator=generator, device=device)
    if scheme == "lognormal":
        snr_inv = (torch.randn(batch_size, generator=generator, device=device) * lognormal_std + lognormal_mean).exp()
        if path_type == "linear":
            return snr_inv / (1 + snr_inv)
        if path_type == "cosine":
            return 2 / math.pi * torch.atan(snr_inv)
        raise ValueError(f"unknown path_type {path_type!r}")
    raise ValueError(f"unknown time sampling {scheme!r}; use uniform or lognormal")


def denoising_loss(v_pred: torch.Tensor, v_target: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error in fp32: [B,...] x2 -> [B]."""
    return (v_pred.float() - v_target.float()).pow(2).flatten(1).mean(dim=1)


def drop_labels(
    labels: torch.Tensor, prob: float, null_class: int, generator: Optional[torch.Generator] = None,
    uniform: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Replace each label by the null class with probability `prob` (CFG training). [B] -> [B].
    `uniform` ([B] in [0,1)) replaces the draw from `generator` when given."""
    if prob <= 0:
        return labels
    if uniform is None:
        uniform = torch.rand(labels.shape, generator=generator, device=labels.device)
    drop = uniform < prob
    return torch.where(drop, torch.full_like(labels, null_class), labels)


def score_from_velocity(v: torch.Tensor, x: torch.Tensor, t: torch.Tensor, path_type: str = "linear") -> torch.Tensor:
    """Score grad log p_t(x) implied by a velocity v at (x, t); t: [B] with t > 0.

    From x_t = alpha x0 + sigma eps and v = alpha' x0 + sigma' eps:
    score = -eps/sigma = (alpha/alpha' * v - x) / (sigma^2 - alpha/alpha' * sigma' * sigma).
    """
    c = path_coefficients(_expand(t, x), path_type)
    ratio = c.alpha / c.d_alpha
    var = c.sigma**2 - ratio * c.d_sigma * c.sigma
    return (ratio * v - x) / var
