"""Reconstruction metrics of a VAE: PSNR, SSIM, LPIPS, streamed over a dataset.

Protocol (matched to the REPA-E authors' own evaluation code, End2End-Diffusion/diffusion-bench
`src/eval/reconstruction.py` + `src/eval/ref_iqa.py`, which reports rFID/PSNR/SSIM/LPIPS of VAEs):
- reconstruct with the **posterior mean** (their VAE wrapper's default `sample_mode="mode"`; the
  usual choice for a deterministic evaluation), decode, clamp to the image range;
- quantise the reconstruction to **uint8** before any metric (they store reconstructions as uint8
  arrays). We round to nearest (`repae.pixels.from_vae_range`); their code truncates
  (`x.mul(255).to(uint8)`), which biases pixels down by half a level on average;
- PSNR **per image** (MSE over C,H,W) then averaged over images; the MSE is clamped at 1e-10 in
  [0,1] units as theirs is, so identical images give a finite **100 dB** (not inf);
- SSIM per image, averaged over images: torchmetrics' `structural_similarity_index_measure`
  defaults (what they call), which are Wang et al. (2004): Gaussian window 11x11, sigma 1.5,
  K1=0.01, K2=0.03, statistics over the window without the N/(N-1) correction, SSIM map over the
  "valid" positions only (torchmetrics pads by reflection then crops the border; scikit-image with
  `gaussian_weights=True, use_sample_covariance=False` does the same), computed per channel and
  averaged over channels and positions. Data range 255 on uint8 values (= range 1 on [0,1]);
- LPIPS (VGG, v0.1) on the two uint8 images mapped to [-1,1], per image, averaged.

rFID needs an Inception network and lives elsewhere: `iter_reconstructions` yields each batch of
(original, reconstruction) uint8 pairs, and `reconstruction_metrics(..., on_batch=...)` hands them
to a callback while it computes the metrics here, so one pass over the data can feed both.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Iterable, Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from repae.evaluate.errors import NO_IMAGES, EvaluationError
from repae.pixels import from_vae_range, to_vae_range

PSNR_MSE_FLOOR = 1e-10  # in [0,1]^2 units, as the reference: caps PSNR at 100 dB
PSNR_CAP_DB = 10.0 * math.log10(1.0 / PSNR_MSE_FLOOR)  # 100.0

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03
DATA_RANGE = 255.0


def _as_pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 (or float already in [0,255]) [B,C,H,W] -> float64 in [0,255]."""
    if images.dim() != 4:
        raise ValueError(f"expected images [B,C,H,W], got shape {tuple(images.shape)}")
    return images.to(torch.float64)


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB. x, y: uint8 [B,C,H,W] in [0,255] -> float64 [B].

    10 log10(255^2 / MSE), MSE over C,H,W; MSE floored at 1e-10 * 255^2, so identical images give
    `PSNR_CAP_DB` (100 dB) rather than inf (matches the REPA-E authors' evaluation code).
    """
    mse = (_as_pixels(x) - _as_pixels(y)).pow(2).flatten(1).mean(dim=1)
    mse = mse.clamp_min(PSNR_MSE_FLOOR * DATA_RANGE**2)
    return 10.0 * torch.log10(DATA_RANGE**2 / mse)


def gaussian_window_1d(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Normalised 1-D Gaussian taps centred on the middle tap, float64 [size]."""
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    taps = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return taps / taps.sum()


def _local_mean(x: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian filter, 'valid' positions only. [B,C,H,W] -> [B,C,H-k+1,W-k+1]."""
    c, k = x.shape[1], taps.numel()
    row = taps.to(x).view(1, 1, 1, k).expand(c, 1, 1, k)
    col = taps.to(x).view(1, 1, k, 1).expand(c, 1, k, 1)
    return F.conv2d(F.conv2d(x, row, groups=c), col, groups=c)


def ssim_map(x: torch.Tensor, y: torch.Tensor, data_range: float = DATA_RANGE) -> torch.Tensor:
    """SSIM map of Wang et al. (2004) per channel over valid window positions.

    x, y: [B,C,H,W] (uint8 or float in [0, data_range]), H, W >= 11 -> float64 [B,C,H-10,W-10].
    """
    if x.shape != y.shape:
        raise ValueError(f"shape mismatch {tuple(x.shape)} vs {tuple(y.shape)}")
    if min(x.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW}, got {tuple(x.shape[-2:])}")
    x, y = _as_pixels(x), _as_pixels(y)
    taps = gaussian_window_1d()
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    stats = _local_mean(torch.cat([x, y, x * x, y * y, x * y], dim=1), taps)
    mu_x, mu_y, e_xx, e_yy, e_xy = stats.chunk(5, dim=1)
    var_x, var_y = e_xx - mu_x * mu_x, e_yy - mu_y * mu_y
    cov = e_xy - mu_x * mu_y
    luminance = (2 * mu_x * mu_y + c1) / (mu_x * mu_x + mu_y * mu_y + c1)
    contrast_structure = (2 * cov + c2) / (var_x + var_y + c2)
    return luminance * contrast_structure


def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM: uint8 [B,C,H,W] pairs -> float64 [B] (mean over channels and positions)."""
    return ssim_map(x, y).flatten(1).mean(dim=1)


@torch.no_grad()
def lpips_distance(lpips: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image LPIPS of uint8 [B,3,H,W] pairs (mapped to [-1,1], LPIPS's range) -> float64 [B]."""
    device = next(lpips.parameters()).device
    d = lpips(to_vae_range(x.to(device)), to_vae_range(y.to(device)))
    return d.reshape(-1).double().cpu()


def _module_device(module) -> torch.device:
    try:
        return next(module.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


@torch.no_grad()
def reconstruct(
    vae,
    images: torch.Tensor,
    use_mean: bool = True,
    generator: Optional[torch.Generator] = None,
    amp_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """uint8 [B,3,H,W] -> uint8 reconstructions [B,3,H,W] on the input's device.

    use_mean: decode the posterior mean (the evaluation default); else a posterior sample.
    amp_dtype: e.g. torch.bfloat16 to run the VAE under autocast (metrics stay float64).
    """
    device = _module_device(vae)
    x = to_vae_range(images.to(device))
    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        posterior = vae.encode(x)
        z = posterior.mode() if use_mean else posterior.sample(generator=generator)
        recon = vae.decode(z)
    return from_vae_range(recon).to(images.device)


def _images_of(batch) -> torch.Tensor:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def iter_reconstructions(
    vae,
    batches: Iterable,
    use_mean: bool = True,
    max_batches: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    amp_dtype: Optional[torch.dtype] = None,
    progress: bool = True,
) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """Yield (originals, reconstructions), both uint8 [B,3,H,W] on CPU, batch by batch.

    batches: uint8 images [B,3,H,W] or (images, labels, ...) tuples. Shows a tqdm bar.
    """
    total = len(batches) if hasattr(batches, "__len__") else None
    if max_batches is not None:
        total = max_batches if total is None else min(total, max_batches)
    bar = tqdm(batches, total=total, desc="reconstruct", disable=not progress, leave=False)
    for i, batch in enumerate(bar):
        if max_batches is not None and i >= max_batches:
            break
        images = _images_of(batch).cpu()
        if images.dtype != torch.uint8:
            raise TypeError(f"reconstruction metrics expect uint8 images, got {images.dtype}")
        yield images, reconstruct(vae, images, use_mean, generator, amp_dtype).cpu()


class ReconMeter:
    """Running per-image sums of PSNR, SSIM (and LPIPS); `compute()` gives the means."""

    def __init__(self, lpips: Optional[torch.nn.Module] = None):
        self.lpips = lpips
        self.sums: Dict[str, float] = {"psnr": 0.0, "ssim": 0.0}
        if lpips is not None:
            self.sums["lpips"] = 0.0
        self.count = 0

    def update(self, originals: torch.Tensor, recons: torch.Tensor) -> None:
        """originals, recons: uint8 [B,3,H,W]."""
        if originals.shape != recons.shape:  # e.g. 33 px through a VAE that downsamples by 4 comes back at 32
            (h, w), (rh, rw) = originals.shape[-2:], recons.shape[-2:]
            raise EvaluationError(f"the VAE decodes {h}x{w} px images to {rh}x{rw} px: the image size must be a "
                                  f"multiple of its downsampling factor (--image-size)")
        self.sums["psnr"] += psnr(originals, recons).sum().item()
        self.sums["ssim"] += ssim(originals, recons).sum().item()
        if self.lpips is not None:
            self.sums["lpips"] += lpips_distance(self.lpips, originals, recons).sum().item()
        self.count += originals.shape[0]

    def compute(self) -> Dict[str, float]:
        if self.count == 0:
            raise EvaluationError(NO_IMAGES)
        out = {k: v / self.count for k, v in self.sums.items()}
        out["num_images"] = self.count
        return out


def reconstruction_metrics(
    vae,
    batches: Iterable,
    lpips: Optional[torch.nn.Module] = None,
    use_mean: bool = True,
    on_batch: Optional[Callable[[torch.Tensor, torch.Tensor], None]] = None,
    max_batches: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    amp_dtype: Optional[torch.dtype] = None,
    progress: bool = True,
) -> Dict[str, float]:
    """Stream a dataset through the VAE; mean PSNR (dB), SSIM, LPIPS (if given) over all images.

    vae: anything with `encode(x[-1,1]) -> posterior (.mode()/.sample())` and `decode(z) -> [-1,1]`.
    batches: iterable of uint8 [B,3,H,W] (or (images, labels) tuples); batch sizes may vary.
    on_batch(originals_uint8, recons_uint8): called for every batch, e.g. to feed an rFID's
        Inception statistics with both sets in the same pass.
    Returns {"psnr", "ssim", ["lpips"], "num_images"}.
    """
    meter = ReconMeter(lpips)
    was_training = getattr(vae, "training", False)
    if hasattr(vae, "eval"):
        vae.eval()
    try:
        for originals, recons in iter_reconstructions(
            vae, batches, use_mean, max_batches, generator, amp_dtype, progress
        ):
            meter.update(originals, recons)
            if on_batch is not None:
                on_batch(originals, recons)
    finally:
        if was_training:
            vae.train()
    return meter.compute()
