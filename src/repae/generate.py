"""Batched generation: noise -> sampler -> de-normalise -> VAE decode -> uint8, and PNG grids.

Noise for sample i depends only on (seed, i), so results do not change with the batch
size or with how samples are split across processes.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from repae.models.sit import SiT
from repae.models.vae import AutoencoderKL
from repae.pixels import from_vae_range
from repae.sample import Guidance, euler_maruyama, euler_ode


def _seed_for(seed: int, index: int, stream: int = 0) -> int:
    return int(np.random.SeedSequence([seed, index, stream]).generate_state(1, dtype=np.uint64)[0] >> 1)


def sample_noise(indices: Sequence[int], shape: Sequence[int], seed: int) -> torch.Tensor:
    """Standard normal [len(indices), *shape], row i drawn from a generator seeded by (seed, indices[i])."""
    rows = [torch.randn(tuple(shape), generator=torch.Generator().manual_seed(_seed_for(seed, i))) for i in indices]
    return torch.stack(rows)


@torch.no_grad()
def generate_images(
    sit: SiT,
    vae: AutoencoderKL,
    labels: torch.Tensor,
    *,
    mode: str = "ode",
    num_steps: int = 50,
    heun: bool = False,
    cfg_scale: float = 1.0,
    guidance_low: float = 0.0,
    guidance_high: float = 1.0,
    path_type: str = "linear",
    seed: int = 0,
    batch_size: int = 64,
    first_index: int = 0,
    autocast_dtype: Optional[torch.dtype] = None,
    progress: bool = True,
) -> torch.Tensor:
    """Class-conditional samples as uint8 [N,3,H,W]. labels: [N] class ids.

    The SiT samples in BN-normalised latent space; its `bn` running stats (from the EMA model
    when you pass the EMA) map back to VAE latents before decoding. Without `bn` the
    latents are decoded as they are.
    """
    device = next(sit.parameters()).device
    sit_was_training, vae_was_training = sit.training, vae.training
    sit.eval()
    vae.eval()
    latent_shape = (sit.args.in_channels, sit.args.input_size, sit.args.input_size)
    guidance = Guidance(cfg_scale, guidance_low, guidance_high, sit.null_class)
    amp = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    out = []
    starts = range(0, len(labels), batch_size)
    for start in tqdm(starts, desc="sampling", disable=not progress, unit="batch"):
        y = labels[start : start + batch_size].to(device)
        idx = range(first_index + start, first_index + start + len(y))
        noise = sample_noise(idx, latent_shape, seed).to(device)
        with amp:
            if mode == "ode":
                z = euler_ode(sit.velocity, noise, y, num_steps, heun=heun, guidance=guidance)
            elif mode == "sde":
                gen = torch.Generator(device).manual_seed(_seed_for(seed, idx[0], stream=1))
                z = euler_maruyama(sit.velocity, noise, y, num_steps, guidance=guidance, path_type=path_type,
                                   generator=gen)
            else:
                raise ValueError(f"unknown sampling mode {mode!r}; use ode or sde")
            z = z.float()
            if sit.bn is not None:
                z = sit.bn.denormalize(z)
            pixels = vae.decode(z)
        out.append(from_vae_range(pixels).cpu())
    sit.train(sit_was_training)
    vae.train(vae_was_training)
    return torch.cat(out)


def image_grid(images: torch.Tensor, nrow: Optional[int] = None, pad: int = 2) -> np.ndarray:
    """uint8 [N,3,H,W] -> uint8 [H', W', 3] grid with `nrow` images per row (default ~sqrt(N))."""
    n, c, h, w = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    arr = images.permute(0, 2, 3, 1).numpy()
    for i in range(n):
        r, col = divmod(i, nrow)
        y0, x0 = pad + r * (h + pad), pad + col * (w + pad)
        grid[y0 : y0 + h, x0 : x0 + w] = arr[i]
    return grid


def save_image_grid(images: torch.Tensor, path: str | Path, nrow: Optional[int] = None, upscale: int = 1) -> Path:
    """Write a PNG grid of uint8 [N,3,H,W] images; `upscale` enlarges tiny images (nearest)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(image_grid(images, nrow))
    if upscale > 1:
        img = img.resize((img.width * upscale, img.height * upscale), Image.NEAREST)
    img.save(path)
    return path
