"""Blockwise DCT energy spectra of latents and images.

Work on scale equivariance of autoencoders reports that VAE latents carry relatively more
high-frequency energy than RGB images, and that this makes them harder to model by diffusion.
This module measures that, the same way for images and for latents:

1. Crop. A batch x [B,C,H,W] is centre-cropped to H' = b*floor(H/b), W' = b*floor(W/b) (b the
   block size, 8 by default); nothing is cropped when b divides H and W. H or W below b is an error.
2. Mean. By default (`remove_mean=True`) each channel's per-image mean over the cropped H'xW'
   is subtracted first. A per-channel offset is a property of the encoding, not of spatial
   structure (SD-VAE-like latents have channel means of several units; the latent BatchNorm
   removes them), and left in it would swamp the DC band and make raw and normalised latents,
   or latents and images, incomparable. After this the DC coefficient of a block carries only
   the deviation of that block's mean from the image mean (variation on scales above the block);
   when one block covers the whole image (e.g. block 8 on the toy world's 8x8 latents) it is
   exactly zero. `remove_mean=False` keeps the offsets (then the DC fraction includes them).
3. DCT. Each bxb block of each channel gets the orthonormal 2D DCT-II
   X[u,v] = sum_{i,j} D[u,i] D[v,j] x[i,j], D[k,i] = a_k cos(pi (2i+1) k / (2b)),
   a_0 = sqrt(1/b), a_k = sqrt(2/b) — scipy.fft.dctn(norm='ortho') on each block; it preserves
   energy (sum X^2 == sum x^2).
4. Bands. Coefficient (u,v) belongs to band u+v (the DCT anti-diagonals, JPEG's zig-zag order),
   bands 0..2(b-1): band 0 is DC alone, band k holds min(k, 2(b-1)-k)+1 coefficients.
5. Energy. The squared coefficients are summed per band over all blocks, channels and images,
   then normalised to fractions of the total (summing to 1). This is the mean over blocks,
   channels and images of each band's energy, normalised: channels with more variance weigh more
   (the latent BatchNorm equalises them, so raw and normalised latents can differ).

Summary numbers: `dc_fraction` = fraction of band 0; `high_frequency_fraction` = total fraction of
bands b..2(b-1), i.e. coefficients with u+v >= b — the upper half of the 2(b-1) non-DC bands
(bands 1..b-1 are the lower half), as a fraction of *all* energy including DC. With zero total
energy (a constant input with the mean removed) the fractions are NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from repae.pixels import to_vae_range

DEFAULT_BLOCK = 8


def dct_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Orthonormal DCT-II matrix D [n,n]: row k is basis function k (D @ D.T == I)."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    d = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d.to(dtype)


def band_index(block: int) -> torch.Tensor:
    """Band u+v of each coefficient of a block: long [block, block], values 0..2(block-1)."""
    u = torch.arange(block)
    return u[:, None] + u[None, :]


def num_bands(block: int) -> int:
    return 2 * block - 1


def crop_to_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """Centre crop [B,C,H,W] -> [B,C,H',W'] with H', W' the largest multiples of `block`."""
    if block < 2:
        raise ValueError(f"block must be >= 2, got {block}")
    h, w = x.shape[-2:]
    if h < block or w < block:
        raise ValueError(f"{h}x{w} is smaller than one {block}x{block} block; use a smaller block")
    hc, wc = h - h % block, w - w % block
    top, left = (h - hc) // 2, (w - wc) // 2
    return x[..., top:top + hc, left:left + wc]


def blockwise_dct(x: torch.Tensor, block: int = DEFAULT_BLOCK) -> torch.Tensor:
    """Orthonormal 2D DCT-II of every block of every channel, in float64.

    x: [B,C,H,W] with H, W multiples of `block` -> [B, C, H/block, W/block, block, block]
    (coefficient [..., u, v]: u the vertical, v the horizontal frequency).
    """
    b, c, h, w = x.shape
    if h % block or w % block:
        raise ValueError(f"{h}x{w} is not a multiple of the block {block}: crop_to_blocks first")
    blocks = x.double().reshape(b, c, h // block, block, w // block, block).permute(0, 1, 2, 4, 3, 5)
    d = dct_matrix(block).to(x.device)
    return d @ blocks @ d.T


def band_energy_sums(x: torch.Tensor, block: int = DEFAULT_BLOCK, remove_mean: bool = True
                     ) -> Tuple[torch.Tensor, int]:
    """(summed squared DCT coefficients per band, float64 [2*block-1]; number of blocks summed over).

    x: [B,C,H,W]; centre-cropped to multiples of `block`; per-image channel means removed first
    when `remove_mean` (see the module docstring).
    """
    x = crop_to_blocks(x, block).double()
    if remove_mean:
        x = x - x.mean(dim=(-2, -1), keepdim=True)
    energy = blockwise_dct(x, block).pow(2).sum(dim=(0, 1, 2, 3)).cpu()  # [block, block]
    if remove_mean and x.shape[-2:] == (block, block):
        energy[0, 0] = 0.0  # one block: its DC is the removed mean, zero but for rounding (~1e-33)
    sums = torch.zeros(num_bands(block), dtype=torch.float64)
    sums.index_add_(0, band_index(block).flatten(), energy.flatten())
    count = x.shape[0] * x.shape[1] * (x.shape[2] // block) * (x.shape[3] // block)
    return sums, count


@dataclass
class Spectrum:
    """Energy per DCT band (u+v) of a set of images or latents; see the module docstring."""

    block: int
    band_energy: List[float]  # mean energy per band per block (summed over the band's coefficients)
    num_blocks: int  # blocks averaged over (images x channels x blocks per channel)
    num_images: int
    shape: List[int] = field(default_factory=list)  # [C, H', W'] analysed (after the crop)
    remove_mean: bool = True

    @property
    def fractions(self) -> List[float]:
        total = sum(self.band_energy)
        return [e / total if total > 0 else math.nan for e in self.band_energy]

    @property
    def dc_fraction(self) -> float:
        return self.fractions[0]

    @property
    def high_frequency_fraction(self) -> float:
        """Fraction of all energy in bands u+v >= block (upper half of the non-DC bands)."""
        return sum(self.fractions[self.block:])

    def to_dict(self) -> Dict[str, object]:
        return {"band_fractions": self.fractions, "dc_fraction": self.dc_fraction,
                "high_frequency_fraction": self.high_frequency_fraction, "band_energy": self.band_energy,
                "block": self.block, "num_images": self.num_images, "num_blocks": self.num_blocks,
                "analysed_shape": self.shape, "remove_mean": self.remove_mean}


class SpectrumAccumulator:
    """Streams batches [B,C,H,W] into one Spectrum (all batches must share C, H, W)."""

    def __init__(self, block: int = DEFAULT_BLOCK, remove_mean: bool = True):
        self.block, self.remove_mean = block, remove_mean
        self.sums = torch.zeros(num_bands(block), dtype=torch.float64)
        self.count = self.images = 0
        self.shape: List[int] = []

    def add(self, x: torch.Tensor) -> None:  # x: [B,C,H,W]
        sums, count = band_energy_sums(x, self.block, self.remove_mean)
        self.sums += sums
        self.count += count
        self.images += x.shape[0]
        self.shape = list(crop_to_blocks(x[:1], self.block).shape[1:])

    def result(self) -> Spectrum:
        if self.count == 0:
            raise ValueError("no batches added")
        return Spectrum(self.block, (self.sums / self.count).tolist(), self.count, self.images, self.shape,
                        self.remove_mean)


def energy_spectrum(x: torch.Tensor, block: int = DEFAULT_BLOCK, remove_mean: bool = True) -> Spectrum:
    """Band energy spectrum of one batch. x: [B,C,H,W] (images in any fixed range, or latents)."""
    acc = SpectrumAccumulator(block, remove_mean)
    acc.add(x)
    return acc.result()


def _as_norm(latent_norm):
    """A LatentNorm as it is, or one built from (mean [C], var [C])."""
    if latent_norm is None or hasattr(latent_norm, "normalize"):
        return latent_norm
    from repae.models.latent_norm import LatentNorm

    mean, var = latent_norm
    norm = LatentNorm(mean.numel())
    norm.init_from_stats(mean, var)
    return norm


@torch.no_grad()
def latent_spectra(vae, images: torch.Tensor, latent_norm=None, block: int = DEFAULT_BLOCK,
                   image_block: Optional[int] = None, remove_mean: bool = True, use_mean: bool = True,
                   batch_size: int = 64, progress: bool = False, desc: str = "spectrum") -> Dict[str, Spectrum]:
    """Spectra of a VAE's latents of `images` and of the images themselves.

    vae: module with `encode(x [-1,1]) -> posterior` (.mode() / .sample()); images: uint8
    [N,3,H,W]; latent_norm: a LatentNorm (its running statistics) or (mean [C], var [C]) or None.
    use_mean: posterior mean (default) or a sample. image_block: block for the images (default
    `block`). Returns {'images', 'raw'[, 'normalized']} -> Spectrum; images are taken in the
    VAE's [-1,1] range. progress: a bar of the batches encoded (`desc`), on the main process.
    """
    from repae.evaluate.pipeline import progress_bar

    norm = _as_norm(latent_norm)
    device = next(vae.parameters()).device
    if norm is not None:
        norm = norm.to(device)
    accs = {"images": SpectrumAccumulator(image_block or block, remove_mean),
            "raw": SpectrumAccumulator(block, remove_mean)}
    if norm is not None:
        accs["normalized"] = SpectrumAccumulator(block, remove_mean)
    for start in progress_bar(range(0, len(images), batch_size), desc, progress):
        x = to_vae_range(images[start:start + batch_size].to(device))
        posterior = vae.encode(x)
        z = (posterior.mode() if use_mean else posterior.sample()).float()
        accs["images"].add(x)
        accs["raw"].add(z)
        if norm is not None:
            accs["normalized"].add(norm.normalize(z))
    return {k: a.result() for k, a in accs.items()}


def plot_spectra(series: Mapping[str, Union[Spectrum, Sequence[float]]], path: Union[str, Path],
                 title: Optional[str] = None, block: Optional[int] = None) -> Path:
    """PNG: energy fraction per band (log y) of each labelled series, bands u+v >= block shaded.

    series: label -> Spectrum or a list of band fractions. Zero fractions (e.g. DC after mean
    removal when one block covers the image) are left out of the log plot.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for label, s in series.items():
        fractions = s.fractions if isinstance(s, Spectrum) else list(s)
        block = block or (s.block if isinstance(s, Spectrum) else None)
        ys = [f if f > 0 else math.nan for f in fractions]  # log axis: zero bands are not drawn
        ax.plot(range(len(ys)), ys, marker="o", label=label)
    if block:
        ax.axvspan(block - 0.5, 2 * block - 1.5, color="grey", alpha=0.12, label=f"high frequency (u+v >= {block})")
    ax.set_yscale("log")
    ax.set_xlabel("DCT band u+v (0 = DC)")
    ax.set_ylabel("fraction of energy")
    ax.set_title(title or "blockwise DCT energy spectrum")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
