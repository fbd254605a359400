"""Conversion between our LDM-layout AutoencoderKL and the diffusers format.

A diffusers VAE directory is `config.json` + `diffusion_pytorch_model.safetensors`; both
are written and read here without importing diffusers, so the package does not need it.
Levels with attention use diffusers' `AttnDownEncoderBlock2D` / `AttnUpDecoderBlock2D`
(the f16d32 layout has attention at its coarsest level).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Dict, Optional

import torch

from repae.fileio import is_number
from repae.models.vae import AutoencoderKL, VAEArgs

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"

_ATTN_PARTS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_RESNET_PARTS = {"nin_shortcut": "conv_shortcut"}


def _rename_tail(tail: str, parts: Dict[str, str]) -> str:
    head, _, rest = tail.partition(".")
    return f"{parts.get(head, head)}.{rest}"


def ldm_key_to_diffusers(key: str, num_levels: int) -> str:
    """One LDM key -> its diffusers key (e.g. decoder.up.3.block.0.conv1.weight -> decoder.up_blocks.0.resnets.0.conv1.weight)."""
    m = re.match(r"(encoder|decoder)\.(down|up)\.(\d+)\.(block|attn|downsample|upsample)\.(.*)", key)
    if m:
        side, _, level, kind, tail = m.groups()
        level = int(level)
        blocks = f"{side}.down_blocks.{level}" if side == "encoder" else f"{side}.up_blocks.{num_levels - 1 - level}"
        if kind == "block":
            idx, _, tail = tail.partition(".")
            return f"{blocks}.resnets.{idx}.{_rename_tail(tail, _RESNET_PARTS)}"
        if kind == "attn":
            idx, _, tail = tail.partition(".")
            return f"{blocks}.attentions.{idx}.{_rename_tail(tail, _ATTN_PARTS)}"
        return f"{blocks}.{'downsamplers' if kind == 'downsample' else 'upsamplers'}.0.{tail}"
    m = re.match(r"(encoder|decoder)\.mid\.(block_1|block_2|attn_1)\.(.*)", key)
    if m:
        side, part, tail = m.groups()
        if part == "attn_1":
            return f"{side}.mid_block.attentions.0.{_rename_tail(tail, _ATTN_PARTS)}"
        idx = 0 if part == "block_1" else 1
        return f"{side}.mid_block.resnets.{idx}.{_rename_tail(tail, _RESNET_PARTS)}"
    return re.sub(r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out.", key)


def _is_attn_proj(key: str) -> bool:
    return re.search(r"\.(attn\.\d+|attn_1)\.(q|k|v|proj_out)\.weight$", key) is not None


def to_diffusers_state(state: Dict[str, torch.Tensor], args: VAEArgs) -> Dict[str, torch.Tensor]:
    """LDM state dict -> diffusers state dict (attention 1x1 convs become linears)."""
    n = len(args.ch_mult)
    out = {}
    for key, value in state.items():
        if _is_attn_proj(key):
            value = value.reshape(value.shape[0], value.shape[1])
        out[ldm_key_to_diffusers(key, n)] = value.contiguous()
    return out


def from_diffusers_state(state: Dict[str, torch.Tensor], args: VAEArgs) -> Dict[str, torch.Tensor]:
    """diffusers state dict -> LDM state dict, for the layout `args`; KeyError names a missing key."""
    n = len(args.ch_mult)
    out = {}
    for key in _ldm_keys(args):
        source = ldm_key_to_diffusers(key, n)
        if source not in state:
            raise KeyError(f"diffusers VAE is missing {source!r} (needed for {key!r})")
        value = state[source]
        if _is_attn_proj(key):
            value = value.reshape(*value.shape, 1, 1)
        out[key] = value
    extra = set(state) - {ldm_key_to_diffusers(k, n) for k in out}
    if extra:
        raise KeyError(f"diffusers VAE has keys with no place in this layout: {sorted(extra)[:10]}")
    return out


def _ldm_keys(args: VAEArgs) -> list:
    with torch.device("meta"):  # key names only: nothing is allocated
        return list(AutoencoderKL(args).state_dict().keys())


def diffusers_config(args: VAEArgs, latents_mean: Optional[torch.Tensor] = None,
                     latents_std: Optional[torch.Tensor] = None, sample_size: int = 256) -> dict:
    """The diffusers AutoencoderKL config.json for our layout (per-channel latent stats optional)."""
    attn = args.attn_levels()
    config = {
        "_class_name": "AutoencoderKL",
        "in_channels": args.in_channels,
        "out_channels": 3,
        "down_block_types": ["AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in attn],
        "up_block_types": ["AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in reversed(attn)],
        "block_out_channels": [args.ch * m for m in args.ch_mult],
        "layers_per_block": args.num_res_blocks,
        "act_fn": "silu",
        "latent_channels": args.z_channels,
        "norm_num_groups": args.norm_groups,
        "sample_size": sample_size,
        "scaling_factor": 1.0,
        "force_upcast": True,
        "use_quant_conv": True,
        "use_post_quant_conv": True,
        "mid_block_add_attention": True,
    }
    if latents_mean is not None and latents_std is not None:
        config["latents_mean"] = [float(v) for v in latents_mean.reshape(-1)]
        config["latents_std"] = [float(v) for v in latents_std.reshape(-1)]
    return config


# Far above any AutoencoderKL (SD/SDXL/FLUX: 4 levels); keeps the per-level work below bounded
# before the loader applies its architecture caps.
MAX_LEVELS = 64


def _config_int(config: dict, key: str, default: int) -> int:
    value = config.get(key, default)
    if not is_number(value, int):
        raise ValueError(f"config.json: {key} must be an integer, found {str(value)[:40]!r}")
    return value


def args_from_diffusers_config(config: dict) -> VAEArgs:
    """Our VAEArgs from a diffusers AutoencoderKL config; ValueError for layouts we cannot hold or
    fields of the wrong type (a config.json is data: sizes are capped by the loader before use)."""
    if not isinstance(config, dict):
        raise ValueError(f"config.json holds a JSON {type(config).__name__}, not an object of AutoencoderKL fields")
    widths = config.get("block_out_channels", [64])
    if not isinstance(widths, list) or not 1 <= len(widths) <= MAX_LEVELS or any(not is_number(w, int) or w < 1
                                                          for w in widths):
        raise ValueError(f"config.json: block_out_channels must be a list of 1 to {MAX_LEVELS} positive integers, "
                         f"found {str(widths)[:60]}")
    ch = widths[0]
    if any(w % ch for w in widths):
        raise ValueError(f"block_out_channels {widths} are not multiples of the first width")
    for opt in ("use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"):
        if config.get(opt, True) is not True:
            raise ValueError(f"diffusers VAE with {opt}=False is not supported")
    down = config.get("down_block_types", ["DownEncoderBlock2D"] * len(widths))
    if not isinstance(down, list) or len(down) != len(widths) or not all(isinstance(t, str) for t in down):
        raise ValueError(f"config.json: down_block_types must be a list of {len(widths)} block names (one per "
                         f"block_out_channels entry), found {str(down)[:60]}")
    levels = [t.startswith("Attn") for t in down]
    resolution = 256
    return VAEArgs(
        ch=ch, ch_mult=[w // ch for w in widths], num_res_blocks=_config_int(config, "layers_per_block", 1),
        z_channels=_config_int(config, "latent_channels", 4),
        attn_resolutions=[resolution // 2**i for i, a in enumerate(levels) if a], resolution=resolution,
        norm_groups=_config_int(config, "norm_num_groups", 32), in_channels=_config_int(config, "in_channels", 3),
    )


def export_diffusers(vae: AutoencoderKL, directory: str | Path, latents_mean: Optional[torch.Tensor] = None,
                     latents_std: Optional[torch.Tensor] = None, sample_size: int = 256) -> Path:
    """Write `vae` so that `diffusers.AutoencoderKL.from_pretrained(directory)` loads it."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().float() for k, v in vae.state_dict().items()}
    save_file(to_diffusers_state(state, vae.args), str(directory / WEIGHTS_NAME))
    config = diffusers_config(vae.args, latents_mean, latents_std, sample_size)
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    return directory


class DiffusersVAEAdapter(torch.nn.Module):
    """Any diffusers AutoencoderKL (SD, SDXL, FLUX's 16-channel VAE, ...) behind our VAE interface,
    so it can be tuned end to end: `encode(x) -> DiagonalGaussian`, `decode(z) -> pixels`, both in
    [-1,1] and on raw (unscaled) latents; latent statistics come from the latent BatchNorm.
    Its parameters are diffusers' own, so save it with `vae.save_pretrained(...)`."""

    def __init__(self, vae: "torch.nn.Module"):
        super().__init__()
        self.vae = vae

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs) -> "DiffusersVAEAdapter":
        import diffusers

        return cls(diffusers.AutoencoderKL.from_pretrained(path, **kwargs))

    @property
    def z_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def encode(self, x: torch.Tensor):  # [B,3,H,W] -> posterior over [B,z,H/f,W/f]
        from repae.models.vae import DiagonalGaussian

        return DiagonalGaussian(self.vae.encode(x).latent_dist.parameters)

    def decode(self, z: torch.Tensor) -> torch.Tensor:  # [B,z,h,w] -> [B,3,h*f,w*f]
        return self.vae.decode(z).sample

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None, noise: torch.Tensor | None = None,
                decode: bool = True):
        posterior = self.encode(x)
        z = posterior.sample(generator, noise)
        return posterior, z, self.decode(z) if decode else None
