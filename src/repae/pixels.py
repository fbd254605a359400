"""The one place pixels change range. Datasets yield uint8 [B,3,H,W]; the VAE works in [-1,1]."""

from __future__ import annotations

import torch


def to_vae_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B,3,H,W] in [0,255] -> float32 [B,3,H,W] in [-1,1]."""
    if images.dtype != torch.uint8:
        raise TypeError(f"to_vae_range expects uint8 images, got {images.dtype}")
    return images.float().div(127.5).sub(1.0)


def from_vae_range(x: torch.Tensor) -> torch.Tensor:
    """float [B,3,H,W] in [-1,1] (clamped) -> uint8 [B,3,H,W], rounding to nearest."""
    return x.float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
