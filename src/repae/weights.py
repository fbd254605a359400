"""Reading and writing model weights, and loading a SiT or VAE from whatever file a user has.

Accepted sources for `load_model`:
- our `.safetensors` (architecture stored in the file's metadata),
- official REPA / REPA-E `.pt` files: a full training checkpoint (`ema`/`model`/`vae` entries),
  a bare VAE state dict, a SiT state dict; read with `weights_only=True` and an explicit
  allow-list (argparse.Namespace, which the official checkpoints pickle as `args`),
- a diffusers AutoencoderKL directory (config.json + diffusion_pytorch_model.safetensors).
Loading is always strict; any mismatch raises CheckpointError naming each key.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import torch
from torch import nn

from repae.models.sit import SiT, SiTArgs
from repae.models.vae import AutoencoderKL, VAEArgs
from repae.models import vae_diffusers

StateDict = Dict[str, torch.Tensor]
# Types the official checkpoints pickle besides tensors; nothing else is unpickled.
SAFE_GLOBALS = [argparse.Namespace]


class CheckpointError(RuntimeError):
    """A weight file that cannot be used: missing, unreadable, or not matching the model."""


# --------------------------------------------------------------------------- files


def read_file(path: Union[str, os.PathLike]) -> dict:
    """Load a .safetensors or a torch pickle (.pt/.pth/.bin/.ckpt) safely; CheckpointError if unreadable."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory; expected a weight file (or use load_model for diffusers dirs)")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"cannot read {path}: not a valid safetensors file ({err})") from None
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a bad pickle; name the file either way
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"cannot read {path}: truncated, corrupt, or holds objects outside the allow-list ({reason})"
        ) from None


def file_metadata(path: Union[str, os.PathLike]) -> Dict[str, str]:
    """The string metadata of a .safetensors file ({} for other files)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return {}
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as err:
        raise CheckpointError(f"cannot read {path}: not a valid safetensors file ({err})") from None


def save_weights(module_or_state: Union[nn.Module, StateDict], path: Union[str, os.PathLike],
                 metadata: Optional[Dict[str, str]] = None) -> Path:
    """Atomically write a state dict as safetensors (tmp file + rename: no half-written file on a crash)."""
    from safetensors.torch import save_file

    state = module_or_state.state_dict() if isinstance(module_or_state, nn.Module) else module_or_state
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata=metadata or {})
    os.replace(tmp, path)
    return path


def save_model(model: Union[SiT, AutoencoderKL], path: Union[str, os.PathLike]) -> Path:
    """Weights plus the architecture (as JSON metadata), so `load_model(path)` needs nothing else."""
    kind = "sit" if isinstance(model, SiT) else "vae"
    meta = {"repae_kind": kind, "repae_args": json.dumps(dataclasses.asdict(model.args))}
    return save_weights(model, path, meta)


# ------------------------------------------------------------------- strict loading


def load_strict(module: nn.Module, state: StateDict, source: str = "state dict") -> nn.Module:
    """load_state_dict(strict=True) with one error listing missing, unexpected and mis-shaped keys."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = [f"{source} does not match {type(module).__name__}:"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", shapes)):
            if items:
                shown = ", ".join(items[:20]) + (f", ... ({len(items)} in all)" if len(items) > 20 else "")
                parts.append(f"  {title}: {shown}")
        raise CheckpointError("\n".join(parts))
    module.load_state_dict(state, strict=True)
    return module


# --------------------------------------------------------------- architecture inference


def _count(state: StateDict, pattern: str) -> int:
    ids = {int(m.group(1)) for k in state for m in [re.match(pattern, k)] if m}
    return max(ids) + 1 if ids else 0


def sit_args_from_state(state: StateDict, encoder_depth: int = 8, **overrides) -> SiTArgs:
    """Rebuild SiTArgs from an official SiT state dict. `encoder_depth` cannot be read from
    weights (the reference default is 8); pass it if the run used another."""
    try:
        proj = state["x_embedder.proj.weight"]  # [D, C, p, p]
        hidden, in_ch, patch = proj.shape[0], proj.shape[1], proj.shape[2]
        tokens = state["pos_embed"].shape[1]
        table = state["y_embedder.embedding_table.weight"].shape[0]
        mlp_hidden = state["blocks.0.mlp.fc1.weight"].shape[0]
    except KeyError as err:
        raise CheckpointError(f"not a SiT state dict: missing key {err.args[0]!r}") from None
    depth = _count(state, r"blocks\.(\d+)\.")
    n_proj = _count(state, r"projectors\.(\d+)\.")
    z_dims = [state[f"projectors.{i}.4.weight"].shape[0] for i in range(n_proj)]
    projector_dim = state["projectors.0.0.weight"].shape[0] if n_proj else 2048
    qk_norm = "blocks.0.attn.q_norm.weight" in state
    head_dim = state["blocks.0.attn.q_norm.weight"].shape[0] if qk_norm else None
    num_heads = hidden // head_dim if head_dim else {384: 6, 768: 12, 1024: 16, 1152: 16}.get(hidden, hidden // 64)
    num_classes = overrides.pop("num_classes", None)
    if num_classes is None:  # official models: 1000 classes (+1 null row when trained with label dropout)
        num_classes = 1000 if table in (1000, 1001) else table - 1
    if table not in (num_classes, num_classes + 1):
        raise CheckpointError(f"label table has {table} rows, which does not fit num_classes={num_classes}")
    args = SiTArgs(
        input_size=int(round(tokens**0.5)) * patch, patch_size=patch, in_channels=in_ch, hidden_size=hidden,
        depth=depth, num_heads=num_heads, mlp_ratio=mlp_hidden / hidden, z_dims=z_dims,
        projector_dim=projector_dim, encoder_depth=min(encoder_depth, depth), qk_norm=qk_norm,
        latent_norm="bn.running_mean" in state, num_classes=num_classes, with_null_class=table == num_classes + 1,
    )
    return dataclasses.replace(args, **overrides)


def vae_args_from_state(state: StateDict) -> VAEArgs:
    """Rebuild VAEArgs (LDM layout) from an LDM AutoencoderKL state dict."""
    try:
        ch = state["encoder.conv_in.weight"].shape[0]
        z = state["post_quant_conv.weight"].shape[0]
    except KeyError as err:
        raise CheckpointError(f"not an AutoencoderKL state dict: missing key {err.args[0]!r}") from None
    levels = _count(state, r"encoder\.down\.(\d+)\.")
    ch_mult = [state[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in range(levels)]
    res_blocks = _count(state, r"encoder\.down\.0\.block\.(\d+)\.")
    resolution = 256
    attn = [resolution // 2**i for i in range(levels) if f"encoder.down.{i}.attn.0.q.weight" in state]
    # the GroupNorm group count is not stored in weights; LDM's 32 is the default of VAEArgs
    return VAEArgs(ch=ch, ch_mult=ch_mult, num_res_blocks=res_blocks, z_channels=z,
                   attn_resolutions=attn, resolution=resolution)


# ------------------------------------------------------------------------ load_model


def _pick(obj: dict, kind: str, prefer_ema: bool) -> Tuple[StateDict, str]:
    """The state dict of `kind` inside a loaded file (full training checkpoint or bare state dict)."""
    if kind == "vae":
        if "vae" in obj and isinstance(obj["vae"], dict):
            return obj["vae"], "['vae']"
        return obj, ""
    for entry in (["ema", "model"] if prefer_ema else ["model", "ema"]):
        if entry in obj and isinstance(obj[entry], dict):
            return obj[entry], f"[{entry!r}]"
    return obj, ""


def _guess_kind(state: dict) -> str:
    if "x_embedder.proj.weight" in state or "ema" in state or "model" in state:
        return "sit"
    if "encoder.conv_in.weight" in state or "vae" in state:
        return "vae"
    raise CheckpointError("cannot tell whether this file holds a SiT or a VAE; pass kind='sit' or kind='vae'")


def load_model(path: Union[str, os.PathLike], kind: Optional[str] = None, args=None, prefer_ema: bool = True,
               **sit_overrides) -> Union[SiT, AutoencoderKL]:
    """Build and strictly load a SiT or VAE from a local file or diffusers directory.

    kind: "sit" | "vae" | None (detected). args: SiTArgs / VAEArgs to build with (default: read
    from our metadata or inferred from the weights). prefer_ema picks `ema` over `model` in
    training checkpoints. Raises CheckpointError naming the path and any mismatched keys.
    """
    path = Path(path)
    if path.is_dir():
        if kind not in (None, "vae"):
            raise CheckpointError(f"{path} is a directory: only diffusers VAE directories are supported")
        return _load_diffusers_dir(path, args)
    meta = file_metadata(path)
    obj = read_file(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict or checkpoint")
    kind = kind or meta.get("repae_kind") or _guess_kind(obj)
    state, where = _pick(obj, kind, prefer_ema)
    if args is None and "repae_args" in meta:
        fields = json.loads(meta["repae_args"])
        args = SiTArgs(**fields) if kind == "sit" else VAEArgs(**fields)
    if kind == "sit":
        args = args or sit_args_from_state(state, **sit_overrides)
        model: nn.Module = SiT(args)
    elif kind == "vae":
        model = AutoencoderKL(args or vae_args_from_state(state))
    else:
        raise CheckpointError(f"kind must be 'sit' or 'vae', got {kind!r}")
    return load_strict(model, state, f"{path}{where}")


def _load_diffusers_dir(path: Path, args: Optional[VAEArgs]) -> AutoencoderKL:
    config_file, weights = path / vae_diffusers.CONFIG_NAME, path / vae_diffusers.WEIGHTS_NAME
    for f in (config_file, weights):
        if not f.is_file():
            raise CheckpointError(f"diffusers VAE directory {path} has no {f.name}")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{config_file} is not valid JSON: {err}") from None
    try:
        args = args or vae_diffusers.args_from_diffusers_config(config)
        state = vae_diffusers.from_diffusers_state(read_file(weights), args)
    except (KeyError, ValueError) as err:
        raise CheckpointError(f"{path}: {err.args[0]}") from None
    return load_strict(AutoencoderKL(args), state, str(weights))


# ------------------------------------------------------------------- latent statistics


def load_latent_stats(path: Union[str, os.PathLike]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (mean [C], var [C]) from an official `*-latents-stats.pt`
    ({'latents_scale': 1/std, 'latents_bias': mean}) or our safetensors ({'mean', 'var'})."""
    obj = read_file(path)
    if "latents_scale" in obj and "latents_bias" in obj:
        scale = obj["latents_scale"].reshape(-1).double()
        return obj["latents_bias"].reshape(-1).float(), scale.pow(-2).float()
    if "mean" in obj and "var" in obj:
        return obj["mean"].reshape(-1).float(), obj["var"].reshape(-1).float()
    raise CheckpointError(
        f"{path} holds no latent statistics: expected keys latents_scale/latents_bias or mean/var, found {sorted(obj)}"
    )


def save_latent_stats(mean: torch.Tensor, var: torch.Tensor, path: Union[str, os.PathLike]) -> Path:
    return save_weights({"mean": mean.reshape(-1).float(), "var": var.reshape(-1).float()}, path)
