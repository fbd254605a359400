"""Optimisers and the Trainables bundle for a run: three AdamW, one per parameter set."""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import nn

from repae.config import OptimConfig, RunConfig
from repae.losses import VAERegulariser
from repae.models.sit import SiT
from repae.nn_utils import compile_regions
from repae.train.ema import EMA
from repae.build import uses_repa
from repae.train.replicas import current_shard, wrap
from repae.train.step import FeatureFn, Trainables


def adamw(params: List[nn.Parameter], cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW with the config's lr/betas/wd; fused kernels where this device has them."""
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, eps=cfg.eps)
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(params, foreach=True, **kwargs)


def uses_channels_last(cfg: RunConfig, device: torch.device) -> bool:
    """train.channels_last, or where unset (null) the measured better layout: NHWC on a CPU, NCHW on a GPU."""
    return device.type == "cpu" if cfg.train.channels_last is None else cfg.train.channels_last


def regulariser_uses_channels_last(cfg: RunConfig, device: torch.device) -> bool:
    """train.regulariser_channels_last (LPIPS and the discriminator), or where unset the VAE's layout."""
    own = cfg.train.regulariser_channels_last
    return uses_channels_last(cfg, device) if own is None else own


def conv_layouts(cfg: RunConfig, device: torch.device) -> dict:
    """The convolution nets' memory layouts, as the benchmarks record them."""
    name = {True: "NHWC", False: "NCHW"}
    return {"vae": name[uses_channels_last(cfg, device)], "regulariser": name[regulariser_uses_channels_last(cfg, device)]}


def uses_compile(cfg: RunConfig, device: torch.device) -> bool:
    """train.compile, or where unset (null) on for a CUDA device and off elsewhere (config.py says why)."""
    return device.type == "cuda" if cfg.train.compile is None else cfg.train.compile


def compile_settings(cfg: RunConfig, device: torch.device) -> dict:
    """Whether the training regions are compiled on `device`, and in which torch.compile mode, as the
    benchmarks record them."""
    compiled = uses_compile(cfg, device)
    return {"compile": compiled, "compile_mode": cfg.train.compile_mode if compiled else None}


def make_trainables(cfg: RunConfig, sit: SiT, vae: nn.Module, encoders: Sequence[FeatureFn],
                    regulariser: Optional[VAERegulariser]) -> Trainables:
    """Freeze what the run does not train and give each trained set its own optimiser."""
    sit.activation_checkpointing = cfg.train.activation_checkpointing
    device = next(sit.parameters()).device
    # the convolution nets only: tokens are not images
    for module, nhwc in ((vae, uses_channels_last(cfg, device)), (regulariser, regulariser_uses_channels_last(cfg, device))):
        if module is not None and nhwc:
            module.to(memory_format=torch.channels_last)
    if uses_compile(cfg, device):
        # every region compiles Module._call_impl, and each sees several variants (training, the
        # frozen alignment pass, no-grad sampling): dynamo's default of 8 recompiles per code object
        # would silently fall back to eager (the reference implementation raises it to 64 too)
        dynamo = torch._dynamo.config
        dynamo.recompile_limit = max(dynamo.recompile_limit, 64)
        regions = [sit, getattr(vae, "encoder", vae), getattr(vae, "decoder", None)]
        regions += [getattr(e, "network", e) for e in encoders]
        if regulariser is not None:
            regions += [regulariser.discriminator, regulariser.lpips]
        for region in regions:
            if isinstance(region, nn.Module):
                compile_regions(region, mode=cfg.train.compile_mode)
    sit_params = [p for p in sit.parameters() if p.requires_grad]
    vae.requires_grad_(cfg.train.tune_vae)
    vae_params: List[nn.Parameter] = list(vae.parameters()) if cfg.train.tune_vae else []
    if regulariser is not None and regulariser.vf_proj is not None:
        vae_params += list(regulariser.vf_proj.parameters())  # VA-VAE's projection trains with the VAE
    disc_opt = None
    if regulariser is not None and cfg.train.tune_vae and cfg.train.use_reg_loss and cfg.loss.gan_weight > 0:
        disc_opt = adamw(list(regulariser.discriminator.parameters()), cfg.optim_disc)
    device = next(sit.parameters()).device
    # DDP needs every trained parameter to get a gradient, or to be told some will not:
    # projectors with no SiT REPA term, the decoder without L_REG.
    sit_unused = uses_repa(cfg) and cfg.loss.proj_coeff == 0
    return Trainables(
        sit=sit, ema=EMA(sit, cfg.train.ema_decay, cfg.train.ema_warmup), vae=vae, regulariser=regulariser, encoders=list(encoders),
        sit_opt=adamw(sit_params, cfg.optim_sit),
        vae_opt=adamw(vae_params, cfg.optim_vae) if vae_params else None,
        disc_opt=disc_opt, sit_params=sit_params, vae_params=vae_params,
        sit_train=wrap(sit, device, find_unused=sit_unused),
        vae_train=wrap(vae, device, find_unused=not cfg.train.use_reg_loss) if cfg.train.tune_vae else None,
        # the PatchGAN's BatchNorm buffers follow rank 0, as DDP's default does (its global-batch
        # statistics keep them equal on every rank anyway)
        disc_train=wrap(regulariser.discriminator, device, broadcast_buffers=True) if disc_opt else None,
        shard=current_shard(),
    )
