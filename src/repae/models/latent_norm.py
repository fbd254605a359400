"""The latent normaliser of REPA-E: a BatchNorm2d without affine parameters.

Its running mean/var start from the VAE's latent statistics. During end-to-end training
the SiT pass runs it in train mode (batch statistics, running stats follow the changing
latent space); the VAE alignment pass runs it in eval mode (running stats, no update).
Sampling happens in normalised space and `denormalize` maps back before decoding.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from repae import dist
from repae.models.global_norm import global_batch_norm
from repae.pixels import to_vae_range


class LatentNorm(nn.BatchNorm2d):
    """BatchNorm2d(C, eps, momentum, affine=False) with normalise/denormalise helpers.

    State-dict keys are BatchNorm2d's (running_mean, running_var, num_batches_tracked), so
    inside a SiT as `bn` they match the official REPA-E checkpoints.
    """

    def __init__(self, channels: int, momentum: float = 0.1, eps: float = 1e-4, denorm_eps: bool = True):
        super().__init__(channels, eps=eps, momentum=momentum, affine=False, track_running_stats=True)
        # denormalize with sqrt(var + eps) (True: the exact inverse of normalize) or with sqrt(var)
        # (False: the official REPA-E rule, latents / latents_scale + latents_bias with scale = rsqrt(var))
        self.denorm_eps = denorm_eps

    @torch.no_grad()
    def init_from_stats(self, mean: torch.Tensor, var: torch.Tensor) -> None:
        """Set running stats from per-channel latent mean and variance (any shape with C elements)."""
        if mean.numel() != self.num_features or var.numel() != self.num_features:
            from repae.weights import CheckpointError  # repae.weights imports this module (via sit)

            # statistics usually come from a file (vae.latent_stats_path): say so rather than a copy_ error
            raise CheckpointError(f"latent statistics hold {mean.numel()} means and {var.numel()} variances, but "
                                  f"the latent norm has {self.num_features} channels (the VAE's z_channels)")
        self.running_mean.copy_(mean.reshape(-1).to(self.running_mean))
        self.running_var.copy_(var.reshape(-1).to(self.running_var))

    @torch.no_grad()
    def init_from_scale_bias(self, latents_scale: torch.Tensor, latents_bias: torch.Tensor) -> None:
        """Official `*-latents-stats.pt` convention: scale = 1/std, bias = mean."""
        self.init_from_stats(latents_bias, latents_scale.reshape(-1).double().pow(-2).float())

    def scale_bias(self) -> dict:
        """Statistics in the official convention: {'latents_scale': 1/sqrt(var), 'latents_bias': mean}, [1,C,1,1]."""
        c = self.num_features
        return {
            "latents_scale": self.running_var.rsqrt().reshape(1, c, 1, 1).clone(),
            "latents_bias": self.running_mean.reshape(1, c, 1, 1).clone(),
        }

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # [B,C,H,W] -> [B,C,H,W]
        # Statistics in fp32 even under autocast: running stats must not drift in bf16.
        with torch.autocast(z.device.type, enabled=False):
            if not self.training:
                # running stats copied into the graph: the SiT pass updates them in place before the
                # alignment pass's backward, which must see the values its forward used
                return F.batch_norm(z.float(), self.running_mean.clone(), self.running_var.clone(),
                                    training=False, eps=self.eps)
            if dist.world_size() > 1:
                return self._synced_forward(z.float())
            return super().forward(z.float())

    def _synced_forward(self, z: torch.Tensor) -> torch.Tensor:
        """Batch norm over the global batch of all ranks (SyncBatchNorm's semantics; see
        repae.models.global_norm: per-channel sums all-reduced, autograd-aware, float64)."""
        return global_batch_norm(self, z)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Running-stats normalisation (no update), whatever the module's mode. [B,C,H,W]."""
        mean, std = self._mean_std(z)
        return (z.float() - mean) / std

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """z * sqrt(var + eps) + mean, the exact inverse of `normalize`; with `denorm_eps` False the
        official rule z * sqrt(var) + mean (compat=official). [B,C,H,W]."""
        mean, std = self._mean_std(z, eps=self.eps if self.denorm_eps else 0.0)
        return z.float() * std + mean

    def _mean_std(self, z: torch.Tensor, eps: Optional[float] = None) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, self.num_features) + (1,) * (z.dim() - 2)
        mean = self.running_mean.float().reshape(shape)
        std = (self.running_var.float() + (self.eps if eps is None else eps)).sqrt().reshape(shape)
        return mean, std


@torch.no_grad()
def measure_latent_stats(
    vae,
    batches: Iterable,
    max_batches: Optional[int] = None,
    sample_posterior: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and variance of latents over a data loader, in float64.

    vae: an AutoencoderKL (anything with `encode(x[-1,1]) -> DiagonalGaussian`).
    batches: uint8 images [B,3,H,W], or (images, labels) tuples.
    Returns (mean [C], var [C]) in float32; var is the population variance over B,H,W.
    """
    total = sq_total = None
    count = 0
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        device = next(vae.parameters()).device
        posterior = vae.encode(to_vae_range(images.to(device)))
        z = (posterior.sample() if sample_posterior else posterior.mode()).double()
        s = z.sum(dim=(0, 2, 3))
        sq = z.pow(2).sum(dim=(0, 2, 3))
        total = s if total is None else total + s
        sq_total = sq if sq_total is None else sq_total + sq
        count += z.numel() // z.shape[1]
    if count == 0:
        raise ValueError("measure_latent_stats: the data loader yielded no batches")
    mean = total / count
    var = (sq_total / count - mean.pow(2)).clamp_min(0)
    return mean.float(), var.float()
