"""The REPA-E training step (DESIGN.md section 1), one mechanism per line.

Per step, for each micro-batch of uint8 images x with labels y:
  0. f = encoder(x)                                  frozen teacher features, no grad
  1. q(z|x) = vae.encode(x); z ~ q; recon = decode(z)
  2. VAE loss  = L_REG(x, recon, q) + lambda_v * L_REPA(proj(h), f)
       h from the SiT run only to `encoder_depth` on bn(z) noised at t, with the SiT frozen
       (no parameter gradients) and its BatchNorm in eval mode: the REPA gradient reaches z
       through the frozen blocks.
  3. SiT loss  = L_diff + lambda_g * L_REPA on bn(sg(z)) noised at the same t and noise,
       BatchNorm in train mode; sg = stop-gradient, so the diffusion loss never reaches the VAE.
The discriminator's hinge loss on the detached reconstructions is backpropagated too; when every
loss and gradient norm is finite, the VAE, SiT and discriminator optimisers step (each with its own
gradient clip), and the EMA follows the SiT.
Ablations are switches: tune_vae=False (REPA / vanilla SiT on a frozen VAE), stop_grad=False,
use_reg_loss=False, latent_norm.mode="fixed", proj_coeff=0 (no REPA).
Stage 2 (a frozen VAE with cached latents, repae.stage2): a micro-batch may carry the posterior's
cached (mean, std); then z = mean + std * eps with eps drawn exactly as the VAE pass would draw it.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from repae import dist
from repae.config import RunConfig
from repae.flow import denoising_loss, drop_labels, interpolate, sample_time, velocity_target
from repae.losses import VAERegulariser, repa_loss
from repae.models.sit import SiT
from repae.nn_utils import frozen
from repae.pixels import to_vae_range
from repae.train.ema import EMA
from repae.train.replicas import Shard, no_sync

# uint8 images [B,3,H,W] -> patch features [B,N,D]
FeatureFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Trainables:
    """Everything the step touches. `vae_opt` is None when the VAE is frozen."""

    sit: SiT
    ema: EMA
    vae: nn.Module
    regulariser: Optional[VAERegulariser]
    encoders: Sequence[FeatureFn]
    sit_opt: torch.optim.Optimizer
    vae_opt: Optional[torch.optim.Optimizer] = None
    disc_opt: Optional[torch.optim.Optimizer] = None
    sit_params: List[nn.Parameter] = field(default_factory=list)
    vae_params: List[nn.Parameter] = field(default_factory=list)
    # The training passes go through these: DDP wrappers with several ranks, the modules otherwise.
    sit_train: Optional[nn.Module] = None
    vae_train: Optional[nn.Module] = None
    disc_train: Optional[nn.Module] = None
    shard: Shard = field(default_factory=Shard)

    def __post_init__(self) -> None:
        self.sit_train = self.sit_train or self.sit
        self.vae_train = self.vae_train or self.vae
        if self.disc_train is None and self.regulariser is not None:
            self.disc_train = self.regulariser.discriminator


@contextmanager
def bn_mode(sit: SiT, train: bool) -> Iterator[None]:
    """Put the SiT's latent BatchNorm in train (batch stats, running update) or eval mode."""
    was = sit.bn.training
    sit.bn.train(train)
    try:
        yield
    finally:
        sit.bn.train(was)


def teacher_features(encoders: Sequence[FeatureFn], images: torch.Tensor) -> List[torch.Tensor]:
    """Step 0: frozen encoder patch features, no grad. [B,3,H,W] uint8 -> list of [B,N,D]."""
    with torch.no_grad():
        return [encode(images) for encode in encoders]


def alignment_loss_for_vae(sit: SiT, z: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, y: torch.Tensor,
                           feats: List[torch.Tensor], cfg: RunConfig) -> torch.Tensor:
    """Step 2's REPA term: the SiT is frozen and its BN reads running stats; gradients reach z only."""
    with frozen(sit), bn_mode(sit, train=False):
        x_t = interpolate(sit.bn(z), noise, t, cfg.flow.path_type)
        projected = sit(x_t, t, y, align_only=True).projected
    return repa_loss(projected, feats)


def sit_losses(sit: SiT, z: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, y: torch.Tensor,
               feats: List[torch.Tensor], cfg: RunConfig, forward: Optional[nn.Module] = None) -> Dict[str, torch.Tensor]:
    """Step 3: diffusion + REPA loss of the SiT. z is already detached unless stop_grad is off.
    `forward` is the SiT's training pass (its DDP wrapper when there are several ranks)."""
    with bn_mode(sit, train=cfg.latent_norm.mode == "batch"):
        z_norm = sit.bn(z)
    x_t = interpolate(z_norm, noise, t, cfg.flow.path_type)
    out = (forward or sit)(x_t, t, y)
    terms = {"diffusion": denoising_loss(out.velocity, velocity_target(z_norm, noise, t, cfg.flow.path_type)).mean()}
    if cfg.loss.proj_coeff > 0:
        terms["repa_sit"] = cfg.loss.proj_coeff * repa_loss(out.projected, feats)
    return terms


def draw_step_noise(m: Trainables, x: torch.Tensor, cfg: RunConfig, gen: torch.Generator,
                    latent: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
    """The step's random draws, made for the global micro-batch and sliced to this rank's share
    (see repae.train.replicas): posterior noise, t, diffusion noise, label-dropout uniforms.
    x: images [B,3,H,W]; or pass `latent` [B,C,h,w] (cached moments) to take the shape from it."""
    ref = latent if latent is not None else x
    n, device = m.shard.global_size(ref.shape[0]), ref.device
    f = m.vae.downsample_factor
    per_item = tuple(latent.shape[1:]) if latent is not None else (m.vae.z_channels, x.shape[-2] // f, x.shape[-1] // f)
    shape = (n, *per_item)
    draws = {"posterior": torch.randn(shape, generator=gen, device=device),
             "t": sample_time(n, cfg.flow.time_sampling, cfg.flow.path_type, cfg.flow.lognormal_mean,
                              cfg.flow.lognormal_std, generator=gen, device=device),
             "noise": torch.randn(shape, generator=gen, device=device),
             "label_drop": torch.rand(n, generator=gen, device=device)}
    return {k: m.shard.take(v) for k, v in draws.items()}


def micro_step(m: Trainables, images: Optional[torch.Tensor], labels: torch.Tensor, cfg: RunConfig, step: int,
               scale: float, gen: torch.Generator, cached: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
               ) -> Tuple[Dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Forward and backward of one micro-batch (gradients accumulate, scaled by `scale`).
    `cached`: the frozen VAE's posterior (mean, std) [B,C,h,w] each, instead of encoding `images`
    (which may then be None unless an alignment encoder needs them).
    Returns (detached loss terms, x in [-1,1], detached reconstruction) for the discriminator."""
    device = labels.device
    feats = teacher_features(m.encoders, images) if uses_alignment(cfg) else []           # 0. teacher
    x = to_vae_range(images) if images is not None else None
    draws = draw_step_noise(m, x, cfg, gen, latent=cached[0] if cached is not None else None)
    t, noise = draws["t"], draws["noise"]                                                 # shared t and noise
    need_recon = cfg.train.tune_vae and cfg.train.use_reg_loss
    if cached is not None:                                                                # 1. cached posterior
        posterior, recon = None, None
        z = cached[0] + cached[1] * draws["posterior"]
    else:                                                                                 # 1. VAE
        vae_pass = m.vae_train if cfg.train.tune_vae else m.vae
        posterior, z, recon = vae_pass(x, noise=draws["posterior"], decode=need_recon)
    logs: Dict[str, torch.Tensor] = {}

    vae_loss = torch.zeros((), device=device)
    if cfg.train.tune_vae:                                                                # 2. VAE loss
        if cfg.train.use_reg_loss:
            reg = m.regulariser.generator_terms(x, recon, posterior, step,
                                                decoder_last=m.vae.decoder.conv_out.weight)
            logs.update({f"reg_{k}": v.detach() for k, v in reg.items()})
            vae_loss = vae_loss + reg["total"]
        if cfg.loss.vae_align_proj_coeff > 0:
            align = alignment_loss_for_vae(m.sit, z, t, noise, labels, feats, cfg)
            logs["repa_vae"] = align.detach()
            vae_loss = vae_loss + cfg.loss.vae_align_proj_coeff * align
        logs["vae_loss"] = vae_loss.detach()
    if cfg.train.stop_grad and vae_loss.requires_grad:
        # Backward the VAE loss now, so the VAE's graph (the step's largest: ~1.25 GB per 256-px
        # image for f8d4) is freed before the SiT's is built. With the stop-gradient the two losses
        # share no gradient path, so two backwards give the gradients of one.
        (scale * vae_loss).backward()
        vae_loss = torch.zeros((), device=device)

    z_sit = z.detach() if cfg.train.stop_grad else z                                      # stop-gradient
    y_drop = drop_labels(labels, cfg.model.class_dropout_prob, m.sit.null_class,
                         uniform=draws["label_drop"])                                     # CFG label dropout
    sit_terms = sit_losses(m.sit, z_sit, t, noise, y_drop, feats, cfg, forward=m.sit_train)  # 3. SiT loss
    logs.update({k: v.detach() for k, v in sit_terms.items()})
    # The frozen alignment pass gives the SiT no gradient from the VAE loss, and the
    # stop-gradient gives the VAE none from the SiT loss. Without it (ablation), one backward
    # carries both losses, the SiT's into the VAE.
    (scale * (vae_loss + sum(sit_terms.values()))).backward()
    return logs, x, recon.detach() if recon is not None else None


def uses_alignment(cfg: RunConfig) -> bool:
    return cfg.loss.proj_coeff > 0 or (cfg.train.tune_vae and cfg.loss.vae_align_proj_coeff > 0)


def _grad_norm(params: List[nn.Parameter]) -> torch.Tensor:
    """The total L2 norm of the parameters' gradients (0 when none has one)."""
    grads = [p.grad for p in params if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())


def _clip_and_step(opt: Optional[torch.optim.Optimizer], params: List[nn.Parameter], max_norm: float,
                   norm: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Clip the gradients to `max_norm` (0: no clipping) given or measuring their norm, then step."""
    norm = _grad_norm(params) if norm is None else norm
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_([p for p in params if p.grad is not None], max_norm, norm)
    if opt is not None:
        opt.step()
    return norm


def _zero(*opts: Optional[torch.optim.Optimizer]) -> None:
    for opt in opts:
        if opt is not None:
            opt.zero_grad(set_to_none=True)


def repae_step(m: Trainables, batches: Sequence[Tuple[torch.Tensor, torch.Tensor]], cfg: RunConfig, step: int,
               gen: torch.Generator) -> Dict[str, torch.Tensor]:
    """One optimisation step over `batches` (gradient-accumulation micro-batches).

    Returns detached metrics; `skipped` = 1 when a loss or a gradient norm was not finite and nothing
    was stepped.
    """
    _zero(m.sit_opt, m.vae_opt, m.disc_opt)
    scale = 1.0 / len(batches)
    logs: Dict[str, torch.Tensor] = {}
    for_disc = []
    for i, (images, labels, *cached) in enumerate(batches):  # (images, labels[, cached moments])
        with no_sync([m.sit_train, m.vae_train], skip_sync=i < len(batches) - 1):  # all-reduce once
            micro, x, recon = micro_step(m, images, labels, cfg, step, scale, gen, *cached)
        for k, v in micro.items():
            logs[k] = logs.get(k, 0) + scale * v
        if recon is not None:
            for_disc.append((x, recon))
    norms = {"grad_norm_sit": _grad_norm(m.sit_params)}
    if m.vae_opt is not None:
        norms["grad_norm_vae"] = _grad_norm(m.vae_params)
    reg = m.regulariser
    train_disc = reg is not None and m.disc_opt is not None and bool(for_disc) and reg.gan_active(step)
    if train_disc:                                                                        # discriminator loss
        # Its backward comes before any update so that its loss and gradient norm are checked with the
        # others. The numbers are the official code's, which runs it after the VAE and SiT updates: it
        # reads only x and the detached reconstructions, and the generator's GAN term ran with it frozen.
        for i, (x, recon) in enumerate(for_disc):
            with no_sync([m.disc_train], skip_sync=i < len(for_disc) - 1):
                d_terms = reg.discriminator_terms(x, recon, discriminator=m.disc_train)
                (scale * d_terms["total"]).backward()
            for k in ("disc", "logits_real", "logits_fake"):
                logs[k] = logs.get(k, 0) + scale * d_terms[k].detach()
        norms["grad_norm_disc"] = _grad_norm(list(reg.discriminator.parameters()))
    # one host sync per step: skip the update when any loss or gradient norm is NaN/inf on any rank
    checked = torch.stack([v.float().to(norms["grad_norm_sit"].device) for v in [*logs.values(), *norms.values()]])
    nonfinite = (~torch.isfinite(checked)).any().float().reshape(1)
    if dist.all_reduce_sum(nonfinite).item() > 0:
        _zero(m.sit_opt, m.vae_opt, m.disc_opt)
        return {**logs, **norms, "skipped": torch.ones((), device=nonfinite.device)}

    logs.update(norms)
    if m.vae_opt is not None:                                                              # VAE update
        _clip_and_step(m.vae_opt, m.vae_params, cfg.optim_vae.max_grad_norm, norms["grad_norm_vae"])
    _clip_and_step(m.sit_opt, m.sit_params, cfg.optim_sit.max_grad_norm, norms["grad_norm_sit"])  # SiT update
    if train_disc:                                                                        # discriminator update
        _clip_and_step(m.disc_opt, list(reg.discriminator.parameters()), cfg.optim_disc.max_grad_norm,
                       norms["grad_norm_disc"])
    m.ema.update(m.sit, step)                                                             # EMA of SiT + BN
    logs["skipped"] = torch.zeros((), device=nonfinite.device)  # beside the losses: the loop stacks them
    return logs
