"""Config -> models. The one place that knows both the schema and the model constructors."""

from __future__ import annotations

from typing import List, Optional

from repae.config import RunConfig, sit_dims, vae_downsample_factor, vae_layout
from repae.models.encoders import encoder_spec
from repae.models.sit import SiT, SiTArgs
from repae.models.vae import AutoencoderKL, VAEArgs


def uses_repa(cfg: RunConfig) -> bool:
    """Whether any REPA loss is on (and so projectors and encoders are needed)."""
    return cfg.loss.proj_coeff > 0 or (cfg.train.tune_vae and cfg.loss.vae_align_proj_coeff > 0)


def compat_sit_fields(compat: str) -> dict:
    """SiTArgs fields that `compat` decides: under "official" a trained pos_embed and the official
    de-normalisation z*sqrt(var)+mean; under "repae" the defaults (frozen buffer, sqrt(var+eps))."""
    official = compat == "official"
    return dict(pos_embed_trainable=official, bn_denorm_eps=not official)


def vae_args(cfg: RunConfig) -> VAEArgs:
    layout = vae_layout(cfg.vae)
    return VAEArgs(**layout)


def sit_args(cfg: RunConfig, z_dims: Optional[List[int]] = None) -> SiTArgs:
    depth, hidden, heads, patch = sit_dims(cfg.model)
    if z_dims is None:
        z_dims = [encoder_spec(n).embed_dim for n in cfg.encoder.names] if uses_repa(cfg) else []
    return SiTArgs(
        input_size=cfg.data.image_size // vae_downsample_factor(cfg.vae),
        patch_size=patch,
        in_channels=vae_layout(cfg.vae)["z_channels"],
        hidden_size=hidden,
        depth=depth,
        num_heads=heads,
        mlp_ratio=cfg.model.mlp_ratio,
        num_classes=cfg.model.num_classes,
        with_null_class=cfg.model.class_dropout_prob > 0,
        z_dims=list(z_dims),
        projector_dim=cfg.model.projector_dim,
        encoder_depth=cfg.model.encoder_depth,
        qk_norm=cfg.model.qk_norm,
        latent_norm=True,  # both modes keep the normaliser as `bn` (fixed mode never updates it)
        bn_momentum=cfg.latent_norm.momentum,
        bn_eps=cfg.latent_norm.eps,
        **compat_sit_fields(cfg.compat),
        attention=cfg.model.attention,
        time_scale=cfg.model.time_scale,
    )


def build_sit(cfg: RunConfig, z_dims: Optional[List[int]] = None) -> SiT:
    """A freshly initialised SiT for this config."""
    return SiT(sit_args(cfg, z_dims))


def build_vae(cfg: RunConfig) -> AutoencoderKL:
    """The config's VAE: loaded strictly from `vae.path` when given, else freshly initialised."""
    args = vae_args(cfg)
    if cfg.vae.path:
        from repae.weights import load_model

        return load_model(cfg.vae.path, kind="vae", args=args)
    return AutoencoderKL(args)
