"""Latent-space structure: spatial variance, total variation, and PCA-to-RGB pictures.

REPA-E (Sec. 3, latent collapse) reports that E2E tuning with the diffusion loss drives the VAE's
latent *spatial variance* from 17.06 to 0.02 and its *total variation* from 6627 to 90. Neither
the paper's code (End2End-Diffusion/REPA-E) nor the authors' later evaluation code
(End2End-Diffusion/diffusion-bench) defines these numbers, so we adopt the standard definitions,
computed on one image's latent z [C,H,W] and averaged over images:

- spatial variance: for each channel, the population variance (divide by H*W) of its values
  over the H*W positions; averaged over channels. It measures structure within an image, not
  differences between images, and is 0 for a spatially constant latent;
- total variation: anisotropic (L1) TV summed over channels and all horizontally and vertically
  adjacent position pairs, sum |z[c,i,j+1]-z[c,i,j]| + sum |z[c,i+1,j]-z[c,i,j]| — the common
  image-TV definition (e.g. torchmetrics `TotalVariation` / kornia `total_variation`, per image).
  It grows with the latent's area (32x32x4 for SD-VAE at 256 px).

The magnitudes of the paper (17.06 on SD-VAE's latents, whose per-channel std is about 5) point
to raw, un-normalised latents; since REPA-E feeds the SiT BatchNorm-normalised latents, both are
reported: keys `raw/...` and `normalized/...` (the latter when a LatentNorm is passed; it applies
the running statistics, (z - mean_c) / sqrt(var_c + eps)).
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterable, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from repae.evaluate.errors import NO_IMAGES, EvaluationError
from repae.pixels import to_vae_range


def spatial_variance(z: torch.Tensor) -> torch.Tensor:
    """Per-image spatial variance. z: [B,C,H,W] -> float64 [B] (channel mean of var over H,W)."""
    return z.double().flatten(2).var(dim=2, unbiased=False).mean(dim=1)


def total_variation(z: torch.Tensor) -> torch.Tensor:
    """Per-image anisotropic L1 total variation. z: [B,C,H,W] -> float64 [B] (sum over C and pairs)."""
    z = z.double()
    dh = (z[:, :, 1:, :] - z[:, :, :-1, :]).abs().sum(dim=(1, 2, 3))
    dw = (z[:, :, :, 1:] - z[:, :, :, :-1]).abs().sum(dim=(1, 2, 3))
    return dh + dw


def _per_image_stats(z: torch.Tensor, latent_norm=None) -> Dict[str, torch.Tensor]:
    """{'raw/spatial_variance': [B], 'raw/total_variation': [B], and 'normalized/...' with a norm}."""
    out = {"raw/spatial_variance": spatial_variance(z), "raw/total_variation": total_variation(z)}
    if latent_norm is not None:
        zn = latent_norm.normalize(z.to(latent_norm.running_mean.device))
        out["normalized/spatial_variance"] = spatial_variance(zn).cpu()
        out["normalized/total_variation"] = total_variation(zn).cpu()
    return out


def latent_structure(z: torch.Tensor, latent_norm=None) -> Dict[str, float]:
    """Batch means of spatial variance and total variation. z: [B,C,H,W] raw latents.

    latent_norm: optional `LatentNorm`; adds `normalized/*` keys computed on its running-stats
    normalisation of z. Keys: raw/spatial_variance, raw/total_variation[, normalized/...].
    """
    return {k: v.mean().item() for k, v in _per_image_stats(z, latent_norm).items()}


@torch.no_grad()
def measure_latent_structure(
    vae,
    batches: Iterable,
    latent_norm=None,
    use_mean: bool = True,
    max_batches: Optional[int] = None,
) -> Dict[str, float]:
    """Stream uint8 image batches through `vae.encode`; mean per-image latent statistics.

    batches: uint8 [B,3,H,W] or (images, labels) tuples. use_mean: posterior mean (default) or
    a sample. Returns the `latent_structure` keys plus `num_images`.
    """
    sums: Dict[str, float] = {}
    count = 0
    device = next(vae.parameters()).device
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        posterior = vae.encode(to_vae_range(images.to(device)))
        z = (posterior.mode() if use_mean else posterior.sample()).float()
        for key, values in _per_image_stats(z, latent_norm).items():
            sums[key] = sums.get(key, 0.0) + values.sum().item()
        count += z.shape[0]
    if count == 0:
        raise EvaluationError(NO_IMAGES)
    out = {k: v / count for k, v in sums.items()}
    out["num_images"] = count
    return out


def vae_batch(images: torch.Tensor) -> int:
    """Images per VAE call: 250 at 64x64 px or smaller, fewer for larger images (the activations
    of an SD-VAE at 256 px take ~16x the memory per image)."""
    return max(8, 250 * 64 * 64 // (images.shape[-1] * images.shape[-2]))


@torch.no_grad()
def posterior_means(vae, images: torch.Tensor, batch_size: Optional[int] = None) -> torch.Tensor:
    """uint8 images [N,3,H,W] -> their posterior means [N,C,h,w], float32 on the CPU, encoded
    `batch_size` at a time (default `vae_batch`) on the VAE's device: the one batched encode that
    the reproduction's measurements, the toy world's report and the benchmarks share."""
    device = next(vae.parameters()).device
    step = batch_size or vae_batch(images)
    return torch.cat([vae.encode(to_vae_range(images[i : i + step].to(device))).mode().float().cpu()
                      for i in range(0, len(images), step)])


def latent_pca_rgb(latents: torch.Tensor) -> torch.Tensor:
    """Project latent channels onto their top-3 principal components, as RGB. [B,C,H,W] -> uint8 [B,3,H,W].

    PCA is fitted over all B*H*W positions of the batch (channels = variables, centred). Each
    component is min-max scaled over the batch to [0,255] and rounded; a component with no
    spread (or missing, when C < 3) is black. Signs are fixed so that each component's largest
    loading is positive (deterministic colours).
    """
    b, c, h, w = latents.shape
    pixels = latents.double().permute(0, 2, 3, 1).reshape(-1, c)  # [B*H*W, C]
    centred = pixels - pixels.mean(dim=0, keepdim=True)
    cov = centred.T @ centred / max(centred.shape[0] - 1, 1)
    _, evecs = torch.linalg.eigh(cov)  # eigenvalues ascending
    evecs = evecs.flip(1)[:, : min(3, c)]  # top components first, [C,k]
    largest = evecs.abs().argmax(dim=0)
    signs = torch.sign(evecs[largest, torch.arange(evecs.shape[1])])
    evecs = evecs * torch.where(signs == 0, torch.ones_like(signs), signs)
    proj = centred @ evecs  # [B*H*W, k]
    lo, hi = proj.min(dim=0).values, proj.max(dim=0).values
    span = hi - lo
    tiny = span <= 1e-12 * (1 + proj.abs().max())
    scaled = torch.where(tiny, torch.zeros_like(proj), (proj - lo) / torch.where(tiny, torch.ones_like(span), span))
    if scaled.shape[1] < 3:
        scaled = torch.cat([scaled, scaled.new_zeros(scaled.shape[0], 3 - scaled.shape[1])], dim=1)
    rgb = scaled.mul(255).round().clamp(0, 255).to(torch.uint8)
    return rgb.reshape(b, h, w, 3).permute(0, 3, 1, 2).contiguous()


def save_latent_pca_figure(
    path: Union[str, Path],
    images: torch.Tensor,
    latents: Union[torch.Tensor, Sequence[torch.Tensor]],
    upscale: int = 1,
) -> Path:
    """PNG grid: first row the uint8 images [B,3,H,W], then one PCA-RGB row per latent set.

    latents: a [B,C,h,w] tensor or a sequence of them (e.g. the same images through the VAE
    before and after E2E tuning); PCA is fitted per set. Each PCA picture is upsampled
    (nearest) to the image size.
    """
    from repae.generate import save_image_grid

    sets = [latents] if isinstance(latents, torch.Tensor) else list(latents)
    size = images.shape[-2:]
    rows = [images.cpu()]
    for z in sets:
        if z.shape[0] != images.shape[0]:
            raise ValueError(f"latents batch {z.shape[0]} != images batch {images.shape[0]}")
        rgb = latent_pca_rgb(z.cpu())
        rows.append(F.interpolate(rgb.float(), size=size, mode="nearest").to(torch.uint8))
    return save_image_grid(torch.cat(rows), path, nrow=images.shape[0], upscale=upscale)
