"""Published encoder weight files -> our ViT key layout (`repae.models.vit`), strictly.

Each family's converter takes whatever the official file holds (a bare state dict, a
training checkpoint with its entry and prefixes, a Hugging Face export) and returns a state
dict in our layout. Keys the official files carry but the features never use (classifier and
projection heads, MAE's decoder, CLIP's text tower) are dropped by name; any other key that
does not fit is an error naming it, and `load_strict` then names the missing ones.

Formats:
- DINOv2: hub `dinov2_vit{s,b,l,g}14[_reg4]_pretrain.pth`, or a Hugging Face `facebook/dinov2-*`
  export (`Dinov2Model` / `Dinov2WithRegistersModel`, either transformers naming scheme).
- DINOv1: `dino_vit{small,base}{8,16}_pretrain.pth`, or a full checkpoint's `teacher` entry.
- MoCo v3: `vit-{s,b,l}-300ep.pth.tar` (`state_dict`, `module.base_encoder.` prefix).
- MAE: `mae_pretrain_vit_{base,large,huge}.pth` (`model` entry).
- I-JEPA: `IN1K-vit.h.14-300e.pth.tar` (`encoder` entry, `module.` prefix), as REPA loads it.
- CLIP: OpenAI `ViT-L-14.pt` (a TorchScript archive, read for its tensors
  only by `repae.torchscript_archive`, never run; or its state dict), `visual.*` keys; or a
  Hugging Face `openai/clip-vit-large-patch14` export (`vision_model.*`).
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Callable, Dict, Iterable, List

import torch

from repae.models.vit import pos_embed_grid
from repae.torchscript_archive import is_torchscript_archive, read_torchscript_state
from repae.weights import CheckpointError, StateDict, check_state_dict, read_file

# ------------------------------------------------------------------------ reading


def read_encoder_file(path: Path) -> dict:
    """A weight file (torch pickle, safetensors, TorchScript archive) or a Hugging Face
    directory (model.safetensors / pytorch_model.bin) -> the dict it holds."""
    if path.is_dir():
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (path / name).is_file():
                return read_file(path / name)
        raise CheckpointError(f"{path} is a directory without model.safetensors or pytorch_model.bin")
    if is_torchscript_archive(path):
        # OpenAI's CLIP files are TorchScript archives. torch.jit.load would compile and run the
        # archive's code (a crafted __setstate__ runs on load), so only its tensors are read.
        return read_torchscript_state(path)
    return read_file(path)


def _entry(obj: dict, names: Iterable[str], source: str) -> dict:
    """The state dict inside a training checkpoint (first entry of `names` present), or obj itself;
    CheckpointError unless it maps names to tensors (a file may hold anything)."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{source} holds a {type(obj).__name__}, not a state dict or checkpoint")
    for name in names:
        if name in obj and isinstance(obj[name], dict):
            return check_state_dict(obj[name], f"{source}[{name!r}]")
    if any(isinstance(v, torch.Tensor) for v in obj.values()):
        return check_state_dict(obj, source)
    found = sorted(str(k)[:40] for k in obj)[:10]
    raise CheckpointError(f"{source}: expected a state dict or one of the entries {list(names)}, found {found}")


def _cat(state: dict, keys: List[str], source: str) -> torch.Tensor:
    """The fused tensor of separately stored parts (q/k/v, gate/up): CheckpointError naming a
    missing part or parts that do not stack."""
    missing = [k for k in keys if k not in state]
    if missing:
        raise CheckpointError(f"{source}: has {keys[0]} but not {', '.join(missing)}, which is fused with it")
    try:
        return torch.cat([state[k] for k in keys])
    except RuntimeError as err:
        shapes = ", ".join(f"{k} {tuple(state[k].shape)}" for k in keys)
        raise CheckpointError(f"{source}: cannot fuse {shapes} ({str(err).splitlines()[0][:120]})") from None


def _strip(state: dict, prefix: str) -> dict:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


def _drop(state: dict, patterns: List[str]) -> dict:
    """Remove keys the features never use (heads, decoders, text towers), by regex."""
    return {k: v for k, v in state.items() if not any(re.match(p, k) for p in patterns)}


# ------------------------------------------------------------------------ DINOv2

_HF_LAYER_RENAMES = [  # (old transformers name | transformers>=5 name) -> hub name
    ("attention.output.dense", "attn.proj"), ("attention.o_proj", "attn.proj"),
    ("layer_scale1.lambda1", "ls1.gamma"), ("layer_scale2.lambda1", "ls2.gamma"),
    ("mlp.weights_in", "mlp.w12"), ("mlp.weights_out", "mlp.w3"), ("mlp.down_proj", "mlp.w3"),
]
_HF_FUSED = {  # hub name -> parts to concatenate, in either naming scheme
    "attn.qkv": (["attention.attention.query", "attention.attention.key", "attention.attention.value"],
                 ["attention.q_proj", "attention.k_proj", "attention.v_proj"]),
    "mlp.w12": (["mlp.gate_proj", "mlp.up_proj"],),
}


def hf_dinov2_to_hub(state: dict, source: str = "state dict") -> dict:
    """Hugging Face `Dinov2Model` / `Dinov2WithRegistersModel` state dict (either transformers
    naming scheme) -> DINOv2 hub layout (fused qkv and SwiGLU w12, ls*.gamma, blocks.N). A layer
    key without a layer number is kept as it is, for load_strict to name."""
    state = {k.removeprefix("dinov2."): v for k, v in state.items()}
    embed = {"embeddings.cls_token": "cls_token", "embeddings.mask_token": "mask_token",
             "embeddings.position_embeddings": "pos_embed", "embeddings.register_tokens": "register_tokens",
             "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
             "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
             "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias"}
    out = {embed[k]: v for k, v in state.items() if k in embed}
    fused_parts = {p for schemes in _HF_FUSED.values() for scheme in schemes for p in scheme}
    layers: Dict[int, List[str]] = {}  # layer -> its keys, in one pass (a file may hold many layers)
    for key in state:
        m = re.match(r"encoder\.layer\.(0|[1-9]\d{0,5})\.", key)
        if m:
            layers.setdefault(int(m.group(1)), []).append(key)
        elif key.startswith("encoder.layer."):
            out[key] = state[key]
    for i in sorted(layers):
        prefix = f"encoder.layer.{i}."
        for key in layers[i]:
            value, rest = state[key], key[len(prefix):]
            if rest.rsplit(".", 1)[0] in fused_parts:
                continue
            for old, new in _HF_LAYER_RENAMES:
                rest = rest.replace(old, new)
            out[f"blocks.{i}.{rest}"] = value
        for hub, schemes in _HF_FUSED.items():
            for scheme in schemes:
                if f"{prefix}{scheme[0]}.weight" in state:
                    for part in ("weight", "bias"):
                        out[f"blocks.{i}.{hub}.{part}"] = _cat(state, [f"{prefix}{n}.{part}" for n in scheme],
                                                               source)
    return out


def convert_dinov2(obj: dict, source: str) -> StateDict:
    state = _entry(obj, ["teacher", "model"], source)
    state = _strip(_strip(state, "module."), "backbone.")
    if any(k.startswith(("embeddings.", "dinov2.embeddings.")) for k in state):
        state = hf_dinov2_to_hub(_drop(state, [r"(dinov2\.)?pooler\.", r"classifier\."]), source)
    return _drop(state, [r"head\.", r"dino_head\.", r"ibot_head\."])


# ------------------------------------------------------------- DINOv1, MAE, I-JEPA


def convert_dinov1(obj: dict, source: str) -> StateDict:
    state = _strip(_strip(_entry(obj, ["teacher"], source), "module."), "backbone.")
    return _drop(state, [r"head\."])


def convert_mae(obj: dict, source: str) -> StateDict:
    # MAE's visualisation checkpoints also hold the decoder; its mask_token belongs to the decoder
    state = _entry(obj, ["model"], source)
    return _drop(state, [r"decoder", r"mask_token$", r"head\.", r"fc_norm\."])


def convert_ijepa(obj: dict, source: str) -> StateDict:
    # REPA aligns to the context `encoder` entry of the I-JEPA checkpoint (not `target_encoder`)
    return _strip(_entry(obj, ["encoder"], source), "module.")


# ------------------------------------------------------------------------ MoCo v3

# The MoCo v3 ViT-L checkpoint misnames four keys; REPA renames them the same way.
_MOCOV3_FIXES = [("blocks.13.norm13", "blocks.13.norm1"), ("blocks.13.mlp.fc13", "blocks.13.mlp.fc1"),
                 ("blocks.14.norm14", "blocks.14.norm2"), ("blocks.14.mlp.fc14", "blocks.14.mlp.fc2")]


def convert_mocov3(obj: dict, source: str) -> StateDict:
    state = _entry(obj, ["state_dict"], source)
    prefix = "module.base_encoder."
    if any(k.startswith(prefix) for k in state):  # training checkpoint: keep the base encoder only
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    out = {}
    for key, value in state.items():
        for old, new in _MOCOV3_FIXES:
            key = key.replace(old, new)
        out[key] = value
    return _drop(out, [r"head\.", r"fc\."])


# ------------------------------------------------------------------------ CLIP


def convert_clip(obj: dict, source: str) -> StateDict:
    """OpenAI CLIP (`visual.*` or a bare visual tower) or HF CLIP (`vision_model.*`) -> our layout."""
    state = _entry(obj, ["state_dict", "model"], source)
    if any(k.startswith("vision_model.") for k in state):  # CLIPModel: keep the vision tower
        state = _strip({k: v for k, v in state.items() if k.startswith("vision_model.")}, "vision_model.")
    if "embeddings.patch_embedding.weight" in state:  # Hugging Face naming
        return _hf_clip(state, source)
    if any(k.startswith("visual.") for k in state):
        state = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    state = _drop(state, [r"proj$"])  # the image-text projection
    names = {"conv1.weight": "patch_embed.proj.weight", "ln_pre.weight": "norm_pre.weight",
             "ln_pre.bias": "norm_pre.bias", "ln_post.weight": "norm.weight", "ln_post.bias": "norm.bias"}
    out: Dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key == "class_embedding":
            out["cls_token"] = value.reshape(1, 1, -1)
        elif key == "positional_embedding":
            out["pos_embed"] = value.unsqueeze(0)
        elif key in names:
            out[names[key]] = value
        else:
            m = re.match(r"transformer\.resblocks\.(\d+)\.(.*)", key)
            rest = m.group(2) if m else key
            for old, new in [("attn.in_proj_", "attn.qkv."), ("attn.out_proj", "attn.proj"), ("ln_1", "norm1"),
                             ("ln_2", "norm2"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")]:
                rest = rest.replace(old, new)
            out[f"blocks.{m.group(1)}.{rest}" if m else key] = value
    return out


def _hf_clip(state: dict, source: str = "state dict") -> StateDict:
    names = {"embeddings.class_embedding": "cls_token", "embeddings.patch_embedding.weight": "patch_embed.proj.weight",
             "embeddings.position_embedding.weight": "pos_embed", "pre_layrnorm.weight": "norm_pre.weight",
             "pre_layrnorm.bias": "norm_pre.bias", "post_layernorm.weight": "norm.weight",
             "post_layernorm.bias": "norm.bias"}
    out: Dict[str, torch.Tensor] = {}
    for key, value in _drop(state, [r"embeddings\.position_ids$"]).items():
        if key in names:
            out[names[key]] = value.reshape(1, 1, -1) if key.endswith("class_embedding") else (
                value.unsqueeze(0) if key.endswith("position_embedding.weight") else value)
            continue
        m = re.match(r"encoder\.layers\.(\d+)\.(.*)", key)
        if not m:
            out[key] = value  # unknown: left for load_strict to name
            continue
        i, rest = m.group(1), m.group(2)
        if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
            continue  # fused below
        for old, new in [("self_attn.out_proj", "attn.proj"), ("layer_norm1", "norm1"), ("layer_norm2", "norm2")]:
            rest = rest.replace(old, new)
        out[f"blocks.{i}.{rest}"] = value
    layers = {int(m.group(1)) for k in state for m in [re.match(r"encoder\.layers\.(\d{1,6})\.", k)] if m}
    for i in layers:
        for part in ("weight", "bias"):
            out[f"blocks.{i}.attn.qkv.{part}"] = _cat(
                state, [f"encoder.layers.{i}.self_attn.{p}.{part}" for p in ("q_proj", "k_proj", "v_proj")], source)
    return out


def _checked(convert: Callable[[dict, str], StateDict], num_prefix: int = 1) -> Callable[[dict, str], StateDict]:
    """`convert`, then the position embedding it yields checked (shape, square grid, bounded size)
    before anyone resamples it: CheckpointError naming the file otherwise."""
    @functools.wraps(convert)
    def run(obj: dict, source: str) -> StateDict:
        state = convert(obj, source)
        if "pos_embed" in state:
            try:
                pos_embed_grid(state["pos_embed"], num_prefix)
            except ValueError as err:
                raise CheckpointError(f"{source}: {err}") from None
        return state
    return run


CONVERTERS: Dict[str, Callable[[dict, str], StateDict]] = {
    "dinov2": _checked(convert_dinov2), "dinov1": _checked(convert_dinov1), "mocov3": _checked(convert_mocov3),
    "mae": _checked(convert_mae), "jepa": _checked(convert_ijepa, num_prefix=0),  # I-JEPA has no class token
    "clip": _checked(convert_clip),
}

