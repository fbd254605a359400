"""Losses: the REPA alignment loss and the VAE regulariser L_REG with its options.

Every loss is computed in fp32 (inputs upcast, autocast off) so bf16 training changes only
the networks' arithmetic, never the loss arithmetic. Pure functions first; the
`VAERegulariser` module owns the stateful parts (discriminator, LPIPS, LeCam EMAs, the
VF-loss projection) and reports each term separately for logging.
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from repae.config import LossConfig
from repae.models.discriminator import NLayerDiscriminator
from repae.models.global_norm import global_mean
from repae.models.lpips import LPIPS
from repae.models.vae import DiagonalGaussian
from repae.nn_utils import frozen


@contextmanager
def fp32() -> Iterator[None]:
    """Autocast off on every device type that could have it on."""
    with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
        yield


# ------------------------------------------------------------------------ REPA


def repa_loss(projected: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> torch.Tensor:
    """L_REPA = -mean over encoders, batch and tokens of cos(proj(h)_n, f_n).

    projected, targets: one [B,N,D_k] pair per encoder. Scalar; -1 when perfectly aligned.
    """
    if len(projected) != len(targets) or not projected:
        raise ValueError(f"need one projection per encoder: got {len(projected)} projections, {len(targets)} targets")
    with fp32():
        sims = [F.cosine_similarity(p.float(), t.float(), dim=-1, eps=1e-8).mean() for p, t in zip(projected, targets)]
        return -torch.stack(sims).mean()


# ----------------------------------------------------------------- reconstruction


def reconstruction_loss(x: torch.Tensor, recon: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    """Mean absolute (l1) or squared (mse) error over all pixels. Scalar."""
    with fp32():
        diff = recon.float() - x.float()
        if kind == "l1":
            return diff.abs().mean()
        if kind == "mse":
            return diff.pow(2).mean()
    raise ValueError(f"unknown reconstruction loss {kind!r}; use l1 or mse")


def kl_loss(posterior: DiagonalGaussian) -> torch.Tensor:
    """KL(q(z|x) || N(0,I)) summed over C,H,W, averaged over the batch. Scalar."""
    return posterior.kl().mean()


# ------------------------------------------------------------------------- GAN


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (mean relu(1 - D(real)) + mean relu(1 + D(fake))). Scalar."""
    with fp32():
        return 0.5 * (F.relu(1.0 - logits_real.float()).mean() + F.relu(1.0 + logits_fake.float()).mean())


def generator_adv_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """-mean D(fake). Scalar."""
    return -logits_fake.float().mean()


def adaptive_weight(loss_ref: torch.Tensor, loss_other: torch.Tensor, layer_weight: torch.Tensor,
                    max_weight: float = 1e4) -> torch.Tensor:
    """|d loss_ref / d W| / (|d loss_other / d W| + 1e-4) at one layer's weight W, clamped, detached.

    Used for the GAN term (W = decoder's last conv, taming-transformers) and the VF loss
    (W = encoder's last conv, VA-VAE). Both losses must depend on W.
    """
    g_ref = torch.autograd.grad(loss_ref, layer_weight, retain_graph=True)[0]
    g_other = torch.autograd.grad(loss_other, layer_weight, retain_graph=True)[0]
    return (g_ref.norm() / (g_other.norm() + 1e-4)).clamp(0.0, max_weight).detach()


class LeCam(nn.Module):
    """LeCam regulariser (Tseng et al. 2021): keeps D's logits near the other side's EMA."""

    def __init__(self, decay: float = 0.999):
        super().__init__()
        self.decay = decay
        self.register_buffer("ema_real", torch.zeros(()))
        self.register_buffer("ema_fake", torch.zeros(()))

    def forward(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
        """relu(mean D(real) - ema_fake)^2 + relu(ema_real - mean D(fake))^2, then update the EMAs."""
        # means over the global batch: every rank's loss and EMAs are those of one process
        real, fake = global_mean(logits_real.float()), global_mean(logits_fake.float())
        loss = F.relu(real - self.ema_fake).pow(2) + F.relu(self.ema_real - fake).pow(2)
        with torch.no_grad():
            self.ema_real.lerp_(real.detach(), 1 - self.decay)
            self.ema_fake.lerp_(fake.detach(), 1 - self.decay)
        return loss


# ------------------------------------------------------- VA-VAE foundation alignment


def vf_loss_terms(z_proj: torch.Tensor, feats: torch.Tensor, margin_cos: float = 0.5,
                  margin_dist: float = 0.25) -> Dict[str, torch.Tensor]:
    """VA-VAE's vision-foundation alignment (Yao et al. 2025), both terms.

    z_proj: latents projected to the feature width, [B,D,h,w]; feats: [B,h*w,D] patch features.
    marginal cosine:    mean_ij relu(1 - m1 - cos(z_ij, f_ij))
    marginal distance:  mean_b,ij relu(|cos(z_i, z_j) - cos(f_i, f_j)| - m2)
    Both are zero when every token is within the margins of its feature.
    """
    with fp32():
        z = z_proj.float().flatten(2).transpose(1, 2)  # [B,N,D]
        f = feats.float()
        if z.shape != f.shape:
            raise ValueError(f"projected latents {tuple(z.shape)} and features {tuple(f.shape)} differ")
        mcos = F.relu(1 - margin_cos - F.cosine_similarity(z, f, dim=-1)).mean()
        zn, fn = F.normalize(z, dim=-1), F.normalize(f, dim=-1)
        mdms = F.relu((zn @ zn.transpose(1, 2) - fn @ fn.transpose(1, 2)).abs() - margin_dist).mean()
        return {"vf_mcos": mcos, "vf_mdms": mdms}


# ------------------------------------------------------------ equivariance terms


@dataclass(frozen=True)
class SpatialTransform:
    """A spatial transform applied alike to images and latents: rotate by k*90 deg, optional
    horizontal flip, then bilinear downscale by `scale` (1 = none)."""

    rot90: int = 0
    hflip: bool = False
    scale: int = 1

    def __call__(self, t: torch.Tensor) -> torch.Tensor:  # [B,C,H,W] -> [B,C,H',W']
        if self.rot90 % 4:
            t = torch.rot90(t, self.rot90 % 4, dims=(2, 3))
        if self.hflip:
            t = t.flip(3)
        if self.scale != 1:
            t = F.interpolate(t, scale_factor=1 / self.scale, mode="bilinear", align_corners=False, antialias=False)
        return t


def equivariance_loss(decode: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, x: torch.Tensor,
                      transform: SpatialTransform, kind: str = "l1") -> torch.Tensor:
    """|| decode(T z) - T x ||: EQ-VAE (rotations/scalings) and the scale-equivariance
    regulariser (T = s-fold bilinear downscale). z: [B,C,h,w] latents; x: [B,3,H,W] in [-1,1]."""
    return reconstruction_loss(transform(x), decode(transform(z)), kind)


def sample_eq_transform(rng: random.Random, max_scale: int = 2) -> SpatialTransform:
    """EQ-VAE's random transform: a rotation (0/90/180/270) or a downscale in 2..max_scale."""
    if rng.random() < 0.5:
        return SpatialTransform(rot90=rng.randint(1, 3))
    return SpatialTransform(scale=rng.randint(2, max_scale))


# ------------------------------------------------------------------ the module


def _scaled(weight: float, adaptive: bool, nll: torch.Tensor, loss: torch.Tensor,
            layer: Optional[torch.Tensor], layer_name: str):
    """weight, times the adaptive gradient-norm ratio when asked for."""
    if not adaptive:
        return weight
    if layer is None:
        raise ValueError(f"adaptive weighting needs {layer_name} (that layer's weight tensor)")
    return weight * adaptive_weight(nll, loss, layer)


class VAERegulariser(nn.Module):
    """L_REG = w_rec*rec + w_lpips*LPIPS + w_kl*KL + w_gan*GAN (+ VF, EQ, scale-EQ options).

    `generator_terms` returns each weighted term and their sum under "total"; it gives
    gradients to the VAE (and the VF projection) only, never to the discriminator.
    `discriminator_terms` is the discriminator's hinge loss (+ LeCam) on detached reconstructions.
    """

    def __init__(self, cfg: LossConfig, lpips: Optional[LPIPS] = None, feat_dim: Optional[int] = None,
                 z_channels: Optional[int] = None, official_lpips_range: bool = False):
        super().__init__()
        self.cfg = cfg
        # compat=official: the official code hands LPIPS images in [-1,1] but its LPIPS maps [0,1] to
        # [-1,1] first (2x-1), so the network sees [-3,1]; our LPIPS takes [-1,1], hence 2x-1 here
        self.official_lpips_range = official_lpips_range
        if cfg.lpips_weight > 0 and lpips is None:
            lpips = LPIPS.from_files(cfg.vgg_path, cfg.lpips_path)  # clear error when absent
        self.lpips = lpips if cfg.lpips_weight > 0 else None
        self.discriminator = NLayerDiscriminator(ndf=cfg.disc_ndf, n_layers=cfg.disc_layers)
        self.lecam = LeCam(cfg.lecam_ema_decay) if cfg.lecam_weight > 0 else None
        self.vf_proj = None
        if cfg.vf_weight > 0:
            if feat_dim is None or z_channels is None:
                raise ValueError("loss.vf_weight > 0 needs the encoder feature width and the VAE latent channels")
            self.vf_proj = nn.Conv2d(z_channels, feat_dim, 1)  # trained with the VAE
        self._rng = random.Random(0)

    def gan_active(self, step: int) -> bool:
        return self.cfg.gan_weight > 0 and step >= self.cfg.gan_start_step

    def generator_terms(self, x: torch.Tensor, recon: torch.Tensor, posterior: DiagonalGaussian, step: int,
                        decoder_last: Optional[torch.Tensor] = None, z: Optional[torch.Tensor] = None,
                        decode: Optional[Callable] = None, feats: Optional[torch.Tensor] = None,
                        encoder_last: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """x, recon: [B,3,H,W] in [-1,1]. z/decode: the latent sample and the decoder (EQ terms);
        feats: [B,N,D] encoder features (VF term); *_last: layer weights for adaptive weights."""
        c = self.cfg
        with fp32():
            x, recon = x.float(), recon.float()
            rec = reconstruction_loss(x, recon, c.recon_type)
            terms = {"rec": c.recon_weight * rec, "kl": c.kl_weight * kl_loss(posterior)}
            nll = terms["rec"]
            if self.lpips is not None:
                a, b = (2 * x - 1, 2 * recon - 1) if self.official_lpips_range else (x, recon)
                terms["lpips"] = c.lpips_weight * self.lpips(a, b).mean()
                nll = nll + terms["lpips"]
            if self.gan_active(step):
                with frozen(self.discriminator):
                    g_loss = generator_adv_loss(self.discriminator(recon))
                weight = _scaled(c.gan_weight, c.gan_adaptive_weight, nll, g_loss, decoder_last, "decoder_last")
                terms["gan"] = weight * g_loss
            terms.update(self._optional_terms(x, nll, z, decode, feats, encoder_last))
        terms["total"] = torch.stack(list(terms.values())).sum()
        return terms

    def _optional_terms(self, x, nll, z, decode, feats, encoder_last) -> Dict[str, torch.Tensor]:
        c, out = self.cfg, {}
        if self.vf_proj is not None:
            if z is None or feats is None:
                raise ValueError("the VF loss needs the latents z and encoder features")
            vf = vf_loss_terms(self.vf_proj(z.float()), feats, c.vf_margin_cos, c.vf_margin_dist)
            vf_total = vf["vf_mcos"] + vf["vf_mdms"]
            out["vf"] = _scaled(c.vf_weight, c.vf_adaptive, nll, vf_total, encoder_last, "encoder_last") * vf_total
        if c.eq_weight > 0 or c.scale_eq_weight > 0:
            if z is None or decode is None:
                raise ValueError("equivariance terms need the latents z and the decoder")
            if c.eq_weight > 0:
                out["eq"] = c.eq_weight * equivariance_loss(decode, z, x, sample_eq_transform(self._rng), c.recon_type)
            if c.scale_eq_weight > 0:
                out["scale_eq"] = c.scale_eq_weight * torch.stack([
                    equivariance_loss(decode, z, x, SpatialTransform(scale=s), c.recon_type)
                    for s in c.scale_eq_factors
                ]).mean()
        return out

    def load_discriminator(self, path) -> None:
        """Strictly load discriminator weights (official `*-discriminator-ckpt.pt` or our safetensors),
        from a local path or a hub id (without a file: the repo's `*discriminator*` file)."""
        from repae.hub import local_path
        from repae.weights import load_strict, read_file

        path = local_path(path, "discriminator")
        state = read_file(path)
        state = state.get("discriminator", state) if isinstance(state.get("discriminator"), dict) else state
        load_strict(self.discriminator, state, str(path))

    def discriminator_terms(self, x: torch.Tensor, recon: torch.Tensor,
                            discriminator: Optional[nn.Module] = None) -> Dict[str, torch.Tensor]:
        """Hinge loss of D on real x vs detached recon (+ LeCam). Gives no gradient to the VAE.
        The caller skips the discriminator update while `gan_active(step)` is False.
        `discriminator`: the module to run (its DDP wrapper with several ranks); default ours."""
        disc = discriminator or self.discriminator
        with fp32():
            logits_real = disc(x.detach().float())
            logits_fake = disc(recon.detach().float())
            terms = {"disc": hinge_d_loss(logits_real, logits_fake)}
            if self.lecam is not None:
                terms["lecam"] = self.cfg.lecam_weight * self.lecam(logits_real, logits_fake)
            terms["logits_real"] = logits_real.detach().mean()
            terms["logits_fake"] = logits_fake.detach().mean()
            terms["total"] = terms["disc"] + terms.get("lecam", torch.zeros(()))
        return terms
